"""Rotary position embedding (HF ``apply_rotary_pos_emb`` semantics) as one Triton launch for q and k.

One program handles one token: it loads that token's cos/sin once and rotates every q head and every
k head with them. Strides are passed through, so q/k made by HF's ``view(...).transpose(1, 2)`` are
read in place, and the outputs keep the inputs' memory layout (as HF's elementwise math does).
cos/sin are already gathered per position, so packed sequences whose positions restart just work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cpt_plugin.kernels._utils import cast_rn, use_triton, warps_for

_NUM_WARPS: int | None = None  # None: scaled with the elements of one token (q and k heads)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's apply_rotary_pos_emb; with rotary_dim < head_dim only the first rotary_dim dims rotate."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    rot = cos.shape[-1]
    if rot == q.shape[-1]:
        return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)
    q_rot, q_pass = q[..., :rot], q[..., rot:]
    k_rot, k_pass = k[..., :rot], k[..., rot:]
    q_embed = (q_rot * cos) + (_rotate_half(q_rot) * sin)
    k_embed = (k_rot * cos) + (_rotate_half(k_rot) * sin)
    return torch.cat((q_embed, q_pass), dim=-1), torch.cat((k_embed, k_pass), dim=-1)


@triton.jit
def _rotate_heads(
    X,
    x_sb,
    x_sh,
    x_st,
    OUT,
    o_sb,
    o_sh,
    o_st,
    b,
    t,
    n_heads,
    half,
    head_dim,
    c1,
    c2,
    s1,
    s2,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_HALF)
    mask = (heads < n_heads)[:, None] & (d < half)[None, :]
    x_base = X + b * x_sb + t * x_st + heads[:, None].to(tl.int64) * x_sh
    o_base = OUT + b * o_sb + t * o_st + heads[:, None].to(tl.int64) * o_sh
    x1 = tl.load(x_base + d[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_base + half + d[None, :], mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * c1[None, :] - x2 * s1[None, :]
    o2 = x2 * c2[None, :] + x1 * s2[None, :]
    tl.store(o_base + d[None, :], cast_rn(o1, OUT.dtype.element_ty), mask=mask)
    tl.store(o_base + half + d[None, :], cast_rn(o2, OUT.dtype.element_ty), mask=mask)
    if BLOCK_PASS > 0:
        p = 2 * half + tl.arange(0, BLOCK_PASS)
        pmask = (heads < n_heads)[:, None] & (p < head_dim)[None, :]
        xp = tl.load(x_base + p[None, :], mask=pmask, other=0.0)
        tl.store(o_base + p[None, :], xp.to(OUT.dtype.element_ty), mask=pmask)


@triton.jit
def _rope_kernel(
    Q,
    q_sb,
    q_sh,
    q_st,
    QO,
    qo_sb,
    qo_sh,
    qo_st,
    K,
    k_sb,
    k_sh,
    k_st,
    KO,
    ko_sb,
    ko_sh,
    ko_st,
    COS,
    cos_sb,
    cos_st,
    SIN,
    sin_sb,
    sin_st,
    seq_len,
    n_q_heads,
    n_k_heads,
    half,
    head_dim,
    BACKWARD: tl.constexpr,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seq_len
    t = pid % seq_len
    d = tl.arange(0, BLOCK_HALF)
    dmask = d < half
    cos_ptr = COS + b * cos_sb + t * cos_st
    sin_ptr = SIN + b * sin_sb + t * sin_st
    c1 = tl.load(cos_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + half + d, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + half + d, mask=dmask, other=0.0).to(tl.float32)
    if BACKWARD:
        # The transpose of the rotation: dx1 = dy1*c1 + dy2*s2, dx2 = dy2*c2 - dy1*s1.
        s1, s2 = -s2, -s1
    _rotate_heads(
        Q, q_sb, q_sh, q_st, QO, qo_sb, qo_sh, qo_st, b, t, n_q_heads, half, head_dim,
        c1, c2, s1, s2, BLOCK_QH, BLOCK_HALF, BLOCK_PASS,
    )  # fmt: skip
    _rotate_heads(
        K, k_sb, k_sh, k_st, KO, ko_sb, ko_sh, ko_st, b, t, n_k_heads, half, head_dim,
        c1, c2, s1, s2, BLOCK_KH, BLOCK_HALF, BLOCK_PASS,
    )  # fmt: skip


def _out_like(x: torch.Tensor) -> torch.Tensor:
    """A new tensor with x's memory layout when x is dense (HF's elementwise ops keep it too)."""
    return torch.empty_like(x, memory_format=torch.preserve_format)


def _launch(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, H, T, D] and k [B, Hkv, T, D] (any strides) by cos/sin [Bc, T, R] (Bc in {1, B})."""
    bsz, n_q_heads, seq_len, head_dim = q.shape
    n_k_heads = k.shape[1]
    rot = cos.shape[-1]
    qo, ko = _out_like(q), _out_like(k)
    if q.numel() == 0 and k.numel() == 0:
        return qo, ko
    cos_sb = cos.stride(0) if cos.shape[0] > 1 else 0
    sin_sb = sin.stride(0) if sin.shape[0] > 1 else 0
    block_half = triton.next_power_of_2(rot // 2)
    pass_dims = head_dim - rot
    block_pass = triton.next_power_of_2(pass_dims) if pass_dims > 0 else 0
    block_qh = triton.next_power_of_2(n_q_heads)
    block_kh = triton.next_power_of_2(n_k_heads)
    num_warps = _NUM_WARPS or warps_for((block_qh + block_kh) * block_half * 2, lo=4, hi=8, per_warp=2048)
    _rope_kernel[(bsz * seq_len,)](
        q, q.stride(0), q.stride(1), q.stride(2),
        qo, qo.stride(0), qo.stride(1), qo.stride(2),
        k, k.stride(0), k.stride(1), k.stride(2),
        ko, ko.stride(0), ko.stride(1), ko.stride(2),
        cos, cos_sb, cos.stride(1),
        sin, sin_sb, sin.stride(1),
        seq_len, n_q_heads, n_k_heads, rot // 2, head_dim,
        BACKWARD=backward, BLOCK_QH=block_qh, BLOCK_KH=block_kh,
        BLOCK_HALF=block_half, BLOCK_PASS=block_pass, num_warps=num_warps,
    )  # fmt: skip
    return qo, ko


class _RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        ctx.save_for_backward(cos, sin)
        return _launch(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor):
        cos, sin = ctx.saved_tensors
        dq = _last_dim_contiguous(dq)
        dk = _last_dim_contiguous(dk)
        dq_in, dk_in = _launch(dq, dk, cos, sin, backward=True)
        return dq_in, dk_in, None, None


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for HF's apply_rotary_pos_emb: returns (q_embed, k_embed) in the inputs' dtype.

    q: [B, H, T, D], k: [B, Hkv, T, D] (or [B, T, H, D] with unsqueeze_dim=2); cos/sin: [B or 1, T, R]
    with R <= D (R < D: partial rotary, the last D - R dims pass through).
    """
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"unsqueeze_dim must be 1 or 2, got {unsqueeze_dim}")
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    if (
        not use_triton(q, k, cos, sin)
        or cos.requires_grad
        or sin.requires_grad
        or q.dim() != 4
        or k.dim() != 4
        or cos.dim() != 3
        or cos.shape[-1] % 2
        or cos.shape[-1] > q.shape[-1]
        or cos.shape != sin.shape
    ):
        return apply_rope_reference(q, k, cos, sin, unsqueeze_dim)
    if unsqueeze_dim == 2:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    bsz, _, seq_len, _ = q.shape
    if cos.shape[0] not in (1, bsz) or cos.shape[1] != seq_len or k.shape[0] != bsz or k.shape[2] != seq_len:
        raise ValueError(
            f"shapes do not line up: q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}"
        )
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    cos, sin = _last_dim_contiguous(cos), _last_dim_contiguous(sin)
    q_embed, k_embed = _RoPEFunction.apply(q, k, cos, sin)
    if unsqueeze_dim == 2:
        q_embed, k_embed = q_embed.transpose(1, 2), k_embed.transpose(1, 2)
    return q_embed, k_embed
