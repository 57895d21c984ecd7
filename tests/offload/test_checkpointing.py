"""Checkpointing modes give the gradients of an unchekpointed model; offload logic runs on CPU too."""

from __future__ import annotations

import copy

import pytest
import torch
from offload_models import tiny_llama

from cpt_plugin.offload import checkpointing as ckpt
from cpt_plugin.offload.checkpointing import CheckpointFunction, checkpointing_mode, enable_checkpointing


def _grads(
    model: torch.nn.Module, batches: list[torch.Tensor]
) -> tuple[list[float], dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    losses = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss / len(batches)
        loss.backward()
        losses.append(loss.item())
    return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _count_mlp_calls(model: torch.nn.Module) -> list[int]:
    calls = [0]

    def hook(*_):
        calls[0] += 1

    for layer in model.model.layers:
        layer.mlp.register_forward_pre_hook(hook)
    return calls


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode,simulate", [("recompute", False), ("offload", False), ("offload", True)])
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_gradients_match_no_checkpointing(mode: str, simulate: bool, micro_batches: int) -> None:
    reference = tiny_llama(layers=3)
    model = copy.deepcopy(reference)
    batches = [torch.randint(0, 257, (2, 33)) for _ in range(micro_batches)]
    ref_losses, ref_grads = _grads(reference, batches)

    used = enable_checkpointing(model, mode, _simulate_offload=simulate)
    assert used == ("offload" if simulate else "recompute")
    calls = _count_mlp_calls(model)
    losses, grads = _grads(model, batches)
    assert losses == pytest.approx(ref_losses, rel=1e-6)
    _assert_same(grads, ref_grads)
    # each layer ran twice per micro-batch: forward and recompute
    assert calls[0] == 2 * 3 * micro_batches


def test_offload_path_prefetches_previous_layer(monkeypatch) -> None:
    model = tiny_llama(layers=3)
    enable_checkpointing(model, "offload", _simulate_offload=True)
    handles = []
    original = ckpt._OffloadedInput.__init__

    def spy(self, x, simulate):
        original(self, x, simulate)
        handles.append(self)

    monkeypatch.setattr(ckpt._OffloadedInput, "__init__", spy)
    ids = torch.randint(0, 257, (1, 17))
    loss = model(input_ids=ids, labels=ids).loss
    assert len(handles) == 3
    assert all(h._x is None for h in handles)  # nothing kept on the "device" after the forward
    assert all(h._host.grad_fn is None and not h._host.requires_grad for h in handles)
    assert handles[1]._prev() is handles[0] and handles[2]._prev() is handles[1]
    loss.backward()
    assert [h.fetches for h in handles] == [1, 1, 1]  # each fetched exactly once (two of them ahead of use)
    assert all(h._taken and h._gpu is None for h in handles)


def test_a_large_input_travels_after_the_layer_above_is_done(monkeypatch) -> None:
    """At long context the input of layer i - 1 is fetched once layer i's backward has finished, so
    that backward's peak does not hold it; the gradients stay the same."""
    reference = tiny_llama(layers=3)
    model = copy.deepcopy(reference)
    enable_checkpointing(model, "offload", _simulate_offload=True)
    monkeypatch.setattr(ckpt, "LATE_FETCH_BYTES", 0)  # every input counts as large
    handles, events = [], []
    original_init, original_fetch = ckpt._OffloadedInput.__init__, ckpt._OffloadedInput.start_fetch

    def spy(self, x, simulate):
        original_init(self, x, simulate)
        handles.append(self)

    def fetch(self):
        if self._gpu is None:
            events.append(("fetch", handles.index(self)))
        original_fetch(self)

    monkeypatch.setattr(ckpt._OffloadedInput, "__init__", spy)
    monkeypatch.setattr(ckpt._OffloadedInput, "start_fetch", fetch)
    for index, layer in enumerate(model.model.layers):
        layer.input_layernorm.register_full_backward_hook(lambda *_, i=index: events.append(("done", i)))
    ids = torch.randint(0, 257, (2, 13))
    ref = _grads(reference, [ids])
    got = _grads(model, [ids])
    # layer i's last backward step (its input norm) comes before layer i - 1's input is fetched
    assert events == [("fetch", 2), ("done", 2), ("fetch", 1), ("done", 1), ("fetch", 0), ("done", 0)]
    assert [h.fetches for h in handles] == [1, 1, 1]
    _assert_same(got[1], ref[1])


def test_rng_preserved_with_dropout() -> None:
    reference = tiny_llama(layers=2, attention_dropout=0.3)
    model = copy.deepcopy(reference)
    ids = torch.randint(0, 257, (2, 19))
    torch.manual_seed(1)
    _, ref_grads = _grads(reference, [ids])
    enable_checkpointing(model, "offload", _simulate_offload=True)
    torch.manual_seed(1)
    _, grads = _grads(model, [ids])
    _assert_same(grads, ref_grads)


def test_no_grad_eval_saves_and_offloads_nothing(monkeypatch) -> None:
    model = tiny_llama(layers=2)
    enable_checkpointing(model, "offload", _simulate_offload=True)
    created = []
    monkeypatch.setattr(ckpt, "_OffloadedInput", lambda *a, **k: created.append(1))
    ids = torch.randint(0, 257, (1, 9))
    with torch.no_grad():
        out_train = model(input_ids=ids).logits
        model.eval()
        out_eval = model(input_ids=ids).logits
    torch.testing.assert_close(out_train, out_eval)
    assert created == []
    before = ckpt.POOL.stats()["allocations"]
    with torch.no_grad():
        model(input_ids=ids)
    assert ckpt.POOL.stats()["allocations"] == before


def test_host_pool_says_whether_a_request_would_allocate() -> None:
    pool = ckpt.HostBufferPool()
    assert not pool.has_free(10, "k")
    buf = pool.get(64, "k", pin=False)
    assert not pool.has_free(10, "k")  # lent out
    pool.put(buf, "k")
    assert pool.has_free(64, "k") and not pool.has_free(65, "k") and not pool.has_free(1, "other")
    assert pool.get(10, "k", pin=False) is buf and pool.stats()["allocations"] == 1


def test_host_pool_stays_flat_over_steps() -> None:
    model = tiny_llama(layers=2)
    enable_checkpointing(model, "offload", _simulate_offload=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    sizes = []
    for _ in range(50):
        ids = torch.randint(0, 257, (1, 24))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        sizes.append(ckpt.POOL.stats())
    assert sizes[1] == sizes[-1]
    assert sizes[-1]["count"] <= sizes[0]["count"] + 2


def test_survives_later_gradient_checkpointing_enable() -> None:
    model = tiny_llama(layers=2)
    enable_checkpointing(model, "offload", _simulate_offload=True)
    model.gradient_checkpointing_disable()
    assert checkpointing_mode(model) == "off"
    # what the Trainer does (5.24: activation_checkpointing_enable; 5.17: gradient_checkpointing_enable)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    assert checkpointing_mode(model) == "offload"
    with pytest.warns(FutureWarning):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert checkpointing_mode(model) == "offload"
    assert all(
        isinstance(layer._gradient_checkpointing_func, CheckpointFunction) for layer in model.model.layers
    )
    calls = _count_mlp_calls(model)
    ids = torch.randint(0, 257, (1, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    assert calls[0] == 4


def test_peft_model_and_off_mode() -> None:
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(layers=2)
    reference = copy.deepcopy(base)
    config = LoraConfig(
        r=4, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"], init_lora_weights=False
    )
    peft_ref = get_peft_model(reference, copy.deepcopy(config))
    peft_model = get_peft_model(base, config)
    peft_model.load_state_dict(peft_ref.state_dict())
    enable_checkpointing(peft_model, "offload", _simulate_offload=True)
    peft_model.gradient_checkpointing_enable()  # through PeftModel to the base model
    assert checkpointing_mode(peft_model) == "offload"
    ids = torch.randint(0, 257, (2, 21))
    _, ref_grads = _grads(peft_ref, [ids])
    _, grads = _grads(peft_model, [ids])
    assert any("lora_A" in n for n in grads)
    _assert_same(grads, ref_grads)

    assert enable_checkpointing(peft_model, "off") == "off"
    assert checkpointing_mode(peft_model) == "off"
    assert not any(getattr(m, "gradient_checkpointing", False) for m in peft_model.modules())
    assert "_set_gradient_checkpointing" not in peft_model.get_base_model().__dict__


def test_model_with_our_function_deepcopies() -> None:
    model = tiny_llama(layers=2)
    enable_checkpointing(model, "recompute")
    clone = copy.deepcopy(model)
    assert clone._set_gradient_checkpointing.__self__ is clone
    assert checkpointing_mode(clone) == "recompute"


def test_bad_mode() -> None:
    with pytest.raises(ValueError, match="one of"):
        enable_checkpointing(tiny_llama(), "sometimes")


@pytest.mark.parametrize("mode", ["recompute", "offload"])
def test_frozen_embedding_output_not_kept_as_autograd_leaf(mode: str) -> None:
    """transformers/PEFT make the embedding output require grad whenever checkpointing is enabled (for
    reentrant checkpointing); with ours that leaf would pin hidden x 2 bytes per token on the GPU."""
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(layers=2)
    reference = copy.deepcopy(base)
    config = LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    peft_ref = get_peft_model(reference, copy.deepcopy(config))
    peft_model = get_peft_model(base, config)
    peft_model.load_state_dict(peft_ref.state_dict())
    peft_model.enable_input_require_grads()  # as PEFT's prepare_model_for_kbit_training does,
    peft_model.enable_input_require_grads()  # twice: the first handle is lost by transformers
    enable_checkpointing(peft_model, mode, _simulate_offload=mode == "offload")
    peft_model.gradient_checkpointing_enable()  # as the Trainer does: transformers re-adds the hook
    seen = []
    peft_model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: seen.append(out))
    ids = torch.randint(0, 257, (2, 15))
    _, grads = _grads(peft_model, [ids])
    assert seen and not seen[0].requires_grad
    _, ref_grads = _grads(peft_ref, [ids])
    _assert_same(grads, ref_grads)

    enable_checkpointing(peft_model, "off")  # transformers' own behaviour comes back
    peft_model.enable_input_require_grads()
    seen.clear()
    peft_model(input_ids=ids)
    assert seen[0].requires_grad


# ----------------------------------------------------------------------------------------------
# Per-layer modes
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "modes,tiled",
    [
        (("keep", "keep", "keep"), (False, False, False)),
        (("offload", "recompute", "keep"), (False, False, False)),
        (("keep", "offload", "recompute"), (True, False, True)),
        (("offload", "offload", "offload"), (True, True, True)),
    ],
)
def test_layer_plan_gives_the_gradients_of_no_checkpointing(modes, tiled) -> None:
    from cpt_plugin.offload.checkpointing import LayerPlan, enable_layer_plan
    from cpt_plugin.offload.tiled_mlp import set_tiled_layers

    reference = tiny_llama(layers=3)
    model = copy.deepcopy(reference)
    batches = [torch.randint(0, 257, (2, 33)) for _ in range(2)]
    ref_losses, ref_grads = _grads(reference, batches)

    holder = enable_layer_plan(model, LayerPlan(modes, tiled), _simulate_offload=True)
    set_tiled_layers(list(model.model.layers), tiled, chunk_tokens=16)  # 66 tokens: 5 chunks
    assert checkpointing_mode(model) == "planned"
    calls = _count_mlp_calls(model)
    losses, grads = _grads(model, batches)
    assert losses == pytest.approx(ref_losses, rel=1e-6)
    _assert_same(grads, ref_grads)
    # kept layers run their MLP once per micro-batch, checkpointed ones twice
    assert calls[0] == 2 * sum(1 if m == "keep" else 2 for m in modes)

    holder.plan = LayerPlan.uniform(3, "recompute")  # a new plan is an assignment
    _, grads = _grads(model, batches)
    _assert_same(grads, ref_grads)


def test_layer_plan_survives_trainer_enable_and_offloads_only_its_layers(monkeypatch) -> None:
    from cpt_plugin.offload.checkpointing import LayerPlan, PlannedLayerFunction, enable_layer_plan

    model = tiny_llama(layers=3)
    enable_layer_plan(
        model, LayerPlan(("offload", "keep", "recompute"), (False,) * 3), _simulate_offload=True
    )
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    funcs = [layer._gradient_checkpointing_func for layer in model.model.layers]
    assert all(isinstance(f, PlannedLayerFunction) for f in funcs)
    assert [f.index for f in funcs] == [0, 1, 2]
    created = []
    original = ckpt._OffloadedInput.__init__

    def spy(self, x, simulate):
        original(self, x, simulate)
        created.append(1)

    monkeypatch.setattr(ckpt._OffloadedInput, "__init__", spy)
    ids = torch.randint(0, 257, (1, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    assert created == [1]  # only layer 0 offloads


# ----------------------------------------------------------------------------------------------
# The lean layer checkpoint (no per-tensor hooks) and when torch's checkpoint is used instead
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,simulate", [("recompute", False), ("offload", True)])
def test_single_process_layers_never_use_torch_checkpoint(monkeypatch, mode: str, simulate: bool) -> None:
    """The decoder layers go through _LayerCheckpoint (graph-free forward, one recompute in backward):
    torch.utils.checkpoint's per-saved-tensor hooks made the offloaded step host-bound on an H200."""
    reference = tiny_llama(layers=2)
    model = copy.deepcopy(reference)
    enable_checkpointing(model, mode, _simulate_offload=simulate)

    def refuse(*_a, **_k):
        raise AssertionError("torch.utils.checkpoint was used")

    monkeypatch.setattr(ckpt, "checkpoint", refuse)
    hooks = []
    original = torch.autograd.graph.saved_tensors_hooks.__init__

    def counting(self, pack, unpack):
        hooks.append(pack)
        original(self, pack, unpack)

    monkeypatch.setattr(torch.autograd.graph.saved_tensors_hooks, "__init__", counting)
    ids = torch.randint(0, 257, (2, 13))
    _, grads = _grads(model, [ids])
    assert hooks == []
    monkeypatch.undo()
    _, ref_grads = _grads(reference, [ids])
    _assert_same(grads, ref_grads)


def test_autocast_is_restored_in_the_recompute() -> None:
    reference = tiny_llama(layers=2)
    model = copy.deepcopy(reference)
    enable_checkpointing(model, "recompute")
    ids = torch.randint(0, 257, (2, 11))

    def grads(m):
        m.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        return {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    _assert_same(grads(model), grads(reference))  # a recompute in fp32 would differ by bf16 rounding


def test_autograd_grad_is_refused_with_the_fix() -> None:
    model = tiny_llama(layers=2)
    enable_checkpointing(model, "recompute")
    ids = torch.randint(0, 257, (1, 7))
    loss = model(input_ids=ids, labels=ids).loss
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(RuntimeError, match="gradient_checkpointing: off"):
        torch.autograd.grad(loss, params)


def test_a_bound_tensor_that_needs_grad_goes_through_torch_checkpoint() -> None:
    """A tensor other than the layer input that needs a gradient (the lean path would drop it)."""
    import functools

    weight = torch.randn(5, 5, requires_grad=True)
    x = torch.randn(3, 5, requires_grad=True)

    def layer(h, w):
        return torch.tanh(h @ w)

    out = CheckpointFunction(offload=False)(functools.partial(layer, w=weight), x)
    out.sum().backward()
    ref_w, ref_x = weight.detach().requires_grad_(True), x.detach().requires_grad_(True)
    layer(ref_x, ref_w).sum().backward()
    torch.testing.assert_close(weight.grad, ref_w.grad)
    torch.testing.assert_close(x.grad, ref_x.grad)


def _released_outputs(monkeypatch) -> list[bool]:
    """Records, for every recomputed layer output, whether its memory was released before backward."""
    released: list[bool] = []
    real = ckpt._release_recomputed_outputs

    def spy(roots):
        real(roots)
        released.extend(root.untyped_storage().nbytes() == 0 for root in roots)

    monkeypatch.setattr(ckpt, "_release_recomputed_outputs", spy)
    return released


def test_a_recomputed_layer_output_is_released_before_its_backward(monkeypatch) -> None:
    """Nothing reads it (the residual add's backward saves nothing): its memory goes, the gradients stay."""
    reference = tiny_llama(layers=3)
    model = copy.deepcopy(reference)
    enable_checkpointing(model, "recompute")
    released = _released_outputs(monkeypatch)
    ids = torch.randint(0, 257, (2, 21))
    _, grads = _grads(model, [ids])
    assert released == [True] * 3
    _, ref_grads = _grads(reference, [ids])
    _assert_same(grads, ref_grads)


@pytest.mark.parametrize("hold", ["tensor", "view"])
def test_a_recomputed_output_someone_holds_is_kept(monkeypatch, hold: str) -> None:
    """A layer function that keeps its output (or a view of it) somewhere keeps its memory too."""
    released = _released_outputs(monkeypatch)
    held: list[torch.Tensor] = []
    weight = torch.randn(5, 5)

    def layer(h):
        out = h + (h @ weight).relu()  # ends in the residual add, like a decoder layer
        held.append(out if hold == "tensor" else out[..., :2])
        return out

    x = torch.randn(3, 5, requires_grad=True)
    CheckpointFunction(offload=False)(layer, x).sum().backward()
    assert released == [False]
    assert len(held) == 2 and held[1].untyped_storage().nbytes() > 0  # the forward's, the recompute's
    torch.testing.assert_close(held[1], held[0])


def test_a_layer_ending_in_another_op_keeps_its_output(monkeypatch) -> None:
    """Only an output made by an add (whose backward saves no tensor) is released."""
    released = _released_outputs(monkeypatch)
    x = torch.randn(3, 5, requires_grad=True)
    out = CheckpointFunction(offload=False)(torch.tanh, x)  # tanh's backward reads its output
    out.sum().backward()
    assert released == [False]
    torch.testing.assert_close(x.grad, 1 - torch.tanh(x.detach()) ** 2)


def test_the_layer_behind_either_partial_transformers_checkpoints():
    """transformers 5.17 checkpoints ``partial(super().__call__, **kw)``, 5.24 ``partial(forward, self,
    **kw)``: both must name the layer (else every layer counts as drawing random numbers, and its
    recompute saves and restores the RNG state)."""
    import functools

    layer = torch.nn.Linear(2, 2)
    assert ckpt.layer_of(functools.partial(layer.__call__, flag=True)) is layer
    assert ckpt.layer_of(functools.partial(type(layer).forward, layer, flag=True)) is layer
    assert ckpt.layer_of(functools.partial(lambda x: x)) is None
    model = tiny_llama(layers=1)
    enable_checkpointing(model, "recompute")
    seen = []
    original = ckpt._uses_rng
    ckpt._uses_rng = lambda module: seen.append(module) or original(module)
    try:
        ids = torch.randint(0, 257, (1, 5))
        model(input_ids=ids, labels=ids).loss.backward()
    finally:
        ckpt._uses_rng = original
    assert seen and all(m is model.model.layers[0] for m in seen)
