"""Kept layers keep their fused MLP's act(gate) * up for backward where the memory is there.

The planner grants it from what its plan leaves under the budget (before the loss chunk), a run without
checkpointing from the device's room at the loss; either way the gradients are the same and backward
forms the product once less per layer.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from offload_models import tiny_llama

from cpt_plugin.offload.planner import install_planner, mlp_products_bytes, predict_peak

GIB = 2**30


def _count_products(monkeypatch) -> list[int]:
    """Counts the gated-activation kernel's calls in the fused MLP (forward, and backward when not kept)."""
    from cpt_plugin.kernels import lora as lora_module

    calls: list[int] = []
    real = lora_module.glu_forward
    monkeypatch.setattr(lora_module, "glu_forward", lambda *a: calls.append(1) or real(*a))
    return calls


def _step_grads(model, ids) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_the_planner_grants_mlp_products_from_the_room_its_plan_leaves(monkeypatch) -> None:
    model = tiny_llama(layers=4)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    planner = install_planner(model, budget_gib=40.0, _simulate_offload=True, _static_bytes=lambda: 0.0)
    planner.shapes = dataclasses.replace(planner.shapes, intermediate=8192, act_bytes=2, fused_mlp=True)
    planner.device, planner.budget, planner.calibrated = torch.device("cuda"), 40.0 * GIB, True
    planner._replan(8192, 0.0)  # every layer kept, far under the budget
    assert planner.plan.counts()["keep"] == 4
    assert planner.mlp_products and planner.holder.mlp_products
    products = 4 * 8192 * 8192 * 2
    assert mlp_products_bytes(planner.plan, 8192, planner.shapes) == products
    assert planner.predicted == predict_peak(planner.plan, planner.costs, 8192, 0.0) + products
    assert planner.pop_log()["memory_plan_mlp_products"] == 1
    # no room for them beyond the plan: not kept
    plan_peak = predict_peak(planner.plan, planner.costs, 8192, 0.0)
    planner.budget = (plan_peak + products / 2) / (1 - 0.05)
    planner._replan(8192, 0.0)
    assert not planner.mlp_products and planner.holder.mlp_products is False
    # after an out-of-memory error their bytes count in what failed: dropping them is a step down
    planner.budget = 40.0 * GIB
    planner._replan(8192, 0.0)
    assert planner.mlp_products
    assert planner.step_down()
    # a probe measures without them (its plan's own costs), like the loss chunk
    planner._budget_cap = None  # the step-down's cap lifted: the room is there again
    planner._replan(8192, 0.0)
    assert planner.holder.mlp_products
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: None)  # the probe's CUDA reads
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 0)
    planner._start_probe(8192, 0.0)
    assert not planner.mlp_products and not planner.holder.mlp_products
    planner._discard_probe()


def test_a_tiled_or_checkpointed_layer_counts_no_product() -> None:
    from cpt_plugin.offload.checkpointing import LayerPlan
    from cpt_plugin.offload.planner import ModelShapes

    shapes = ModelShapes(layers=4, hidden=64, intermediate=96, heads=4, kv_heads=2, head_dim=16, vocab=257,
                         act_bytes=2, fused_mlp=True)  # fmt: skip
    plan = LayerPlan(("offload", "recompute", "keep", "keep"), (False, False, True, False))
    assert mlp_products_bytes(plan, 10, shapes) == 1 * 10 * 96 * 2
    assert mlp_products_bytes(plan, 10, dataclasses.replace(shapes, fused_mlp=False)) == 0


@pytest.mark.parametrize("checkpointing", ["auto", "off"])
def test_kept_mlp_products_give_the_same_gradients_with_one_kernel_fewer_per_layer(
    monkeypatch, checkpointing
) -> None:
    """A patched model (fused LoRA MLP): with the products kept, each layer's backward does not run the
    gated activation again, and every LoRA and embedding gradient is bitwise the same."""
    from cpt_plugin import setup_model

    torch.manual_seed(0)
    model = setup_model(tiny_llama(layers=3), {"lora_r": 4, "kernels": True}, checkpointing=checkpointing)
    model.train()
    ids = torch.randint(0, 257, (2, 11))
    calls = _count_products(monkeypatch)
    plain = _step_grads(model, ids)
    assert len(calls) == 6  # 3 layers: forward and backward
    base = model.get_base_model()
    if checkpointing == "auto":
        from cpt_plugin.offload.planner import find_planner

        find_planner(model)._set_mlp_products(True)  # the planner's grant (it needs CUDA to make it)
    else:
        base.__dict__["cpt_mlp_products_tokens"] = ids.numel()  # the room noted at an earlier loss
    calls.clear()
    kept = _step_grads(model, ids)
    assert len(calls) == 3  # forward only
    for i, (a, b) in enumerate(zip(kept, plain, strict=True)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"gradient {i}")
    if checkpointing == "off":  # a longer micro-batch than the room was noted for: not kept
        calls.clear()
        longer = torch.randint(0, 257, (2, 12))
        model(input_ids=longer, labels=longer).loss.backward()
        assert len(calls) == 6


def test_without_checkpointing_the_room_for_mlp_products_is_noted_at_the_loss(caplog) -> None:
    from cpt_plugin import setup_model
    from cpt_plugin.patching import causal_lm

    model = setup_model(tiny_llama(layers=3), {"lora_r": 4, "kernels": True}, checkpointing="off")
    base = model.get_base_model()
    base.train()
    need = causal_lm.products_bytes_from_config(base, 64, 2)
    assert need == 3 * 64 * 96 * 2
    causal_lm._note_room_for_mlp_products(base, 64, need - 1, 2)  # no room
    assert not causal_lm._mlp_products_now(base, 64)
    with caplog.at_level("INFO", logger="cpt_plugin.patching.causal_lm"):
        causal_lm._note_room_for_mlp_products(base, 64, need, 2)
        causal_lm._note_room_for_mlp_products(base, 32, need, 2)  # fewer tokens: the room stays at 64
    assert "keep act(gate) * up" in caplog.text and caplog.text.count("keep act(gate)") == 1
    assert causal_lm._mlp_products_now(base, 64) and causal_lm._mlp_products_now(base, 40)
    assert not causal_lm._mlp_products_now(base, 65)
    base.eval()  # evaluation keeps nothing for a backward
    assert not causal_lm._mlp_products_now(base, 64)
    base.train()
    with torch.no_grad():
        assert not causal_lm._mlp_products_now(base, 64)
    # with checkpointing (the planner or a uniform mode) this path never grants them
    offload = setup_model(tiny_llama(layers=1), {"lora_r": 4}, checkpointing="offload").get_base_model()
    offload.__dict__["cpt_mlp_products_tokens"] = 10**9
    assert not causal_lm._mlp_products_now(offload, 64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("checkpointing", ["auto", "off"])
def test_on_a_roomy_gpu_the_products_are_granted_and_change_no_gradient(monkeypatch, checkpointing) -> None:
    """bf16 on CUDA with the Triton kernels: the default budget (auto) or the device's room (off) grants
    the products after the first steps, and a step with them gives the gradients of a step without."""
    from offload_models import gpu_bf16_llama

    from cpt_plugin import setup_model

    config = {"lora_r": 8, "kernels": True, "cuda_graphs": False}  # graphs would take the room first
    model = setup_model(gpu_bf16_llama(), config, checkpointing=checkpointing)
    model.train()
    ids = torch.randint(0, 257, (2, 128), device="cuda")
    for _ in range(4):  # auto: probe, calibrated plan; off: the room noted at the first loss
        _step_grads(model, ids)
    base = model.get_base_model()
    if checkpointing == "auto":
        from cpt_plugin.offload.planner import find_planner

        planner = find_planner(model)
        assert planner.mlp_products, planner.plan.describe()
        toggle = planner._set_mlp_products
    else:
        assert base.__dict__.get("cpt_mlp_products_tokens") == ids.numel()
        room = base.__dict__["cpt_mlp_products_tokens"]

        def toggle(on: bool) -> None:
            base.__dict__["cpt_mlp_products_tokens"] = room if on else -1

    calls = _count_products(monkeypatch)
    kept = _step_grads(model, ids)
    assert len(calls) == 2  # two layers, forward only
    toggle(False)
    calls.clear()
    plain = _step_grads(model, ids)
    assert len(calls) == 4
    for i, (a, b) in enumerate(zip(kept, plain, strict=True)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"gradient {i}")


def _with_managed_graphs(model):
    from cpt_plugin.offload.checkpointing import enable_layer_plan, layer_plan_holder
    from cpt_plugin.offload.layer_graphs import LayerGraphs

    holder = layer_plan_holder(model) or enable_layer_plan(model)
    holder.graphs = LayerGraphs(managed=True)  # what a GPU run installs (core.install_layer_graphs)
    return holder


def test_the_planner_grants_kept_layer_graphs_first_and_only_when_every_layer_is_kept() -> None:
    from cpt_plugin.offload.layer_graphs import kept_graph_extra_bytes

    model = tiny_llama(layers=4)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    planner = install_planner(model, budget_gib=40.0, _simulate_offload=True, _static_bytes=lambda: 0.0)
    graphs = _with_managed_graphs(model).graphs
    assert not graphs.granted  # managed: nothing runs as a graph before the planner says so
    planner.shapes = dataclasses.replace(
        planner.shapes, hidden=2048, intermediate=4096, act_bytes=2, fused_mlp=True
    )
    planner.device, planner.budget, planner.calibrated = torch.device("cuda"), 40.0 * GIB, True
    planner._replan(8192, 0.0)
    trainable = sum(p.numel() * p.element_size() for p in planner.layers[0].parameters() if p.requires_grad)
    extra = kept_graph_extra_bytes(4, 8192, planner.shapes.hidden, 2, trainable)
    products = mlp_products_bytes(planner.plan, 8192, planner.shapes)
    assert planner.kept_graphs and graphs.granted and planner.mlp_products  # room for both
    assert planner.predicted == predict_peak(planner.plan, planner.costs, 8192, 0.0) + extra + products
    assert planner.pop_log()["memory_plan_kept_graphs"] == 1
    # a budget that only holds the products: no graphs, the products
    plan_peak = predict_peak(planner.plan, planner.costs, 8192, 0.0)
    assert products < extra
    planner.budget = (plan_peak + (products + extra) / 2) / (1 - 0.05)
    planner._replan(8192, 0.0)
    assert not planner.kept_graphs and not graphs.granted and planner.mlp_products
    # room for the graphs but not for both: the graphs (they are worth more), without the products
    planner.budget = (plan_peak + extra + products / 2) / (1 - 0.05)
    planner._replan(8192, 0.0)
    assert planner.kept_graphs and graphs.granted and not planner.mlp_products
    # a plan that checkpoints a layer: no graphs
    planner.budget = 40.0 * GIB
    planner._replan(8192, 0.0)
    assert planner.kept_graphs
    planner.budget = plan_peak * 0.6
    planner._replan(8192, 0.0)
    assert planner.plan.counts()["keep"] < 4 and not planner.kept_graphs and not graphs.granted
    # graphs turned off for the run (a failed capture, an overrun): never granted again
    planner.budget = 40.0 * GIB
    graphs.off_reason = "turned off"
    planner._replan(8192, 0.0)
    assert not planner.kept_graphs


def test_kept_layers_under_granted_graphs_keep_their_mlp_products(monkeypatch) -> None:
    """Granted graphs do not take the products away (a captured backward keeps the product with the
    graph, kernels/lora.py); here, on the CPU, the layers run eagerly and form the product once each."""
    from cpt_plugin import setup_model

    model = setup_model(tiny_llama(layers=2), {"lora_r": 4, "kernels": True}, checkpointing="auto")
    holder = _with_managed_graphs(model)
    holder.mlp_products = True
    holder.graphs.grant(True)
    calls = _count_products(monkeypatch)
    ids = torch.randint(0, 257, (1, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == 2  # the forward of both layers only
    holder.mlp_products = False
    calls.clear()
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == 4  # forward and backward of both layers


def test_without_checkpointing_graphs_are_granted_before_products_when_there_is_room(caplog) -> None:
    from cpt_plugin import setup_model
    from cpt_plugin.offload.layer_graphs import kept_graph_extra_bytes
    from cpt_plugin.patching import causal_lm

    model = setup_model(tiny_llama(layers=3), {"lora_r": 4, "kernels": True}, checkpointing="off")
    graphs = _with_managed_graphs(model).graphs
    base = model.get_base_model()
    base.train()
    layer = base.model.layers[0]
    trainable = sum(p.numel() * p.element_size() for p in layer.parameters() if p.requires_grad)
    need = kept_graph_extra_bytes(3, 64, 64, 2, trainable)
    assert not causal_lm._grant_layer_graphs_if_room(base, 64, need - 1, 2) and not graphs.granted
    with caplog.at_level("INFO", logger="cpt_plugin.patching.causal_lm"):
        assert causal_lm._grant_layer_graphs_if_room(base, 64, need, 2)
    assert graphs.granted and "run as CUDA graphs" in caplog.text
    assert causal_lm._grant_layer_graphs_if_room(base, 64, 1e12, 2) == 0  # granted before: nothing new
    graphs.off_reason = "a failed capture"
    assert not causal_lm._grant_layer_graphs_if_room(base, 64, 1e12, 2)


def test_without_checkpointing_the_products_get_the_room_the_graphs_leave(monkeypatch) -> None:
    """At the loss: the graphs' bytes come off the device's room first, the products get what is left."""
    from cpt_plugin import setup_model
    from cpt_plugin.offload.layer_graphs import kept_graph_extra_bytes
    from cpt_plugin.patching import causal_lm

    model = setup_model(tiny_llama(layers=3), {"lora_r": 4, "kernels": True}, checkpointing="off")
    graphs = _with_managed_graphs(model).graphs
    base = model.get_base_model()
    base.train()
    layer = base.model.layers[0]
    trainable = sum(p.numel() * p.element_size() for p in layer.parameters() if p.requires_grad)
    graphs_need = kept_graph_extra_bytes(3, 64, 64, 2, trainable)
    products_need = causal_lm.products_bytes_from_config(base, 64, 2)
    causal_lm._grant_room_at_the_loss(base, 64, graphs_need + products_need / 2, 2)
    assert graphs.granted and not causal_lm._mlp_products_now(base, 64)
    graphs.grant(False)
    causal_lm._grant_room_at_the_loss(base, 64, graphs_need + products_need, 2)
    assert graphs.granted and causal_lm._mlp_products_now(base, 64)
