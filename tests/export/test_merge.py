"""Merged 16-bit export: logits of the adapter model, the model dtype everywhere, tied stays tied."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

from cpt_plugin.export import merge
from cpt_plugin.export.merging import merged_state_dict
from tests.export.helpers import VOCAB, byte_bpe_tokenizer, cpt_model, relative_error, sample_ids
from tests.patching.models import FAMILIES

# bf16 noise: the adapter model itself is ~0.8% (relative L2) from an fp64 run on these tiny models.
BF16_BOUND = 2e-2


def _saved_tensors(directory) -> dict[str, torch.dtype]:
    found = {}
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                found[key] = handle.get_tensor(key).dtype
    return found


def _load_plain(directory):
    """Loads with transformers alone: no cpt-plugin kernels patched into the classes."""
    from transformers import AutoModelForCausalLM

    from cpt_plugin.patching.registry import unpatch

    unpatch()
    return AutoModelForCausalLM.from_pretrained(str(directory)).eval()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("family", FAMILIES)
def test_merged_model_matches_adapter_model(family, tied, tmp_path):
    model = cpt_model(family, tied)
    ids = sample_ids()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    out = merge(model, tmp_path / "merged", tokenizer=byte_bpe_tokenizer())

    saved = _saved_tensors(out)
    assert set(saved.values()) == {torch.bfloat16}, saved  # the fp32 embedding copies were cast back
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied and config["vocab_size"] == VOCAB
    assert ("lm_head.weight" in saved) is not tied  # tied: one tensor on disk
    assert not list(tmp_path.glob(".merged.partial-*"))

    loaded = _load_plain(out)
    assert loaded.dtype == torch.bfloat16
    assert (loaded.get_input_embeddings().weight is loaded.get_output_embeddings().weight) is tied
    assert loaded.get_input_embeddings().weight.shape[0] == VOCAB
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    assert relative_error(got, want) < BF16_BOUND
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_merged_weights_equal_peft_merge_and_model_is_left_alone(tied):
    model = cpt_model("llama", tied, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ours = merged_state_dict(model, torch.float32)
    reference = copy.deepcopy(model).merge_and_unload().state_dict()
    if tied:
        reference.pop("lm_head.weight")
        ours.pop("lm_head.weight", None)
    assert ours.keys() == reference.keys()
    for key, tensor in reference.items():
        torch.testing.assert_close(ours[key], tensor, rtol=1e-6, atol=1e-6, msg=key)
    after = model.state_dict()  # the adapter model still has its adapter, unmerged
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_merge_from_adapter_dir_with_resized_vocabulary(tmp_path):
    """An adapter saved from a base whose vocabulary the run grew: the base is found from
    adapter_config.json, resized to the adapter's rows, and the tokenizer beside the adapter is saved."""
    from transformers import AutoModelForCausalLM

    from cpt_plugin import CPTConfig, setup_model
    from tests.patching.models import tiny_model

    tiny_model("llama", vocab_size=VOCAB, tie_word_embeddings=False).to(torch.bfloat16).save_pretrained(
        tmp_path / "base"
    )
    tokenizer = byte_bpe_tokenizer()
    tokenizer.add_tokens([f"<domain{i}>" for i in range(VOCAB + 10 - len(tokenizer))])
    assert len(tokenizer) == VOCAB + 10
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), attn_implementation="eager")
    base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model = setup_model(base, CPTConfig(lora_r=4, trained_embeddings_dtype="float32", max_seq_length=64))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    model.eval()
    ids = torch.randint(0, len(tokenizer), (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    run = tmp_path / "run"
    model.save_pretrained(run / "checkpoint-4")
    tokenizer.save_pretrained(run / "checkpoint-4")
    assert json.loads((run / "checkpoint-4" / "adapter_config.json").read_text())["base_model_name_or_path"]

    out = merge(run, tmp_path / "merged")  # the run directory: its latest checkpoint

    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == len(tokenizer) == VOCAB + 10
    loaded = _load_plain(out)
    assert loaded.get_input_embeddings().weight.shape[0] == VOCAB + 10
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(str(out))) == VOCAB + 10
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    assert relative_error(got, want) < BF16_BOUND


def test_merge_from_adapter_dir_gives_no_future_warning_and_keeps_the_base_dtype(tmp_path):
    """Was: PeftModel.from_pretrained read transformers' deprecated is_gradient_checkpointing during the
    export's adapter reload (a FutureWarning a user cannot act on); and a bf16 base whose fp32 LoRA factors
    outnumber its weights (r=128 on this tiny model) was saved in fp32."""
    import warnings

    from transformers import AutoModelForCausalLM

    from cpt_plugin import CPTConfig, prepare_model
    from tests.patching.models import tiny_model

    tiny_model("llama", vocab_size=VOCAB).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    prepare_model(base, CPTConfig(lora_r=128, max_seq_length=64)).save_pretrained(tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        merge(tmp_path / "adapter", tmp_path / "merged")
    assert set(_saved_tensors(tmp_path / "merged").values()) == {torch.bfloat16}
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_merged_export_of_peft_trainable_tokens(tied, tmp_path):
    """A PEFT model that trains only some embedding rows (``trainable_token_indices``, tied lm_head wrapped
    by PEFT too): the merged export writes those rows into the plain weights and gives the adapter model's
    logits (before, the wrapper's keys did not match the plain model and the export stopped)."""
    from peft import LoraConfig, get_peft_model

    from tests.patching.models import tiny_model

    base = tiny_model("llama", tie_word_embeddings=tied, vocab_size=VOCAB)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"], trainable_token_indices=[3, 5, 200]
    )
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                param.add_(0.5 * torch.randn(param.shape, generator=generator))
    ids = torch.tensor([[3, 5, 200, 7, 9, 3, 11, 200]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
    out = merge(model, tmp_path / "merged", dtype=torch.float32)
    loaded = _load_plain(out)
    assert (loaded.get_input_embeddings().weight is loaded.get_output_embeddings().weight) is tied
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    assert relative_error(got, want) < 1e-5
