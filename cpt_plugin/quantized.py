"""Getting a bitsandbytes 4/8-bit base ready for CPT training, without PEFT's fp32 upcast.

PEFT's ``prepare_model_for_kbit_training`` casts every parameter left in 16 bits (embeddings, norms,
lm_head) to fp32: twice their memory, and the fp32 embedding output carries the whole residual stream in
fp32, so the hidden states that checkpointing keeps double and a layer's saved activations grow (about
12% at the shapes of tests/test_quantized.py). bf16 training needs none of it: the RMSNorm and loss
kernels accumulate in fp32 inside. So the CPT path only freezes the base, keeps the 16-bit parameters in
one bf16/fp16 dtype and lets checkpointed layers see an input that requires grad.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


def is_kbit_model(model: nn.Module) -> bool:
    """True for a model loaded through bitsandbytes in 4 or 8 bits (transformers sets these flags)."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def _is_quantized_param(param: torch.Tensor) -> bool:
    # bitsandbytes' Params4bit / Int8Params, whatever their storage dtype
    return type(param).__name__ in {"Params4bit", "Int8Params"} or not param.is_floating_point()


def prepare_kbit_model(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Freezes every parameter, casts the floating-point parameters that are not quantized (embeddings,
    norms, lm_head) to ``dtype`` and makes the input embeddings' output require grad. Returns ``model``."""
    cast = 0
    for param in model.parameters():
        param.requires_grad_(False)
        if _is_quantized_param(param) or param.dtype == dtype:
            continue
        param.data = param.data.to(dtype)
        cast += 1
    if cast:
        logger.info(
            "cpt-plugin: %d non-quantized parameter tensors of the k-bit base kept in %s", cast, dtype
        )
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    return model
