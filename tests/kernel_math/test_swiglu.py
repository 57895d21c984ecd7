"""SwiGLU / GeGLU kernels vs their references and HF's ACT2FN activations."""

from __future__ import annotations

import pytest
import torch
from transformers.activations import ACT2FN

from cpt_plugin.kernels.swiglu import geglu, geglu_reference, swiglu, swiglu_reference
from tests.kernel_math._helpers import DTYPES, TOL, assert_close_scaled

FNS = [(swiglu, swiglu_reference, "silu"), (geglu, geglu_reference, "gelu_pytorch_tanh")]
FN_IDS = ["swiglu", "geglu"]


def _check(gate, up, fn, ref):
    dtype = gate.dtype
    out = fn(gate, up)
    out_ref = ref(gate.detach(), up.detach())
    assert out.dtype == dtype and out.shape == gate.shape
    # The activation is rounded to the dtype before the product, as in HF: near-exact in every dtype.
    assert_close_scaled(out, out_ref, TOL[dtype], "forward")
    dy = torch.randn_like(out)
    dg, du = torch.autograd.grad(out, (gate, up), dy)
    g64 = gate.detach().double().requires_grad_()
    u64 = up.detach().double().requires_grad_()
    dg64, du64 = torch.autograd.grad(ref(g64, u64), (g64, u64), dy.double())
    assert_close_scaled(dg, dg64, 2 * TOL[dtype], "dgate")
    assert_close_scaled(du, du64, 2 * TOL[dtype], "dup")


@pytest.mark.parametrize("fn,ref,act", FNS, ids=FN_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 48), (3, 100), (2, 17, 257)])
def test_matches_reference(shape, dtype, fn, ref, act):
    gate = (2 * torch.randn(shape)).to(dtype).requires_grad_()
    up = torch.randn(shape).to(dtype).requires_grad_()
    _check(gate, up, fn, ref)


@pytest.mark.parametrize("fn,ref,act", FNS, ids=FN_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_hf_act2fn(fn, ref, act, dtype):
    gate = (3 * torch.randn(7, 100)).to(dtype)
    up = torch.randn(7, 100).to(dtype)
    expected = ACT2FN[act](gate) * up
    tol = 1e-6 if dtype == torch.float32 else 8e-3  # bf16: a rare 1-ulp flip of the activation
    assert_close_scaled(fn(gate, up), expected, tol, act)


@pytest.mark.parametrize("fn,ref,act", FNS, ids=FN_IDS)
def test_non_contiguous_chunks_of_fused_projection(fn, ref, act):
    gate_up = torch.randn(3, 17, 2 * 48).to(torch.bfloat16)
    gate, up = gate_up.chunk(2, dim=-1)
    gate.requires_grad_()
    up.requires_grad_()
    assert not gate.is_contiguous()
    _check(gate, up, fn, ref)


@pytest.mark.parametrize("fn,ref,act", FNS, ids=FN_IDS)
def test_large_magnitudes_stay_finite(fn, ref, act):
    gate = torch.tensor([[-90.0, -30.0, -5.0, 0.0, 5.0, 30.0, 90.0]], requires_grad=True)
    up = torch.ones_like(gate, requires_grad=True)
    _check(gate, up, fn, ref)


def test_cpu_fallback_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    gate, up = torch.randn(3, 48), torch.randn(3, 48)
    assert torch.equal(swiglu(gate, up), swiglu_reference(gate, up))
    assert torch.equal(geglu(gate, up), geglu_reference(gate, up))


@pytest.mark.gpu
@pytest.mark.parametrize("fn,ref,act", FNS, ids=FN_IDS)
def test_gpu_real_sizes(fn, ref, act):
    gate = (2 * torch.randn(4096, 14336, device="cuda")).to(torch.bfloat16).requires_grad_()
    up = torch.randn(4096, 14336, device="cuda").to(torch.bfloat16).requires_grad_()
    _check(gate, up, fn, ref)
