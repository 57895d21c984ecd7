"""RMSNorm: Triton forward and backward and a PyTorch reference (the patchers call rms_norm from HF norms).

Two casting conventions exist in transformers and both are reproduced exactly:

* ``"llama"`` (Llama, Mistral, Qwen2/3): normalise in fp32, cast back to the input dtype, then
  ``weight * hidden`` in the promoted dtype of weight and input.
* ``"gemma"`` (Gemma 2/3): everything in fp32, ``normed * (1 + weight.float())``, cast to the input dtype.

The forward stores one fp32 ``rstd`` per row so the backward never recomputes the reduction.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from cpt_plugin.kernels._utils import as_rows, cast_rn, num_programs_for, use_triton, warps_for

CAST_MODES = ("llama", "gemma")
# Launch knobs (elements per program in forward/backward, persistent backward programs per SM).
_FWD_TARGET = 4096
_BWD_TARGET = 2048
_BWD_PER_SM = 2
_BWD_WARPS: int | None = None
_BWD_STAGES: int | None = 3  # software-pipelined row loop: +10% of copy rate on an H200


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0, cast_mode: str = "llama"
) -> torch.Tensor:
    """The HF math in plain PyTorch (LlamaRMSNorm for "llama", Gemma2/3RMSNorm for "gemma")."""
    _check_mode(cast_mode)
    input_dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if cast_mode == "gemma":
        return (h * (offset + weight.float())).to(input_dtype)
    if offset == 0.0:
        return weight * h.to(input_dtype)
    out_dtype = torch.promote_types(input_dtype, weight.dtype)
    return ((weight.float() + offset) * h.to(input_dtype).float()).to(out_dtype)


def _check_mode(cast_mode: str) -> None:
    if cast_mode not in CAST_MODES:
        raise ValueError(f"cast_mode must be one of {CAST_MODES}, got {cast_mode!r}")


@triton.jit
def _rms_norm_fwd_kernel(
    X,
    x_row_stride,
    W,
    Y,
    y_row_stride,
    RSTD,
    n_rows,
    n_cols,
    eps,
    offset,
    CAST_LLAMA: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_COLS)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    normed = x * rstd[:, None]
    if CAST_LLAMA:
        normed = cast_rn(normed, X.dtype.element_ty).to(tl.float32)
    y = normed * w[None, :]
    tl.store(Y + rows64[:, None] * y_row_stride + cols[None, :], cast_rn(y, Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY,
    dy_row_stride,
    X,
    x_row_stride,
    W,
    RSTD,
    DX,
    dx_row_stride,
    DW_PARTIAL,
    n_rows,
    n_cols,
    offset,
    rows_per_program,
    CAST_LLAMA: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """Each program walks a contiguous chunk of rows and keeps its own fp32 partial dweight."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_COLS)
    col_mask = cols < n_cols
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
    dw_acc = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for start in tl.range(row_start, row_end, BLOCK_ROWS, num_stages=NUM_STAGES):
        rows = start + tl.arange(0, BLOCK_ROWS)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64[:, None] * dy_row_stride + cols[None, :], mask=mask, other=0.0).to(
            tl.float32
        )
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        normed = x * rstd[:, None]
        if CAST_LLAMA:
            dw_acc += dy * cast_rn(normed, X.dtype.element_ty).to(tl.float32)
        else:
            dw_acc += dy * normed
        dnormed = dy * w[None, :]
        c = tl.sum(dnormed * normed, axis=1) / n_cols
        dx = (dnormed - normed * c[:, None]) * rstd[:, None]
        tl.store(
            DX + rows64[:, None] * dx_row_stride + cols[None, :], cast_rn(dx, DX.dtype.element_ty), mask=mask
        )
    tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_mask)


def _launch_shape(n_cols: int, target: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_COLS, BLOCK_ROWS, num_warps): one row per program for big rows, several for small ones.

    The interpreter pays per operation, not per element: there, fewer and bigger programs. Cached: a
    launch's host time counts (an offloaded backward waits on the host), and the shapes repeat.
    """
    return _launch_shape_for(n_cols, target, device.type)


@functools.lru_cache(maxsize=64)
def _launch_shape_for(n_cols: int, target: int, device_type: str) -> tuple[int, int, int]:
    if device_type != "cuda":
        target *= 8
    block_cols = triton.next_power_of_2(n_cols)
    block_rows = max(1, min(64, target // block_cols))
    return block_cols, block_rows, warps_for(block_rows * block_cols)


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, cast_mode: str):
        shape = x.shape
        x2 = as_rows(x)
        weight = weight.contiguous()
        n_rows, n_cols = x2.shape
        if cast_mode == "gemma":
            out_dtype = x.dtype
        else:
            out_dtype = torch.promote_types(x.dtype, weight.dtype)
        y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block_cols, block_rows, num_warps = _launch_shape(n_cols, _FWD_TARGET, x.device)
        if n_rows > 0:
            _rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_rows),)](
                x2,
                x2.stride(0),
                weight,
                y,
                y.stride(0),
                rstd,
                n_rows,
                n_cols,
                float(eps),
                float(offset),
                CAST_LLAMA=cast_mode == "llama",
                BLOCK_ROWS=block_rows,
                BLOCK_COLS=block_cols,
                num_warps=num_warps,
            )
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset = float(offset)
        ctx.cast_llama = cast_mode == "llama"
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = as_rows(dy)
        dx = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device)
        block_cols, block_rows, num_warps = _launch_shape(n_cols, _BWD_TARGET, x2.device)
        n_programs = max(1, min(num_programs_for(x2.device, per_sm=_BWD_PER_SM, cpu=2), n_rows))
        rows_per_program = triton.cdiv(max(n_rows, 1), n_programs)
        n_programs = triton.cdiv(max(n_rows, 1), rows_per_program)
        dw_partial = torch.empty((n_programs, n_cols), dtype=torch.float32, device=x2.device)
        if n_rows > 0:
            _rms_norm_bwd_kernel[(n_programs,)](
                dy2,
                dy2.stride(0),
                x2,
                x2.stride(0),
                weight,
                rstd,
                dx,
                dx.stride(0),
                dw_partial,
                n_rows,
                n_cols,
                ctx.offset,
                rows_per_program,
                CAST_LLAMA=ctx.cast_llama,
                BLOCK_ROWS=block_rows,
                BLOCK_COLS=block_cols,
                NUM_STAGES=_BWD_STAGES,
                num_warps=_BWD_WARPS or num_warps,
            )
        else:
            dw_partial.zero_()
        dweight = dw_partial.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(ctx.shape), dweight, None, None, None


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0, cast_mode: str = "llama"
) -> torch.Tensor:
    """RMSNorm over the last dim of `x` with HF's casting rules (see the module docstring).

    Triton on CUDA (or under TRITON_INTERPRET=1); the PyTorch reference elsewhere.
    """
    _check_mode(cast_mode)
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden size {x.shape[-1]}")
    if not use_triton(x, weight):
        return rms_norm_reference(x, weight, eps, offset, cast_mode)
    return _RMSNormFunction.apply(x, weight, eps, offset, cast_mode)
