"""Tiny models shared by the offload tests (imported by name: tests/ has no packages)."""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(layers: int = 2, **overrides) -> LlamaForCausalLM:
    values = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=257,
        max_position_embeddings=256,
        attn_implementation="sdpa",
    )
    values.update(overrides)
    config = LlamaConfig(**values)
    model = LlamaForCausalLM(config).float()
    model.train()
    return model


def gpu_bf16_llama(hidden: int = 256, positions: int = 4096) -> LlamaForCausalLM:
    """Two bf16 layers on the GPU with GQA (8 query heads over 4 key/value heads), for SDPA's CUDA kernels."""
    import torch

    torch.manual_seed(0)
    return tiny_llama(
        layers=2,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=positions,
    ).to("cuda", torch.bfloat16)


def assert_grads_close_in_norm(grads: dict, ref: dict, bound: float = 1e-2) -> None:
    """bf16 gradients of two computations of the same math: relative error in norm per parameter."""
    for name in ref:
        want = ref[name].float()
        error = (grads[name].float() - want).norm() / want.norm().clamp_min(1e-12)
        assert error < bound, (name, error.item())
