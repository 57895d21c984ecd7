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
