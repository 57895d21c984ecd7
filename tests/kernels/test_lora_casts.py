"""Kept casts of the LoRA factors (kernels/lora_casts.py): the same numbers as casting anew on every call,
whatever changed the factors in between, and the buffer reused only when no graph reads it."""

from __future__ import annotations

import torch

from cpt_plugin.kernels.lora import LoraProjection, lora_gated_mlp, lora_grouped_linear, lora_linear
from cpt_plugin.kernels.lora_casts import forget_kept_casts

D, H, R = 24, 40, 8


def _projection(n_in: int, n_out: int, seed: int) -> LoraProjection:
    g = torch.Generator().manual_seed(seed)
    return LoraProjection(
        weight=(torch.randn(n_out, n_in, generator=g) / n_in**0.5).bfloat16(),
        bias=None,
        lora_a=(torch.randn(R, n_in, generator=g) / n_in**0.5).requires_grad_(True),  # fp32, as PEFT's
        lora_b=(0.5 * torch.randn(n_out, R, generator=g)).requires_grad_(True),
        scale=2.0,
    )


def _mlp() -> tuple[LoraProjection, ...]:
    return _projection(D, H, 1), _projection(D, H, 2), _projection(H, D, 3)


def _factors(projections) -> list[torch.Tensor]:
    return [t for p in projections for t in (p.lora_a, p.lora_b)]


def _x(seed: int, tokens: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, tokens, D, generator=g).bfloat16().requires_grad_(True)


def _run(call, projections, x, keep: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    out = call(x, projections, keep)
    out = out if isinstance(out, torch.Tensor) else torch.cat([o.flatten() for o in out])
    grads = torch.autograd.grad(out.float().square().mean(), [x, *_factors(projections)])
    return out.detach(), list(grads)


def _assert_same(got, want) -> None:
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    for g, w in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


CALLS = {
    "mlp": lambda x, p, keep: lora_gated_mlp(x, *p, keep_casts=keep),
    "qkv": lambda x, p, keep: lora_grouped_linear(x, p, keep_casts=keep),
    "o": lambda x, p, keep: lora_linear(x, p[0], keep_casts=keep),
}


def _projections_for(name: str) -> tuple[LoraProjection, ...]:
    if name == "mlp":
        return _mlp()
    if name == "qkv":
        return _projection(D, D, 4), _projection(D, 16, 5), _projection(D, 16, 6)
    return (_projection(D, D, 7),)


def _kept_buffer(projections) -> torch.Tensor:
    (site,) = projections[0].kept_casts.values()
    return site.casts[0]


def test_kept_cast_follows_every_optimizer_step_and_reuses_its_buffer():
    """Three steps of SGD: each forward equals a fresh cast's, the buffer is refreshed in place."""
    for name, call in CALLS.items():
        projections = _projections_for(name)
        optimizer = torch.optim.SGD(_factors(projections), lr=1e-3)
        pointers = set()
        for step in range(3):
            x = _x(step)
            want = _run(call, projections, x, keep=False)
            got = _run(call, projections, x, keep=True)
            _assert_same(got, want)
            pointers.add(_kept_buffer(projections).data_ptr())
            for factor, grad in zip(_factors(projections), got[1][1:], strict=True):
                factor.grad = grad
            optimizer.step()
        assert len(pointers) == 1, f"{name}: the kept buffer was reallocated instead of refreshed in place"


class _DataWritingSGD(torch.optim.Optimizer):
    """Updates through ``param.data`` (as some optimizers do): no version bump on the parameter."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.data.add_(p.grad, alpha=-group["lr"])


def test_an_optimizer_writing_through_data_still_refreshes_the_cast():
    projections = _mlp()
    factors = _factors(projections)
    optimizer = _DataWritingSGD(factors, lr=1e-3)
    for step in range(2):
        versions = [f._version for f in factors]
        x = _x(step)
        _assert_same(
            _run(CALLS["mlp"], projections, x, keep=True), _run(CALLS["mlp"], projections, x, keep=False)
        )
        for f in factors:
            f.grad = torch.ones_like(f)
        optimizer.step()
        assert [f._version for f in factors] == versions  # the case the optimizer step hook is for


def test_writes_through_data_without_an_optimizer_need_forget_kept_casts():
    projections = _mlp()
    x = _x(0)
    _run(CALLS["mlp"], projections, x, keep=True)
    projections[0].lora_a.data.mul_(3.0)  # no version bump, no optimizer step
    forget_kept_casts()
    _assert_same(
        _run(CALLS["mlp"], projections, x, keep=True), _run(CALLS["mlp"], projections, x, keep=False)
    )


def test_replaced_parameter_storage_is_cast_anew():
    projections = _mlp()
    x = _x(0)
    _run(CALLS["mlp"], projections, x, keep=True)
    projections[2].lora_b.data = projections[2].lora_b.data * -1.0  # new storage, same version
    _assert_same(
        _run(CALLS["mlp"], projections, x, keep=True), _run(CALLS["mlp"], projections, x, keep=False)
    )


def test_a_second_forward_before_backward_does_not_overwrite_the_first_graphs_cast():
    """Forward, optimizer step, forward again, then both backwards: each graph keeps the factors it saw."""
    for name, call in CALLS.items():
        kept, fresh = _projections_for(name), _projections_for(name)
        results = {}
        for keep, projections in ((True, kept), (False, fresh)):
            optimizer = torch.optim.SGD(_factors(projections), lr=1e-3)
            x1, x2 = _x(1), _x(2)
            out1 = call(x1, projections, keep)
            out1 = out1 if isinstance(out1, torch.Tensor) else torch.cat([o.flatten() for o in out1])
            for f in _factors(projections):
                f.grad = torch.full_like(f, 0.01)
            optimizer.step()  # the factors change while the first graph is pending
            out2 = call(x2, projections, keep)
            out2 = out2 if isinstance(out2, torch.Tensor) else torch.cat([o.flatten() for o in out2])
            results[keep] = torch.autograd.grad(
                out1.float().square().mean() + out2.float().square().mean(), [x1, x2, *_factors(projections)]
            )
        for g, w in zip(results[True], results[False], strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=0, msg=name)


def test_nothing_is_kept_without_keep_casts_or_in_the_factors_dtype():
    projections = _mlp()
    _run(CALLS["mlp"], projections, _x(0), keep=False)
    assert projections[0].kept_casts == {}
    x32 = _x(0).float().detach().requires_grad_(True)  # fp32 compute: the factors are used as they are
    lora_gated_mlp(x32, *projections, keep_casts=True)
    assert projections[0].kept_casts == {}


def test_release_kept_casts_drops_them_and_the_next_call_casts_anew():
    from cpt_plugin.kernels.lora_casts import release_kept_casts

    projections = _mlp()
    x = _x(0)
    _run(CALLS["mlp"], projections, x, keep=True)
    assert len(projections[0].kept_casts) == 1
    release_kept_casts()
    assert projections[0].kept_casts == {}
    _assert_same(
        _run(CALLS["mlp"], projections, x, keep=True), _run(CALLS["mlp"], projections, x, keep=False)
    )
