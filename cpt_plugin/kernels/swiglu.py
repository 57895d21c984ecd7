"""Gated MLP activations: swiglu = silu(gate) * up, geglu = gelu_tanh(gate) * up.

Flat 1-D elementwise Triton kernels with large blocks. The backward recomputes the activation from
the saved gate instead of storing it. As in HF (``ACT2FN[...](gate) * up``), the activation is
rounded to the input dtype before the product, so outputs match HF bit for bit up to rounding of
the activation itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from cpt_plugin.kernels._utils import cast_rn, use_triton

_SQRT_2_OVER_PI = 0.7978845608028654
_GELU_COEF = 0.044715
_BLOCK = 2048
_NUM_WARPS = 8


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """HF's ACT2FN["silu"](gate) * up."""
    return F.silu(gate) * up


def geglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """HF's ACT2FN["gelu_pytorch_tanh"](gate) * up."""
    return F.gelu(gate, approximate="tanh") * up


@triton.jit
def _tanh(x):
    # tanh(x) = 2 * sigmoid(2x) - 1 (libdevice.tanh does not run in the interpreter: trap 5).
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _gelu_parts(g):
    """(gelu_tanh(g), d gelu_tanh / dg) in fp32."""
    inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
    t = _tanh(inner)
    act = 0.5 * g * (1.0 + t)
    d_inner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
    dact = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * d_inner
    return act, dact


@triton.jit
def _glu_fwd_kernel(G, U, Y, n_elements, GELU: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    if GELU:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        act = 0.5 * g * (1.0 + _tanh(inner))
    else:
        act = g * tl.sigmoid(g)
    act = cast_rn(act, Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + offs, cast_rn(act * u, Y.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(DY, G, U, DG, DU, n_elements, GELU: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    if GELU:
        act, dact = _gelu_parts(g)
    else:
        sig = tl.sigmoid(g)
        act = g * sig
        dact = sig * (1.0 + g * (1.0 - sig))
    act = cast_rn(act, DU.dtype.element_ty).to(tl.float32)
    tl.store(DU + offs, cast_rn(dy * act, DU.dtype.element_ty), mask=mask)
    tl.store(DG + offs, cast_rn(dy * u * dact, DG.dtype.element_ty), mask=mask)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.view(-1) if x.is_contiguous() else x.contiguous().view(-1)


def glu_forward(gate: torch.Tensor, up: torch.Tensor, gelu: bool) -> torch.Tensor:
    """act(gate) * up without autograd (Triton where it runs, else the reference); used by fused callers."""
    if not use_triton(gate, up):
        ref = geglu_reference if gelu else swiglu_reference
        return ref(gate, up)
    g, u = _flat(gate), _flat(up)
    y = torch.empty_like(g)
    n = g.numel()
    if n:
        _glu_fwd_kernel[(triton.cdiv(n, _BLOCK),)](g, u, y, n, GELU=gelu, BLOCK=_BLOCK, num_warps=_NUM_WARPS)
    return y.view(gate.shape)


def glu_backward(
    dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, gelu: bool, *, overwrite: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d gate, d up) of act(gate) * up for the upstream gradient ``dy``, without autograd.

    ``overwrite``: the caller no longer needs ``gate`` and ``up``, and the Triton kernel may write the
    gradients into their memory (each element is read before it is written): two tokens x intermediate
    buffers fewer at the peak of a layer's backward. The reference path (CPU) never overwrites."""
    if not use_triton(dy, gate, up):
        ref = geglu_reference if gelu else swiglu_reference
        with torch.enable_grad():
            g = gate.detach().requires_grad_(True)
            u = up.detach().requires_grad_(True)
            dg, du = torch.autograd.grad(ref(g, u), (g, u), dy)
        return dg, du
    g, u, d = _flat(gate), _flat(up), _flat(dy)
    dg, du = (g, u) if overwrite else (torch.empty_like(g), torch.empty_like(u))
    n = g.numel()
    if n:
        _glu_bwd_kernel[(triton.cdiv(n, _BLOCK),)](
            d, g, u, dg, du, n, GELU=gelu, BLOCK=_BLOCK, num_warps=_NUM_WARPS
        )
    return dg.view(gate.shape), du.view(gate.shape)


class _GLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, gelu: bool):
        ctx.save_for_backward(gate, up)
        ctx.gelu = gelu
        return glu_forward(gate, up, gelu)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        gate, up = ctx.saved_tensors
        dg, du = glu_backward(dy, gate, up, ctx.gelu)
        return dg, du, None


def _glu(gate: torch.Tensor, up: torch.Tensor, gelu: bool) -> torch.Tensor:
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    if gate.dtype != up.dtype:
        dtype = torch.promote_types(gate.dtype, up.dtype)
        gate, up = gate.to(dtype), up.to(dtype)
    return _GLUFunction.apply(gate, up, gelu)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (LlamaMLP's activation), Triton forward and backward."""
    if not use_triton(gate, up):
        return swiglu_reference(gate, up)
    return _glu(gate, up, gelu=False)


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu(gate, approximate="tanh") * up (Gemma's MLP activation), Triton forward and backward."""
    if not use_triton(gate, up):
        return geglu_reference(gate, up)
    return _glu(gate, up, gelu=True)
