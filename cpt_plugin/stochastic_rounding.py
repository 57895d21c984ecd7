"""Stochastic rounding to bf16, and the AdamW updates that use it for 16-bit trained embeddings.

Why: the CPT recipe trains embed_tokens and lm_head at about lr/10. An AdamW step of ~5e-6 on a weight
of ~0.02 is below half a bf16 ulp, so round-to-nearest writes the old weight back and the update is lost.
Rounding stochastically (up with probability equal to the distance from the lower neighbour, in ulps)
makes the stored bf16 weight equal the fp32 result *in expectation*: small updates survive on average,
at 2 bytes per weight instead of fp32's 4.

The trick: an fp32 number whose lower 16 bits are zero is a bf16 number. Adding 16 uniform random bits to
the lower half of the fp32 bit pattern and then clearing it rounds the magnitude up exactly when the
random bits exceed the distance to the next bf16 value, so P(up) = (x - lo) / (hi - lo): unbiased.

The randomness of one update is a pure function of (seed, parameter index, step): a stopped and resumed
run draws the same bits (the seed lives in the optimizer's param group and the step in its state, both in
the checkpoint), and every data-parallel rank rounds its replica identically.

The moments of a bf16 parameter are kept in bf16 and rounded stochastically too (8 bytes per parameter,
as torch's AdamW on a bf16 copy): with round-to-nearest, exp_avg_sq's per-step change (1 - beta2 = 0.1%)
is below bf16's resolution and would never decay. Updates run over chunks of the flattened tensor, so the
fp32 temporaries stay small next to a 128K-vocab embedding.

Per-row learning rates (``row_scale``): every update takes an optional fp32 vector with one factor per
row of the parameter; row r then steps as AdamW with lr * row_scale[r] (weight decay scaled alike). The
factor multiplies the update, not the gradient: Adam divides gradient scale away, so scaling gradients
would change nothing. It serves new or untrained embedding rows, which learn faster than known ones.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

CHUNK_ELEMENTS = 1 << 22  # fp32 temporaries per chunk: a few times 16 MiB
BLOCKWISE_8BIT = 256  # bitsandbytes' block size for 8-bit optimizer states (one absmax per block)
_MASK = -(1 << 16)  # 0xFFFF0000 as int32: keeps sign, exponent and bf16's 7 mantissa bits
_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def stochastic_round_to_bf16(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """x (fp32) rounded to bf16, up or down at random so that E[result] == x. inf and nan pass through."""
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round_to_bf16 expects float32, got {x.dtype}")
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = bits.add(noise).bitwise_and_(_MASK).view(torch.float32)
    # inf/nan: the add could carry into the sign bit; round those to nearest (they stay inf/nan)
    return torch.where(torch.isfinite(x), rounded, x).to(torch.bfloat16)


def stochastic_round_reference(x: Tensor, noise: Tensor) -> Tensor:
    """The same rounding written out for finite fp32 ``x`` and integer ``noise`` in [0, 2**16): with
    lo, hi the bf16 neighbours toward and away from zero and p = (x - lo) / (hi - lo), round to hi iff
    noise / 2**16 >= 1 - p (probability p)."""
    truncated = x.contiguous().view(torch.int32) & _MASK
    lo = truncated.view(torch.float32).double()
    hi = (truncated + (1 << 16)).view(torch.float32).double()
    p = (x.double() - lo) / (hi - lo)
    up = (noise.double() / (1 << 16) >= 1 - p) & (p > 0)
    return torch.where(up, hi, lo).to(torch.bfloat16)


def rounding_seed(seed: int, index: int, step: int) -> int:
    """A 63-bit seed for the rounding of parameter ``index`` at ``step`` (splitmix-style mixing)."""
    value = (seed * _MIX[0] + (index + 1) * _MIX[1] + step * _MIX[2]) & ((1 << 64) - 1)
    value ^= value >> 31
    value = (value * _MIX[1]) & ((1 << 64) - 1)
    return (value ^ (value >> 29)) & ((1 << 63) - 1)


def _store(target: Tensor, value: Tensor, generator: torch.Generator | None) -> None:
    """Writes fp32 ``value`` into ``target``: stochastic rounding for bf16 with a generator, exact for fp32,
    round-to-nearest for bf16 without one (``trained_embeddings_dtype: model``)."""
    if target.dtype == torch.bfloat16 and generator is not None:
        target.copy_(stochastic_round_to_bf16(value, generator))
    else:
        target.copy_(value)


try:  # the fused GPU path; the chunked torch code below is its reference and the CPU path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None

if triton is not None:

    @triton.jit
    def _bf16_bits_to_fp32(bits16):
        return (bits16.to(tl.int32) << 16).to(tl.float32, bitcast=True)

    @triton.jit
    def _fp32_to_bf16_bits_stochastic(x, random):
        bits = x.to(tl.int32, bitcast=True)
        rounded = (bits + (random & 0xFFFF).to(tl.int32)) >> 16
        finite = (bits & 0x7F800000) != 0x7F800000
        special = tl.where(x != x, 0x7FC0, bits >> 16)  # inf keeps its bits, nan becomes the quiet nan
        return tl.where(finite, rounded, special).to(tl.int16)

    @triton.jit
    def _adamw_bf16_sr_kernel(
        w_ptr, g_ptr, m_ptr, v_ptr, n, seed, decay, one_minus_beta1, beta2, one_minus_beta2, step_size,
        bias_correction2_sqrt, eps,
        scale_ptr, lr_decay, row, BLOCK: tl.constexpr, HAS_SCALE: tl.constexpr,
    ):  # fmt: skip
        """One AdamW step over bf16 weight, grad and moments (all passed as int16 views: integer loads and
        stores are exact everywhere), fp32 math, every result rounded stochastically (Philox, seed, offset).
        HAS_SCALE: element i of row i // row steps with step_size * scale[i // row] and decays by
        1 - lr_decay * scale[i // row] (lr_decay = lr * weight_decay)."""
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        w = _bf16_bits_to_fp32(tl.load(w_ptr + offsets, mask=mask))
        g = _bf16_bits_to_fp32(tl.load(g_ptr + offsets, mask=mask))
        m = _bf16_bits_to_fp32(tl.load(m_ptr + offsets, mask=mask))
        v = _bf16_bits_to_fp32(tl.load(v_ptr + offsets, mask=mask))
        if HAS_SCALE:
            scale = tl.load(scale_ptr + offsets // row, mask=mask, other=0.0)
            w = w * (1.0 - lr_decay * scale)
            step = step_size * scale
        else:
            w = w * decay
            step = step_size
        # 1 - beta comes in from the host: formed here from fp32 beta2 = 0.999 it is off by 1.3e-5
        # (cancellation), which moved some updates by 2 bf16 ulps on an H200 (the interpreter keeps fp64)
        m = m + one_minus_beta1 * (g - m)
        v = v * beta2 + one_minus_beta2 * g * g
        w = w - step * m / (tl.sqrt(v) / bias_correction2_sqrt + eps)
        r0, r1, r2, _ = tl.randint4x(seed, offsets)
        tl.store(w_ptr + offsets, _fp32_to_bf16_bits_stochastic(w, r0), mask=mask)
        tl.store(m_ptr + offsets, _fp32_to_bf16_bits_stochastic(m, r1), mask=mask)
        tl.store(v_ptr + offsets, _fp32_to_bf16_bits_stochastic(v, r2), mask=mask)


def fused_path_applies(*tensors: Tensor) -> bool:
    """The Triton kernel runs for contiguous bf16 CUDA tensors (or any device under TRITON_INTERPRET)."""
    import os

    if triton is None or not all(t.dtype == torch.bfloat16 and t.is_contiguous() for t in tensors):
        return False
    return all(t.is_cuda for t in tensors) or os.environ.get("TRITON_INTERPRET") == "1"


def adamw_bf16_sr_fused_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    seed: int,
    block: int = 1024,
    row_scale: Tensor | None = None,
) -> None:
    """adamw_step_ in one Triton pass for all-bf16 tensors; its random bits come from Philox(seed, offset)
    rather than a torch generator (the torch path is the reference; both are unbiased)."""
    n = param.numel()
    row = 1
    if row_scale is not None:
        row = _row_length(param, row_scale)
        row_scale = row_scale.to(param.device, torch.float32).contiguous()
    _adamw_bf16_sr_kernel[(triton.cdiv(n, block),)](
        param.view(torch.int16), grad.view(torch.int16), exp_avg.view(torch.int16), exp_avg_sq.view(torch.int16),
        n, seed & ((1 << 31) - 1), 1.0 - lr * weight_decay, 1.0 - betas[0], betas[1], 1.0 - betas[1],
        lr / (1 - betas[0] ** step),
        math.sqrt(1 - betas[1] ** step), eps, row_scale if row_scale is not None else param, lr * weight_decay,
        row, BLOCK=block, HAS_SCALE=row_scale is not None,
    )  # fmt: skip


def _chunks(n: int, size: int | None = None) -> list[tuple[int, int]]:
    size = size or CHUNK_ELEMENTS
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def _row_length(param: Tensor, row_scale: Tensor) -> int:
    """Elements per row of ``param`` for a per-row factor vector (a clear error when they do not match)."""
    rows = param.shape[0] if param.ndim else 1
    if row_scale.ndim != 1 or row_scale.numel() != rows:
        raise ValueError(
            f"cpt-plugin: row_scale has {row_scale.numel()} entries but the parameter has {rows} rows "
            f"(shape {tuple(param.shape)})"
        )
    return param.numel() // max(rows, 1)


def _per_element(values: Tensor, start: int, end: int, row: int) -> Tensor:
    """The per-row ``values`` spread over the elements [start, end) of the flattened parameter."""
    first, last = start // row, (end - 1) // row + 1
    spread = values[first:last].repeat_interleave(row)
    return spread[start - first * row : end - first * row]


@torch.no_grad()
def adamw_step_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    generator: torch.Generator | None,
    row_scale: Tensor | None = None,
) -> None:
    """One AdamW step (torch.optim.AdamW's math, in fp32) in place. bf16 tensors among param, exp_avg and
    exp_avg_sq are read up to fp32 and written back with stochastic rounding (round-to-nearest without a
    generator); fp32 ones exactly. ``row_scale``: row r steps with lr * row_scale[r] (module doc)."""
    beta1, beta2 = betas
    step_size = lr / (1 - beta1**step)
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    flat = [t.view(-1) for t in (param, grad, exp_avg, exp_avg_sq)]
    if row_scale is not None:  # per-row step size and decay, computed in fp64 as torch does for its scalars
        row = _row_length(param, row_scale)
        scale = row_scale.to(param.device, torch.float64)
        row_steps, row_decays = (scale * step_size).float(), (1 - scale * (lr * weight_decay)).float()
    for start, end in _chunks(param.numel()):
        w, g, m, v = (t[start:end].float() for t in flat)
        if row_scale is None:
            w.mul_(1 - lr * weight_decay)
        else:
            w.mul_(_per_element(row_decays, start, end, row))
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        if row_scale is None:
            w.addcdiv_(m, denom, value=-step_size)
        else:
            w.sub_(m.div(denom).mul_(_per_element(row_steps, start, end, row)))
        for target, value in ((flat[0], w), (flat[2], m), (flat[3], v)):
            _store(target[start:end], value, generator)


def adamw_step_reference(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """The fp32 AdamW step, out of place: (param, exp_avg, exp_avg_sq) as torch.optim.AdamW computes them."""
    beta1, beta2 = betas
    w, g, m, v = (t.double() for t in (param, grad, exp_avg, exp_avg_sq))
    w = w * (1 - lr * weight_decay)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    w = w - lr / (1 - beta1**step) * m / ((v / (1 - beta2**step)).sqrt() + eps)
    return w, m, v


def init_8bit_state(param: Tensor) -> dict[str, Tensor]:
    """bitsandbytes' blockwise 8-bit AdamW state for ``param``: uint8 moments, one fp32 absmax per block."""
    blocks = math.ceil(param.numel() / BLOCKWISE_8BIT)
    return {
        "state1": torch.zeros(param.shape, dtype=torch.uint8, device=param.device),
        "state2": torch.zeros(param.shape, dtype=torch.uint8, device=param.device),
        "absmax1": torch.zeros(blocks, dtype=torch.float32, device=param.device),
        "absmax2": torch.zeros(blocks, dtype=torch.float32, device=param.device),
    }


@torch.no_grad()
def adamw_8bit_step_(
    param: Tensor,
    grad: Tensor,
    state: dict[str, Tensor],
    qmaps: tuple[Tensor, Tensor],
    *,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    generator: torch.Generator | None,
    row_scale: Tensor | None = None,
) -> None:
    """One step of bitsandbytes' blockwise 8-bit AdamW in place. A bf16 param with a generator is updated
    in fp32 chunk copies (chunks aligned to the 256-element blocks) and written back stochastically rounded;
    otherwise the kernel updates the param directly, as bitsandbytes' AdamW8bit does.

    ``row_scale``: the kernel takes one lr, so each chunk is updated with ``lr`` on an fp32 copy and its
    change scaled per row (AdamW's change is linear in lr for given moments: -lr * (update + decay * w))."""
    import bitsandbytes.functional as F

    def update(p: Tensor, g: Tensor, s1: Tensor, s2: Tensor, a1: Tensor, a2: Tensor) -> None:
        F.optimizer_update_8bit_blockwise(
            "adam", g, p, s1, s2, betas[0], betas[1], 0.0, 0.0, eps, step, lr,
            qmaps[0], qmaps[1], a1, a2, weight_decay,
        )  # fmt: skip

    grad = grad.contiguous()
    if row_scale is None and (param.dtype != torch.bfloat16 or generator is None):
        update(param, grad, state["state1"], state["state2"], state["absmax1"], state["absmax2"])
        return
    if row_scale is not None:
        row = _row_length(param, row_scale)
        row_scale = row_scale.to(param.device, torch.float32)
    flat_p, flat_g = param.view(-1), grad.view(-1)
    s1, s2 = state["state1"].view(-1), state["state2"].view(-1)
    chunk = CHUNK_ELEMENTS - CHUNK_ELEMENTS % BLOCKWISE_8BIT
    for start, end in _chunks(param.numel(), chunk):
        blocks = slice(start // BLOCKWISE_8BIT, math.ceil(end / BLOCKWISE_8BIT))
        w = flat_p[start:end].to(torch.float32, copy=True)
        update(
            w, flat_g[start:end].float(), s1[start:end], s2[start:end],
            state["absmax1"][blocks], state["absmax2"][blocks],
        )  # fmt: skip
        if row_scale is not None:
            before = flat_p[start:end].float()
            w.sub_(before).mul_(_per_element(row_scale, start, end, row)).add_(before)
        _store(flat_p[start:end], w, generator)


def dynamic_qmaps(device: torch.device) -> tuple[Tensor, Tensor]:
    """bitsandbytes' signed and unsigned dynamic quantization maps (for exp_avg and exp_avg_sq)."""
    import bitsandbytes.functional as F

    return F.create_dynamic_map(signed=True).to(device), F.create_dynamic_map(signed=False).to(device)
