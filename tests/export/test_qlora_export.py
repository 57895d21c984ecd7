"""QLoRA export (issue 11): a run on a bitsandbytes NF4 base leaves as a merged 16-bit model (the base
dequantized, the LoRA merged into it) and as GGUF f16, both computing the adapter model's logits.

Why the dequantized base and not the original 16-bit weights: the adapter was trained against the NF4
base, so only ``dequantize(NF4(W)) + BA`` is the model that was trained and evaluated; merging into ``W``
gives a model that nobody measured (it differs from the adapter model by the quantization error, far
above bf16 noise; the last test shows by how much).

Bounds (relative L2 error of the logits on random ids): BF16_BOUND as in test_merge.py (bf16 noise of
one rounding of the merged weights, ~1% measured), GGUF f16 as in test_gguf.py's read-back.
"""

from __future__ import annotations

import json

import pytest
import torch

from cpt_plugin import CPTConfig, setup_model
from cpt_plugin.export import merge
from tests.export.helpers import byte_bpe_tokenizer, relative_error

bnb = pytest.importorskip("bitsandbytes")

BF16_BOUND = 2e-2
VOCAB = 300


def _quantization():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny bf16 Llama on disk; hidden states wider than NF4's 64-value blocks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("qlora-base")
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    byte_bpe_tokenizer().save_pretrained(path)
    return path


def _qlora_model(base_dir):
    """The QLoRA set-up as the CLI makes it (NF4 base, prepare_kbit_model, setup_model), LoRA B and the
    trained embedding copy moved off their init."""
    from transformers import AutoModelForCausalLM

    from cpt_plugin.quantized import prepare_kbit_model

    model = AutoModelForCausalLM.from_pretrained(
        str(base_dir), quantization_config=_quantization(), dtype=torch.bfloat16
    )
    model = setup_model(prepare_kbit_model(model), CPTConfig(lora_r=8, max_seq_length=64, log_metrics=False))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
            elif param.requires_grad:
                param.add_(0.02 * torch.randn(param.shape, generator=generator).to(param.dtype))
    return model.eval()


@pytest.fixture(scope="module")
def qlora(base_dir, tmp_path_factory):
    """The QLoRA model, its logits on fixed ids, and its in-memory merged export."""
    model = _qlora_model(base_dir)
    assert isinstance(model.base_model.model.model.layers[0].mlp.up_proj.base_layer, bnb.nn.Linear4bit)
    ids = torch.randint(0, 290, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(input_ids=ids).logits.float()
    state = model.base_model.model.get_submodule("model.layers.0.mlp.up_proj").base_layer.weight.quant_state
    model.packed_before_export = getattr(state, "packing_format_for_cpu", False)  # AVX512-BF16 CPUs
    out = merge(model, tmp_path_factory.mktemp("qlora-out") / "merged", tokenizer=byte_bpe_tokenizer())
    return model, ids, want, out


def _load_plain(directory):
    from transformers import AutoModelForCausalLM

    from cpt_plugin.patching.registry import unpatch

    unpatch()
    return AutoModelForCausalLM.from_pretrained(str(directory)).eval()


def test_merged_16_bit_from_a_4bit_run_computes_the_adapter_logits(qlora):
    model, ids, want, out = qlora
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert config["tie_word_embeddings"]
    loaded = _load_plain(out)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert not any(type(m).__name__ == "Linear4bit" for m in loaded.modules())
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    assert relative_error(got, want) < BF16_BOUND


def _canonical_dequantized(base_dir, name: str) -> torch.Tensor:
    """bitsandbytes' own dequantization of a freshly loaded NF4 layer (no forward yet: the usual layout)."""
    import bitsandbytes.functional as bnb_functional
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(
        str(base_dir), quantization_config=_quantization(), dtype=torch.bfloat16
    )
    weight = fresh.get_submodule(name).weight
    assert not getattr(weight.quant_state, "packing_format_for_cpu", False)
    return bnb_functional.dequantize_4bit(weight.data, weight.quant_state).float()


def test_merged_weight_is_the_dequantized_base_plus_the_lora_delta(qlora, base_dir):
    """Up to the bf16 rounding of absmax that bitsandbytes' CPU repacking does (2**-9 relative)."""
    from safetensors import safe_open

    model, _, _, out = qlora
    name = "model.layers.1.self_attn.q_proj"
    layer = model.base_model.model.get_submodule(name)
    want = _canonical_dequantized(base_dir, name) + layer.get_delta_weight("default").float()
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        got = handle.get_tensor(f"{name}.weight")
    assert relative_error(got, want) < 5e-3


def test_dequantize_reads_the_cpu_packed_layout(base_dir):
    """Was: after an eval forward on an AVX512-BF16 CPU (samples, the evaluator), bitsandbytes keeps the
    4-bit weight in its CPU-kernel layout, and the export read it as the usual one (noise)."""
    from transformers import AutoModelForCausalLM

    from cpt_plugin.quantized import dequantize_4bit

    name = "model.layers.0.mlp.down_proj"
    want = _canonical_dequantized(base_dir, name)
    layer = AutoModelForCausalLM.from_pretrained(
        str(base_dir), quantization_config=_quantization(), dtype=torch.bfloat16
    ).get_submodule(name)
    with torch.no_grad():
        layer.eval()(torch.randn(3, want.shape[1], dtype=torch.bfloat16))
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16 (or bitsandbytes no longer repacks): nothing to read")
    assert relative_error(dequantize_4bit(layer.weight), want) < 5e-3


def test_gguf_f16_of_a_4bit_run_reads_back(qlora, tmp_path):
    """The exporter's own read-back check (transformers' GGUF loader against the merged model) passes, and
    the GGUF logits are the adapter model's within the merged bound."""
    from transformers import AutoModelForCausalLM

    from cpt_plugin.export import to_gguf

    model, ids, want, out = qlora
    path = to_gguf(out, tmp_path / "model-f16.gguf", "f16")
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    assert relative_error(got, want) < BF16_BOUND


def test_merging_into_the_original_16_bit_base_would_be_off_by_the_quantization_error(qlora, base_dir):
    """Why the exporter dequantizes: the same LoRA merged into the original bf16 weights misses the
    adapter model by far more than the bf16 bound."""
    from transformers import AutoModelForCausalLM

    model, ids, want, _ = qlora
    original = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.bfloat16).eval()
    with torch.no_grad():
        state = original.state_dict()
        for name, module in model.base_model.model.named_modules():
            if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
                key = f"{name}.weight"
                if key in state:
                    state[key].add_(module.get_delta_weight("default").to(torch.bfloat16))
        got = original(input_ids=ids).logits
    assert relative_error(got, want) > 2 * BF16_BOUND


def test_qlora_adapter_directory_with_base_4bit(base_dir, tmp_path):
    """`cpt-plugin export RUN --to merged --base-4bit`: an adapter directory does not record that its run was
    QLoRA; with the switch the base is loaded as NF4 (cpt-plugin's set-up) and dequantized, so the merged model
    computes the adapter model's logits; without it, the merge into the original 16-bit weights does not."""
    from cpt_plugin.cli import main

    model = _qlora_model(base_dir)
    ids = torch.randint(0, 290, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(input_ids=ids).logits.float()
    run = tmp_path / "run"
    model.save_pretrained(run / "adapter")
    byte_bpe_tokenizer().save_pretrained(run / "adapter")
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir)
    assert main(["export", str(run), "--to", "merged", "--base-4bit"]) == 0
    saved = json.loads((run / "merged" / "config.json").read_text())
    assert "quantization_config" not in saved and saved["dtype"] == "bfloat16"
    with torch.no_grad():
        got = _load_plain(run / "merged")(input_ids=ids).logits
    assert relative_error(got, want) < BF16_BOUND
    assert main(["export", str(run), "--to", "merged", "--out", str(tmp_path / "plain")]) == 0
    with torch.no_grad():
        got = _load_plain(tmp_path / "plain")(input_ids=ids).logits
    assert relative_error(got, want) > 2 * BF16_BOUND


def test_export_leaves_the_4bit_model_as_it_was(qlora):
    """Was: taking the model's state dict made bitsandbytes undo its CPU repacking (re-quantizing absmax), so
    the model a user exported mid-run computed slightly different logits afterwards."""
    model, ids, want, _ = qlora
    if not model.packed_before_export:
        pytest.skip("this CPU has no AVX512-BF16 (or bitsandbytes no longer repacks): nothing is rewritten")
    weight = model.base_model.model.get_submodule("model.layers.0.mlp.up_proj").base_layer.weight
    assert weight.quant_state.packing_format_for_cpu
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits.float(), want)
