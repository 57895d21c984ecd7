"""Small helpers shared by the Triton kernel modules: when to launch Triton, launch-size heuristics."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernels can run: every tensor on CUDA, or the CPU interpreter is on.

    Otherwise the public functions fall back to their PyTorch reference, so CPU users never break.
    """
    if all(t.is_cuda for t in tensors):
        return True
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return interpret and all(t.device.type == "cpu" for t in tensors)


# Read when a kernel is compiled; TRITON_INTERPRET is fixed before triton is imported anyway.
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))


@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_programs_for(device: torch.device, per_sm: int = 2, cpu: int = 4) -> int:
    """How many persistent programs to launch on `device` (a few per SM; a handful on the interpreter)."""
    if device.type != "cuda":
        return cpu
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count(index) * per_sm


def warps_for(elements_per_program: int, lo: int = 4, hi: int = 16, per_warp: int = 512) -> int:
    """num_warps scaled with the number of elements one program touches (powers of two)."""
    warps = triton.next_power_of_2(max(1, elements_per_program // per_warp))
    return max(lo, min(hi, warps))


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View `x` as a 2-D [rows, last_dim] tensor whose last dim is contiguous, copying only if needed."""
    if x.dim() == 0:
        raise ValueError("expected a tensor with at least one dimension")
    if x.stride(-1) != 1:
        x = x.contiguous()
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return x.contiguous().view(-1, x.shape[-1])


@triton.jit
def cast_rn(x, dtype: tl.constexpr):
    """fp32 -> `dtype` rounding to nearest even, identically on the GPU and in the interpreter.

    The interpreter's fp32 -> bf16 cast truncates (the GPU rounds); there the bits are rounded by hand
    first so the final cast is exact and CPU tests see the GPU's numbers. Compiled kernels keep the
    native (packed) conversion.
    """
    if _INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        bits = (bits >> 16) << 16
        return bits.to(tl.float32, bitcast=True).to(dtype)
    else:
        return x.to(dtype)
