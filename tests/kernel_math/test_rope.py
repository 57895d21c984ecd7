"""RoPE kernel vs HF's apply_rotary_pos_emb math: layouts, packed positions, partial rotary, GQA."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from cpt_plugin.kernels.rope import apply_rope, apply_rope_reference
from tests.kernel_math._helpers import DTYPES, TOL, assert_close_scaled


def _cos_sin(position_ids: torch.Tensor, rotary_dim: int, dtype: torch.dtype, base: float = 10000.0):
    """cos/sin as HF's rotary embeddings build them: [B, T, rotary_dim], halves duplicated."""
    arange = torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=position_ids.device)
    inv_freq = 1.0 / (base ** (arange / rotary_dim))
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _qk(bsz, n_heads, n_kv, seq, head_dim, dtype, hf_layout=True):
    """q/k as HF makes them: [B, T, H, D] projections viewed and transposed to [B, H, T, D]."""
    if hf_layout:
        q = torch.randn(bsz, seq, n_heads, head_dim).to(dtype).transpose(1, 2)
        k = torch.randn(bsz, seq, n_kv, head_dim).to(dtype).transpose(1, 2)
    else:
        q = torch.randn(bsz, n_heads, seq, head_dim).to(dtype)
        k = torch.randn(bsz, n_kv, seq, head_dim).to(dtype)
    return q.requires_grad_(), k.requires_grad_()


def _check(q, k, cos, sin, unsqueeze_dim=1):
    dtype = q.dtype
    q_out, k_out = apply_rope(q, k, cos, sin, unsqueeze_dim)
    q_ref, k_ref = apply_rope_reference(q.detach(), k.detach(), cos, sin, unsqueeze_dim)
    assert q_out.dtype == dtype and k_out.dtype == k.dtype
    assert q_out.shape == q.shape and k_out.shape == k.shape
    # The kernel rounds once (fp32 math); HF's bf16 math rounds three times: allow a couple of ulps.
    assert_close_scaled(q_out, q_ref, 2 * TOL[dtype], "q")
    assert_close_scaled(k_out, k_ref, 2 * TOL[dtype], "k")
    dq_out, dk_out = torch.randn_like(q_out), torch.randn_like(k_out)
    dq, dk = torch.autograd.grad((q_out, k_out), (q, k), (dq_out, dk_out))
    q64 = q.detach().double().requires_grad_()
    k64 = k.detach().double().requires_grad_()
    q64_out, k64_out = apply_rope_reference(q64, k64, cos.double(), sin.double(), unsqueeze_dim)
    dq64, dk64 = torch.autograd.grad((q64_out, k64_out), (q64, k64), (dq_out.double(), dk_out.double()))
    assert_close_scaled(dq, dq64, TOL[dtype], "dq")
    assert_close_scaled(dk, dk64, TOL[dtype], "dk")
    return q_out, k_out


CASES = [(1, 2, 2, 1, 16, dt) for dt in DTYPES] + [(2, 4, 2, 3, 16, dt) for dt in DTYPES]
CASES += [(1, 3, 1, 17, 24, torch.float32), (1, 3, 1, 17, 24, torch.bfloat16)]


@pytest.mark.parametrize("bsz,n_heads,n_kv,seq,head_dim,dtype", CASES)
def test_matches_reference(bsz, n_heads, n_kv, seq, head_dim, dtype):
    q, k = _qk(bsz, n_heads, n_kv, seq, head_dim, dtype)
    position_ids = torch.arange(seq).expand(bsz, seq)
    cos, sin = _cos_sin(position_ids, head_dim, dtype)
    _check(q, k, cos, sin)


def test_fp32_exact_vs_hf():
    q, k = _qk(2, 4, 2, 5, 16, torch.float32)
    cos, sin = _cos_sin(torch.arange(5).expand(2, 5), 16, torch.float32)
    q_out, k_out = apply_rope(q, k, cos, sin)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(q_out, q_hf, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k_out, k_hf, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_positions_restart(dtype):
    """Packed documents: positions restart inside a row; each token uses its own position's angle."""
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1], [5, 6, 0, 1, 2, 3, 0]])
    q, k = _qk(2, 4, 2, 7, 16, dtype)
    cos, sin = _cos_sin(position_ids, 16, dtype)
    q_out, _ = _check(q, k, cos, sin)
    # Token 3 of row 0 is at position 0: the rotation is the identity there.
    torch.testing.assert_close(q_out[0, :, 3], q[0, :, 3].detach(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_partial_rotary(dtype):
    q, k = _qk(2, 2, 1, 3, 24, dtype)
    cos, sin = _cos_sin(torch.arange(1, 4).expand(2, 3), 8, dtype)
    q_out, k_out = _check(q, k, cos, sin)
    assert torch.equal(q_out[..., 8:], q[..., 8:].detach())
    assert torch.equal(k_out[..., 8:], k[..., 8:].detach())


def test_cos_batch_broadcast_and_contiguous_inputs():
    q, k = _qk(3, 2, 2, 4, 16, torch.float32, hf_layout=False)
    cos, sin = _cos_sin(torch.arange(4)[None], 16, torch.float32)
    assert cos.shape[0] == 1
    _check(q, k, cos, sin)


def test_hf_layout_is_kept_without_copy():
    """q made by view+transpose is read in place and the output keeps that layout (as HF's math does)."""
    q, k = _qk(2, 4, 2, 3, 16, torch.bfloat16)
    cos, sin = _cos_sin(torch.arange(3).expand(2, 3), 16, torch.bfloat16)
    q_out, k_out = apply_rope(q, k, cos, sin)
    assert q_out.stride() == q.stride() and k_out.stride() == k.stride()
    assert not q_out.is_contiguous()


def test_unsqueeze_dim_2():
    """[B, T, H, D] inputs with unsqueeze_dim=2, as some callers use."""
    q, k = _qk(2, 4, 2, 3, 16, torch.float32, hf_layout=False)
    q_bthd = q.detach().transpose(1, 2).requires_grad_()
    k_bthd = k.detach().transpose(1, 2).requires_grad_()
    cos, sin = _cos_sin(torch.arange(3).expand(2, 3), 16, torch.float32)
    _check(q_bthd, k_bthd, cos, sin, unsqueeze_dim=2)


def test_cos_with_grad_falls_back():
    q, k = _qk(1, 2, 1, 3, 16, torch.float32)
    cos, sin = _cos_sin(torch.arange(3)[None], 16, torch.float32)
    cos.requires_grad_()
    q_out, k_out = apply_rope(q, k, cos, sin)
    (q_out.sum() + k_out.sum()).backward()
    assert cos.grad is not None


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim,rotary_dim", [(128, 128), (128, 64)])
def test_gpu_real_sizes(head_dim, rotary_dim):
    bsz, seq = 2, 4096
    q = torch.randn(bsz, seq, 32, head_dim, device="cuda").to(torch.bfloat16).transpose(1, 2)
    k = torch.randn(bsz, seq, 8, head_dim, device="cuda").to(torch.bfloat16).transpose(1, 2)
    q.requires_grad_()
    k.requires_grad_()
    position_ids = (torch.arange(seq, device="cuda") % 1000).expand(bsz, seq)
    cos, sin = _cos_sin(position_ids, rotary_dim, torch.bfloat16)
    _check(q, k, cos, sin)
