"""Fused linear cross-entropy vs the plain-PyTorch reference (CPU interpreter; GPU tests at real size)."""

from __future__ import annotations

import pytest
import torch

from cpt_plugin.kernels import fused_linear_cross_entropy as flce
from cpt_plugin.kernels.fused_linear_cross_entropy import (
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)

# max |ours - fp32 reference| / max |fp32 reference|, per dtype
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}
LOSS_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    # A few rows per chunk, so the chunk loop (and a ragged last chunk) is always exercised.
    monkeypatch.setattr(flce, "CPU_CHUNK_BYTES", 12 * 4 * 1000)


def _inputs(n, h, v, dtype, bias=False, ignore_every=0, device="cpu"):
    hidden = torch.randn(n, h, device=device).to(dtype)
    weight = (torch.randn(v, h, device=device) / h**0.5 * 2).to(dtype)
    b = torch.randn(v, device=device).to(dtype) if bias else None
    labels = torch.randint(0, v, (n,), device=device)
    if ignore_every:
        labels[::ignore_every] = -100
    return hidden, weight, b, labels


def _run(fn, hidden, weight, bias, labels, upcast=False, grad_scale=1.0, **kw):
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    leaves = [(t.detach().float() if upcast else t.detach().clone()).requires_grad_() for t in leaves]
    h, w = leaves[0], leaves[1]
    b = leaves[2] if bias is not None else None
    loss = fn(h, w, labels, b, **kw)
    (loss * grad_scale).backward()
    return loss.detach(), [t.grad for t in leaves]


def _check(hidden, weight, bias, labels, dtype, grad_scale=1.0, **kw):
    loss, grads = _run(fused_linear_cross_entropy, hidden, weight, bias, labels, grad_scale=grad_scale, **kw)
    ref_loss, ref_grads = _run(
        fused_linear_cross_entropy_reference,
        hidden,
        weight,
        bias,
        labels,
        upcast=True,
        grad_scale=grad_scale,
        **kw,
    )
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert torch.isfinite(loss)
    assert abs(loss.item() - ref_loss.item()) <= LOSS_TOL[dtype] * max(1.0, abs(ref_loss.item()))
    for g, r, t in zip(grads, ref_grads, (hidden, weight, bias), strict=False):
        assert g.dtype == t.dtype and g.shape == t.shape
        assert torch.isfinite(g).all()
        err = (g.float() - r).abs().max().item()
        assert err <= TOL[dtype] * max(r.abs().max().item(), 1e-6), f"max err {err}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,h,v", [(1, 16, 37), (7, 48, 300), (33, 16, 1000), (33, 48, 37), (7, 16, 1000)])
def test_matches_reference(n, h, v, dtype):
    hidden, weight, bias, labels = _inputs(n, h, v, dtype, bias=True, ignore_every=3 if n > 1 else 0)
    _check(hidden, weight, bias, labels, dtype)


def test_no_bias_and_frozen_weight():
    hidden, weight, _, labels = _inputs(33, 48, 300, torch.float32, ignore_every=4)
    h = hidden.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, weight, labels)
    loss.backward()
    h_ref = hidden.clone().requires_grad_()
    ref = fused_linear_cross_entropy_reference(h_ref, weight, labels)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-4, atol=1e-6)
    assert weight.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_ignored_gives_zero(dtype):
    hidden, weight, bias, _ = _inputs(7, 16, 300, dtype, bias=True)
    labels = torch.full((7,), -100)
    loss, grads = _run(fused_linear_cross_entropy, hidden, weight, bias, labels)
    assert loss.item() == 0.0
    for g in grads:
        assert torch.isfinite(g).all() and (g == 0).all()


@pytest.mark.parametrize("as_tensor", [False, True])
def test_num_items_in_batch(as_tensor):
    hidden, weight, bias, labels = _inputs(33, 16, 300, torch.float32, bias=True, ignore_every=5)
    num = 57
    _check(
        hidden,
        weight,
        bias,
        labels,
        torch.float32,
        num_items_in_batch=torch.tensor(num) if as_tensor else num,
    )


def test_reduction_sum():
    hidden, weight, bias, labels = _inputs(33, 48, 300, torch.float32, bias=True, ignore_every=6)
    _check(hidden, weight, bias, labels, torch.float32, reduction="sum")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softcap(dtype):
    hidden, weight, bias, labels = _inputs(33, 48, 1000, dtype, bias=False, ignore_every=4)
    _check(hidden, weight * 20, bias, labels, dtype, softcap=30.0)  # logits of order the cap


def test_custom_ignore_index():
    hidden, weight, bias, labels = _inputs(33, 16, 37, torch.float32)
    labels[::2] = 5
    _check(hidden, weight, bias, labels, torch.float32, ignore_index=5)


def test_grad_output_not_one():
    hidden, weight, bias, labels = _inputs(33, 48, 300, torch.float32, bias=True, ignore_every=3)
    _check(hidden, weight, bias, labels, torch.float32, grad_scale=3.0)


def test_loss_can_be_scaled_in_place():
    # transformers' Trainer does `loss *= world_size` on the model's loss (with num_items_in_batch, also in
    # one process); autograd forbids that on a view returned by a custom Function, so the loss is no view.
    hidden, weight, _, labels = _inputs(33, 16, 300, torch.float32)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, w, labels, num_items_in_batch=torch.tensor(66))
    assert loss.dim() == 0 and not loss._is_view()
    loss *= 2
    loss.backward()
    ref_loss, (ref_h, ref_w) = _run(
        fused_linear_cross_entropy_reference,
        hidden,
        weight,
        None,
        labels,
        grad_scale=2.0,
        num_items_in_batch=66,
    )
    torch.testing.assert_close(loss.detach(), 2 * ref_loss)
    torch.testing.assert_close(h.grad, ref_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, ref_w, rtol=1e-5, atol=1e-6)


def test_non_contiguous_hidden():
    base = torch.randn(48, 66)
    hidden = base.t()[::2]  # [33, 48], strides (2, 66)
    assert not hidden.is_contiguous()
    _, weight, bias, labels = _inputs(33, 48, 300, torch.float32, bias=True, ignore_every=7)
    _check(hidden, weight, bias, labels, torch.float32)


def test_no_grad_mode_returns_loss():
    hidden, weight, bias, labels = _inputs(33, 16, 300, torch.float32, bias=True)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, labels, bias)
    ref = fused_linear_cross_entropy_reference(hidden, weight, labels, bias)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_torch_fallback_path(monkeypatch, softcap):
    """CPU without the interpreter: the chunked torch path, same results."""
    monkeypatch.setattr(flce, "use_triton", lambda *t: False)
    hidden, weight, bias, labels = _inputs(33, 48, 1000, torch.float32, bias=True, ignore_every=3)
    _check(hidden, weight, bias, labels, torch.float32, softcap=softcap, grad_scale=2.0)
    _check(hidden.bfloat16(), weight.bfloat16(), bias.bfloat16(), labels, torch.bfloat16)


def test_autocast_cpu_matches_reference_under_autocast():
    hidden, weight, bias, labels = _inputs(7, 16, 300, torch.float32, bias=True)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(h1, w1, labels)
        ref = fused_linear_cross_entropy_reference(h2, w2, labels)
    loss.backward()
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-2
    assert w1.grad.dtype == torch.float32
    for a, b in ((h1.grad, h2.grad), (w1.grad, w2.grad)):
        assert (a - b).abs().max() <= 3e-2 * b.abs().max()


# ---------------------------------------------------------------- GPU, real size (run by gpu_check.sh)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_gpu_llama_size(softcap):
    """8192 tokens x 2048 x 128256 bf16: ours vs a float32 reference, no worse than HF's bf16 path."""
    n, h, v = 8192, 2048, 128256
    hidden, weight, _, labels = _inputs(n, h, v, torch.bfloat16, ignore_every=11, device="cuda")
    x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = fused_linear_cross_entropy(x, w, labels, softcap=softcap)
    loss.backward()
    torch.cuda.synchronize()
    gh, gw = x.grad, w.grad
    extra = torch.cuda.max_memory_allocated() - base - gh.numel() * 2 - gw.numel() * 2
    assert extra <= flce.GPU_CHUNK_BYTES + 64 * 2**20, f"extra peak {extra / 2**30:.2f} GiB"
    del x, w

    bf_loss, (bf_gh, bf_gw) = _run(
        fused_linear_cross_entropy_reference, hidden, weight, None, labels, softcap=softcap
    )
    ref_loss, (ref_gh, ref_gw) = _run(
        fused_linear_cross_entropy_reference, hidden, weight, None, labels, upcast=True, softcap=softcap
    )
    assert abs(loss.item() - bf_loss.item()) < 1e-3
    assert abs(loss.item() - ref_loss.item()) < 2e-2
    for ours, hf, ref in ((gh, bf_gh, ref_gh), (gw, bf_gw, ref_gw)):
        # grad_weight is accumulated in bf16 over the chunks (fp32 inside each matmul): a few roundings more.
        assert _rel_err(ours, ref) <= 2.5 * _rel_err(hf, ref) + 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_small_shapes(dtype):
    for n, h, v in [(1, 16, 37), (33, 48, 1000), (1000, 64, 5000)]:
        hidden, weight, bias, labels = _inputs(
            n, h, v, dtype, bias=True, ignore_every=3 if n > 1 else 0, device="cuda"
        )
        _check(hidden, weight, bias, labels, dtype)
        _check(hidden, weight, None, labels, dtype, softcap=30.0, grad_scale=3.0)


@pytest.mark.gpu
def test_gpu_fp32_weight_under_autocast():
    """HF Trainer bf16 mixed precision: fp32 weights, bf16 autocast; grad_weight stays fp32."""
    hidden, weight, _, labels = _inputs(2048, 512, 32000, torch.float32, ignore_every=5, device="cuda")
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(h1, w1, labels)
        ref = fused_linear_cross_entropy_reference(h2, w2, labels)
    loss.backward()
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-3
    assert w1.grad.dtype == torch.float32 and h1.grad.dtype == torch.float32
    assert _rel_err(h1.grad, h2.grad) < 2e-2
    assert _rel_err(w1.grad, w2.grad) < 2e-2


@pytest.mark.parametrize("chunk_bytes", [1, 3 * 37 * 4, 10**9])
def test_chunk_bytes_keyword_matches_reference(chunk_bytes):
    """One row, three rows and one chunk for everything give the same loss and gradients."""
    import functools

    hidden, weight, bias, labels = _inputs(9, 16, 37, torch.float32, bias=True, ignore_every=4)
    ours = functools.partial(fused_linear_cross_entropy, chunk_bytes=chunk_bytes)
    loss, grads = _run(ours, hidden, weight, bias, labels)
    ref_loss, ref_grads = _run(fused_linear_cross_entropy_reference, hidden, weight, bias, labels)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def _run_counting_allocations(fn, *args, **kwargs):
    """Runs fn, returning the sizes (bytes) of the fresh tensors that factory ops made inside it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    factories = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_like.default}
    factories |= {
        torch.ops.aten.zeros_like.default,
        torch.ops.aten.zeros.default,
        torch.ops.aten.ones.default,
    }
    sizes: list[int] = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in factories:
                sizes.append(out.numel() * out.element_size())
            return out

    with Count():
        result = fn(*args, **kwargs)
    return result, sizes


def test_extra_memory_is_the_one_chunk_buffer_counted_on_cpu():
    """Every buffer made inside the call is a returned gradient, the per-row losses or the one logits
    chunk, which stays within the budget: the analytic count of extra_memory_bytes."""
    n, h, v = 33, 16, 301
    hidden, weight, _, labels = _inputs(n, h, v, torch.float32)
    hidden.requires_grad_()
    weight.requires_grad_()
    budget = 5 * v * 4  # five rows
    loss, sizes = _run_counting_allocations(
        fused_linear_cross_entropy, hidden, weight, labels, chunk_bytes=budget
    )
    plan = flce.extra_memory_bytes(n, h, v, torch.float32, device="cpu", chunk_bytes=budget)
    grads = {n * h * 4, v * h * 4}
    extra = sorted(s for s in sizes if s not in grads and s > 4)  # one-element scale factors aside
    assert extra == sorted([plan["logits_chunk"], plan["loss_rows"]]), (extra, plan)
    assert plan["logits_chunk"] == 5 * v * 4 <= budget
    loss.backward()


def test_extra_memory_plan_at_the_benchmark_shape():
    plan = flce.extra_memory_bytes(8192, 2048, 128256, torch.bfloat16, device="cuda")
    assert plan["logits_chunk"] == 512 * 128256 * 2 <= flce.GPU_CHUNK_BYTES  # 125.3 MiB
    assert plan["total"] < 0.125 * 2**30
    liger_like = flce.extra_memory_bytes(8192, 2048, 128256, device="cuda", chunk_bytes=64 * 2**20)
    assert liger_like["logits_chunk"] == 256 * 128256 * 2  # Liger 0.8.5's chunk at this shape
    fp32_head = flce.extra_memory_bytes(8192, 2048, 128256, weight_dtype=torch.float32, device="cuda")
    assert fp32_head["weight_cast"] == 128256 * 2048 * 2  # the bf16 copy of an fp32 lm_head under autocast


def test_chunk_bytes_must_be_positive():
    hidden, weight, _, labels = _inputs(3, 16, 37, torch.float32)
    with pytest.raises(ValueError, match="chunk_bytes"):
        fused_linear_cross_entropy(hidden, weight, labels, chunk_bytes=0)


@pytest.mark.gpu
def test_gpu_extra_peak_memory_matches_the_plan():
    """Measured extra peak (beyond inputs and the returned gradients) at 8192 x 2048 x 128256 bf16."""
    n, h, v = 8192, 2048, 128256
    hidden, weight, _, labels = _inputs(n, h, v, torch.bfloat16, device="cuda")
    hidden.requires_grad_()
    weight.requires_grad_()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fused_linear_cross_entropy(hidden, weight, labels).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - (n * h + v * h) * 2
    plan = flce.extra_memory_bytes(n, h, v, torch.bfloat16, device="cuda")
    assert extra <= plan["total"] + 8 * 2**20, (extra / 2**20, plan)
