"""Bad input: a clear CPTConfigError before anything is written, and nothing left behind."""

from __future__ import annotations

import json
import os

import pytest
import torch

from cpt_plugin import CPTConfigError
from cpt_plugin.export import merge, to_gguf
from tests.export.helpers import VOCAB, byte_bpe_tokenizer, cpt_model


def _nothing_written(directory) -> None:
    leftovers = [p.name for p in directory.iterdir() if ".partial-" in p.name or p.name.startswith("out")]
    assert not leftovers, leftovers


@pytest.fixture(scope="module")
def merged_llama(tmp_path_factory):
    return merge(cpt_model("llama"), tmp_path_factory.mktemp("m") / "merged", tokenizer=byte_bpe_tokenizer())


def _adapter(tmp_path, base_name):
    model = cpt_model("llama")
    model.save_pretrained(tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_name
    config_path.write_text(json.dumps(config))
    return tmp_path / "adapter"


def test_adapter_whose_base_cannot_be_found(tmp_path):
    adapter = _adapter(tmp_path, "some-org/not-downloaded")
    with pytest.raises(CPTConfigError, match=r"not-downloaded.*not a local model directory.*--base PATH"):
        merge(adapter, tmp_path / "out")
    adapter = _adapter(tmp_path / "second", None)
    with pytest.raises(CPTConfigError, match=r"does not name its base model.*base=PATH"):
        merge(adapter, tmp_path / "out")
    _nothing_written(tmp_path)


def test_family_without_gguf_mapping(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB)).save_pretrained(
        tmp_path / "gpt2"
    )
    byte_bpe_tokenizer().save_pretrained(tmp_path / "gpt2")
    with pytest.raises(CPTConfigError, match=r"no GGUF mapping for model type 'gpt2'.*--to merged"):
        to_gguf(tmp_path / "gpt2", tmp_path / "out.gguf")
    _nothing_written(tmp_path)


def test_untied_gemma2_has_no_gguf_output_tensor(tmp_path):
    merged = merge(cpt_model("gemma2", tied=False), tmp_path / "merged", tokenizer=byte_bpe_tokenizer())
    with pytest.raises(CPTConfigError, match=r"untied lm_head.*no output tensor"):
        to_gguf(merged, tmp_path / "out.gguf")
    _nothing_written(tmp_path)


def test_output_path_exists_or_is_not_writable(tmp_path, merged_llama):
    (tmp_path / "taken").mkdir()
    with pytest.raises(CPTConfigError, match=r"already exists.*Choose a new path"):
        merge(cpt_model("llama"), tmp_path / "taken")
    (tmp_path / "taken.gguf").write_bytes(b"keep me")
    with pytest.raises(CPTConfigError, match=r"already exists"):
        to_gguf(merged_llama, tmp_path / "taken.gguf")
    assert (tmp_path / "taken.gguf").read_bytes() == b"keep me"
    (tmp_path / "a-file").write_text("")
    with pytest.raises(CPTConfigError, match=r"is not a writable directory"):
        merge(cpt_model("llama"), tmp_path / "a-file" / "merged")
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(CPTConfigError, match=r"is not a writable directory"):
            to_gguf(merged_llama, locked / "model.gguf")


def test_vocabulary_that_does_not_match_the_tokenizer(tmp_path, merged_llama):
    big = byte_bpe_tokenizer()
    big.add_tokens([f"<new{i}>" for i in range(VOCAB + 5 - len(big))])
    with pytest.raises(
        CPTConfigError, match=rf"{VOCAB + 5} tokens but the model's embeddings have {VOCAB} rows"
    ):
        merge(cpt_model("llama"), tmp_path / "out", tokenizer=big)
    with pytest.raises(CPTConfigError, match=r"resize_token_embeddings"):
        to_gguf(merged_llama, tmp_path / "out.gguf", tokenizer=big)
    _nothing_written(tmp_path)


def test_failed_read_back_leaves_no_file(tmp_path, merged_llama, monkeypatch):
    from cpt_plugin.export import readback

    monkeypatch.setitem(readback.TOLERANCE, "f16", 0.0)  # f16 rounds a little: above a zero bound
    with pytest.raises(CPTConfigError, match=r"read-back failed.*not kept"):
        to_gguf(merged_llama, tmp_path / "out.gguf", "f16")
    assert not list(tmp_path.iterdir())


def test_bad_outtype_and_dtype(tmp_path, merged_llama):
    with pytest.raises(CPTConfigError, match=r"q4_k.*f16, bf16, q8_0"):
        to_gguf(merged_llama, tmp_path / "out.gguf", "q4_k")
    with pytest.raises(CPTConfigError, match=r"int8.*bfloat16, float16, float32"):
        merge(cpt_model("llama"), tmp_path / "out", dtype=torch.int8)
    _nothing_written(tmp_path)
