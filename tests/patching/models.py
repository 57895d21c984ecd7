"""Tiny random-weight models of every supported family, and loss/gradient capture helpers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 257
COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=64,
)
GEMMA = dict(head_dim=16, sliding_window=8)

CONFIGS: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "gemma2": Gemma2Config,
    "gemma3_text": Gemma3TextConfig,
}
EXTRA = {
    "qwen3": dict(head_dim=16),
    "gemma2": dict(GEMMA, final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "gemma3_text": dict(GEMMA, final_logit_softcapping=20.0),
}
FAMILIES = tuple(CONFIGS)


def tiny_config(model_type: str, **overrides) -> PretrainedConfig:
    return CONFIGS[model_type](**{**COMMON, **EXTRA.get(model_type, {}), **overrides})


def tiny_model(model_type: str, seed: int = 0, **overrides) -> nn.Module:
    """fp32, eager attention, norm weights moved off their init so the RMSNorm weight matters."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        tiny_config(model_type, **overrides), attn_implementation="eager"
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model.float()


def batch(seed: int = 1, shape: tuple[int, int] = (2, 11)) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, shape, generator=generator)
    labels = ids.clone()
    labels[0, :3] = -100  # some ignored positions
    return {"input_ids": ids, "labels": labels}


def train_step(model: nn.Module, inputs: dict, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor], Any]:
    """One training step: its loss, the gradient of every trainable parameter (then reset), its output."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1234)  # same dropout masks in both runs
    out = model(**inputs, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), grads, out


def assert_same_grads(got: dict, want: dict, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    for name in want:
        torch.testing.assert_close(
            got[name], want[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}"
        )
