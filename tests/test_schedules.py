import math

import pytest
import torch

from cpt_plugin.config import CPTConfig
from cpt_plugin.schedules import build_plan, create_scheduler


def factors(config, total, warmup):
    plan = build_plan(config, total, warmup)
    return [plan.factor(step) for step in range(total + 1)]


def test_cosine_rewarm_and_decay_to_min():
    f = factors(CPTConfig(schedule="cosine", min_lr_ratio=0.1), total=110, warmup=10)
    assert f[0] == 0.0 and f[5] == pytest.approx(0.5) and f[10] == pytest.approx(1.0)
    assert f[60] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert f[110] == pytest.approx(0.1)


def test_wsd():
    f = factors(CPTConfig(schedule="wsd", decay_ratio=0.2, min_lr_ratio=0.0), total=100, warmup=10)
    assert f[50] == 1.0 and f[79] == 1.0
    assert f[90] == pytest.approx(0.5) and f[100] == pytest.approx(0.0)


def test_infinite_cosine_matches_paper_formulas():
    config = CPTConfig(
        schedule="infinite_cosine",
        constant_lr_ratio=0.5,
        min_lr_ratio=0.05,
        cooldown_steps=40,
        anneal_steps=20,
    )
    f = factors(config, total=200, warmup=10)
    eta_max, eta_const, eta_min = 1.0, 0.5, 0.05
    assert f[5] == pytest.approx(eta_max * 5 / 10)
    t = 20  # step 30, t counted after warm-up
    assert f[30] == pytest.approx(eta_const + (eta_max - eta_const) / 2 * (1 + math.cos(math.pi * t / 40)))
    assert f[50] == pytest.approx(eta_const) and f[179] == pytest.approx(eta_const)
    k = -math.log(eta_min / eta_const) / 20
    assert f[190] == pytest.approx(eta_const * math.exp(-k * 10))
    assert f[200] == pytest.approx(eta_min)
    assert min(f[10:]) >= eta_min - 1e-12


def test_infinite_inv_sqrt_matches_paper_formula():
    alpha = 10.0
    config = CPTConfig(
        schedule="infinite_inv_sqrt",
        constant_lr_ratio=0.4,
        min_lr_ratio=0.04,
        cooldown_steps=50,
        anneal_steps=0,
        inv_sqrt_alpha=alpha,
    )
    f = factors(config, total=300, warmup=0)

    def g(x):
        return 1 / math.sqrt(1 + alpha * x) - 1

    for step in (0, 7, 25, 49):
        assert f[step] == pytest.approx(1.0 + (0.4 - 1.0) * g(step / 50) / g(1.0))
    assert f[50] == pytest.approx(0.4) and f[300] == pytest.approx(0.4)  # no anneal: open-ended


def test_infinite_schedule_is_extendable():
    config = CPTConfig(schedule="infinite_cosine", cooldown_steps=20, anneal_steps=0)
    short, longer = factors(config, 100, 5), factors(config, 400, 5)
    assert short == longer[: len(short)]


def test_scheduler_scales_every_group_by_the_same_factor():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 1e-4}], lr=1e-3)
    scheduler = create_scheduler(optimizer, CPTConfig(schedule="cosine"), total_steps=50, warmup_steps=5)
    for _ in range(17):
        optimizer.step()
        scheduler.step()
        lr_main, lr_emb = (g["lr"] for g in optimizer.param_groups)
        assert lr_emb == pytest.approx(lr_main / 10)
    assert lr_main == pytest.approx(1e-3 * build_plan(CPTConfig(schedule="cosine"), 50, 5).factor(17))
