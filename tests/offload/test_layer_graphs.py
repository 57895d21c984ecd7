"""Kept decoder layers replayed as CUDA graphs (offload/layer_graphs.py): same numbers as eager, never
a silently wrong gradient, and nothing installed where graphs cannot run."""

from __future__ import annotations

import logging

import pytest
import torch

from cpt_plugin import CPTConfig, CPTConfigError, setup_model
from cpt_plugin.offload.checkpointing import layer_plan_holder
from cpt_plugin.offload.graph_capture import (
    LayerState,
    call_signature,
    graphs_available,
    parameters_swapped,
)
from cpt_plugin.offload.layer_graphs import LayerGraphs
from tests.patching.models import tiny_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_config_validates_cuda_graphs():
    with pytest.raises(CPTConfigError, match="cuda_graphs"):
        CPTConfig(cuda_graphs="yes")
    assert CPTConfig().cuda_graphs is None  # checkpointed layers of short batches only (core.py)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_nothing_is_installed_without_cuda(caplog):
    assert graphs_available(torch.nn.Linear(2, 2)) == "no CUDA device"
    with caplog.at_level(logging.WARNING, logger="cpt_plugin.core"):
        model = setup_model(tiny_model("llama"), {"lora_r": 4, "cuda_graphs": True}, checkpointing="off")
    assert layer_plan_holder(model) is None  # checkpointing stays plainly off
    assert any("cannot run here: no CUDA device" in r.getMessage() for r in caplog.records)


def test_signature_tells_shapes_strides_and_values_apart():
    a = torch.zeros(2, 3)
    assert call_signature(a) == call_signature(torch.ones(2, 3))
    assert call_signature(a) != call_signature(torch.zeros(3, 2))
    assert call_signature(a) != call_signature(torch.zeros(3, 2).t())
    assert call_signature({"x": (a, None), "flag": True}) != call_signature({"x": (a, None), "flag": False})


def test_layer_graphs_stay_eager_for_calls_they_cannot_replay():
    graphs = LayerGraphs()
    x = torch.zeros(2, 3)
    assert graphs.run(0, lambda t: t, (x,)) is None  # a CPU tensor, no transformers partial
    assert graphs.run(0, lambda t, u: t, (x, x)) is None
    graphs.turn_off("test")
    assert graphs.run(0, lambda t: t, (x,)) is None and graphs.graphs == {}


def test_layer_state_notices_what_a_replay_would_get_wrong():
    """A replay reads the captured storage and computes the captured adapter set-up: any change to those
    must drop the layer's graphs."""
    model = setup_model(tiny_model("llama"), {"lora_r": 4}, checkpointing="off")
    layer = model.get_base_model().model.layers[0]
    state = LayerState(layer)
    assert state.unchanged(layer)
    assert state.trainable and all(p.requires_grad for p in state.trainable)
    with model.disable_adapter():  # PEFT's adapters switched off
        assert not state.unchanged(layer)
    assert state.unchanged(layer)
    lora_a = layer.self_attn.q_proj.lora_A["default"]
    original = lora_a.weight
    lora_a.weight = torch.nn.Parameter(original.detach().clone())  # a parameter replaced
    assert not state.unchanged(layer)
    lora_a.weight = original
    assert state.unchanged(layer)
    original.data = original.data.clone()  # the same parameter, new storage
    assert not state.unchanged(layer)
    state = LayerState(layer)
    original.requires_grad_(False)
    assert not state.unchanged(layer)
    original.requires_grad_(True)
    assert state.unchanged(layer)


def test_parameters_are_swapped_for_the_capture_and_restored_even_on_error():
    layer = torch.nn.Linear(3, 2)
    state = LayerState(layer)
    alias = layer.weight.detach().requires_grad_(True)
    with pytest.raises(RuntimeError, match="capture failed"):
        with parameters_swapped(state.slots, {id(layer.weight): alias}):
            assert layer.weight is alias and layer.bias is state.slots[1][2]
            raise RuntimeError("capture failed")
    assert layer.weight is state.slots[0][2] and state.unchanged(layer)


# ------------------------------------------------------------------------------------------------
# On the GPU: graphs give the eager numbers, with gradient accumulation and a second forward
# ------------------------------------------------------------------------------------------------
def _gpu_model(graphs: bool, checkpointing: str = "off", layers: int = 3):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=256, intermediate_size=704, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.train()
    model = setup_model(model, {"lora_r": 16, "cuda_graphs": graphs}, checkpointing=checkpointing)
    with torch.no_grad():  # B away from zero, so the LoRA branch and dA matter
        generator = torch.Generator(device="cuda").manual_seed(3)
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.copy_(0.02 * torch.randn(param.shape, device="cuda", generator=generator))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return model, optimizer


def _run(model, optimizer, steps: int, accumulate: int = 1, double_forward_at: int = -1):
    """Losses per step and the final trainable parameters; micro-batches of fresh ids every time.

    ``loss`` stays referenced until the next forward, so the previous step's autograd graph keeps the
    parameters' gradient accumulators alive during a capture: the case that invalidated captures on the
    H200 before the parameters were swapped for fresh leaves there."""
    losses = []
    for step in range(steps):
        total = 0.0
        for micro in range(accumulate):
            generator = torch.Generator().manual_seed(100 * step + micro)
            ids = torch.randint(0, 1000, (2, 77), generator=generator).cuda()  # odd token count
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
                if step == double_forward_at:  # two forwards before one backward: must not be replayed
                    loss = loss + model(input_ids=ids.flip(1), labels=ids.flip(1)).loss
            (loss / accumulate).backward()
            total += float(loss.detach())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total / accumulate)
    params = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses, params


def _mlp_products_kept(model, checkpointing: str) -> bool:
    if checkpointing == "auto":
        from cpt_plugin.offload.planner import find_planner

        return bool(find_planner(model).mlp_products)
    return model.get_base_model().__dict__.get("cpt_mlp_products_tokens", 0) > 0


def synchronize_when_captured(module: torch.nn.Module) -> None:
    """``module`` reads a value on the host while a CUDA graph is being captured: its capture fails."""
    original = type(module).forward

    def synchronizing_forward(self, x):
        if torch.cuda.is_current_stream_capturing():
            float(x.sum())  # a host sync: not capturable
        return original(self, x)

    module.forward = synchronizing_forward.__get__(module)


def assert_same_run(got, want) -> None:
    """Losses and final parameters of two ``_run`` results: equal up to cuBLAS choosing another
    algorithm inside a capture."""
    (losses, params), (want_losses, want_params) = got, want
    torch.testing.assert_close(losses, want_losses, rtol=1e-3, atol=0)
    for name, value in want_params.items():
        torch.testing.assert_close(params[name], value, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize(
    ("checkpointing", "accumulate", "double_at", "graphs_on"),
    [
        ("off", 1, -1, True),
        ("off", 2, 4, True),
        ("auto", 2, -1, True),
        ("off", 1, -1, None),
        ("auto", 2, -1, None),
    ],
)
def test_graphed_layers_give_the_eager_losses_and_parameters(checkpointing, accumulate, double_at, graphs_on):
    """``cuda_graphs: true``, and unset (None: granted by the planner or by the room at the loss, here a
    roomy GPU), against ``false``."""
    results = {}
    for graphs in (False, graphs_on):
        model, optimizer = _gpu_model(graphs, checkpointing)
        results[graphs] = _run(model, optimizer, steps=6, accumulate=accumulate, double_forward_at=double_at)
        holder = layer_plan_holder(model)
        if graphs is not False:
            assert holder is not None and holder.graphs is not None
            assert holder.graphs.off_reason is None and holder.graphs.captured == 3
            assert all(g.backward_graph is not None for g in holder.graphs.graphs.values())
            # the granted default keeps the MLP products too (a roomy GPU): their memory crosses from
            # the forward graph to the backward graph (a NaN loss on an H200 when it did not stay held)
            assert graphs is True or _mlp_products_kept(model, checkpointing)
        del model, optimizer
        torch.cuda.empty_cache()
    assert_same_run(results[graphs_on], results[False])


@pytest.mark.gpu
@cuda
def test_adapters_disabled_after_capture_run_eagerly():
    """A grad-enabled forward with the adapters off must compute without them, not replay the capture."""
    model, optimizer = _gpu_model(True)
    _run(model, optimizer, steps=4)
    holder = layer_plan_holder(model)
    assert holder.graphs.captured == 3 and holder.graphs.off_reason is None
    ids = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(7)).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with model.disable_adapter():
            without = model(input_ids=ids, labels=ids).loss.detach()
            with torch.no_grad():
                reference = model(input_ids=ids, labels=ids).loss  # no grad: always eager
        with_adapters = model(input_ids=ids, labels=ids).loss.detach()
    torch.testing.assert_close(without, reference, rtol=1e-3, atol=0)
    assert abs(float(with_adapters) - float(without)) > 1e-4  # the adapters do change the loss


@pytest.mark.gpu
@cuda
def test_a_failed_capture_leaves_the_process_usable(caplog):
    """A layer that synchronizes during its capture: graphs turn off with a notice, training goes on with
    the eager numbers, and allocations and random numbers work afterwards (the eighth session's failure
    left the allocator routing into the dead graph's pool and the generator in capture mode)."""
    eager_model, eager_optimizer = _gpu_model(False)
    eager_losses, eager_params = _run(eager_model, eager_optimizer, steps=5)
    del eager_model, eager_optimizer
    model, optimizer = _gpu_model(True)
    synchronize_when_captured(model.get_base_model().model.layers[1].mlp)
    with caplog.at_level(logging.WARNING, logger="cpt_plugin.offload.layer_graphs"):
        losses, params = _run(model, optimizer, steps=5)
    holder = layer_plan_holder(model)
    assert holder.graphs.off_reason is not None
    assert any("CUDA graphs for the kept decoder layers are off" in r.getMessage() for r in caplog.records)
    assert_same_run((losses, params), (eager_losses, eager_params))
    sample = torch.randn(1024, 1024, device="cuda")  # the generator is out of capture mode
    assert torch.isfinite(sample).all()
    graph = torch.cuda.CUDAGraph()  # and a new capture works (the allocator is not still recording)
    with torch.cuda.graph(graph):
        doubled = sample * 2
    sample.copy_(torch.ones_like(sample))
    graph.replay()
    torch.testing.assert_close(doubled, torch.full_like(sample, 2.0))


def test_checkpointing_off_with_waiting_graphs_says_nothing_about_checkpointing(monkeypatch, caplog):
    """Without checkpointing the kept layers run through the per-layer function (for their CUDA graphs),
    which transformers counts as gradient checkpointing: a training forward with the config's
    ``use_cache=True`` must not be told that caching is incompatible with it."""
    monkeypatch.setattr("cpt_plugin.offload.graph_capture.graphs_available", lambda model: None)
    model = setup_model(tiny_model("llama", use_cache=True), {"lora_r": 4}, checkpointing="off")
    holder = layer_plan_holder(model)
    assert holder is not None and holder.graphs.managed
    model.train()
    ids = torch.randint(0, 64, (2, 9))
    with caplog.at_level(logging.WARNING):
        model(input_ids=ids, labels=ids).loss.backward()
    assert not [r for r in caplog.records if "gradient checkpointing" in r.getMessage()]
