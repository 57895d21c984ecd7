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
import os
from typing import Any

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


def dequantize_4bit(weight: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A bitsandbytes ``Params4bit`` weight as a dense tensor in ``dtype`` (default: its quant_state's dtype),
    the module left as it is.

    On CUDA (or the CPU under TRITON_INTERPRET=1) the standard layout goes through our Triton kernel
    (:mod:`cpt_plugin.kernels.nf4`): one launch, nested absmax included, written in ``dtype`` directly
    (bitsandbytes runs two kernels for a nested absmax, and a cast would be a third pass). Anything it does
    not read takes bitsandbytes' path, then one cast if ``dtype`` differs.

    Why not bitsandbytes' ``dequantize_4bit`` alone (nor PEFT's ``dequantize_module_weight``, which calls
    it): on a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit weight for its CPU kernel at the
    first forward in eval mode without gradients (``quant_state.packing_format_for_cpu``: the 4-bit codes
    reordered in blocks of 32 rows, absmax un-nested, transposed and in bf16), and ``dequantize_4bit`` then
    reads that layout as the usual one: a QLoRA run that had generated samples or evaluated was exported
    as noise (logits 75% off). Its own inverse re-quantizes absmax and changes the module, so the packed
    layout is read here instead, exactly as the CPU kernel reads it: code value x block absmax.
    """
    import bitsandbytes.functional as bnb_functional

    from cpt_plugin.kernels.nf4 import dequantize_4bit_checked

    state = weight.quant_state
    out_dtype = dtype or state.dtype
    if not getattr(state, "packing_format_for_cpu", False):
        packed = weight.data
        if _triton_reads(packed, state, out_dtype):
            return dequantize_4bit_checked(packed, state, out_dtype)
        full = bnb_functional.dequantize_4bit(packed, state)
        return full if full.dtype == out_dtype else full.to(out_dtype)
    rows, cols = state.shape
    packed = weight.data.reshape(-1, 32)
    codes = torch.cat([packed & 0xF, packed >> 4], dim=-1)  # 32 low nibbles, then 32 high ones
    codes = codes.reshape(rows // 32, cols // 2, 32, 2).transpose(1, 2).reshape(rows, cols)
    values = state.code.to(torch.float32)[codes.long()].reshape(
        rows, cols // state.blocksize, state.blocksize
    )
    absmax = state.absmax.to(torch.float32).T.reshape(rows, cols // state.blocksize, 1)
    full = (values * absmax).reshape(rows, cols).to(state.dtype)
    return full if full.dtype == out_dtype else full.to(out_dtype)


def _triton_reads(packed: torch.Tensor, state: Any, dtype: torch.dtype) -> bool:
    """Whether the Triton kernel takes this weight. Not the (1, n) packed form: bitsandbytes transposes its
    output for that one (a backward-compatibility shim), which the old path keeps."""
    from cpt_plugin.kernels.nf4 import unsupported_reason

    if packed.dim() == 2 and packed.shape[0] == 1 and packed.shape[1] > 1:
        return False
    # the answer for this weight's memory and dtype, kept on its quant state: the checks are the larger
    # host cost of a dequantization, which a QLoRA step makes hundreds of times
    key = (dtype, packed.data_ptr(), packed.device, packed.shape, os.environ.get("TRITON_INTERPRET"))
    cached = state.__dict__.get("_cpt_triton_reads")
    if cached is not None and cached[0] == key:
        return cached[1]
    reads = unsupported_reason(packed, state, dtype) is None
    state.__dict__["_cpt_triton_reads"] = (key, reads)
    return reads
