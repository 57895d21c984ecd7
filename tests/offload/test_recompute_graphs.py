"""Checkpointed layers' backward replayed as CUDA graphs (offload/recompute_graphs.py): the eager numbers,
gradients accumulated as AccumulateGrad does, and nothing installed where graphs cannot run."""

from __future__ import annotations

import copy
import logging
import pickle

import pytest
import torch

from cpt_plugin import setup_model
from cpt_plugin.offload.checkpointing import (
    CheckpointFunction,
    LayerPlan,
    checkpoint_function,
    layer_plan_holder,
)
from cpt_plugin.offload.recompute_graphs import (
    DEFAULT_MAX_TOKENS,
    RecomputeGraphs,
    _accumulate,
    _has_grad_hooks,
)
from tests.offload.test_layer_graphs import _gpu_model, _run, assert_same_run, synchronize_when_captured
from tests.patching.models import tiny_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
@pytest.mark.parametrize("mode", ["recompute", "offload"])
def test_nothing_is_installed_without_cuda(mode, caplog):
    with caplog.at_level(logging.WARNING, logger="cpt_plugin.core"):
        model = setup_model(tiny_model("llama"), {"lora_r": 4, "cuda_graphs": True}, checkpointing=mode)
    function = checkpoint_function(model)
    assert function is not None and function.graphs is None
    assert any("cannot run here: no CUDA device" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_the_default_installs_nothing_and_says_nothing_without_cuda(caplog):
    with caplog.at_level(logging.DEBUG, logger="cpt_plugin.core"):
        model = setup_model(tiny_model("llama"), {"lora_r": 4}, checkpointing="offload")
    assert checkpoint_function(model).graphs is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "CUDA graphs" in r.getMessage()]


@pytest.mark.parametrize(
    ("cuda_graphs", "checkpointing", "checkpointed", "kept", "max_tokens"),
    [
        (None, "offload", True, False, DEFAULT_MAX_TOKENS),
        (None, "recompute", True, False, DEFAULT_MAX_TOKENS),
        (None, "off", False, "managed", None),
        (None, "auto", False, "managed", None),
        (True, "offload", True, False, None),
        (True, "off", False, True, None),
        (False, "offload", False, False, None),
        (False, "off", False, False, None),
    ],
)
def test_which_layers_get_graphs(monkeypatch, cuda_graphs, checkpointing, checkpointed, kept, max_tokens):
    """Unset, checkpointed layers of short batches (measured to pay there) and kept layers once their
    memory is granted ("managed": by the planner, or by the room at the loss); true, every layer and
    length; false, none."""
    monkeypatch.setattr("cpt_plugin.offload.graph_capture.graphs_available", lambda model: None)
    config = {"lora_r": 4} if cuda_graphs is None else {"lora_r": 4, "cuda_graphs": cuda_graphs}
    model = setup_model(tiny_model("llama"), config, checkpointing=checkpointing)
    function = checkpoint_function(model)
    graphs = function.graphs if function is not None else None
    assert (graphs is not None) == checkpointed
    if graphs is not None:
        assert graphs.max_tokens == max_tokens
    holder = layer_plan_holder(model)
    assert (holder is not None and holder.graphs is not None) == bool(kept)
    if kept:
        assert holder.graphs.managed == (kept == "managed")
        assert holder.graphs.granted == (kept is True)  # managed ones wait for their grant


def test_longer_batches_than_the_limit_run_eagerly():
    model, optimizer = _cpu_model(True)
    graphs = checkpoint_function(model).graphs
    graphs.max_tokens = 20
    layer = model.get_base_model().model.layers[0]
    long_ids = torch.randint(0, 100, (3, 7), generator=torch.Generator().manual_seed(1))  # 21 tokens
    for _ in range(4):
        model(input_ids=long_ids, labels=long_ids).loss.backward()
    assert id(layer) not in graphs.entries and graphs.captured == 0
    short_ids = long_ids[:2]  # 14 tokens
    for _ in range(4):
        model(input_ids=short_ids, labels=short_ids).loss.backward()
    assert graphs.entries[id(layer)].forward_graph.replays == 1


def test_a_copied_checkpoint_function_captures_its_own_graphs():
    function = CheckpointFunction(offload=True)
    function.graphs = RecomputeGraphs()
    assert copy.deepcopy(function).graphs is None
    assert pickle.loads(pickle.dumps(function)).graphs is None
    assert function.graphs is not None


def test_cpu_calls_run_eagerly_and_count_nothing():
    graphs = RecomputeGraphs()
    layer = torch.nn.Linear(3, 3)
    x = torch.zeros(2, 3)
    call = lambda t: layer(t)  # noqa: E731 - no transformers partial: no keywords
    assert graphs.prepare(layer, call, x, (), layer(x), [], 0, False) is None
    assert graphs.entries == {}


def test_gradients_are_accumulated_as_autograd_does():
    """The graph's gradient buffers are overwritten by the next replay: ``.grad`` must be a fresh tensor
    when it was None, and a sum when it was not."""
    fresh, summed = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    summed.grad = torch.ones(2)
    buffers = [torch.full((3,), 2.0), torch.full((2,), 5.0)]
    _accumulate([fresh, summed], buffers)
    torch.testing.assert_close(fresh.grad, torch.full((3,), 2.0))
    torch.testing.assert_close(summed.grad, torch.full((2,), 6.0))
    assert fresh.grad.data_ptr() != buffers[0].data_ptr()
    buffers[0].fill_(9.0)  # the next replay
    torch.testing.assert_close(fresh.grad, torch.full((3,), 2.0))


def test_parameters_with_gradient_hooks_are_not_graphed():
    plain, hooked = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    assert not _has_grad_hooks((plain,))
    hooked.register_post_accumulate_grad_hook(lambda p: None)
    assert _has_grad_hooks((plain, hooked))
    other = torch.nn.Parameter(torch.zeros(2))
    other.register_hook(lambda g: g)
    assert _has_grad_hooks((other,))


# ------------------------------------------------------------------------------------------------
# On the CPU: the same plumbing with a "graph" that replays its body eagerly
# ------------------------------------------------------------------------------------------------
class _EagerReplay:
    def __init__(self, body, scope) -> None:
        self.body, self.scope = body, scope
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        with self.scope():
            self.body()


class _EagerGraphs(RecomputeGraphs):
    """RecomputeGraphs whose capture keeps the captured body and replays it eagerly (CPU tensors)."""

    def _can_capture_on(self, x):
        return True

    def _record(self, body, scope, device):
        with scope():
            body()  # as the real one: an eager pass first (it also learns which gradients are used)
        return _EagerReplay(body, scope)


def _lora_b_away_from_zero(model) -> None:
    """B away from zero, so the LoRA branch and dA matter."""
    with torch.no_grad():
        generator = torch.Generator().manual_seed(3)
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))


def _cpu_model(graphs: bool):
    torch.manual_seed(0)
    model = setup_model(tiny_model("llama"), {"lora_r": 4}, checkpointing="recompute")
    _lora_b_away_from_zero(model)
    if graphs:
        checkpoint_function(model).graphs = _EagerGraphs()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    return model, optimizer


def _cpu_steps(model, optimizer, steps: int, accumulate: int = 2, double_at: int = -1):
    losses = []
    for step in range(steps):
        for micro in range(accumulate):
            ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(10 * step + micro))
            loss = model(input_ids=ids, labels=ids).loss
            if step == double_at:  # two forwards before one backward
                loss = loss + model(input_ids=ids.flip(1), labels=ids.flip(1)).loss
            (loss / accumulate).backward()
            losses.append(float(loss))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_replayed_backward_gives_the_eager_numbers_on_the_cpu():
    """Warm-up, capture, replays through shared static tensors, gradients accumulated over micro-batches
    and a second forward before one backward: the same losses and parameters as the eager backward."""
    eager = _cpu_steps(*_cpu_model(False), steps=5, double_at=3)
    model, optimizer = _cpu_model(True)
    replayed = _cpu_steps(model, optimizer, steps=5, double_at=3)
    graphs = checkpoint_function(model).graphs
    layers = model.get_base_model().model.layers
    assert graphs.captured == len(layers) and len(graphs.statics) == 1
    assert all(graphs.entries[id(layer)].graph.replays > 0 for layer in layers)
    assert all(graphs.entries[id(layer)].forward_graph.replays > 0 for layer in layers)
    torch.testing.assert_close(replayed[0], eager[0], rtol=1e-5, atol=1e-6)
    for name, value in eager[1].items():
        torch.testing.assert_close(replayed[1][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_warm_up_then_capture_and_a_new_length_runs_eagerly():
    model, optimizer = _cpu_model(True)
    graphs = checkpoint_function(model).graphs
    layer = model.get_base_model().model.layers[0]
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    for expected_backwards in (0, 1):
        model(input_ids=ids, labels=ids).loss.backward()
        assert graphs.entries[id(layer)].backwards == expected_backwards + 1
        assert graphs.entries[id(layer)].graph is None
    model(input_ids=ids, labels=ids).loss.backward()  # the third forward captures (after running eagerly)
    captured, forward = graphs.entries[id(layer)].graph, graphs.entries[id(layer)].forward_graph
    assert captured is not None and captured.replays == 1
    assert forward is not None and forward.replays == 0
    other = torch.randint(0, 100, (2, 13), generator=torch.Generator().manual_seed(2))
    model(input_ids=other, labels=other).loss.backward()  # another length: eager, graph kept
    assert graphs.entries[id(layer)].graph is captured and captured.replays == 1 and forward.replays == 0
    model(input_ids=ids, labels=ids).loss.backward()
    assert captured.replays == 2 and forward.replays == 1


def test_a_changed_layer_drops_its_graph():
    model, optimizer = _cpu_model(True)
    _cpu_steps(model, optimizer, steps=2)
    graphs = checkpoint_function(model).graphs
    layer = model.get_base_model().model.layers[0]
    assert graphs.entries[id(layer)].graph is not None
    lora_a = layer.self_attn.q_proj.lora_A["default"]
    lora_a.weight = torch.nn.Parameter(lora_a.weight.detach().clone())  # a parameter replaced
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    entry = graphs.entries[id(layer)]
    assert entry.graph is None and entry.forward_graph is None and lora_a.weight.grad is not None


def test_a_layer_with_module_hooks_runs_eagerly_with_its_hooks():
    """A replay would skip a hook's Python: a hook added after the capture drops the layer's graphs and
    is called in every forward, and the numbers stay the eager ones."""
    eager_model, eager_optimizer = _cpu_model(False)
    eager = (
        _cpu_steps(eager_model, eager_optimizer, steps=3)[0]
        + _cpu_steps(eager_model, eager_optimizer, steps=2)[0]
    )
    model, optimizer = _cpu_model(True)
    first = _cpu_steps(model, optimizer, steps=3)
    graphs = checkpoint_function(model).graphs
    layer = model.get_base_model().model.layers[0]
    assert graphs.entries[id(layer)].forward_graph is not None
    calls = []
    layer.mlp.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    second = _cpu_steps(model, optimizer, steps=2)
    assert len(calls) >= 4  # two steps of two micro-batches, each forward (and recompute) seen
    assert graphs.entries[id(layer)].graph is None and graphs.entries[id(layer)].forward_graph is None
    torch.testing.assert_close(first[0] + second[0], eager, rtol=1e-5, atol=1e-6)


def test_adapters_disabled_in_between_run_plainly():
    """``disable_adapter`` freezes the LoRA factors: the layers run without our checkpoint (nothing to
    replay), and training afterwards replays with the eager numbers."""
    results = {}
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    for graphs in (False, True):
        model, optimizer = _cpu_model(graphs)
        _cpu_steps(model, optimizer, steps=2)
        with model.disable_adapter():
            without = float(model(input_ids=ids, labels=ids).loss)
        results[graphs] = (without, *_cpu_steps(model, optimizer, steps=2))
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-6)
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-5, atol=1e-6)
    for name, value in results[False][2].items():
        torch.testing.assert_close(results[True][2][name], value, rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------------
# On the GPU: graphs give the eager numbers, with gradient accumulation and a second forward
# ------------------------------------------------------------------------------------------------
def _graphs_of(model) -> RecomputeGraphs:
    function = checkpoint_function(model)
    if function is not None:
        return function.graphs
    return layer_plan_holder(model).recompute_graphs


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize(
    ("checkpointing", "accumulate", "double_at"),
    [("offload", 1, -1), ("offload", 2, 4), ("recompute", 2, -1)],
)
def test_graphed_backward_gives_the_eager_losses_and_parameters(checkpointing, accumulate, double_at):
    results = {}
    for graphs in (False, True):
        model, optimizer = _gpu_model(graphs, checkpointing)
        results[graphs] = _run(model, optimizer, steps=6, accumulate=accumulate, double_forward_at=double_at)
        if graphs:
            recompute_graphs = _graphs_of(model)
            assert recompute_graphs.off_reason is None and recompute_graphs.captured == 3
            assert all(e.graph is not None for e in recompute_graphs.entries.values())
            assert all(e.forward_graph is not None for e in recompute_graphs.entries.values())
            assert len(recompute_graphs.statics) == 1  # the layers share their static tensors
        del model, optimizer
        torch.cuda.empty_cache()
    assert_same_run(results[True], results[False])


@pytest.mark.gpu
@cuda
def test_graphed_backward_gradients_equal_eager_ones():
    """One step's gradients after the capture, compared tensor by tensor (the replays of all layers
    share one pool and one set of static tensors)."""
    grads = {}
    for graphs in (False, True):
        model, optimizer = _gpu_model(graphs, "offload")
        _run(model, optimizer, steps=4)
        ids = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(11)).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids).loss.backward()
        grads[graphs] = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
        if graphs:
            assert _graphs_of(model).captured == 3
        del model, optimizer
    assert grads[True].keys() == grads[False].keys()
    for name, value in grads[False].items():
        torch.testing.assert_close(grads[True][name], value, rtol=1e-3, atol=1e-6, msg=name)


@pytest.mark.gpu
@cuda
def test_adapters_disabled_in_between_keep_the_eager_numbers():
    """PEFT's ``disable_adapter`` freezes the LoRA factors, so the layers run plainly (no checkpoint, no
    replay) and their loss is the base model's; training afterwards replays with the eager numbers."""
    results = {}
    ids = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(7)).cuda()
    for graphs in (False, True):
        model, optimizer = _gpu_model(graphs, "offload")
        _run(model, optimizer, steps=4)
        with model.disable_adapter(), torch.autocast("cuda", dtype=torch.bfloat16):
            without = float(model(input_ids=ids, labels=ids).loss)
        results[graphs] = (without, *_run(model, optimizer, steps=2))
        if graphs:
            assert _graphs_of(model).captured == 3 and _graphs_of(model).off_reason is None
        del model, optimizer
    (eager_without, eager_losses, eager_params) = results[False]
    (without, losses, params) = results[True]
    assert abs(without - eager_without) < 1e-3 * abs(eager_without)
    assert_same_run((losses, params), (eager_losses, eager_params))


@pytest.mark.gpu
@cuda
def test_a_failed_capture_leaves_the_run_eager_and_correct(caplog):
    eager_model, eager_optimizer = _gpu_model(False, "offload")
    eager_losses, eager_params = _run(eager_model, eager_optimizer, steps=5)
    del eager_model, eager_optimizer
    model, optimizer = _gpu_model(True, "offload")
    synchronize_when_captured(model.get_base_model().model.layers[1].mlp)
    with caplog.at_level(logging.WARNING, logger="cpt_plugin.offload.recompute_graphs"):
        losses, params = _run(model, optimizer, steps=5)
    assert _graphs_of(model).off_reason is not None
    assert any("checkpointed decoder layers are off" in r.getMessage() for r in caplog.records)
    assert_same_run((losses, params), (eager_losses, eager_params))


# ------------------------------------------------------------------------------------------------
# The planner's checkpointed layers (gradient_checkpointing: auto)
# ------------------------------------------------------------------------------------------------
def test_the_planners_layers_get_graphs_when_asked_not_by_default(monkeypatch):
    """By default the planner's checkpointed layers run eagerly; its kept layers' graphs wait for its grant."""
    monkeypatch.setattr("cpt_plugin.offload.graph_capture.graphs_available", lambda model: None)
    model = setup_model(tiny_model("llama"), {"lora_r": 4}, checkpointing="auto")
    holder = layer_plan_holder(model)
    assert holder.recompute_graphs is None
    assert holder.graphs.managed and not holder.graphs.granted
    asked = setup_model(tiny_model("llama"), {"lora_r": 4, "cuda_graphs": True}, checkpointing="auto")
    assert layer_plan_holder(asked).graphs is not None
    assert layer_plan_holder(asked).recompute_graphs.max_tokens is None


def _planned_cpu_model(graphs: bool, budget_gib: float):
    torch.manual_seed(0)
    model = tiny_model("llama", num_hidden_layers=4)
    model = setup_model(model, {"lora_r": 4, "memory_budget_gib": budget_gib}, checkpointing="auto")
    _lora_b_away_from_zero(model)
    if graphs:
        layer_plan_holder(model).recompute_graphs = _EagerGraphs()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    return model, optimizer


def _pool_estimate(model) -> float:
    from cpt_plugin.offload.planner import find_planner, graph_pool_estimate

    return graph_pool_estimate(find_planner(model).costs)


def _budget_for_one_kept_layer() -> float:
    """A budget (GiB) that holds the top layer kept, the others recomputed, and the graphs' estimated pool
    (the CPU plans from the analytic model and the parameters' bytes; first-step headroom 15%)."""
    from cpt_plugin.offload.planner import canonical_plan, find_planner, graph_pool_estimate, predict_peak

    model, _ = _planned_cpu_model(False, 1.0)
    planner = find_planner(model)
    ids = torch.randint(0, 100, (2, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    plan = canonical_plan(4, keep=1, offload=0, tiling="none")
    pool = graph_pool_estimate(planner.costs)
    return predict_peak(plan, planner.costs, 18, planner._static(), pool) / 0.85 * 1.001 / 2**30


def test_the_planners_checkpointed_layers_replay_with_the_eager_numbers_and_a_new_plan_drops_them(
    monkeypatch,
):
    # graphed layers much faster than eager ones: the plan with the graphs' pool wins (planner.py)
    monkeypatch.setattr("cpt_plugin.offload.planner.TIME_GRAPHED_GAIN", 0.9)
    budget = _budget_for_one_kept_layer()
    eager = _cpu_steps(*_planned_cpu_model(False, budget), steps=4)
    model, optimizer = _planned_cpu_model(True, budget)
    # the CPU "captures" measure no pool: as if they had measured the estimate the plan was made with
    layer_plan_holder(model).recompute_graphs.pool_bytes_per_token = _pool_estimate(model)
    replayed = _cpu_steps(model, optimizer, steps=4)
    holder = layer_plan_holder(model)
    graphs = holder.recompute_graphs
    layers = model.get_base_model().model.layers
    checkpointed = [layer for layer, mode in zip(layers, holder.plan.modes, strict=True) if mode != "keep"]
    assert checkpointed and graphs.captured == len(checkpointed) and not graphs.held_eager
    assert all(graphs.entries[id(layer)].graph.replays > 0 for layer in checkpointed)
    torch.testing.assert_close(replayed[0], eager[0], rtol=1e-5, atol=1e-6)
    for name, value in eager[1].items():
        torch.testing.assert_close(replayed[1][name], value, rtol=1e-5, atol=1e-6, msg=name)
    # another plan (a re-plan: a layer's mode or tiling changed): the graphs are freed and warm up again
    holder.plan = LayerPlan(("recompute",) * len(layers), (False,) * len(layers))
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    assert graphs.plan_seen is holder.plan
    assert all(entry.graph is None for entry in graphs.entries.values())


def test_a_budget_the_graphs_pool_does_not_fit_runs_the_plan_eagerly():
    """Nothing fits with the pool: the planner holds the graphs back rather than add it to the peak."""
    eager = _cpu_steps(*_planned_cpu_model(False, 1e-6), steps=4)
    model, optimizer = _planned_cpu_model(True, 1e-6)
    held = _cpu_steps(model, optimizer, steps=4)
    graphs = layer_plan_holder(model).recompute_graphs
    assert graphs.held_eager and graphs.captured == 0 and graphs.entries == {}
    assert layer_plan_holder(model).plan.counts()["keep"] < 4  # the smallest plan, without the pool
    torch.testing.assert_close(held[0], eager[0], rtol=1e-5, atol=1e-6)
