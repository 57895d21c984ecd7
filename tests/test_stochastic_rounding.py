"""Stochastic rounding to bf16 and the AdamW updates built on it (cpt_plugin/stochastic_rounding.py)."""

from __future__ import annotations

import io

import pytest
import torch

from cpt_plugin import stochastic_rounding as sr
from cpt_plugin.optim import CPTAdamW

HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_fast_rounding_equals_the_written_out_reference() -> None:
    x = torch.randn(20_000, generator=_gen(0)) * torch.logspace(-38, 38, 20_000)
    x[:3] = torch.tensor([0.0, -0.0, 1.0])  # exact bf16 values
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, generator=_gen(1))
    fast = sr.stochastic_round_to_bf16(x, _gen(1))
    assert torch.equal(fast.view(torch.int16), sr.stochastic_round_reference(x, noise).view(torch.int16))
    assert torch.equal(fast[:3].float(), x[:3])


@pytest.mark.parametrize("lo", [1.0, -1.0, 3.0e-3, -7.0e-30])
@pytest.mark.parametrize("fraction", [0.03, 0.25, 0.5, 0.9])
def test_unbiased_between_two_bf16_neighbours(lo: float, fraction: float) -> None:
    lo_bf16 = torch.tensor(lo).to(torch.bfloat16)
    hi_bf16 = (lo_bf16.view(torch.int16) + 1).view(torch.bfloat16)  # next bf16 away from zero
    gap = hi_bf16.double() - lo_bf16.double()
    x = float(lo_bf16.double() + fraction * gap)
    n = 100_000
    rounded = sr.stochastic_round_to_bf16(torch.full((n,), x), _gen(3)).double()
    assert set(rounded.unique().tolist()) <= {float(lo_bf16), float(hi_bf16)}
    sigma = abs(float(gap)) * (fraction * (1 - fraction) / n) ** 0.5
    assert abs(rounded.mean().item() - x) < 5 * sigma
    nearest = torch.tensor(x).to(torch.bfloat16).double().item()
    assert fraction == 0.5 or abs(nearest - x) > 10 * sigma  # round-to-nearest would be biased here


def test_deterministic_for_a_seed_and_different_across_seeds() -> None:
    x = torch.randn(4096, generator=_gen(0))
    a, b = (sr.stochastic_round_to_bf16(x, _gen(5)) for _ in range(2))
    c = sr.stochastic_round_to_bf16(x, _gen(6))
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    assert not torch.equal(a.view(torch.int16), c.view(torch.int16))
    assert sr.rounding_seed(42, 0, 1) == sr.rounding_seed(42, 0, 1)
    assert len({sr.rounding_seed(s, i, t) for s in (0, 1) for i in (0, 1) for t in (1, 2)}) == 8


def test_inf_nan_and_signed_zero_pass_through() -> None:
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0])
    out = sr.stochastic_round_to_bf16(special, _gen(0)).float()
    assert out[0] == float("inf") and out[1] == float("-inf") and out[2].isnan()
    assert torch.equal(out[3:].view(torch.int32), special[3:].view(torch.int32))


def _adam_tensors(n: int, dtype: torch.dtype, seed: int = 0):
    g = _gen(seed)
    param = (torch.randn(n, generator=g) * 0.02).to(dtype)
    grad = (torch.randn(n, generator=g) * 1e-3).to(dtype)
    return param, grad, torch.zeros(n, dtype=dtype), torch.zeros(n, dtype=dtype)


def test_fp32_update_is_torch_adamw(monkeypatch) -> None:
    monkeypatch.setattr(sr, "CHUNK_ELEMENTS", 1000)  # several chunks, one of them short
    param, grad, m, v = _adam_tensors(4500, torch.float32)
    reference = torch.nn.Parameter(param.clone())
    torch_adam = torch.optim.AdamW([reference], **HYPER)
    for step in (1, 2, 3):
        sr.adamw_step_(param, grad, m, v, step=step, **HYPER, generator=_gen(step))
        reference.grad = grad.clone()
        torch_adam.step()
    torch.testing.assert_close(param, reference.detach(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(v, torch_adam.state[reference]["exp_avg_sq"], rtol=1e-6, atol=1e-12)


def test_bf16_update_equals_the_fp32_step_in_expectation() -> None:
    """64 distinct weights, each repeated 2000 times: every copy rounds independently, so the mean over the
    copies estimates E[new weight], which must be the fp32 AdamW result although the step is << 1 ulp."""
    distinct, copies = 64, 2000
    base, grad, _, _ = _adam_tensors(distinct, torch.bfloat16, seed=1)
    param, grad = base.repeat(copies), grad.repeat(copies)
    m, v = torch.zeros_like(param), torch.zeros_like(param)
    hyper = dict(HYPER, lr=2e-5)  # the recipe's embedding LR: the step is ~1/100 of a bf16 ulp here
    sr.adamw_step_(param, grad, m, v, step=1, **hyper, generator=_gen(9))
    expected, _, _ = sr.adamw_step_reference(
        base, grad[:distinct], torch.zeros(distinct), torch.zeros(distinct), step=1, **hyper
    )
    mean = param.view(copies, distinct).double().mean(0)
    ulp = (base.float().abs() * 2**-7).double()
    assert ((mean - expected).abs() < 5 * ulp * 0.5 / copies**0.5).all()
    moved = (mean - base.double()).abs()
    assert (moved > 0.3 * (expected - base.double()).abs()).all()  # updates survive on average


def _split_params(seed: int = 0):
    g = _gen(seed)
    lora = torch.nn.Parameter(torch.randn(8, 16, generator=g) * 0.1)
    emb = torch.nn.Parameter((torch.randn(300, 16, generator=g) * 0.02).to(torch.bfloat16))
    return lora, emb


def _optimizer(lora, emb, update: str = "adamw", seed: int = 42) -> CPTAdamW:
    groups = [
        {"params": [lora], "lr": 1e-3, "cpt_group": "lora"},
        {"params": [emb], "lr": 1e-4, "cpt_group": "embeddings", "cpt_update": update,
         "cpt_stochastic_rounding": True},
    ]  # fmt: skip
    return CPTAdamW(groups, seed=seed, lr=1e-3, weight_decay=0.0)


def _steps(optimizer, params, steps, start=0):
    for step in range(start, start + steps):
        g = _gen(100 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype) * 1e-2
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_one_optimizer_torch_groups_unchanged_and_state_dict_resumes_exactly() -> None:
    lora, emb = _split_params()
    optimizer = _optimizer(lora, emb)
    plain_lora = torch.nn.Parameter(lora.detach().clone())
    plain = torch.optim.AdamW([plain_lora], lr=1e-3, weight_decay=0.0)
    _steps(optimizer, [lora, emb], 2)
    g = _gen(100), _gen(101)
    for gen in g:  # the same gradients for the LoRA weight alone, through torch's AdamW
        plain_lora.grad = torch.randn(lora.shape, generator=gen) * 1e-2
        plain.step()
    assert torch.equal(lora.detach(), plain_lora.detach())
    assert optimizer.state[emb]["exp_avg"].dtype == torch.bfloat16

    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)  # as the Trainer checkpoints it
    lora2, emb2 = (torch.nn.Parameter(p.detach().clone()) for p in (lora, emb))
    resumed = _optimizer(lora2, emb2, seed=0)  # the checkpoint's seed wins
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.param_groups[1]["cpt_seed"] == 42
    _steps(optimizer, [lora, emb], 3, start=2)
    _steps(resumed, [lora2, emb2], 3, start=2)
    assert torch.equal(lora.detach(), lora2.detach())
    assert torch.equal(emb.detach().view(torch.int16), emb2.detach().view(torch.int16))


def test_8bit_group_keeps_its_state_dtypes_through_a_checkpoint() -> None:
    pytest.importorskip("bitsandbytes")
    lora, emb = _split_params()
    optimizer = _optimizer(lora, emb, update="adamw_8bit")
    _steps(optimizer, [lora, emb], 2)
    state = optimizer.state[emb]
    assert state["state1"].dtype == torch.uint8 and state["absmax1"].dtype == torch.float32
    assert emb.dtype == torch.bfloat16
    lora2, emb2 = (torch.nn.Parameter(p.detach().clone()) for p in (lora, emb))
    resumed = _optimizer(lora2, emb2, update="adamw_8bit")
    resumed.load_state_dict(optimizer.state_dict())
    assert resumed.state[emb2]["absmax1"].dtype == torch.float32  # torch would have cast it to bf16
    _steps(optimizer, [lora, emb], 2, start=2)
    _steps(resumed, [lora2, emb2], 2, start=2)
    assert torch.equal(emb.detach().view(torch.int16), emb2.detach().view(torch.int16))


@pytest.mark.parametrize("update", ["adamw", "adamw_8bit"])
def test_small_updates_survive_with_rounding(update: str) -> None:
    if update == "adamw_8bit":
        pytest.importorskip("bitsandbytes")
    moved = {}
    for rounding in (True, False):
        lora, emb = _split_params()
        optimizer = _optimizer(lora, emb, update=update if rounding else "torch")
        optimizer.param_groups[1]["lr"] = 1e-5  # ~1/20 of a bf16 ulp of these weights
        before = emb.detach().clone()
        _steps(optimizer, [lora, emb], 2)
        moved[rounding] = (emb.detach() != before).float().mean().item()
    assert moved[True] > 2 * moved[False]


def test_fused_triton_step_is_unbiased_and_seeded() -> None:
    """The Triton kernel (interpreter on CPU): each result is one of the two bf16 neighbours of the fp32
    AdamW result, the mean over copies is that result, and a seed gives the same bits twice."""
    distinct, copies = 64, 500
    base, grad, _, _ = _adam_tensors(distinct, torch.bfloat16, seed=2)
    hyper = dict(HYPER, lr=2e-5)

    def run(seed: int):
        param, g = base.repeat(copies), grad.repeat(copies)
        m, v = torch.zeros_like(param), torch.zeros_like(param)
        assert sr.fused_path_applies(param, g, m, v)
        sr.adamw_bf16_sr_fused_(param, g, m, v, step=1, **hyper, seed=seed)
        return param, m, v

    param, m, v = run(123)
    zeros = torch.zeros(distinct)
    expected = sr.adamw_step_reference(base, grad, zeros, zeros, step=1, **hyper)
    ulp = base.double().abs() * 2**-7
    for result, exact, scale in ((param, expected[0], ulp), (m, expected[1], None), (v, expected[2], None)):
        rows = result.view(copies, distinct).double()
        scale = exact.abs() * 2**-7 if scale is None else scale
        assert ((rows - exact).abs() <= scale * 1.001).all()  # a bf16 neighbour of the fp32 result
        assert ((rows.mean(0) - exact).abs() < 5 * scale * 0.5 / copies**0.5).all()
    again, _, _ = run(123)
    other, _, _ = run(124)
    assert torch.equal(param.view(torch.int16), again.view(torch.int16))
    assert not torch.equal(param.view(torch.int16), other.view(torch.int16))
