"""LoRA projections computed in the activation dtype: ``y = x W^T + b + s * (x A^T) B^T``.

Why: PEFT's LoRA layers cast the 16-bit activation to the fp32 LoRA weight dtype, autocast casts it back
for each matmul, the scaled LoRA product is added in separate kernels, and backward casts the gradients
again: about 28% of a CPT step's GPU time on Llama-1B shapes went to those copies. Here:

* the fp32 LoRA factors are cast to the compute dtype once per call (``A`` as is, ``B`` pre-multiplied by
  the scale), the activation is never cast when it already has the compute dtype;
* the LoRA product is accumulated into the base output by one ``addmm`` (no separate scale or add pass);
* backward forms dX from the base and the LoRA path in one buffer (``addmm_``), and dA, dB from the
  saved 16-bit activation and the small ``x A^T`` (tokens x r), so no fp32 copy of an activation exists;
* a gated MLP (``down(act(gate(x)) * up(x))``, SwiGLU or tanh-GeGLU) is one function: it saves the input,
  the two pre-activations and three tokens x r products, and recomputes ``act(gate) * up`` in backward
  instead of keeping it.

The compute dtype is autocast's dtype when autocast is on for the input's device, else the input's dtype.
That matches PEFT under autocast (its matmuls then run in the autocast dtype too). Without autocast on a
16-bit model PEFT computes the LoRA branch in fp32; here it runs in the model's dtype.

Base weights are frozen: plain tensors, or a bitsandbytes 4-bit weight given with a ``dequantize``
callable that returns it in the compute dtype (called once per pass: in forward and again in backward,
so no dequantized copy stays alive between them). ``*_reference`` functions are the same math in plain
PyTorch autograd, for tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cpt_plugin.kernels.swiglu import geglu_reference, glu_backward, glu_forward, swiglu_reference

Dequantize = Callable[[torch.dtype], torch.Tensor]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the projections run in: autocast's when it is on for ``x``'s device, else ``x``'s."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


@dataclass(frozen=True)
class LoraProjection:
    """One LoRA projection's tensors: frozen base ``weight`` (out x in) and ``bias``, factors ``lora_a``
    (r x in) and ``lora_b`` (out x r), and the scale (``alpha / r`` or rsLoRA's ``alpha / sqrt(r)``)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scale: float
    dequantize: Dequantize | None = None  # 4-bit base: returns the weight in the requested dtype

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        return (self.weight, self.bias, self.lora_a, self.lora_b)


# ------------------------------------------------------------------------------------------------
# The building blocks: one projection forward and backward on 2-D inputs in the compute dtype.
# ------------------------------------------------------------------------------------------------
def _base_weight(weight: torch.Tensor, dequantize: Dequantize | None, dtype: torch.dtype) -> torch.Tensor:
    if dequantize is not None:
        return dequantize(dtype)
    return weight if weight.dtype == dtype else weight.to(dtype)


def _cast_factors(lora_a: torch.Tensor, lora_b: torch.Tensor, dtype: torch.dtype):
    """(A, B) in the compute dtype: the only casts of LoRA parameters in a call. The scale is applied as
    the GEMMs' ``alpha``, never as a separate multiply (each kernel launch costs host time, and the
    backward of an offloaded step waits on the host)."""
    a = lora_a if lora_a.dtype == dtype else lora_a.to(dtype)
    b = lora_b if lora_b.dtype == dtype else lora_b.to(dtype)
    return a, b


_ZEROS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _scaled_mm(m1: torch.Tensor, m2: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * (m1 @ m2)`` in one GEMM (``addmm`` with beta 0 never reads its input)."""
    if scale == 1.0:
        return torch.mm(m1, m2)
    key = (m1.device, m1.dtype)
    zero = _ZEROS.get(key)
    if zero is None:
        zero = _ZEROS[key] = torch.zeros((), device=m1.device, dtype=m1.dtype)
    return torch.addmm(zero, m1, m2, beta=0, alpha=scale)


def _project(
    x2: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
):
    """(x W^T + b + s (x A^T) B^T, x A^T) with the LoRA product accumulated into the base output."""
    xa = torch.mm(x2, a.t())
    if bias is not None:
        out = torch.addmm(bias.to(x2.dtype), x2, w.t())
    else:
        out = torch.mm(x2, w.t())
    out.addmm_(xa, b.t(), alpha=scale)
    return out, xa


def _project_backward(
    g2: torch.Tensor,
    x2: torch.Tensor,
    xa: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    dx: torch.Tensor | None,
    w: torch.Tensor | None,
    need: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of one projection: (dX accumulated into ``dx`` or new, dA, dB); ``need`` = (x, A, B).

    With u = g B (unscaled): dB = s g^T (x A^T), dA = s u^T x, dX = g W + s u A."""
    need_x, need_a, need_b = need
    grad_b = _scaled_mm(g2.t(), xa, scale) if need_b else None
    u = torch.mm(g2, b) if (need_x or need_a) else None
    grad_a = _scaled_mm(u.t(), x2, scale) if need_a else None
    if need_x:
        if dx is None:
            dx = torch.mm(g2, w)
        else:
            dx.addmm_(g2, w)
        dx.addmm_(u, a, alpha=scale)
    return dx, grad_a, grad_b


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _no_autocast(device_type: str):
    """Autocast off inside the fused functions: their operands are already in the compute dtype."""
    return torch.autocast(device_type=device_type, enabled=False)


# ------------------------------------------------------------------------------------------------
# One projection
# ------------------------------------------------------------------------------------------------
class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale, dequantize, dtype):
        x2 = _rows(x)
        if x2.dtype != dtype:
            x2 = x2.to(dtype)
        with _no_autocast(x.device.type):
            w = _base_weight(weight, dequantize, dtype)
            a, b = _cast_factors(lora_a, lora_b, dtype)
            out, xa = _project(x2, w, bias, a, b, scale)
        ctx.save_for_backward(x2, weight, a, b, xa)
        ctx.meta = (scale, dequantize, dtype, x.shape, x.dtype)
        ctx.need_bias = bias is not None and ctx.needs_input_grad[2]
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, weight, a, b, xa = ctx.saved_tensors
        scale, dequantize, dtype, x_shape, x_dtype = ctx.meta
        need_x, need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        g2 = _rows(grad_out)
        if g2.dtype != dtype:
            g2 = g2.to(dtype)
        w = _base_weight(weight, dequantize, dtype) if need_x else None
        dx, grad_a, grad_b = _project_backward(g2, x2, xa, a, b, scale, None, w, (need_x, need_a, need_b))
        grad_bias = g2.sum(0) if ctx.need_bias else None
        return (
            dx.view(x_shape).to(x_dtype) if dx is not None else None,
            None,
            grad_bias,
            grad_a,
            grad_b,
            None,
            None,
            None,
        )


def lora_linear(x: torch.Tensor, projection: LoraProjection) -> torch.Tensor:
    """``x W^T + b + s (x A^T) B^T`` in the compute dtype (see module doc), with a fused backward."""
    p = projection
    return _LoraLinear.apply(x, p.weight, p.bias, p.lora_a, p.lora_b, p.scale, p.dequantize, compute_dtype(x))


def lora_linear_reference(x: torch.Tensor, projection: LoraProjection) -> torch.Tensor:
    """The same math in plain PyTorch autograd (casts made explicitly, no autocast inside)."""
    p = projection
    dtype = compute_dtype(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        xc = x.to(dtype)
        w = _base_weight(p.weight, p.dequantize, dtype)
        out = torch.nn.functional.linear(xc, w, None if p.bias is None else p.bias.to(dtype))
        lora = torch.nn.functional.linear(
            torch.nn.functional.linear(xc, p.lora_a.to(dtype)), p.lora_b.to(dtype)
        )
        return out + lora * p.scale


# ------------------------------------------------------------------------------------------------
# Projections sharing one input (q, k, v): one x A^T product, one dX buffer
# ------------------------------------------------------------------------------------------------
class _LoraGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scales, dequantizers, dtype, *tensors):
        # tensors: (weight, bias, lora_a, lora_b) per projection
        ctx.set_materialize_grads(False)  # an output nobody uses gets no gradient
        x2 = _rows(x)
        if x2.dtype != dtype:
            x2 = x2.to(dtype)
        params = [tensors[i : i + 4] for i in range(0, len(tensors), 4)]
        ranks = [p[2].shape[0] for p in params]
        with _no_autocast(x.device.type):
            a_all = torch.cat([p[2] for p in params])  # (sum r) x in, cast once below
            if a_all.dtype != dtype:
                a_all = a_all.to(dtype)
            bs = [p[3] if p[3].dtype == dtype else p[3].to(dtype) for p in params]
            xa_all = torch.mm(x2, a_all.t())
            outs = []
            offset = 0
            for p, rank, b, scale, dequantize in zip(params, ranks, bs, scales, dequantizers, strict=True):
                w = _base_weight(p[0], dequantize, dtype)
                out = torch.addmm(p[1].to(dtype), x2, w.t()) if p[1] is not None else torch.mm(x2, w.t())
                out.addmm_(xa_all[:, offset : offset + rank], b.t(), alpha=scale)
                outs.append(out.view(*x.shape[:-1], out.shape[-1]))
                offset += rank
        ctx.save_for_backward(x2, a_all, xa_all, *bs, *[p[0] for p in params])
        ctx.meta = (scales, dequantizers, dtype, x.shape, x.dtype, ranks)
        ctx.need_bias = [
            p[1] is not None and ctx.needs_input_grad[4 + 4 * i + 1] for i, p in enumerate(params)
        ]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outs):
        x2, a_all, xa_all, *rest = ctx.saved_tensors
        scales, dequantizers, dtype, x_shape, x_dtype, ranks = ctx.meta
        n = len(ranks)
        bs, weights = rest[:n], rest[n:]
        need = ctx.needs_input_grad
        need_x = need[0]
        # One scale for the group (the usual case: same r and alpha): u = g B stays unscaled and the
        # scale rides on the dA and dX GEMMs; otherwise each block of u is scaled where it is formed.
        common = scales[0] if all(s == scales[0] for s in scales) else None
        grads: list[Any] = [None] * (4 * n)
        u_all = torch.empty(x2.shape[0], a_all.shape[0], dtype=x2.dtype, device=x2.device)
        dx = None
        offset = 0
        for i, (g, rank) in enumerate(zip(grad_outs, ranks, strict=True)):
            block = u_all[:, offset : offset + rank]
            if g is None:
                block.zero_()
            else:
                g2 = _rows(g)
                if g2.dtype != dtype:
                    g2 = g2.to(dtype)
                if need[4 + 4 * i + 3]:
                    grads[4 * i + 3] = _scaled_mm(g2.t(), xa_all[:, offset : offset + rank], scales[i])
                torch.mm(g2, bs[i], out=block)  # a column block of u_all: written in place
                if common is None:
                    block.mul_(scales[i])
                if need_x:
                    w = _base_weight(weights[i], dequantizers[i], dtype)
                    dx = torch.mm(g2, w) if dx is None else dx.addmm_(g2, w)
                if ctx.need_bias[i]:
                    grads[4 * i + 1] = g2.sum(0)
            offset += rank
        scale = 1.0 if common is None else common
        if any(need[4 + 4 * i + 2] for i in range(n)):
            grad_a_all = _scaled_mm(u_all.t(), x2, scale)
            offset = 0
            for i, rank in enumerate(ranks):
                if need[4 + 4 * i + 2]:
                    grads[4 * i + 2] = grad_a_all[offset : offset + rank]
                offset += rank
        if need_x:
            dx = _scaled_mm(u_all, a_all, scale) if dx is None else dx.addmm_(u_all, a_all, alpha=scale)
            dx = dx.view(x_shape).to(x_dtype)
        return (dx, None, None, None, *grads)


def lora_grouped_linear(x: torch.Tensor, projections: Sequence[LoraProjection]) -> tuple[torch.Tensor, ...]:
    """Several LoRA projections of the same input (q, k, v): one ``x A^T``, dX formed in one buffer."""
    tensors = [t for p in projections for t in p.tensors()]
    return _LoraGroup.apply(
        x,
        tuple(p.scale for p in projections),
        tuple(p.dequantize for p in projections),
        compute_dtype(x),
        *tensors,
    )


# ------------------------------------------------------------------------------------------------
# A gated MLP: down(act(gate(x)) * up(x)), three LoRA projections in one function
# ------------------------------------------------------------------------------------------------
class _LoraGatedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gelu, scales, dequantizers, dtype, skip_output, *tensors):
        # tensors: (weight, bias, lora_a, lora_b) for gate, up and down
        x2 = _rows(x)
        if x2.dtype != dtype:
            x2 = x2.to(dtype)
        params = [tensors[i : i + 4] for i in range(0, 12, 4)]
        with _no_autocast(x.device.type):
            casts = [_cast_factors(p[2], p[3], dtype) for p in params]
            w = _base_weight(params[0][0], dequantizers[0], dtype)
            gate, xa_gate = _project(x2, w, params[0][1], *casts[0], scales[0])
            w = _base_weight(params[1][0], dequantizers[1], dtype)
            up, xa_up = _project(x2, w, params[1][1], *casts[1], scales[1])
            hidden = glu_forward(gate, up, gelu)
            if skip_output:  # a recompute whose output nobody reads: only what backward needs
                ha_down = torch.mm(hidden, casts[2][0].t())
                out = x2.new_zeros(x2.shape[0], params[2][3].shape[0])  # lora_b: out x r
            else:
                w = _base_weight(params[2][0], dequantizers[2], dtype)
                out, ha_down = _project(hidden, w, params[2][1], *casts[2], scales[2])
                del w
        # A recompute runs right before this layer's backward: its act(gate) * up is kept for the down
        # projection's gradients instead of being formed a third time (no extra peak: backward would
        # allocate it anyway). A first forward drops it: it would stay alive until backward.
        # Held as an attribute, not a saved tensor, so backward can free it as soon as it is used.
        ctx.kept_hidden = hidden if skip_output else None
        del hidden
        flat_casts = [t for pair in casts for t in pair]
        weights = [p[0] for p in params]
        ctx.save_for_backward(x2, gate, up, xa_gate, xa_up, ha_down, *flat_casts, *weights)
        ctx.meta = (gelu, scales, dequantizers, dtype, x.shape, x.dtype)
        ctx.need_bias = [
            p[1] is not None and ctx.needs_input_grad[5 + 4 * i + 1] for i, p in enumerate(params)
        ]
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, gate, up, xa_gate, xa_up, ha_down, *rest = ctx.saved_tensors
        casts = [(rest[0], rest[1]), (rest[2], rest[3]), (rest[4], rest[5])]
        weights = rest[6:9]
        kept_hidden, ctx.kept_hidden = ctx.kept_hidden, None
        gelu, scales, dequantizers, dtype, x_shape, x_dtype = ctx.meta
        need = ctx.needs_input_grad
        need_x = need[0]
        need_ab = [(need[6 + 4 * i + 2], need[6 + 4 * i + 3]) for i in range(3)]
        g2 = _rows(grad_out)
        if g2.dtype != dtype:
            g2 = g2.to(dtype)
        grads: list[Any] = [None] * 12
        # down: its input (act(gate) * up) is recomputed, used for dA and freed
        hidden = kept_hidden if kept_hidden is not None else glu_forward(gate, up, gelu)
        del kept_hidden
        w = _base_weight(weights[2], dequantizers[2], dtype)
        dh, grads[10], grads[11] = _project_backward(
            g2, hidden, ha_down, *casts[2], scales[2], None, w, (True, *need_ab[2])
        )
        if ctx.need_bias[2]:
            grads[9] = g2.sum(0)
        del hidden, w
        d_gate, d_up = glu_backward(dh, gate, up, gelu)
        del dh
        dx = None
        for index, (d, xa) in enumerate(((d_gate, xa_gate), (d_up, xa_up))):
            w = _base_weight(weights[index], dequantizers[index], dtype) if need_x else None
            dx, grads[4 * index + 2], grads[4 * index + 3] = _project_backward(
                d, x2, xa, *casts[index], scales[index], dx, w, (need_x, *need_ab[index])
            )
            if ctx.need_bias[index]:
                grads[4 * index + 1] = d.sum(0)
        dx = dx.view(x_shape).to(x_dtype) if dx is not None else None
        return (dx, None, None, None, None, None, *grads)


def lora_gated_mlp(
    x: torch.Tensor,
    gate: LoraProjection,
    up: LoraProjection,
    down: LoraProjection,
    activation: str = "swiglu",
    skip_output: bool = False,
) -> torch.Tensor:
    """``down(act(gate(x)) * up(x))`` for three LoRA projections; ``activation`` "swiglu" or "geglu".

    ``skip_output``: in a checkpoint recompute whose MLP output only feeds the discarded layer output, compute
    just the tensors backward needs (the down projection's base matmul, a third of the MLP, is skipped) and
    return zeros."""
    if activation not in ("swiglu", "geglu"):
        raise ValueError(f"activation must be 'swiglu' or 'geglu', got {activation!r}")
    projections: Sequence[LoraProjection] = (gate, up, down)
    tensors = [t for p in projections for t in p.tensors()]
    return _LoraGatedMLP.apply(
        x,
        activation == "geglu",
        tuple(p.scale for p in projections),
        tuple(p.dequantize for p in projections),
        compute_dtype(x),
        skip_output,
        *tensors,
    )


def lora_gated_mlp_reference(
    x: torch.Tensor,
    gate: LoraProjection,
    up: LoraProjection,
    down: LoraProjection,
    activation: str = "swiglu",
) -> torch.Tensor:
    act = geglu_reference if activation == "geglu" else swiglu_reference
    hidden = act(lora_linear_reference(x, gate), lora_linear_reference(x, up))
    return lora_linear_reference(hidden, down)
