"""bitsandbytes 4-bit (NF4/FP4) weights dequantized by one Triton kernel, and a PyTorch reference.

bitsandbytes' standard layout (what ``quantize_4bit`` returns on CUDA and on the CPU, before the CPU
kernel's repacking): the weight flattened row-major, two 4-bit codes per byte, the *high* nibble first
(element ``2i`` is ``byte[i] >> 4``, element ``2i + 1`` is ``byte[i] & 0xF``), one absmax per
``blocksize`` consecutive elements (the last block may be partial). An element is
``code[c] * absmax[block]`` computed in fp32, then cast once to the output dtype.

With double quantization (``quant_state.nested``) absmax is uint8 codes into ``state2.code`` (256 values)
with one fp32 scale per ``state2.blocksize`` (256) blocks, plus ``quant_state.offset``; bitsandbytes
computes ``(code2[q] * absmax2[block // 256]) + offset`` in fp32, the product rounded before the add.
Its dequantization runs that as a kernel of its own; here it is recomputed inside the 4-bit kernel (a few
blocks per program), so the whole weight is one launch straight into the compute dtype. The kernel is
compiled without fp fusion: an fma rounds that product and sum once, not twice (on an H200 3.6M of the
58.7M fp32 elements of a 14336×4096 weight then differed from bitsandbytes').

Checked bit-exact against bitsandbytes 0.50.2's CUDA kernels (H200, bf16 and fp32 output, NF4 and FP4,
nested or not, every block size, Mistral-7B shapes and odd ones) and against its CPU build in all three
output dtypes. bitsandbytes rounds the same fp32 product once into its output dtype; its output in
``quant_state.dtype`` cast to another dtype afterwards (fp16 -> bf16, say) is rounded twice and can be
one unit in the last place away from this. Its native CPU ``dequantize_4bit`` (AVX512) misreads its own
layout when a row's length is not a multiple of the block size (a 64×112 weight came back with 3x the
quantization error); its CUDA kernel and its pure-PyTorch backend agree with this one there.
"""

from __future__ import annotations

import functools
from math import prod
from typing import Any

import torch
import triton
import triton.language as tl

from cpt_plugin.kernels._utils import cast_rn, use_triton

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' quantize_4bit accepts
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Launch knobs: packed bytes per program (rounded to a power-of-two count of blocks) and warps: 4 KiB in,
# 16 KiB of bf16 out per program of 128 threads was among the best of 1-16 KiB x 2-16 warps on an H200 (43 us,
# 3.4 TB/s, for a 14336×4096 weight). The interpreter pays per operation: there, much bigger programs.
_TARGET_BYTES = 4096
_INTERPRETER_TARGET_BYTES = 1 << 17
_NUM_WARPS = 4


def _as_bytes(packed: torch.Tensor) -> torch.Tensor:
    """The packed codes as a flat uint8 tensor (bitsandbytes may store them in another dtype: quant_storage)."""
    flat = packed.reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def _absmax_fp32(quant_state: Any) -> torch.Tensor:
    """One fp32 scale per block; the nested case exactly as bitsandbytes computes it."""
    if not quant_state.nested:
        return quant_state.absmax.to(torch.float32)
    state2 = quant_state.state2
    n_blocks = quant_state.absmax.numel()
    scale2 = state2.absmax.to(torch.float32).repeat_interleave(state2.blocksize)[:n_blocks]
    absmax = state2.code.to(torch.float32)[quant_state.absmax.reshape(-1).long()] * scale2
    return absmax + _offset_tensor(quant_state.offset, absmax.device)


def _offset_tensor(offset: Any, device: torch.device) -> torch.Tensor:
    if isinstance(offset, torch.Tensor):
        return offset.to(device=device, dtype=torch.float32).reshape(1)
    return torch.tensor([float(offset)], dtype=torch.float32, device=device)


def dequantize_4bit_reference(packed: torch.Tensor, quant_state: Any, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight of ``quant_state.shape`` in ``dtype``: the kernel's math in plain PyTorch."""
    shape = tuple(quant_state.shape)
    n = prod(shape)
    data = _as_bytes(packed)
    codes = torch.stack([data >> 4, data & 0xF], dim=-1).reshape(-1)[:n]
    values = quant_state.code.to(torch.float32)[codes.long()]
    absmax = _absmax_fp32(quant_state).repeat_interleave(quant_state.blocksize)[:n]
    return (values * absmax).to(dtype).reshape(shape)


def unsupported_reason(packed: torch.Tensor, quant_state: Any, dtype: torch.dtype) -> str | None:
    """Why the kernel cannot dequantize this weight (None when it can): layout, block size, dtypes."""
    if getattr(quant_state, "packing_format_for_cpu", False):
        return "bitsandbytes' CPU-repacked layout"
    if quant_state.blocksize not in BLOCKSIZES:
        return f"blocksize {quant_state.blocksize}"
    if dtype not in OUT_DTYPES:
        return f"output dtype {dtype}"
    if quant_state.code.numel() != 16:
        return f"a code table of {quant_state.code.numel()} values"
    if not packed.is_contiguous():
        return "non-contiguous packed codes"
    n = prod(quant_state.shape)
    if packed.numel() * packed.element_size() != (n + 1) // 2:
        return f"{packed.numel() * packed.element_size()} packed bytes for {n} elements"
    n_blocks = triton.cdiv(n, quant_state.blocksize)
    if quant_state.absmax.numel() != n_blocks:
        return f"{quant_state.absmax.numel()} absmax values for {n_blocks} blocks"
    tensors = [packed, quant_state.code, quant_state.absmax]
    if quant_state.nested:
        state2 = quant_state.state2
        if quant_state.absmax.dtype != torch.uint8 or state2.code.numel() != 256:
            return "a nested absmax that is not 8-bit codes"
        if state2.absmax.dtype != torch.float32 or state2.dtype != torch.float32:
            return "a nested absmax not dequantized in fp32"
        if state2.blocksize <= 0 or state2.absmax.numel() != triton.cdiv(n_blocks, state2.blocksize):
            return "a nested absmax whose scales do not match its blocks"
        tensors += [state2.code, state2.absmax]
    elif not quant_state.absmax.is_floating_point():
        return f"absmax of dtype {quant_state.absmax.dtype}"
    if len({t.device for t in tensors}) != 1:
        return "tensors on several devices"
    if not use_triton(*tensors):
        return "no CUDA device and no TRITON_INTERPRET"
    return None


@triton.jit
def _dequantize_4bit_kernel(
    PACKED,
    CODE,
    ABSMAX,
    ABSMAX2,
    CODE2,
    OFFSET,
    OUT,
    n_elements,
    n_bytes,
    n_blocks,
    blocksize2,
    NESTED: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
):
    """Each program expands BLOCKS_PER_PROGRAM whole quantization blocks: a [blocks, blocksize / 2] tile of
    bytes (one contiguous, vectorized load), its absmax vector, and a [blocks, blocksize] tile out."""
    HALF: tl.constexpr = BLOCKSIZE // 2
    first = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROGRAM
    blocks = tl.arange(0, BLOCKS_PER_PROGRAM)
    block_mask = blocks < n_blocks - first
    if NESTED:
        q = tl.load(ABSMAX + first + blocks, mask=block_mask, other=0).to(tl.int32)
        scale2 = tl.load(ABSMAX2 + (first + blocks) // blocksize2, mask=block_mask, other=0.0)
        absmax = tl.load(CODE2 + q) * scale2 + tl.load(OFFSET)
    else:
        absmax = tl.load(ABSMAX + first + blocks, mask=block_mask, other=0.0).to(tl.float32)
    byte_offs = blocks[:, None] * HALF + tl.arange(0, HALF)[None, :]
    data = tl.load(PACKED + first * HALF + byte_offs, mask=byte_offs < n_bytes - first * HALF, other=0)
    data = data.to(tl.int32)
    high = tl.load(CODE + (data >> 4)) * absmax[:, None]
    low = tl.load(CODE + (data & 0xF)) * absmax[:, None]
    values = tl.interleave(high, low)  # [blocks, BLOCKSIZE]: element 2i from the high nibble of byte i
    out_offs = blocks[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(
        OUT + first * BLOCKSIZE + out_offs,
        cast_rn(values, OUT.dtype.element_ty),
        mask=out_offs < n_elements - first * BLOCKSIZE,
    )


@functools.lru_cache(maxsize=32)
def _blocks_per_program(blocksize: int, device_type: str) -> int:
    """Whole quantization blocks per program: a power of two (tl.arange) near the byte target."""
    target = _TARGET_BYTES if device_type == "cuda" else _INTERPRETER_TARGET_BYTES
    return 1 << (max(1, target // (blocksize // 2)).bit_length() - 1)


def dequantize_4bit_triton(packed: torch.Tensor, quant_state: Any, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight of ``quant_state.shape`` in ``dtype``, in one kernel launch (nested absmax too).

    ``packed`` in bitsandbytes' standard layout (``Params4bit.data``); raises ValueError for what the kernel
    does not read (see :func:`unsupported_reason`): callers that may meet those check first.
    """
    reason = unsupported_reason(packed, quant_state, dtype)
    if reason is not None:
        raise ValueError(f"dequantize_4bit_triton cannot read this weight: {reason}")
    return dequantize_4bit_checked(packed, quant_state, dtype)


def dequantize_4bit_checked(packed: torch.Tensor, quant_state: Any, dtype: torch.dtype) -> torch.Tensor:
    """:func:`dequantize_4bit_triton` for a weight whose :func:`unsupported_reason` the caller has seen be
    None (the checks cost more host time than the launch, and a QLoRA step makes hundreds of these calls)."""
    shape = tuple(quant_state.shape)
    n = prod(shape)
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    if n == 0:
        return out
    blocksize = int(quant_state.blocksize)
    n_blocks = quant_state.absmax.numel()
    per_program = _blocks_per_program(blocksize, packed.device.type)
    code = quant_state.code if quant_state.code.dtype == torch.float32 else quant_state.code.float()
    if quant_state.nested:
        state2 = quant_state.state2
        code2 = state2.code if state2.code.dtype == torch.float32 else state2.code.float()
        absmax2, blocksize2 = state2.absmax, int(state2.blocksize)
        offset = _offset_tensor(quant_state.offset, packed.device)
    else:
        code2 = absmax2 = offset = code  # unread
        blocksize2 = 1
    _dequantize_4bit_kernel[(triton.cdiv(n_blocks, per_program),)](
        _as_bytes(packed),
        code,
        quant_state.absmax,
        absmax2,
        code2,
        offset,
        out,
        n,
        (n + 1) // 2,
        n_blocks,
        blocksize2,
        NESTED=bool(quant_state.nested),
        BLOCKSIZE=blocksize,
        BLOCKS_PER_PROGRAM=per_program,
        num_warps=_NUM_WARPS,
        enable_fp_fusion=False,  # the nested scale is a rounded product plus offset, as in bitsandbytes
    )
    return out
