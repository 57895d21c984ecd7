"""Pre-flight checks: failures that used to come at step 1 or deep inside PEFT are errors at Trainer
construction, and legal-but-suspicious values are warned about."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)

from cpt_plugin.config import CPTConfig, CPTConfigError
from cpt_plugin.data import CPTDataset, collate_packed
from cpt_plugin.integrations.hf import CPTCallback
from cpt_plugin.optim import build_param_groups
from cpt_plugin.preflight import causal_lm_problem, check_replay, check_tokenizer_fits, embedding_rows
from cpt_plugin.recipe import prepare_model
from tests.tiny import RandomBlocks, tiny_llama


def _tokenizer(words: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer of ``words`` + 2 special tokens (no hub access)."""
    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


def _args(tmp_path, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        report_to=[],
        use_cpu=True,
        per_device_train_batch_size=2,
        save_strategy="no",
    )
    values.update(overrides)
    return TrainingArguments(**values)


def _bert() -> BertModel:
    config = BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=257
    )
    return BertModel(config)


def _llama_classifier() -> LlamaForSequenceClassification:
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=257,
        pad_token_id=0,
    )
    return LlamaForSequenceClassification(config)


# --- model kind ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "build", [_bert, _llama_classifier], ids=["BertModel", "LlamaForSequenceClassification"]
)
def test_non_causal_lm_is_a_clear_error_at_trainer_construction(tmp_path, build):
    model = build()
    with pytest.raises(CPTConfigError) as raised:
        Trainer(model=model, args=_args(tmp_path), callbacks=[CPTCallback(lora_r=4)])
    message = str(raised.value)
    assert f"{type(model).__name__} is not a causal language model" in message
    assert "AutoModelForCausalLM" in message
    assert not hasattr(model, "peft_config")  # rejected before anything changed the model


def test_causal_lm_problem_by_capability():
    assert causal_lm_problem(tiny_llama()) is None
    assert causal_lm_problem(prepare_model(tiny_llama(), CPTConfig(lora_r=2))) is None  # the PeftModel too
    assert "not a causal language model" in causal_lm_problem(_bert())


# --- tokenizer vs embedding ----------------------------------------------------------------------
def test_tokenizer_larger_than_embedding_is_an_error_naming_both_sizes(tmp_path):
    tokenizer = _tokenizer(298)  # 300 tokens; the model has 257 rows
    with pytest.raises(CPTConfigError) as raised:
        Trainer(
            model=tiny_llama(vocab_size=257),
            args=_args(tmp_path),
            train_dataset=RandomBlocks(n=4),
            processing_class=tokenizer,
            callbacks=[CPTCallback(lora_r=4)],
        )
    message = str(raised.value)
    assert "300 tokens" in message and "257 rows" in message
    assert "model.resize_token_embeddings(len(tokenizer))" in message


def test_tokenizer_that_fits_passes_also_on_the_prepared_model():
    model = prepare_model(tiny_llama(vocab_size=257), CPTConfig(lora_r=2))
    assert embedding_rows(model) == 257  # through PEFT's ModulesToSaveWrapper
    check_tokenizer_fits(model, _tokenizer(255))  # 257 tokens: fits exactly
    check_tokenizer_fits(model, None)
    with pytest.raises(CPTConfigError, match="258 tokens"):
        check_tokenizer_fits(model, _tokenizer(256))


# --- replay that the dataset would not do --------------------------------------------------------
def test_replay_ratio_with_a_plain_dataset_is_an_error(tmp_path):
    with pytest.raises(CPTConfigError) as raised:
        Trainer(
            model=tiny_llama(),
            args=_args(tmp_path),
            train_dataset=RandomBlocks(n=4),
            callbacks=[CPTCallback(lora_r=4, replay_ratio=0.3)],
        )
    message = str(raised.value)
    assert "'replay_ratio'" in message and "RandomBlocks" in message
    assert "cpt_plugin.data.CPTDataset(" in message and "replay_source=" in message


def test_replay_through_cpt_dataset_is_accepted_and_trains(tmp_path):
    tokenizer = _tokenizer(100)
    new = [" ".join(f"w{(i * 7 + j) % 100}" for j in range(40)) for i in range(8)]
    old = [" ".join(f"w{(i * 3 + j) % 100}" for j in range(40)) for i in range(8)]
    dataset = CPTDataset(new, tokenizer, 16, replay_source=old, replay_ratio=0.3)
    trainer = Trainer(
        model=tiny_llama(),
        args=_args(tmp_path),
        train_dataset=dataset,
        data_collator=collate_packed,
        processing_class=tokenizer,
        callbacks=[CPTCallback(lora_r=4, replay_ratio=0.3)],
    )
    trainer.train()
    with pytest.raises(CPTConfigError, match="the dataset's value is the one used"):
        check_replay(CPTConfig(replay_ratio=0.1), dataset)
    check_replay(CPTConfig(), RandomBlocks(n=2))  # no replay asked: any dataset


# --- legal but suspicious ------------------------------------------------------------------------
def test_embedding_lr_far_above_lora_lr_warns_with_both_values(caplog):
    model = prepare_model(tiny_llama(), CPTConfig(lora_r=2))
    with caplog.at_level("WARNING", logger="cpt_plugin"):
        build_param_groups(model, CPTConfig(lora_r=2), learning_rate=1e-4)  # default 0.1x: silent
    assert "embedding learning rate" not in caplog.text
    with caplog.at_level("WARNING", logger="cpt_plugin"):
        build_param_groups(model, CPTConfig(lora_r=2, embedding_learning_rate=0.1), learning_rate=1e-4)
    assert "embedding learning rate 0.1 is 1000x the LoRA learning rate 0.0001" in caplog.text


def test_no_embedding_lr_warning_when_embeddings_are_not_trained(caplog):
    model = prepare_model(tiny_llama(), CPTConfig(lora_r=2, train_embeddings=False))
    with caplog.at_level("WARNING", logger="cpt_plugin"):
        build_param_groups(model, CPTConfig(embedding_learning_rate=1.0), learning_rate=1e-4)
    assert "embedding learning rate" not in caplog.text
