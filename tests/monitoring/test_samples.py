"""Sample completions: base (adapter off) before training, trained after, streamed to the log and written."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import GenerationConfig

from cpt_plugin.config import CPTConfig, CPTConfigError
from cpt_plugin.monitoring import SampleCallback
from cpt_plugin.monitoring.samples import generate_samples
from tests.monitoring.helpers import make_trainer, word_tokenizer
from tests.tiny import tiny_llama

PROMPTS = ["w1 w2 w3", "w10 w20"]
NEW_TOKENS = 6


def greedy(model, tokenizer, prompt: str) -> str:
    """The unpatched model's greedy completion (new tokens only)."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=1, pad_token_id=1)
    with torch.no_grad():
        out = model.eval().generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_samples_before_and_after_training(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="cpt_plugin.monitoring")
    trainer = make_trainer(
        tmp_path,
        cpt={"sample_prompts": PROMPTS, "sample_max_new_tokens": NEW_TOKENS},
        learning_rate=5e-2,
        max_steps=8,
        gradient_checkpointing=True,  # the memory planner's per-layer checkpointing
    )
    trainer.train()
    out = tmp_path / "out"
    record = json.loads((out / "samples.json").read_text())
    samples = record["samples"]
    assert [s["prompt"] for s in samples] == PROMPTS and record["trained_step"] == 8
    # the base comes from disable_adapter(): the same as the untouched model's greedy output
    reference = tiny_llama(seed=0)
    tokenizer = word_tokenizer()
    assert [s["base"] for s in samples] == [greedy(reference, tokenizer, p) for p in PROMPTS]
    assert any(s["trained"] != s["base"] for s in samples)  # a high LR moved the model
    assert samples[0]["base_text"].startswith(PROMPTS[0])
    markdown = (out / "samples.md").read_text()
    assert "**base**" in markdown and "**trained**" in markdown and samples[0]["trained_text"] in markdown
    # streamed through logging, line by line
    logged = [r.getMessage() for r in caplog.records if r.name == "cpt_plugin.monitoring.samples"]
    assert logged[0].startswith("cpt-plugin samples before training (base model, greedy, 6 new tokens)")
    assert f"      | {samples[0]['base']}" in logged
    assert f"      | {samples[1]['trained']}" in logged
    # generation did not disturb training: the planner still saw the checkpointed training forwards
    from cpt_plugin.offload.planner import find_planner

    planner = find_planner(trainer.model)
    assert planner is not None and planner.tokens == 2 * 16


def test_train_mode_restored_and_base_without_adapter_effect(tmp_path):
    trainer = make_trainer(tmp_path, cpt={"sample_prompts": PROMPTS, "sample_max_new_tokens": NEW_TOKENS})
    model = trainer.model
    with torch.no_grad():  # move the adapter away from zero, so adapter on and off differ
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=1.0)
    callback = SampleCallback(PROMPTS, NEW_TOKENS)
    model.train()
    callback.on_train_begin(
        trainer.args, trainer.state, trainer.control, model=model, processing_class=word_tokenizer()
    )
    assert model.training
    assert all(m.training for m in model.modules())
    reference = tiny_llama(seed=0)
    assert [s["completion"] for s in callback.base] == [
        greedy(reference, word_tokenizer(), p) for p in PROMPTS
    ]
    with_adapter = generate_samples(model, word_tokenizer(), PROMPTS, NEW_TOKENS, base=False, emit=False)
    assert with_adapter != callback.base  # so the equality above needed the adapter switched off


def test_no_tokenizer_one_notice_and_skip(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="cpt_plugin.monitoring")
    trainer = make_trainer(tmp_path, cpt={"sample_prompts": PROMPTS, "memory_report": False}, tokenizer=None)
    trainer.train()
    notices = [r for r in caplog.records if "sample_prompts skipped" in r.getMessage()]
    assert len(notices) == 1 and notices[0].levelno == logging.INFO
    assert "processing_class" in notices[0].getMessage()
    assert not (tmp_path / "out" / "samples.json").exists()


def test_off_by_default(tmp_path):
    trainer = make_trainer(tmp_path, cpt={"memory_report": False})
    assert not any(isinstance(c, SampleCallback) for c in trainer.callback_handler.callbacks)


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"sample_prompts": []}, "sample_prompts"),
        ({"sample_prompts": ["ok", "  "]}, "sample_prompts"),
        ({"sample_prompts": [3]}, "sample_prompts"),
        ({"sample_prompts": {"a": 1}}, "sample_prompts"),
        ({"sample_max_new_tokens": 0}, "sample_max_new_tokens"),
        ({"sample_max_new_tokens": 4.5}, "sample_max_new_tokens"),
        ({"sample_max_new_tokens": True}, "sample_max_new_tokens"),
        ({"memory_report": "yes"}, "memory_report"),
    ],
)
def test_bad_values_name_the_key(values, key):
    with pytest.raises(CPTConfigError, match=f"'{key}'"):
        CPTConfig(**values)


def test_one_prompt_as_a_string():
    assert CPTConfig(sample_prompts="Once upon").sample_prompts == ["Once upon"]


@pytest.mark.gpu
def test_samples_on_cuda_with_kernels(tmp_path):
    """Generation through the patched model (kernels, fused LoRA) on a CUDA bf16 model, planner on."""
    from transformers import Trainer, TrainingArguments

    from cpt_plugin import CPTCallback
    from tests.tiny import RandomBlocks

    trainer = Trainer(
        model=tiny_llama(seed=0).to("cuda", torch.bfloat16),
        args=TrainingArguments(
            output_dir=str(tmp_path / "out"),
            max_steps=3,
            per_device_train_batch_size=2,
            learning_rate=5e-2,
            report_to=[],
            save_strategy="no",
            disable_tqdm=True,
            bf16=True,
            gradient_checkpointing=True,
        ),
        train_dataset=RandomBlocks(n=8, seed=3),
        processing_class=word_tokenizer(),
        callbacks=[CPTCallback(lora_r=4, max_seq_length=16, sample_prompts=PROMPTS, sample_max_new_tokens=4)],
    )
    trainer.train()
    record = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert all(s["base"] and s["trained"] for s in record["samples"])
    assert trainer.model.training
