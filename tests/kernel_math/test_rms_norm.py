"""RMSNorm kernel vs its reference (fp64 for gradients) and vs HF's LlamaRMSNorm / Gemma3RMSNorm."""

from __future__ import annotations

import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from cpt_plugin.kernels.rms_norm import rms_norm, rms_norm_reference
from tests.kernel_math._helpers import DTYPES, TOL, assert_close_scaled

SHAPES = [(1, 48), (3, 100), (2, 17, 257)]
MODES = [("llama", 0.0), ("gemma", 1.0)]


def _weight(n: int, mode: str, dtype: torch.dtype) -> torch.Tensor:
    base = 1.0 if mode == "llama" else 0.0
    return (base + 0.3 * torch.randn(n)).to(dtype).requires_grad_()


def _check(x: torch.Tensor, w: torch.Tensor, mode: str, offset: float, eps: float = 1e-6) -> None:
    dtype = x.dtype
    y = rms_norm(x, w, eps, offset, mode)
    y_ref = rms_norm_reference(x.detach(), w.detach(), eps, offset, mode)
    assert y.dtype == y_ref.dtype and y.shape == x.shape
    # Same dtype, same casting: at most one rounding step apart (rsqrt/sum order).
    assert_close_scaled(y, y_ref, TOL[dtype], "forward")
    dy = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    y64 = rms_norm_reference(x64, w64, eps, offset, mode)
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), dy.double())
    assert dx.dtype == x.dtype and dw.dtype == w.dtype
    assert_close_scaled(dx, dx64, 2 * TOL[dtype], "dx")
    assert_close_scaled(dw, dw64, 2 * TOL[min(dtype, w.dtype, key=lambda d: -TOL[d])], "dweight")


@pytest.mark.parametrize("mode,offset", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, dtype, mode, offset):
    x = torch.randn(shape).to(dtype).requires_grad_()
    _check(x, _weight(shape[-1], mode, dtype), mode, offset)


@pytest.mark.parametrize("mode,offset", MODES)
def test_fp32_weight_with_bf16_input(mode, offset):
    """Mixed precision: Llama promotes the output to fp32, Gemma keeps the input dtype."""
    x = torch.randn(5, 100).to(torch.bfloat16).requires_grad_()
    w = _weight(100, mode, torch.float32)
    out = rms_norm(x, w, 1e-6, offset, mode)
    assert out.dtype == (torch.float32 if mode == "llama" else torch.bfloat16)
    _check(x, w, mode, offset)


def test_llama_offset():
    x = torch.randn(3, 48, requires_grad=True)
    _check(x, _weight(48, "gemma", torch.float32), "llama", 1.0)


@pytest.mark.parametrize("layout", ["last_dim_strided", "row_strided"])
def test_non_contiguous_input(layout):
    if layout == "last_dim_strided":
        x = torch.randn(100, 7).to(torch.bfloat16).t()
    else:
        x = torch.randn(7, 160).to(torch.bfloat16)[:, 10:110]
    x.requires_grad_()
    assert not x.is_contiguous()
    _check(x, _weight(100, "llama", torch.bfloat16), "llama", 0.0)


def test_empty_input():
    x = torch.randn(0, 48, requires_grad=True)
    w = _weight(48, "llama", torch.float32)
    y = rms_norm(x, w, 1e-6)
    y.sum().backward()
    assert y.shape == (0, 48) and torch.equal(w.grad, torch.zeros(48))


def test_cpu_fallback_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(3, 48)
    w = _weight(48, "llama", torch.float32)
    assert torch.equal(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))


def test_bad_mode():
    with pytest.raises(ValueError, match="cast_mode"):
        rms_norm(torch.randn(2, 4), torch.ones(4), 1e-6, cast_mode="t5")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hf_cls,mode,offset", [(LlamaRMSNorm, "llama", 0.0), (Gemma3RMSNorm, "gemma", 1.0)])
def test_function_matches_hf_modules(hf_cls, mode, offset, dtype):
    """rms_norm with the module's weight and eps is what the patched HF norm's forward computes."""
    hf = hf_cls(100, eps=1e-5)
    with torch.no_grad():
        hf.weight.normal_(0.0 if hf_cls is Gemma3RMSNorm else 1.0, 0.2)
    hf.to(dtype)
    weight = hf.weight.detach().clone().requires_grad_()
    x = torch.randn(2, 3, 100).to(dtype)
    x_hf = x.clone().requires_grad_()
    x_ours = x.clone().requires_grad_()
    y_hf, y_ours = hf(x_hf), rms_norm(x_ours, weight, 1e-5, offset, mode)
    assert y_ours.dtype == y_hf.dtype
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    assert_close_scaled(y_ours, y_hf, tol, "forward")
    dy = torch.randn_like(y_hf)
    y_hf.backward(dy)
    y_ours.backward(dy)
    assert_close_scaled(x_ours.grad, x_hf.grad, 10 * tol, "dx")
    assert_close_scaled(weight.grad, hf.weight.grad, 10 * tol, "dweight")


@pytest.mark.gpu
@pytest.mark.parametrize("mode,offset", MODES)
@pytest.mark.parametrize("shape", [(4096, 4096), (3, 1001, 2048), (8192, 128)])
def test_gpu_real_sizes(shape, mode, offset):
    x = torch.randn(shape, device="cuda").to(torch.bfloat16).requires_grad_()
    w = (torch.randn(shape[-1], device="cuda") * 0.2 + (1.0 if mode == "llama" else 0.0)).to(torch.bfloat16)
    w.requires_grad_()
    _check(x, w, mode, offset)
