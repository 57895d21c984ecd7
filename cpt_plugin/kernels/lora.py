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
  instead of keeping it; in backward that recomputed product's memory then takes its gradient, and the
  pre-activations' memory takes theirs (one tokens x intermediate buffer formed in backward, not four).

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


# ------------------------------------------------------------------------------------------------
# The building blocks: a group of projections sharing one 2-D input, forward and backward, in the compute
# dtype. Every function below is a group (q/k/v: three, gate/up: two, o and down: one).
# ------------------------------------------------------------------------------------------------
def _base_weight(weight: torch.Tensor, dequantize: Dequantize | None, dtype: torch.dtype) -> torch.Tensor:
    if dequantize is not None:
        return dequantize(dtype)
    return weight if weight.dtype == dtype else weight.to(dtype)


def _cast_factors(
    groups: Sequence[tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]], dtype: torch.dtype
) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """Per group of (A factors, B factors): (its A factors stacked as one (sum r) x in matrix, its Bs),
    all in the compute dtype.

    Why one buffer: every cast is an allocation and a launch, and a launch-bound forward waits on the
    host. All factors of the call (the MLP's three projections, say) are copied into one buffer by one
    ``_foreach_copy_`` (one kernel on CUDA), each group's A's first and next to each other, so a group's
    stacked A (its shared ``x A^T`` GEMM) is a view, not a ``cat``."""
    factors = [f for lora_as, lora_bs in groups for f in (*lora_as, *lora_bs)]
    if all(f.dtype == dtype for f in factors):
        return [
            (lora_as[0] if len(lora_as) == 1 else torch.cat(list(lora_as)), list(lora_bs))
            for lora_as, lora_bs in groups
        ]
    numels = [f.numel() for f in factors]
    flat = torch.empty(sum(numels), dtype=dtype, device=factors[0].device)
    casts = [part.view(f.shape) for part, f in zip(flat.split(numels), factors, strict=True)]
    torch._foreach_copy_(casts, factors)
    out = []
    start = index = 0
    for lora_as, lora_bs in groups:
        n_a = sum(numels[index : index + len(lora_as)])
        a_stack = flat[start : start + n_a].view(-1, lora_as[0].shape[1])
        index += len(lora_as)
        out.append((a_stack, casts[index : index + len(lora_bs)]))
        start += n_a + sum(numels[index : index + len(lora_bs)])
        index += len(lora_bs)
    return out


_ZEROS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
_OUT_DTYPE_GEMM: dict[str, bool] = {}  # device type -> mm/addmm take out_dtype here (tried once)


def _zero(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    key = (device, dtype)
    zero = _ZEROS.get(key)
    if zero is None:
        zero = _ZEROS[key] = torch.zeros((), device=device, dtype=dtype)
    return zero


def _scaled_mm(
    m1: torch.Tensor, m2: torch.Tensor, scale: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``scale * (m1 @ m2)`` in one GEMM (``addmm`` with beta 0 never reads its input), into ``out`` if given."""
    if scale == 1.0:
        return torch.mm(m1, m2) if out is None else torch.mm(m1, m2, out=out)
    zero = _zero(m1.device, m1.dtype)
    if out is None:
        return torch.addmm(zero, m1, m2, beta=0, alpha=scale)
    return torch.addmm(zero, m1, m2, beta=0, alpha=scale, out=out)


def _grad_mm(m1: torch.Tensor, m2: torch.Tensor, scale: float, param_dtype: torch.dtype) -> torch.Tensor:
    """``scale * (m1 @ m2)`` as a LoRA factor's gradient, in the factor's dtype.

    16-bit operands and an fp32 factor (PEFT's default): on CUDA the GEMM accumulates in fp32 anyway and
    writes fp32 directly (``out_dtype``), so autograd does not cast each gradient in another kernel. Where
    that overload is missing, the 16-bit product, which autograd then casts."""
    device_type = m1.device.type
    if (
        param_dtype == torch.float32
        and m1.dtype in (torch.bfloat16, torch.float16)
        and _OUT_DTYPE_GEMM.get(device_type, device_type == "cuda")
    ):
        try:
            if scale == 1.0:
                return torch.mm(m1, m2, out_dtype=param_dtype)
            return torch.addmm(
                _zero(m1.device, param_dtype), m1, m2, beta=0, alpha=scale, out_dtype=param_dtype
            )
        except (RuntimeError, TypeError, NotImplementedError):  # not in this build: the 16-bit path
            _OUT_DTYPE_GEMM[device_type] = False
    return _scaled_mm(m1, m2, scale)


def _group_forward(
    x2: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    a_stack: torch.Tensor,
    bs: Sequence[torch.Tensor],
    ranks: Sequence[int],
    scales: Sequence[float],
    dequantizers: Sequence[Dequantize | None],
    dtype: torch.dtype,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """([x W_i^T + b_i + s_i (x A_i^T) B_i^T], x A^T of the stack).

    The LoRA product is written first and the base GEMM accumulates onto it (beta 1): the large output
    is written once and read once inside the base GEMM, not written, read and written again by a
    second pass."""
    xa_all = torch.mm(x2, a_stack.t())
    outs = []
    offset = 0
    for weight, bias, b, rank, scale, dequantize in zip(
        weights, biases, bs, ranks, scales, dequantizers, strict=True
    ):
        xa = xa_all[:, offset : offset + rank]
        if bias is not None:
            out = torch.addmm(bias.to(dtype), xa, b.t(), alpha=scale)
        else:
            out = _scaled_mm(xa, b.t(), scale)
        out.addmm_(x2, _base_weight(weight, dequantize, dtype).t())
        outs.append(out)
        offset += rank
    return outs, xa_all


def _group_backward(
    grads_out: Sequence[torch.Tensor | None],
    x2: torch.Tensor,
    xa_all: torch.Tensor,
    a_stack: torch.Tensor,
    bs: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    ranks: Sequence[int],
    scales: Sequence[float],
    dequantizers: Sequence[Dequantize | None],
    dtype: torch.dtype,
    need_x: bool,
    need_a: Sequence[bool],
    need_b: Sequence[bool],
    param_dtypes: tuple[torch.dtype, torch.dtype],
    x_is_scratch: bool = False,
) -> tuple[torch.Tensor | None, list[Any], list[Any]]:
    """(dX, [dA_i], [dB_i]) of a group; ``grads_out`` are 2-D in the compute dtype (None: unused).

    ``x_is_scratch``: nothing reads ``x2`` after this call, so dX (its shape and dtype) is written into its
    memory once dA has read it: one tokens x in buffer fewer at the peak.

    With u_i = g_i B_i (unscaled): dB_i = s g_i^T (x A_i^T), dA_i = s u_i^T x, dX = s u A_stack + sum g_i W_i.
    The u_i are written into column blocks of one buffer, so dA of the whole stack and the LoRA part of
    dX are one GEMM each; the base GEMMs accumulate dX onto the LoRA part."""
    n = len(ranks)
    # One scale for the group (the usual case: same r and alpha): u stays unscaled and the scale rides on
    # the dA and dX GEMMs; otherwise each block of u is scaled where it is formed.
    common = scales[0] if all(s == scales[0] for s in scales) else None
    grad_a: list[Any] = [None] * n
    grad_b: list[Any] = [None] * n
    a_dtype, b_dtype = param_dtypes
    u_all = torch.empty(x2.shape[0], a_stack.shape[0], dtype=x2.dtype, device=x2.device)
    offset = 0
    for i, (g, rank) in enumerate(zip(grads_out, ranks, strict=True)):
        block = u_all[:, offset : offset + rank]
        if g is None:
            block.zero_()
        else:
            if need_b[i]:
                grad_b[i] = _grad_mm(g.t(), xa_all[:, offset : offset + rank], scales[i], b_dtype)
            torch.mm(g, bs[i], out=block)  # a column block of u_all: written in place
            if common is None:
                block.mul_(scales[i])
        offset += rank
    scale = 1.0 if common is None else common
    if any(need_a):
        grad_a_all = _grad_mm(u_all.t(), x2, scale, a_dtype)
        offset = 0
        for i, rank in enumerate(ranks):
            if need_a[i]:
                grad_a[i] = grad_a_all[offset : offset + rank]
            offset += rank
    dx = None
    if need_x:
        dx = _scaled_mm(u_all, a_stack, scale, out=x2 if x_is_scratch and x2.is_contiguous() else None)
        for g, weight, dequantize in zip(grads_out, weights, dequantizers, strict=True):
            if g is not None:
                dx.addmm_(g, _base_weight(weight, dequantize, dtype))
    return dx, grad_a, grad_b


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _rows_in(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t2 = _rows(t)
    return t2 if t2.dtype == dtype else t2.to(dtype)


def _no_autocast(device_type: str):
    """Autocast off inside the fused functions: their operands are already in the compute dtype."""
    return torch.autocast(device_type=device_type, enabled=False)


@dataclass(frozen=True)
class _FrozenBase:
    """A group's frozen base tensors and constants: given to ``apply`` as one non-tensor argument, so
    autograd neither tracks nor saves them (the host cost of ``apply`` grows with its tensor arguments)."""

    weights: tuple[torch.Tensor, ...]
    biases: tuple[torch.Tensor | None, ...]
    scales: tuple[float, ...]
    dequantizers: tuple[Dequantize | None, ...]


def _frozen_base(projections: Sequence[LoraProjection]) -> _FrozenBase:
    """The projections' base tensors; a trained base weight or bias has no gradient here, so it is refused."""
    for p in projections:
        if p.weight.requires_grad or (p.bias is not None and p.bias.requires_grad):
            raise ValueError(
                "the fused LoRA path computes frozen base layers only (a base weight or bias requires grad); "
                "use PEFT's own forward for trained base layers"
            )
    return _FrozenBase(
        tuple(p.weight for p in projections),
        tuple(p.bias for p in projections),
        tuple(p.scale for p in projections),
        tuple(p.dequantize for p in projections),
    )


def _factors(projections: Sequence[LoraProjection]) -> list[torch.Tensor]:
    return [t for p in projections for t in (p.lora_a, p.lora_b)]


# ------------------------------------------------------------------------------------------------
# Projections sharing one input: q/k/v, or a single projection (o)
# ------------------------------------------------------------------------------------------------
class _LoraGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, base: _FrozenBase, dtype, *factors):
        # factors: (lora_a, lora_b) per projection
        ctx.set_materialize_grads(False)  # an output nobody uses gets no gradient
        x2 = _rows_in(x, dtype)
        lora_as, lora_bs = factors[0::2], factors[1::2]
        ranks = [a.shape[0] for a in lora_as]
        with _no_autocast(x.device.type):
            ((a_stack, bs),) = _cast_factors([(lora_as, lora_bs)], dtype)
            outs, xa_all = _group_forward(
                x2, base.weights, base.biases, a_stack, bs, ranks, base.scales, base.dequantizers, dtype
            )
        ctx.save_for_backward(x2, a_stack, xa_all, *bs)
        ctx.base = base  # frozen parameters: held, not saved (no saved-tensor hooks, no version checks)
        ctx.meta = (dtype, x.shape, x.dtype, ranks, (lora_as[0].dtype, lora_bs[0].dtype))
        return tuple(out.view(*x.shape[:-1], out.shape[-1]) for out in outs)

    @staticmethod
    def backward(ctx, *grad_outs):
        x2, a_stack, xa_all, *bs = ctx.saved_tensors
        base: _FrozenBase = ctx.base
        dtype, x_shape, x_dtype, ranks, param_dtypes = ctx.meta
        need = ctx.needs_input_grad
        grads_2d = [None if g is None else _rows_in(g, dtype) for g in grad_outs]
        dx, grad_a, grad_b = _group_backward(
            grads_2d,
            x2,
            xa_all,
            a_stack,
            bs,
            base.weights,
            ranks,
            base.scales,
            base.dequantizers,
            dtype,
            need[0],
            need[3::2],
            need[4::2],
            param_dtypes,
        )
        grads: list[Any] = []
        for da, db in zip(grad_a, grad_b, strict=True):
            grads += [da, db]
        if dx is not None:
            dx = dx.view(x_shape).to(x_dtype)
        return (dx, None, None, *grads)


def lora_linear(x: torch.Tensor, projection: LoraProjection) -> torch.Tensor:
    """``x W^T + b + s (x A^T) B^T`` in the compute dtype (see module doc), with a fused backward."""
    projections = (projection,)
    return _LoraGroup.apply(x, _frozen_base(projections), compute_dtype(x), *_factors(projections))[0]


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


def lora_grouped_linear(x: torch.Tensor, projections: Sequence[LoraProjection]) -> tuple[torch.Tensor, ...]:
    """Several LoRA projections of the same input (q, k, v): one ``x A^T``, dX formed in one buffer."""
    return _LoraGroup.apply(x, _frozen_base(projections), compute_dtype(x), *_factors(projections))


# ------------------------------------------------------------------------------------------------
# A gated MLP: down(act(gate(x)) * up(x)), three LoRA projections in one function
# ------------------------------------------------------------------------------------------------
def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class _LoraGatedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gelu, base: _FrozenBase, dtype, skip_output, keep_product, *factors):
        # base and factors: gate, up and down
        x2 = _rows_in(x, dtype)
        a_gate, b_gate, a_up, b_up, a_down, b_down = factors
        ranks_gu = [a_gate.shape[0], a_up.shape[0]]
        w_gate, w_up, w_down = base.weights
        with _no_autocast(x.device.type):
            # one cast for all six factors; gate and up share their input: one stacked A, one x A^T GEMM
            (a_gu, (bc_gate, bc_up)), (ac_down, (bc_down,)) = _cast_factors(
                [((a_gate, a_up), (b_gate, b_up)), ((a_down,), (b_down,))], dtype
            )
            (gate, up), xa_gu = _group_forward(
                x2,
                (w_gate, w_up),
                base.biases[:2],
                a_gu,
                (bc_gate, bc_up),
                ranks_gu,
                base.scales[:2],
                base.dequantizers[:2],
                dtype,
            )
            hidden = glu_forward(gate, up, gelu)
            if skip_output:  # a recompute whose output nobody reads: only what backward needs
                ha_down = torch.mm(hidden, ac_down.t())
                # zeros from one element (lora_b: out x r): no tokens x hidden buffer in the recompute
                out = x2.new_zeros(()).expand(x2.shape[0], b_down.shape[0])
            else:
                (out,), ha_down = _group_forward(
                    hidden,
                    (w_down,),
                    base.biases[2:],
                    ac_down,
                    (bc_down,),
                    (a_down.shape[0],),
                    base.scales[2:],
                    base.dequantizers[2:],
                    dtype,
                )
        # A recompute runs right before this layer's backward: its act(gate) * up is kept for the down
        # projection's gradients instead of being formed a third time (no extra peak: backward would
        # allocate it anyway). A first forward drops it (it would stay alive until backward) unless the
        # caller has the memory for that (``keep_product``: one kernel fewer in backward).
        # Held as an attribute, not a saved tensor, so backward can free it as soon as it is used.
        ctx.kept_hidden = hidden if skip_output or keep_product else None
        ctx.kept_from_forward = keep_product  # (a recompute's product is formed and read inside one capture)
        ctx.gate_up_overwritten = False
        del hidden
        ctx.save_for_backward(x2, gate, up, xa_gu, ha_down, a_gu, ac_down, bc_gate, bc_up, bc_down)
        ctx.base = base  # frozen parameters: held, not saved
        ctx.meta = (gelu, dtype, x.shape, x.dtype, ranks_gu, (a_gate.dtype, b_gate.dtype))
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, gate, up, xa_gu, ha_down, a_gu, a_down, b_gate, b_up, b_down = ctx.saved_tensors
        base: _FrozenBase = ctx.base
        kept_hidden, ctx.kept_hidden = ctx.kept_hidden, None
        if ctx.kept_from_forward and kept_hidden is not None and _capturing():
            # a CUDA graph's backward capture: the product's memory must stay with the graph (its forward
            # replay writes it, this backward replay reads it), not go back to the pool for the next
            # layer's capture; it takes d hidden below, so it is never read as the product again
            ctx.captured_product = kept_hidden
        gelu, dtype, x_shape, x_dtype, ranks_gu, param_dtypes = ctx.meta
        if ctx.gate_up_overwritten:  # a second backward of this graph (retain_graph=True): recomputed
            with _no_autocast(x2.device.type):
                (gate, up), _ = _group_forward(
                    x2, base.weights[:2], base.biases[:2], a_gu, (b_gate, b_up), ranks_gu,
                    base.scales[:2], base.dequantizers[:2], dtype,
                )  # fmt: skip
        need = ctx.needs_input_grad
        need_a, need_b = need[6::2], need[7::2]  # gate, up, down
        g2 = _rows_in(grad_out, dtype)
        # down: its input (act(gate) * up) is recomputed (or kept by a recompute), used for dA and freed
        hidden = kept_hidden if kept_hidden is not None else glu_forward(gate, up, gelu)
        del kept_hidden
        dh, (grad_a_down,), (grad_b_down,) = _group_backward(
            [g2],
            hidden,
            ha_down,
            a_down,
            [b_down],
            base.weights[2:],
            [a_down.shape[0]],
            base.scales[2:],
            base.dequantizers[2:],
            dtype,
            True,
            need_a[2:],
            need_b[2:],
            param_dtypes,
            x_is_scratch=True,  # act(gate) * up, formed for this backward: its memory takes d hidden
        )
        del hidden
        # gate and up are not read again: their memory takes the gradients (a later backward of the same
        # graph recomputes them, above)
        d_gate, d_up = glu_backward(dh, gate, up, gelu, overwrite=True)
        ctx.gate_up_overwritten = d_gate.data_ptr() == gate.data_ptr()
        del dh
        dx, grad_a, grad_b = _group_backward(
            [d_gate, d_up],
            x2,
            xa_gu,
            a_gu,
            [b_gate, b_up],
            base.weights[:2],
            ranks_gu,
            base.scales[:2],
            base.dequantizers[:2],
            dtype,
            need[0],
            need_a[:2],
            need_b[:2],
            param_dtypes,
        )
        dx = dx.view(x_shape).to(x_dtype) if dx is not None else None
        grads = (grad_a[0], grad_b[0], grad_a[1], grad_b[1], grad_a_down, grad_b_down)
        return (dx, None, None, None, None, None, *grads)


def lora_gated_mlp(
    x: torch.Tensor,
    gate: LoraProjection,
    up: LoraProjection,
    down: LoraProjection,
    activation: str = "swiglu",
    skip_output: bool = False,
    keep_product: bool = False,
) -> torch.Tensor:
    """``down(act(gate(x)) * up(x))`` for three LoRA projections; ``activation`` "swiglu" or "geglu".

    ``skip_output``: in a checkpoint recompute whose MLP output only feeds the discarded layer output, compute
    just the tensors backward needs (the down projection's base matmul, a third of the MLP, is skipped) and
    return zeros.

    ``keep_product``: keep ``act(gate) * up`` (tokens x intermediate) from the forward for backward instead
    of forming it again there: one tokens x intermediate buffer more between forward and backward, one
    kernel fewer in backward, the same numbers."""
    if activation not in ("swiglu", "geglu"):
        raise ValueError(f"activation must be 'swiglu' or 'geglu', got {activation!r}")
    projections = (gate, up, down)
    return _LoraGatedMLP.apply(
        x,
        activation == "geglu",
        _frozen_base(projections),
        compute_dtype(x),
        skip_output,
        keep_product and not skip_output,
        *_factors(projections),
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
