"""The fused LoRA projection and gated MLP against their plain-PyTorch references (forward and gradients)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cpt_plugin.kernels.lora import (
    LoraProjection,
    compute_dtype,
    lora_gated_mlp,
    lora_gated_mlp_reference,
    lora_grouped_linear,
    lora_linear,
    lora_linear_reference,
)
from tests.kernel_math._helpers import assert_close_scaled

# bf16 outputs of a sum of two matmuls: a few ulps of the largest term
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


def _projection(
    n_in: int, n_out: int, rank: int, dtype: torch.dtype, bias: bool, scale: float
) -> LoraProjection:
    weight = (torch.randn(n_out, n_in) / n_in**0.5).to(dtype)
    return LoraProjection(
        weight=weight,
        bias=(0.1 * torch.randn(n_out)).to(dtype) if bias else None,
        lora_a=(torch.randn(rank, n_in) / n_in**0.5).requires_grad_(True),  # fp32, as PEFT keeps them
        lora_b=(0.5 * torch.randn(n_out, rank) / rank**0.5).requires_grad_(True),
        scale=scale,
    )


def _to_device(p: LoraProjection, device: torch.device) -> LoraProjection:
    """The same projection on ``device`` (no bias), its factors fresh leaves there."""
    return LoraProjection(
        p.weight.to(device),
        None,
        p.lora_a.detach().to(device).requires_grad_(True),
        p.lora_b.detach().to(device).requires_grad_(True),
        p.scale,
    )


def _grads(out: torch.Tensor, tensors: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device, out.dtype)
    return list(torch.autograd.grad(out, tensors, upstream))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("tokens", "n_in", "n_out", "rank", "bias"),
    [(7, 48, 56, 8, False), (33, 80, 24, 16, True), (5, 40, 72, 128, False), (1, 24, 40, 256, True)],
)
def test_lora_linear_matches_reference(dtype, tokens, n_in, n_out, rank, bias):
    p = _projection(n_in, n_out, rank, dtype, bias, scale=32 / rank**0.5)
    x = torch.randn(3, tokens, n_in).to(dtype).requires_grad_(True)
    got = lora_linear(x, p)
    want = lora_linear_reference(x, p)
    assert got.dtype == want.dtype == dtype
    assert_close_scaled(got, want, TOL[dtype], "output")
    inputs = [x, p.lora_a, p.lora_b]
    for name, g, w in zip(("x", "A", "B"), _grads(got, inputs, 1), _grads(want, inputs, 1), strict=True):
        assert g.dtype == w.dtype, name
        assert_close_scaled(g, w, TOL[dtype], name)


def test_lora_linear_under_autocast_keeps_the_activation_dtype():
    """bf16 autocast on an fp32 input: computed in bf16 (as PEFT under autocast), gradient back in fp32."""
    p = _projection(32, 40, 8, torch.float32, True, 2.0)
    x = torch.randn(9, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(x) is torch.bfloat16
        got = lora_linear(x, p)
        want = lora_linear_reference(x, p)
    assert got.dtype == torch.bfloat16
    assert_close_scaled(got, want, TOL[torch.bfloat16], "output")
    gx, ga = _grads(got, [x, p.lora_a], 2)
    wx, wa = _grads(want, [x, p.lora_a], 2)
    assert gx.dtype == torch.float32 and ga.dtype == torch.float32
    assert_close_scaled(gx, wx, TOL[torch.bfloat16], "x")
    assert_close_scaled(ga, wa, TOL[torch.bfloat16], "A")


def test_lora_linear_against_float64():
    """Independent of the reference's own rounding: fp32 kernel vs the float64 formula."""
    p = _projection(50, 30, 8, torch.float32, True, 0.7)
    x = torch.randn(13, 50)
    got = lora_linear(x, p).double()
    d = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in vars(p).items()}
    x64 = x.double()
    want = x64 @ d["weight"].t() + d["bias"] + 0.7 * (x64 @ d["lora_a"].t()) @ d["lora_b"].t()
    assert (got - want).norm() / want.norm() < 1e-6


def test_only_needed_gradients_are_formed():
    p = _projection(16, 16, 4, torch.float32, False, 1.0)
    x = torch.randn(5, 16)  # no grad: the first layer after frozen embeddings
    out = lora_linear(x, p)
    (ga,) = torch.autograd.grad(out.sum(), [p.lora_a])
    assert ga.shape == p.lora_a.shape


@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("tokens", "hidden", "inter", "rank"), [(7, 48, 80, 8), (17, 40, 56, 128)])
def test_gated_mlp_matches_reference(activation, dtype, tokens, hidden, inter, rank):
    gate = _projection(hidden, inter, rank, dtype, False, 32 / rank**0.5)
    up = _projection(hidden, inter, rank, dtype, True, 32 / rank**0.5)
    down = _projection(inter, hidden, rank, dtype, False, 32 / rank**0.5)
    x = torch.randn(2, tokens, hidden).to(dtype).requires_grad_(True)
    got = lora_gated_mlp(x, gate, up, down, activation)
    want = lora_gated_mlp_reference(x, gate, up, down, activation)
    assert_close_scaled(got, want, TOL[dtype], "output")
    inputs = [x] + [t for p in (gate, up, down) for t in (p.lora_a, p.lora_b)]
    names = ["x", "gate.A", "gate.B", "up.A", "up.B", "down.A", "down.B"]
    for name, g, w in zip(names, _grads(got, inputs, 3), _grads(want, inputs, 3), strict=True):
        assert_close_scaled(g, w, 2 * TOL[dtype], name)


def test_gated_mlp_rejects_unknown_activation():
    p = _projection(8, 8, 2, torch.float32, False, 1.0)
    with pytest.raises(ValueError, match="swiglu"):
        lora_gated_mlp(torch.randn(2, 8), p, p, p, "relu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("tokens", "hidden", "outs", "ranks"),
    [(7, 48, (48, 16, 16), (8, 8, 8)), (19, 40, (40, 24, 24), (16, 4, 128))],
)
def test_grouped_linear_matches_reference(dtype, tokens, hidden, outs, ranks):
    projections = [
        _projection(hidden, n, r, dtype, i == 1, 2.0 / (i + 1))
        for i, (n, r) in enumerate(zip(outs, ranks, strict=True))
    ]
    x = torch.randn(2, tokens, hidden).to(dtype).requires_grad_(True)
    got = lora_grouped_linear(x, projections)
    want = [lora_linear_reference(x, p) for p in projections]
    inputs = [x] + [t for p in projections for t in (p.lora_a, p.lora_b)]
    upstream = [torch.randn(w.shape).to(dtype) for w in want]
    for g, w in zip(got, want, strict=True):
        assert_close_scaled(g, w, TOL[dtype], "output")
    got_grads = torch.autograd.grad(got, inputs, upstream)
    want_grads = torch.autograd.grad(want, inputs, upstream)
    for i, (g, w) in enumerate(zip(got_grads, want_grads, strict=True)):
        assert_close_scaled(g, w, 2 * TOL[dtype], f"input {i}")


def test_grouped_linear_with_an_unused_output():
    projections = [_projection(24, 24, 4, torch.float32, False, 1.0) for _ in range(3)]
    x = torch.randn(5, 24, requires_grad=True)
    q, k, _ = lora_grouped_linear(x, projections)
    gx, gb = torch.autograd.grad((q * k).sum(), [x, projections[2].lora_b], allow_unused=True)
    rq, rk = (lora_linear_reference(x, p) for p in projections[:2])
    (wx,) = torch.autograd.grad((rq * rk).sum(), [x])
    assert_close_scaled(gx, wx, TOL[torch.float32], "x")
    assert gb is None or not gb.any()


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
def test_fused_lora_on_gpu_bf16(activation):
    """Real Triton GLU kernel and cuBLAS bf16 matmuls: MLP, group and single projection against references."""
    device = torch.device("cuda")
    hidden, inter, rank, tokens = 320, 864, 128, 1031
    gate, up, down = (
        _projection(a, b, rank, torch.bfloat16, False, 32 / rank**0.5)
        for a, b in ((hidden, inter),) * 2 + ((inter, hidden),)
    )
    gate, up, down = (_to_device(p, device) for p in (gate, up, down))
    x = torch.randn(2, tokens, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    got = lora_gated_mlp(x, gate, up, down, activation)
    want = lora_gated_mlp_reference(x, gate, up, down, activation)
    assert_close_scaled(got, want, TOL[torch.bfloat16], "mlp")
    inputs = [x, gate.lora_a, up.lora_b, down.lora_a]
    for g, w in zip(_grads(got, inputs, 4), _grads(want, inputs, 4), strict=True):
        assert_close_scaled(g, w, 2 * TOL[torch.bfloat16], "mlp grads")
    q, k = lora_grouped_linear(x, [gate, up])
    assert_close_scaled(q, lora_linear_reference(x, gate), TOL[torch.bfloat16], "group q")
    assert_close_scaled(k, lora_linear_reference(x, up), TOL[torch.bfloat16], "group k")
    assert_close_scaled(lora_linear(x, up), lora_linear_reference(x, up), TOL[torch.bfloat16], "linear")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_linear_with_one_scale_and_an_unused_output(dtype):
    """rsLoRA with one r and alpha (the usual case): the scale rides on the dA and dX GEMMs; an output
    without gradient leaves its block of u at zero."""
    projections = [_projection(40, n, 16, dtype, False, 32 / 16**0.5) for n in (40, 24, 24)]
    x = torch.randn(3, 11, 40).to(dtype).requires_grad_(True)
    inputs = [x] + [t for p in projections for t in (p.lora_a, p.lora_b)]
    q, _, v = lora_grouped_linear(x, projections)
    rq, _, rv = (lora_linear_reference(x, p) for p in projections)
    upstream = [torch.randn(t.shape).to(dtype) for t in (q, v)]
    got = torch.autograd.grad((q, v), inputs, upstream, allow_unused=True)
    want = torch.autograd.grad((rq, rv), inputs, upstream, allow_unused=True)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if w is None:
            assert g is None or not g.any(), i
        else:
            assert_close_scaled(g, w, 2 * TOL[dtype], f"input {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_mlp_recompute_gives_the_same_gradients(dtype):
    """skip_output (a checkpoint's recompute): zeros out, act(gate) * up kept for backward instead of formed
    again; the gradients equal those of the full forward."""
    gate, up, down = (_projection(a, b, 8, dtype, False, 2.0) for a, b in ((32, 48), (32, 48), (48, 32)))
    x = torch.randn(13, 32).to(dtype).requires_grad_(True)
    inputs = [x] + [t for p in (gate, up, down) for t in (p.lora_a, p.lora_b)]
    full = lora_gated_mlp(x, gate, up, down)
    skipped = lora_gated_mlp(x, gate, up, down, skip_output=True)
    assert not skipped.any()
    assert skipped.untyped_storage().nbytes() == skipped.element_size()  # one element, not tokens x hidden
    upstream = torch.randn(full.shape).to(dtype)
    for i, (g, w) in enumerate(
        zip(
            torch.autograd.grad(skipped, inputs, upstream),
            torch.autograd.grad(full, inputs, upstream),
            strict=True,
        )
    ):
        torch.testing.assert_close(g, w, msg=f"input {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("tokens", "hidden", "inter"), [(13, 32, 48), (1, 24, 40), (37, 40, 72)])
def test_gated_mlp_keeping_its_product_gives_the_same_numbers_and_forms_it_once(
    monkeypatch, dtype, tokens, hidden, inter
):
    """keep_product: act(gate) * up from the forward is used by backward (the gated-activation kernel runs
    once, not again in backward), and output and gradients are bitwise those without it; a second
    backward of the same graph (retain_graph) forms it again and is still right."""
    from cpt_plugin.kernels import lora as lora_module

    calls = []
    real = lora_module.glu_forward
    monkeypatch.setattr(lora_module, "glu_forward", lambda *a: calls.append(1) or real(*a))
    gate, up, down = (
        _projection(a, b, 8, dtype, False, 2.0) for a, b in ((hidden, inter),) * 2 + ((inter, hidden),)
    )
    x = torch.randn(tokens, hidden).to(dtype).requires_grad_(True)
    inputs = [x] + [t for p in (gate, up, down) for t in (p.lora_a, p.lora_b)]
    upstream = torch.randn(tokens, hidden).to(dtype)
    plain = lora_gated_mlp(x, gate, up, down)
    want = torch.autograd.grad(plain, inputs, upstream)
    assert len(calls) == 2  # forward, and again in backward
    calls.clear()
    kept = lora_gated_mlp(x, gate, up, down, keep_product=True)
    torch.testing.assert_close(kept, plain, rtol=0, atol=0)
    first = torch.autograd.grad(kept, inputs, upstream, retain_graph=True)
    assert len(calls) == 1  # the forward's only
    second = torch.autograd.grad(kept, inputs, upstream)
    for i, (a, b, w) in enumerate(zip(first, second, want, strict=True)):
        torch.testing.assert_close(a, w, rtol=0, atol=0, msg=f"input {i}")
        torch.testing.assert_close(b, w, rtol=0, atol=0, msg=f"input {i}, second backward")
    # a recompute's skipped output already keeps it: keep_product changes nothing there
    skipped = lora_gated_mlp(x, gate, up, down, skip_output=True, keep_product=True)
    assert not skipped.any()


def test_a_captured_backward_leaves_the_kept_product_with_the_graph(monkeypatch):
    """Inside a CUDA graph's backward capture (stubbed here) the kept product is not given back to the
    pool: the forward graph's replay writes that memory and the backward graph's replay reads it, so a
    later capture must not be handed it (on an H200 that turned the loss NaN). Outside a capture it is
    released in backward, as before, and a second backward still forms it again."""
    from cpt_plugin.kernels import lora as lora_module

    gate, up, down = (
        _projection(a, b, 8, torch.float32, False, 2.0) for a, b in ((24, 40),) * 2 + ((40, 24),)
    )
    x = torch.randn(9, 24).requires_grad_(True)
    inputs = [x] + [t for p in (gate, up, down) for t in (p.lora_a, p.lora_b)]
    upstream = torch.randn(9, 24)
    want = torch.autograd.grad(lora_gated_mlp(x, gate, up, down), inputs, upstream)
    for capturing in (True, False):
        monkeypatch.setattr(lora_module, "_capturing", lambda capturing=capturing: capturing)
        out = lora_gated_mlp(x, gate, up, down, keep_product=True)
        node = out.grad_fn  # the fused MLP's backward node: its ctx
        assert node.kept_hidden is not None
        first = torch.autograd.grad(out, inputs, upstream, retain_graph=True)
        held = getattr(node, "captured_product", None)
        assert (held is not None) == capturing and node.kept_hidden is None
        second = torch.autograd.grad(out, inputs, upstream)  # recomputes the product: the kept one is gone
        for i, (a, b, w) in enumerate(zip(first, second, want, strict=True)):
            torch.testing.assert_close(a, w, rtol=0, atol=0, msg=f"input {i}")
            torch.testing.assert_close(b, w, rtol=0, atol=0, msg=f"input {i}, second backward")


def test_gated_mlp_with_gate_and_up_of_different_ranks_and_scales():
    """gate and up share one stacked A (one x A^T GEMM, one u buffer): ranks and scales that differ
    between them (PEFT's rank_pattern / alpha_pattern) and biases still give the reference gradients."""
    gate = _projection(40, 56, 8, torch.float32, True, 2.0)
    up = _projection(40, 56, 24, torch.float32, False, 0.5)
    down = _projection(56, 40, 16, torch.float32, True, 1.0)
    x = torch.randn(2, 9, 40).requires_grad_(True)
    inputs = [x] + [t for p in (gate, up, down) for t in (p.lora_a, p.lora_b)]
    got = lora_gated_mlp(x, gate, up, down)
    want = lora_gated_mlp_reference(x, gate, up, down)
    assert_close_scaled(got, want, TOL[torch.float32], "output")
    for i, (g, w) in enumerate(zip(_grads(got, inputs, 5), _grads(want, inputs, 5), strict=True)):
        assert_close_scaled(g, w, TOL[torch.float32], f"input {i}")


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops a call dispatches (what a GPU would launch), by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def gemms(self) -> int:
        return sum(self.counts[name] for name in ("mm", "addmm", "addmm_"))


def _bf16_lora(n_in: int, n_out: int, rank: int = 8) -> LoraProjection:
    """A bf16 base weight with fp32 factors: PEFT's layout on a bf16 model."""
    return _projection(n_in, n_out, rank, torch.bfloat16, False, 2.0)


def test_launch_counts_of_the_gated_mlp_and_the_qkv_group():
    """Each launch costs host time that an offloaded backward waits for: the fp32 factors of a group are
    cast by one foreach copy (A's stacked, no cat), gate and up share one x A^T GEMM and one dA / dX-LoRA
    GEMM, and all six factors of the MLP are cast by one copy. Pins the counts: forward 8 GEMMs and 1 copy
    for the MLP (was 9 GEMMs and 6 casts, then 2 copies), backward 13 GEMMs (was 15); q/k/v forward 7
    GEMMs, 1 copy, no cat."""
    gate, up, down = _bf16_lora(32, 48), _bf16_lora(32, 48), _bf16_lora(48, 32)
    x = torch.randn(13, 32, dtype=torch.bfloat16, requires_grad=True)
    with _OpCounter() as forward:
        out = lora_gated_mlp(x, gate, up, down)
    assert forward.gemms() == 8
    assert forward.counts["_foreach_copy_"] == 1
    assert forward.counts["_to_copy"] == 0 and forward.counts["cat"] == 0
    with _OpCounter() as backward:
        out.backward(torch.randn_like(out))
    assert backward.gemms() == 13
    q, k, v = _bf16_lora(32, 32), _bf16_lora(32, 16), _bf16_lora(32, 16)
    with _OpCounter() as group:
        lora_grouped_linear(x, [q, k, v])
    assert group.gemms() == 7
    assert group.counts["_foreach_copy_"] == 1
    assert group.counts["_to_copy"] == 0 and group.counts["cat"] == 0


def test_a_trained_base_layer_is_refused_not_silently_frozen():
    """The fused functions hold the base weight and bias outside autograd (fewer tracked arguments, less
    host time per call), so they form no gradient for them: a base that requires grad is an error."""
    p = _projection(16, 12, 4, torch.float32, True, 1.0)
    p.bias.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen base"):
        lora_linear(torch.randn(3, 16), p)
    q = _projection(16, 12, 4, torch.float32, False, 1.0)
    q.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen base"):
        lora_grouped_linear(torch.randn(3, 16), [q])


def test_fp32_gradient_gemm_falls_back_where_the_overload_is_missing(monkeypatch):
    """``out_dtype`` GEMMs exist on CUDA only: tried on another device they fail once, the 16-bit product
    is used from then on (autograd casts it), and the gradients stay right."""
    from cpt_plugin.kernels import lora as lora_module

    monkeypatch.setitem(lora_module._OUT_DTYPE_GEMM, "cpu", True)
    p = _bf16_lora(24, 40)
    x = torch.randn(2, 7, 24, dtype=torch.bfloat16, requires_grad=True)
    inputs = [x, p.lora_a, p.lora_b]
    got = _grads(lora_linear(x, p), inputs, 3)
    assert lora_module._OUT_DTYPE_GEMM["cpu"] is False
    want = _grads(lora_linear_reference(x, p), inputs, 3)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        assert_close_scaled(g, w, 2 * TOL[torch.bfloat16], "grads")


@pytest.mark.gpu
def test_lora_gradients_are_written_fp32_by_the_gemms_on_gpu():
    """On CUDA the factors' gradients come out of the GEMMs in fp32 (``out_dtype``): no cast kernel per
    gradient in backward, and they match the reference."""
    device = torch.device("cuda")
    gate, up, down = (
        _to_device(p, device)
        for p in (_bf16_lora(320, 864, 128), _bf16_lora(320, 864, 128), _bf16_lora(864, 320, 128))
    )
    x = torch.randn(3, 517, 320, device=device, dtype=torch.bfloat16, requires_grad=True)
    out = lora_gated_mlp(x, gate, up, down)
    upstream = torch.randn_like(out)
    inputs = [x] + [t for p in (gate, up, down) for t in (p.lora_a, p.lora_b)]
    with _OpCounter() as backward:
        got = torch.autograd.grad(out, inputs, upstream)
    assert backward.counts["_to_copy"] == 0, backward.counts
    want = torch.autograd.grad(lora_gated_mlp_reference(x, gate, up, down), inputs, upstream)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.dtype == w.dtype, i
        assert_close_scaled(g, w, 2 * TOL[torch.bfloat16], f"input {i}")


class _AllocationCounter(TorchDispatchMode):
    """Bytes of every tensor an op creates (``empty_like`` and friends included)."""

    def __init__(self) -> None:
        super().__init__()
        self.allocated = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.split(".")[0] in ("empty_like", "empty", "empty_strided", "new_empty"):
            self.allocated += out.numel() * out.element_size()
        return out


def test_gate_and_up_take_their_own_gradients():
    """The gated MLP's backward writes d gate and d up into gate's and up's memory (two tokens x
    intermediate buffers fewer at the peak), and a second backward of the same graph (retain_graph)
    recomputes them, so both backwards give the reference's gradients."""
    import os

    from cpt_plugin.kernels.swiglu import glu_backward

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("the overwrite is the Triton kernel's (CPU: the interpreter)")
    torch.manual_seed(0)
    gate_pre, up_pre, dy = (torch.randn(7, 90, dtype=torch.bfloat16) for _ in range(3))
    want = glu_backward(dy, gate_pre.clone(), up_pre.clone(), False)
    with _AllocationCounter() as fresh:
        glu_backward(dy, gate_pre.clone(), up_pre.clone(), False)
    g, u = gate_pre.clone(), up_pre.clone()
    with _AllocationCounter() as overwriting:
        got = glu_backward(dy, g, u, False, overwrite=True)
    assert got[0].data_ptr() == g.data_ptr() and got[1].data_ptr() == u.data_ptr()
    assert overwriting.allocated == fresh.allocated - 2 * g.numel() * g.element_size()
    torch.testing.assert_close(got, want, rtol=0, atol=0)

    hidden, inter, rank = 40, 56, 8
    gate = _projection(hidden, inter, rank, torch.bfloat16, False, 2.0)
    up = _projection(hidden, inter, rank, torch.bfloat16, True, 2.0)
    down = _projection(inter, hidden, rank, torch.bfloat16, False, 2.0)
    x = torch.randn(2, 9, hidden).to(torch.bfloat16).requires_grad_(True)
    inputs = [x] + [t for p in (gate, up, down) for t in (p.lora_a, p.lora_b)]
    upstream = torch.randn(2, 9, hidden, dtype=torch.bfloat16)
    reference = lora_gated_mlp_reference(x, gate, up, down)
    want = torch.autograd.grad(reference, inputs, upstream)
    out = lora_gated_mlp(x, gate, up, down)
    first = torch.autograd.grad(out, inputs, upstream, retain_graph=True)
    second = torch.autograd.grad(out, inputs, upstream)
    for name, a, b, w in zip(["x", "gA", "gB", "uA", "uB", "dA", "dB"], first, second, want, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)  # the recompute is the same math
        assert_close_scaled(a, w, 2 * TOL[torch.bfloat16], name)


class _FreshBuffers(TorchDispatchMode):
    """Element counts of the new (not view, not in-place, not ``out=``) tensors the ops return."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        packet = func.__name__.split(".")
        fresh = not func.is_view and not packet[0].endswith("_") and "out" not in packet[1:]
        if fresh and isinstance(out, torch.Tensor):
            self.shapes[out.numel()] += 1
        return out


def test_the_mlp_backward_forms_one_tokens_by_intermediate_buffer():
    """act(gate) * up is formed again for the down projection's gradients, and that is the only new
    tokens x intermediate buffer of the backward: d hidden goes into its memory, d gate and d up into
    gate's and up's (was four such buffers)."""
    import os

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("the overwrite is the Triton kernel's (CPU: the interpreter)")
    tokens, hidden, inter = 13, 32, 48
    gate, up, down = _bf16_lora(hidden, inter), _bf16_lora(hidden, inter), _bf16_lora(inter, hidden)
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16, requires_grad=True)
    out = lora_gated_mlp(x, gate, up, down)
    with _FreshBuffers() as backward:
        out.backward(torch.randn_like(out))
    assert backward.shapes[tokens * inter] == 1, backward.shapes
