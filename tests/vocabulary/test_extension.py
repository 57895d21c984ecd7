"""Vocabulary extension: new tokens in the tokenizer, sound rows in the model, bad input refused before any change."""

from __future__ import annotations

import json

import pytest
import torch

from cpt_plugin import CPTConfig, CPTConfigError, add_new_tokens, learn_new_tokens
from cpt_plugin.vocabulary.fresh_rows import fresh_rows, mark_fresh_rows
from tests.export.helpers import TEXT, byte_bpe_tokenizer
from tests.tiny import tiny_llama

NEW = [" squares", " Continued"]  # each split into several old tokens


def _setup(tied: bool = True, extra_rows: int = 0):
    tokenizer = byte_bpe_tokenizer()
    model = tiny_llama(tied=tied, vocab_size=len(tokenizer) + extra_rows)
    return model, tokenizer


def _weights(model):
    return model.get_input_embeddings().weight, model.get_output_embeddings().weight


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_subtoken_mean_rows_padding_and_config(tied):
    model, tokenizer = _setup(tied)
    old_in, old_out = (w.detach().clone() for w in _weights(model))
    pieces = [tokenizer.encode(t, add_special_tokens=False) for t in NEW]
    assert all(len(p) >= 2 for p in pieces)
    ids = add_new_tokens(model, tokenizer, NEW)
    assert ids == [290, 291] and len(tokenizer) == 292
    embed, head = _weights(model)
    assert (embed is head) is tied  # tied stays tied
    assert embed.shape[0] == 320 and model.config.vocab_size == 320  # 292 padded to a multiple of 64
    torch.testing.assert_close(embed[:290], old_in)  # old rows untouched
    for token_id, piece in zip(ids, pieces, strict=True):
        torch.testing.assert_close(embed[token_id], old_in[piece].mean(0))  # mean of the pieces, by hand
        if not tied:
            torch.testing.assert_close(head[token_id], old_out[piece].mean(0))
    torch.testing.assert_close(embed[292:], old_in.mean(0).expand(28, -1))  # padding rows: the mean row
    if not tied:
        torch.testing.assert_close(head[292:], old_out.mean(0).expand(28, -1))
    assert fresh_rows(model).tolist() == [*ids, *range(292, 320)]  # new and padding rows
    for token, token_id in zip(NEW, ids, strict=True):  # one id each, and back to the text
        assert tokenizer.encode(token, add_special_tokens=False) == [token_id]
    text = "for i in range(10): squares Continued"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    with torch.no_grad():  # the resized model runs on every id
        assert model(input_ids=torch.tensor([[1, 290, 291]])).logits.shape == (1, 3, 320)


def test_mean_init_uses_trained_rows_only_and_bf16_works():
    model, tokenizer = _setup(tied=False)
    model.to(torch.bfloat16)
    mark_fresh_rows(model, [5])  # e.g. healed: not a trained row
    with torch.no_grad():
        model.get_input_embeddings().weight[5] = 100.0
    old = model.get_input_embeddings().weight.detach().float().clone()
    trained = torch.cat([old[:5], old[6:]])
    ids = add_new_tokens(model, tokenizer, NEW, init="mean")
    embed = model.get_input_embeddings().weight
    assert embed.dtype == torch.bfloat16
    for token_id in ids:
        torch.testing.assert_close(embed[token_id].float(), trained.mean(0), atol=1e-2, rtol=1e-2)
    assert fresh_rows(model).tolist() == [5, *ids, *range(292, 320)]


def test_spare_rows_are_used_and_never_shrunk():
    """A model with more rows than tokens (Qwen-style): new ids go to the spare rows, nothing is resized."""
    model, tokenizer = _setup(extra_rows=10)
    ids = add_new_tokens(model, tokenizer, NEW)
    assert ids == [290, 291] and model.get_input_embeddings().weight.shape[0] == 300
    assert model.config.vocab_size == 300


def _four_bit(tmp_path, tokenizer):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(tmp_path / "base")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantization)


def _peft(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))


@pytest.mark.parametrize(
    ("tokens", "model_kind", "message"),
    [
        ([" squares", "a"], "plain", r"'new_tokens': 'a' is already in the vocabulary \(as 'a', id \d+\)"),
        (["</s>"], "plain", r"'</s>' is already in the vocabulary \(as '</s>', id 1\)"),
        ([], "plain", r"'new_tokens': expected a non-empty list of strings, got \[\]"),
        ([" squares", " squares"], "plain", r"' squares' is listed twice\. Remove the duplicate"),
        (
            ["Stra\u00dfe"],
            "plain",
            r"'Straße' cannot be added: it decodes as 'Stra\ufffde'.*#1915; with its leading space, ' Straße', "
            r"it decodes right\). Remove it",
        ),
        ([" squares"], "4bit", r"loaded quantized.*Load it in 16-bit.*save it"),
        ([" squares"], "peft", r"already a PeftModel.*Add tokens to the base model first"),
    ],
    ids=["in-vocab", "special", "empty", "duplicate", "decodes-wrong", "quantized", "peft"],
)
def test_bad_input_is_refused_before_anything_changes(tmp_path, tokens, model_kind, message):
    tokenizer = byte_bpe_tokenizer()
    model = {
        "plain": lambda: tiny_llama(vocab_size=len(tokenizer)),
        "4bit": lambda: _four_bit(tmp_path, tokenizer),
    }
    model = _peft(tiny_llama(vocab_size=len(tokenizer))) if model_kind == "peft" else model[model_kind]()
    rows = model.get_input_embeddings().weight.shape[0]
    with pytest.raises(CPTConfigError, match=message):
        add_new_tokens(model, tokenizer, tokens)
    assert len(tokenizer) == 290 and model.get_input_embeddings().weight.shape[0] == rows
    assert fresh_rows(model) is None


def test_unknown_init_names_the_closest():
    model, tokenizer = _setup()
    with pytest.raises(
        CPTConfigError, match=r"'new_token_init': unknown init 'subtoken'\. Did you mean 'subtoken_mean'"
    ):
        add_new_tokens(model, tokenizer, NEW, init="subtoken")
    assert len(tokenizer) == 290


def test_learn_new_tokens_is_deterministic_and_saves_tokens(caplog):
    tokenizer = byte_bpe_tokenizer()
    with caplog.at_level("INFO", logger="cpt_plugin"):
        learned = learn_new_tokens(tokenizer, TEXT, 6)
    assert "learned 6 new tokens from 932 characters of text (they shorten it by about" in caplog.text
    assert learned == learn_new_tokens(byte_bpe_tokenizer(), iter(TEXT), 6)  # same input, same tokens
    assert len(learned) == len(set(learned)) == 6
    pieces = [len(tokenizer.encode(t, add_special_tokens=False)) for t in learned]
    assert all(p >= 2 for p in pieces) and all(t in "".join(TEXT) for t in learned)
    saved = ["".join(TEXT).count(t) * (p - 1) for t, p in zip(learned, pieces, strict=True)]
    assert saved == sorted(saved, reverse=True)  # the most tokens saved first
    assert learned[0] not in learn_new_tokens(tokenizer, TEXT, 6, exclude=[learned[0]])
    before = len(tokenizer(TEXT[0])["input_ids"])
    add_new_tokens(tiny_llama(vocab_size=len(tokenizer)), tokenizer, learned)
    assert len(tokenizer(TEXT[0])["input_ids"]) < before


def test_learn_more_tokens_than_the_corpus_supports():
    with pytest.raises(
        CPTConfigError,
        match=r"'extend_vocabulary': asked for 5000 new tokens, but the training "
        r"corpus supports only \d+ .*Set extend_vocabulary: \d+ or lower",
    ):
        learn_new_tokens(byte_bpe_tokenizer(), TEXT, 5000)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"new_tokens": "abc"}, r"'new_tokens': expected a non-empty list of strings"),
        ({"new_tokens": ["a", "b", "a"]}, r"'new_tokens': 'a' is listed twice"),
        ({"new_tokens": ["a", ""]}, r"'new_tokens': every token must be a non-empty string"),
        ({"extend_vocabulary": -3}, r"'extend_vocabulary': got -3"),
        ({"new_token_init": "means"}, r"'new_token_init': unknown init 'means'\. Did you mean 'mean'"),
        (
            {"extend_vocabulary": 8, "train_embeddings": False},
            r"'extend_vocabulary': adds embedding rows.*"
            r"Set train_embeddings: true",
        ),
    ],
)
def test_config_keys_are_checked(values, message):
    with pytest.raises(CPTConfigError, match=message):
        CPTConfig(**values)


def _trainer(model, tokenizer, tmp_path, config):
    from transformers import Trainer

    from cpt_plugin import CPTCallback
    from tests.tiny import RandomBlocks, training_args

    return Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=2),
        train_dataset=RandomBlocks(n=8, vocab_size=len(tokenizer)),
        processing_class=tokenizer,
        callbacks=[CPTCallback(config)],
    )


def test_trainer_callback_refuses_the_keys_and_untrained_new_rows(tmp_path):
    from cpt_plugin.integrations.hf import uninstall_trainer_hooks

    model, tokenizer = _setup()
    try:
        with pytest.raises(
            CPTConfigError,
            match=r"'new_tokens': CPTCallback cannot add tokens.*"
            r"cpt_plugin\.add_new_tokens\(model, tokenizer, new_tokens=\[\.\.\.\]\)",
        ):
            _trainer(model, tokenizer, tmp_path, {"new_tokens": [" squares"], "log_metrics": False})
        add_new_tokens(model, tokenizer, NEW)
        with pytest.raises(CPTConfigError, match=r"'train_embeddings': add_new_tokens added 2 tokens"):
            _trainer(model, tokenizer, tmp_path, {"train_embeddings": False, "log_metrics": False})
    finally:
        uninstall_trainer_hooks()


def test_extend_train_export_merged_and_gguf_reload(tmp_path):
    """Extended, trained 2 steps, saved: the adapter reloads on the resized base, the merged model and the
    GGUF file give the trained model's logits with the extended vocabulary size."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpt_plugin.export import merge, to_gguf
    from cpt_plugin.integrations.hf import uninstall_trainer_hooks

    model, tokenizer = _setup(tied=True)
    model.save_pretrained(tmp_path / "base")
    ids = add_new_tokens(model, tokenizer, NEW)
    config = {"lora_r": 4, "max_seq_length": 16, "log_metrics": False, "memory_report": False}
    try:
        trainer = _trainer(model, tokenizer, tmp_path, config)
        trainer.train_dataset.blocks[:, 3] = ids[0]  # the new tokens are seen in training
        trainer.train()
        trainer.save_model(str(tmp_path / "adapter"))
    finally:
        uninstall_trainer_hooks()
    trained = trainer.model.eval()
    sample = torch.tensor([[5, ids[0], 7, ids[1], 9]])
    with torch.no_grad():
        want = trained(input_ids=sample).logits.float()
    assert len(AutoTokenizer.from_pretrained(tmp_path / "adapter")) == 292  # the extended tokenizer is saved
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as handle:
        embedding_keys = sorted(k for k in handle.keys() if "embed_tokens" in k or "lm_head" in k)  # noqa: SIM118
    # the trained copies only (PEFT's resized-vocabulary save adds the originals and the copies once more)
    assert embedding_keys == ["base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"]
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(tmp_path / "base")
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(adapter_config))
    merged_dir = merge(tmp_path / "adapter", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert merged.config.vocab_size == 320 and merged.get_input_embeddings().weight.shape[0] == 320
    assert len(AutoTokenizer.from_pretrained(merged_dir)) == 292
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=sample).logits, want, atol=1e-4, rtol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    base.resize_token_embeddings(320, mean_resizing=False)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=sample).logits, want, atol=1e-4, rtol=1e-4)
    pytest.importorskip("gguf")
    path = to_gguf(merged_dir, tmp_path / "gguf" / "model.gguf", "f16")
    from gguf import GGUFReader

    assert len(GGUFReader(str(path)).fields["tokenizer.ggml.tokens"].data) == 320
    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    assert gguf_model.config.vocab_size == 320
    with torch.no_grad():
        got = gguf_model.eval()(input_ids=sample).logits
    assert float((got - want).norm() / want.norm()) < 2e-2  # f16 weights


def test_cli_extends_the_vocabulary_for_cpt_only(tmp_path, capsys):
    """The default job, shrunk, with extend_vocabulary: the base pretrains and is saved with the old tokenizer,
    CPT (both runs) and the held-out blocks use the extended one, the adapter saves it, export works."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpt_plugin.cli import main
    from cpt_plugin.integrations.hf import uninstall_trainer_hooks
    from tests.test_cli import SMALL

    try:
        args = ["train", "--output-dir", str(tmp_path), "--set", *SMALL, "cpt.extend_vocabulary=8"]
        assert main([*args, 'cpt.new_tokens=[" kubectl"]', "cpt.eval_every_steps=0"]) == 0
    finally:
        uninstall_trainer_hooks()
    summary = json.loads((tmp_path / "summary.json").read_text())
    vocabulary = summary["vocabulary"]
    assert vocabulary["added_tokens"] == 9 and vocabulary["tokens"][0] == " kubectl"
    assert vocabulary["embedding_rows"] == 320  # 300 + 9 padded to 64
    counts = vocabulary["new_domain_tokens"]
    assert counts["extended_tokenizer"] < counts["old_tokenizer"]
    assert set(summary["heldout_loss"]) == {"base", "CPT, replay 25%", "CPT, no replay"}
    assert "vocabulary:  9 tokens added (subtoken_mean init); the new domain's held-out text is" in (
        capsys.readouterr().out
    )
    base_tokens = len(AutoTokenizer.from_pretrained(tmp_path / "base-model"))
    assert len(AutoTokenizer.from_pretrained(tmp_path / "adapter")) == base_tokens + 9
    assert main(["export", str(tmp_path), "--to", "merged", "--out", str(tmp_path / "exported")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    assert (
        merged.config.vocab_size == 320 and len(AutoTokenizer.from_pretrained(tmp_path / "exported")) == 309
    )


def test_learn_reads_at_most_max_chars():
    """A many-GB corpus is not tokenized whole: only its first max_chars characters count."""
    text = TEXT[1]  # "The quick brown fox ..." (95 characters)

    def corpus():
        yield text * 3
        raise AssertionError("read past max_chars")

    assert learn_new_tokens(byte_bpe_tokenizer(), corpus(), 2, max_chars=len(text) * 3)
    message = rf"supports only 0 .* in its first {len(text)} characters, and found nowhere else\)\. Set "
    message += r"extend_vocabulary: 0, or give more"
    with pytest.raises(CPTConfigError, match=message):
        learn_new_tokens(byte_bpe_tokenizer(), [text * 3], 2, max_chars=len(text))


def test_learned_tokens_match_only_their_own_words():
    """An added token is matched anywhere in the raw text: " squares" would also cut " squaresq" (here its own
    word, left out) into new pieces, so it is not taken; " y" matches only itself."""
    corpus = [" squares x"] * 3 + [" squaresq y"] * 5
    tokenizer = byte_bpe_tokenizer()
    assert learn_new_tokens(tokenizer, corpus, 1, exclude=[" squaresq"]) == [" y"]
    assert learn_new_tokens(tokenizer, corpus, 1) == [" squaresq"]  # the longer word saves the most


def test_learning_needs_a_pre_tokenizer():
    tokenizer = byte_bpe_tokenizer()
    tokenizer.backend_tokenizer.pre_tokenizer = None
    with pytest.raises(CPTConfigError, match=r"has no pre-tokenizer.*List the tokens yourself in new_tokens"):
        learn_new_tokens(tokenizer, TEXT, 2)
