"""Checkpointed layers' backward replayed as CUDA graphs (offload/recompute_graphs.py): the eager numbers,
gradients accumulated as AccumulateGrad does, and nothing installed where graphs cannot run."""

from __future__ import annotations

import copy
import logging
import pickle

import pytest
import torch

from cpt_plugin import setup_model
from cpt_plugin.offload.checkpointing import CheckpointFunction, checkpoint_function, layer_plan_holder
from cpt_plugin.offload.recompute_graphs import RecomputeGraphs, _accumulate, _has_grad_hooks
from tests.offload.test_layer_graphs import _gpu_model, _run
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
            assert len(recompute_graphs.statics) == 1  # the layers share their static tensors
        del model, optimizer
        torch.cuda.empty_cache()
    (eager_losses, eager_params), (graph_losses, graph_params) = results[False], results[True]
    torch.testing.assert_close(graph_losses, eager_losses, rtol=1e-3, atol=0)
    for name, value in eager_params.items():
        torch.testing.assert_close(graph_params[name], value, rtol=1e-3, atol=1e-5, msg=name)


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
def test_adapters_switched_after_capture_drop_the_graph():
    """A replay computes the captured adapter set-up: a forward with the adapters off must not get it."""
    model, optimizer = _gpu_model(True, "offload")
    _run(model, optimizer, steps=4)
    graphs = _graphs_of(model)
    assert graphs.captured == 3
    layer = model.get_base_model().model.layers[0]
    assert graphs.entries[id(layer)].graph is not None
    ids = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(7)).cuda()
    with model.disable_adapter(), torch.autocast("cuda", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids)  # grad-enabled; nothing it computes needs a gradient
    assert graphs.entries[id(layer)].graph is None  # stale: dropped, not replayed
    losses, _ = _run(model, optimizer, steps=4)  # warmed up and captured again, still finite
    assert all(torch.isfinite(torch.tensor(losses)))
    assert graphs.entries[id(layer)].graph is not None


@pytest.mark.gpu
@cuda
def test_a_failed_capture_leaves_the_run_eager_and_correct(caplog):
    eager_model, eager_optimizer = _gpu_model(False, "offload")
    eager_losses, eager_params = _run(eager_model, eager_optimizer, steps=5)
    del eager_model, eager_optimizer
    model, optimizer = _gpu_model(True, "offload")
    mlp = model.get_base_model().model.layers[1].mlp
    original = type(mlp).forward

    def synchronizing_forward(self, x):
        if torch.cuda.is_current_stream_capturing():
            float(x.sum())  # a host sync: not capturable
        return original(self, x)

    mlp.forward = synchronizing_forward.__get__(mlp)
    with caplog.at_level(logging.WARNING, logger="cpt_plugin.offload.recompute_graphs"):
        losses, params = _run(model, optimizer, steps=5)
    assert _graphs_of(model).off_reason is not None
    assert any("checkpointed decoder layers are off" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(losses, eager_losses, rtol=1e-3, atol=0)
    for name, value in eager_params.items():
        torch.testing.assert_close(params[name], value, rtol=1e-3, atol=1e-5, msg=name)
