"""A 4-bit base loaded through transformers + bitsandbytes (on the CPU), prepared the CPT way vs PEFT's."""

from __future__ import annotations

import pytest
import torch

from cpt_plugin import CPTConfig, setup_model
from cpt_plugin.quantized import is_kbit_model, prepare_kbit_model
from tests.tiny import tiny_llama

bnb = pytest.importorskip("bitsandbytes")
VOCAB = 64


def _load_4bit(path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """Hidden states wider than the vocabulary, as in real models (so logits don't dominate activations)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny4bit")
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


def _saved_activation_bytes(model, ids) -> int:
    """Bytes of every tensor autograd keeps for backward in one forward (no checkpointing)."""
    total = 0

    def pack(tensor):
        nonlocal total
        if not isinstance(tensor, torch.nn.Parameter) and tensor.is_floating_point():
            total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids).loss.backward()
    return total


def test_prepare_kbit_model_keeps_16_bit_leftovers_and_freezes(saved_tiny):
    model = _load_4bit(saved_tiny)
    assert is_kbit_model(model) and not is_kbit_model(tiny_llama())
    assert isinstance(model.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    prepare_kbit_model(model)
    floats = [p for p in model.parameters() if type(p).__name__ != "Params4bit"]
    assert floats and all(p.dtype == torch.bfloat16 for p in floats)
    assert not any(p.requires_grad for p in model.parameters())
    ids = torch.randint(0, VOCAB, (1, 12))
    assert model.get_input_embeddings()(ids).requires_grad  # checkpointed layers get an input with grad


def test_residual_stream_stays_bf16_and_saves_less_than_peft_upcast(saved_tiny):
    """PEFT's set-up upcasts embeddings/norms to fp32, so the residual stream (and most of what backward
    keeps) goes fp32; the CPT set-up keeps it bf16 and trains the same LoRA parameters."""
    from peft import prepare_model_for_kbit_training

    config = CPTConfig(lora_r=8, train_embeddings=False, kernels=False, gradient_checkpointing="off")
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    saved, layer_input_dtypes = {}, {}
    for name, prepare in (
        ("cpt", prepare_kbit_model),
        ("peft", lambda m: prepare_model_for_kbit_training(m, use_gradient_checkpointing=False)),
    ):
        model = setup_model(prepare(_load_4bit(saved_tiny)), config)
        seen = []
        layer = model.base_model.model.model.layers[1]
        handle = layer.register_forward_pre_hook(lambda _m, args, seen=seen: seen.append(args[0].dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            saved[name] = _saved_activation_bytes(model, ids)
        handle.remove()
        layer_input_dtypes[name] = seen[0]
        lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
        assert lora_grads and all(g is not None for g in lora_grads)
        assert any(g.abs().sum() > 0 for g in lora_grads)
    assert layer_input_dtypes == {"cpt": torch.bfloat16, "peft": torch.float32}
    assert saved["cpt"] < 0.95 * saved["peft"], saved  # measured: about 12% less at these shapes


def test_pipeline_loads_4bit_with_the_cpt_preparation(saved_tiny):
    """The CLI's `model: {load_in_4bit: true}` goes through prepare_kbit_model (no fp32 copies)."""
    from cpt_plugin.cli import pipeline

    run = pipeline.RunConfig.from_dict(
        {
            "model": {"name_or_path": str(saved_tiny), "load_in_4bit": True, "dtype": "bfloat16"},
            "data": {"default_corpora": True},
            "training": {"max_steps": 1},
        }
    )
    model = pipeline._load_model(run, tokenizer=None)
    assert is_kbit_model(model)
    assert {p.dtype for p in model.parameters() if type(p).__name__ != "Params4bit"} == {torch.bfloat16}
