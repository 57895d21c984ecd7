"""The planner with the checkpointed layers' CUDA graphs (recompute_graphs.py): their pool counted in
every plan that checkpoints a layer, estimated before a capture and measured after, and re-planned when
the measurement differs."""

from __future__ import annotations

import gc
import logging

import pytest
import torch

from cpt_plugin.offload.checkpointing import LayerPlan
from cpt_plugin.offload.planner import (
    GIB,
    canonical_plan,
    choose_plan,
    graph_pool_estimate,
    predict_peak,
)
from cpt_plugin.offload.recompute_graphs import RecomputeGraphs
from tests.offload.test_planner import TOY, _planned_model


def test_the_pool_counts_only_where_a_layer_is_checkpointed() -> None:
    recomputed = LayerPlan.uniform(4, "recompute")
    assert (
        predict_peak(recomputed, TOY, 10, 0.0, graph_pool=5.0) == predict_peak(recomputed, TOY, 10, 0.0) + 50
    )
    kept = LayerPlan.uniform(4, "keep")
    assert predict_peak(kept, TOY, 10, 0.0, graph_pool=5.0) == predict_peak(kept, TOY, 10, 0.0)
    # before a capture: one checkpointed layer's recompute and backward (keep 10 + the gradient 1 + work 2)
    assert graph_pool_estimate(TOY) == 13.0


def test_a_plan_with_the_pool_keeps_fewer_layers_or_none_checkpointed() -> None:
    budget = 600.0
    plain, plain_peak, _ = choose_plan(8, TOY, tokens=10, static=0.0, budget=budget, chunk_tokens=4096)
    pooled, pooled_peak, fits = choose_plan(
        8, TOY, tokens=10, static=0.0, budget=budget, chunk_tokens=4096, graph_pool=20.0
    )
    assert 0 < pooled.counts()["keep"] < plain.counts()["keep"] < 8
    assert fits and pooled_peak <= budget and pooled_peak == predict_peak(pooled, TOY, 10, 0.0, 20.0)
    # one more kept layer would not fit once the pool is counted
    more = canonical_plan(8, pooled.counts()["keep"] + 1, 0, "none")
    assert predict_peak(more, TOY, 10, 0.0, 20.0) > budget
    # every layer kept needs no pool: a budget that holds exactly that keeps them all
    all_kept = predict_peak(LayerPlan.uniform(8, "keep"), TOY, 10, 0.0)
    plan, _, _ = choose_plan(
        8, TOY, tokens=10, static=0.0, budget=all_kept, chunk_tokens=4096, graph_pool=1e6
    )
    assert plan.counts()["keep"] == 8


def _planner(budget_gib: float):
    return _planned_model(budget_gib, layers=4)


def _mixed_budget(tokens: int) -> float:
    """Half-way between every layer kept and every one offloaded with the estimated pool (first-step
    headroom included)."""
    _, probe = _planner(1.0)
    costs, grads = probe.costs, 3 * probe._grad_bytes
    kept = predict_peak(LayerPlan.uniform(4, "keep"), costs, tokens, grads)
    offloaded = predict_peak(
        LayerPlan.uniform(4, "offload"), costs, tokens, grads, graph_pool_estimate(costs)
    )
    return (kept + offloaded) / 2 / (1 - 0.15) / GIB


def test_the_planner_counts_the_estimate_then_replans_on_the_measured_pool(monkeypatch, caplog) -> None:
    # graphed layers much faster than eager ones, so the graphed plan wins at the first budget (at the
    # measured gain an eager plan that keeps two more of these four layers is faster: the next test)
    monkeypatch.setattr("cpt_plugin.offload.planner.TIME_GRAPHED_GAIN", 0.9)
    ids = torch.randint(0, 257, (1, 64))
    budget = _mixed_budget(64)
    model, planner = _planner(budget)
    graphs = planner.holder.recompute_graphs = RecomputeGraphs(max_tokens=10_000)  # on the CPU: eager
    with caplog.at_level(logging.INFO, logger="cpt_plugin.offload.planner"):
        model(input_ids=ids, labels=ids).loss.backward()
    estimate = graph_pool_estimate(planner.costs)
    assert planner._pool_planned == pytest.approx(estimate * 64)
    assert "checkpointed layers as CUDA graphs" in caplog.text
    assert planner.pop_log()["memory_plan_graph_pool_gib"] == round(estimate * 64 / GIB, 3)
    first = planner.plan
    assert first.counts()["keep"] < 4
    # the captures measured a pool far larger than the estimate: the next forward re-plans with it
    graphs.pool_bytes_per_token = 50 * estimate
    model(input_ids=ids, labels=ids).loss.backward()
    # no plan that checkpoints a layer fits with that pool: the fastest plan without it, run eagerly
    assert planner.fits and graphs.held_eager and planner._pool_planned == 0.0
    assert planner.plan.counts()["keep"] > first.counts()["keep"]
    # a measured pool like the estimate: the mixed plan again; graphs off (a failed capture): no pool
    graphs.pool_bytes_per_token = estimate
    model(input_ids=ids, labels=ids).loss.backward()
    assert planner.plan == first and planner._pool_planned == pytest.approx(estimate * 64)
    assert not graphs.held_eager
    graphs.off_reason = "failed"
    model(input_ids=ids, labels=ids).loss.backward()
    assert planner._pool_planned == 0.0 and planner.plan.counts()["keep"] >= first.counts()["keep"]


def test_longer_batches_than_the_graphs_take_count_no_pool() -> None:
    ids = torch.randint(0, 257, (1, 64))
    model, planner = _planner(_mixed_budget(64))
    planner.holder.recompute_graphs = RecomputeGraphs(max_tokens=32)
    model(input_ids=ids, labels=ids).loss.backward()
    assert planner._pool_planned == 0.0 and planner.plan.counts()["keep"] < 4


def test_an_eager_plan_that_keeps_more_layers_beats_a_graphed_one_at_the_measured_gain() -> None:
    ids = torch.randint(0, 257, (1, 64))
    model, planner = _planner(_mixed_budget(64))
    graphs = planner.holder.recompute_graphs = RecomputeGraphs(max_tokens=10_000)
    model(input_ids=ids, labels=ids).loss.backward()
    # keeping 3 of 4 layers eagerly (3 x 3 + 4 = 13) beats keeping 1 with graphs (3 + 3 x 3.85 = 14.55)
    assert graphs.held_eager and planner.fits and planner.plan.counts()["keep"] == 3
    assert planner._pool_planned == 0.0


# On the GPU (run by the lead on the device machine)
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_graphed_mixed_plan_gives_the_eager_losses_and_its_pool_is_counted(monkeypatch) -> None:
    from cpt_plugin import setup_model
    from tests.offload.test_planner import _gpu_cpt_model, _gpu_step, gpu_base_model

    monkeypatch.setattr("cpt_plugin.offload.planner.TIME_GRAPHED_GAIN", 0.9)  # graphed plans win
    generator = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, 32000, (2, 4096), generator=generator).cuda() for _ in range(10)]
    model, optimizer, planner = _gpu_cpt_model(None)  # the default budget: every layer kept
    for ids in batches[:3]:
        _gpu_step(model, optimizer, ids)
    budget_gib = 0.75 * torch.cuda.max_memory_allocated() / GIB  # a mixed plan
    del model, optimizer, planner
    gc.collect()
    torch.cuda.empty_cache()
    losses = {}
    for graphs in (False, True):
        import cpt_plugin.offload.planner as planner_module

        model = gpu_base_model()
        model = setup_model(
            model,
            {"lora_r": 32, "memory_budget_gib": budget_gib, "cuda_graphs": graphs},
            checkpointing="auto",
        )
        planner = planner_module.find_planner(model)
        planner.holder.graphs = None  # the kept layers' graphs are another test's
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        losses[graphs] = [float(_gpu_step(model, optimizer, ids)) for ids in batches]
        if graphs:
            recompute_graphs = planner.holder.recompute_graphs
            pool = planner._graph_pool(8192) * 8192
            print(
                f"plan {planner.plan.describe()}, pool {pool / GIB:.3f} GiB, planned {planner._pool_planned / GIB:.3f}"
            )
            assert planner.plan.counts()["keep"] < 6 and not recompute_graphs.held_eager
            assert recompute_graphs.captured > 0 and pool >= graph_pool_estimate(planner.costs) * 8192
            assert abs(planner._pool_planned - pool) <= 0.02 * planner.budget  # re-planned if further off
        del model, optimizer, planner
        gc.collect()
        torch.cuda.empty_cache()
    torch.testing.assert_close(losses[True], losses[False], rtol=2e-3, atol=0)
