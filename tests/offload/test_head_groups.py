"""Attention over groups of heads: the same values and gradients as one SDPA call, less backward memory."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from offload_models import assert_grads_close_in_norm, gpu_bf16_llama, tiny_llama

import cpt_plugin.offload.attention_replay as replay_module
import cpt_plugin.offload.head_groups as hg
from cpt_plugin.offload.checkpointing import enable_checkpointing
from cpt_plugin.offload.head_groups import (
    disable_head_groups,
    enable_head_groups,
    head_grouped_attention,
    head_groups,
)
from tests.patching.models import FAMILIES, tiny_model

SHAPES = [  # batch, query heads, key/value heads, seq, head_dim, groups
    (2, 8, 2, 37, 16, 2),
    (1, 4, 4, 33, 8, 4),  # one head per group, no GQA
    (3, 6, 3, 17, 24, 3),
    (1, 8, 4, 64, 16, 2),
]


def _inputs(batch, heads, kv_heads, seq, dim, dtype):
    """(batch, seq, heads, dim) leaves, given to attention as the transposed views the projections make."""
    make = lambda h: torch.randn(batch, seq, h, dim, dtype=dtype).requires_grad_()  # noqa: E731
    return make(heads), make(kv_heads), make(kv_heads)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_and_gradients_equal_one_sdpa_call(shape, dtype) -> None:
    batch, heads, kv_heads, seq, dim, groups = shape
    q, k, v = _inputs(batch, heads, kv_heads, seq, dim, dtype)
    views = [t.transpose(1, 2) for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*views, is_causal=True, enable_gqa=heads != kv_heads).transpose(1, 2)
    grad = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    out = head_grouped_attention(*views, groups)
    assert out.shape == (batch, seq, heads, dim) and out.is_contiguous()
    grads = torch.autograd.grad(out, (q, k, v), grad)
    tol = dict(rtol=0, atol=0) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out, ref, **tol)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, **tol)


def test_group_outputs_are_freed_after_forward_and_restored_for_backward(monkeypatch) -> None:
    """Each group's SDPA output is kept once (in the returned buffer); its backward reads it back. Feeding
    zeros back instead changes the gradients, so the restore is what makes them right."""
    q, k, v = _inputs(2, 8, 2, 37, 16, torch.float32)
    views = [t.transpose(1, 2) for t in (q, k, v)]
    out = head_grouped_attention(*views, 2)
    parts = out.grad_fn.parts
    assert all(parked and part.untyped_storage().nbytes() == 0 for _, part, parked, _ in parts)
    grad = torch.randn_like(out)
    good = torch.autograd.grad(out, (q, k), grad)

    restore = hg._unpark
    monkeypatch.setattr(hg, "_unpark", lambda t, values, n: restore(t, torch.zeros_like(values), n))
    wrong = torch.autograd.grad(head_grouped_attention(*views, 2), (q, k), grad)
    assert not torch.allclose(wrong[0], good[0])


def test_group_count_follows_the_query_size_and_the_key_value_heads(monkeypatch) -> None:
    def count(seq, heads=32, kv=8, dim=64):
        return head_groups(
            torch.empty(1, heads, seq, dim, device="meta", dtype=torch.bfloat16),
            torch.empty(1, kv, seq, dim, device="meta", dtype=torch.bfloat16),
        )

    assert count(32768) == 1  # 128 MiB of query: one call
    assert count(65536) == 2  # 256 MiB: two groups of 128 MiB
    assert count(131072) == 4  # Llama-1B at 131K
    assert count(524288) == 8  # no more groups than key/value heads
    assert count(262144, heads=12, kv=3) == 3
    assert count(262144, heads=12, kv=5) == 1  # heads not a multiple of the key/value heads


def _grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _force_groups(monkeypatch) -> None:
    monkeypatch.setattr(hg, "MIN_QUERY_BYTES", 0)
    monkeypatch.setattr(hg, "GROUP_QUERY_BYTES", 1)  # as many groups as key/value heads


@pytest.mark.parametrize("checkpointing", ["off", "recompute", "offload"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_whole_model_gives_the_same_loss_and_gradients(monkeypatch, family, checkpointing) -> None:
    _force_groups(monkeypatch)
    reference = tiny_model(family, num_hidden_layers=2)
    if not reference._supports_sdpa:  # Gemma 2 (soft-capped attention): eager only, left alone
        assert enable_head_groups(reference) == 0
        return
    reference.set_attn_implementation("sdpa")
    model = copy.deepcopy(reference)
    calls, replays = [], []
    original = hg._HeadGroupedAttention.apply
    monkeypatch.setattr(hg._HeadGroupedAttention, "apply", lambda *a: calls.append(a[3]) or original(*a))
    replay = replay_module._Replay.apply
    monkeypatch.setattr(replay_module._Replay, "apply", lambda *a: replays.append(1) or replay(*a))
    marked = enable_head_groups(model)
    assert marked == 2
    if checkpointing != "off":
        enable_checkpointing(model, checkpointing, _simulate_offload=True)
    ids = torch.randint(0, model.config.vocab_size, (2, 19))
    ref_loss, ref = _grads(reference, ids)
    loss, grads = _grads(model, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref.keys() and grads
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)
    # Only recomputes are grouped (a kept layer chose speed), and an offloaded layer's recompute does not
    # run attention at all (attention_replay); Gemma 3's sliding-window layers (both tiny layers here)
    # pass a mask: they keep transformers' call
    long_calls = family != "gemma3_text"
    assert bool(calls) == (long_calls and checkpointing != "off"), calls
    assert not replays  # attention_replay is opt-in (tests/offload/test_attention_replay.py)
    assert all(g == model.config.num_key_value_heads for g in calls)


@pytest.mark.parametrize("mode", ["recompute", "offload"])
def test_under_torch_checkpoint_the_recompute_keeps_one_call(monkeypatch, mode) -> None:
    """Under torch.distributed the layers go through torch's checkpoint, whose recompute must save what
    the forward saved: no groups there (the run would fail or mismatch), the same gradients."""
    from cpt_plugin.offload import checkpointing as ckpt

    _force_groups(monkeypatch)
    monkeypatch.setattr(ckpt, "_distributed", lambda: True)
    reference = tiny_llama(layers=2)
    model = copy.deepcopy(reference)
    enable_head_groups(model)
    enable_checkpointing(model, mode, _simulate_offload=True)
    calls = []
    original = hg._HeadGroupedAttention.apply
    monkeypatch.setattr(hg._HeadGroupedAttention, "apply", lambda *a: calls.append(1) or original(*a))
    ids = torch.randint(0, 257, (2, 13))
    ref_loss, ref = _grads(reference, ids)
    loss, grads = _grads(model, ids)
    assert not calls
    torch.testing.assert_close(loss, ref_loss)
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)


def test_the_layer_below_input_travels_once_the_attention_backward_is_done(monkeypatch) -> None:
    """Offloaded at long context: the attention's backward holds the layer's largest working set; the
    input of the layer below is fetched right after it, before the rest of the layer's backward."""
    from cpt_plugin.offload import checkpointing as ckpt

    _force_groups(monkeypatch)
    monkeypatch.setattr(ckpt, "LATE_FETCH_BYTES", 0)
    model = tiny_llama(layers=2)
    enable_head_groups(model)
    enable_checkpointing(model, "offload", _simulate_offload=True)
    events = []
    original_fetch = ckpt._OffloadedInput.start_fetch
    original_backward = hg._HeadGroupedAttention.backward

    def fetch(self):
        if self._gpu is None:
            events.append("fetch")
        original_fetch(self)

    def backward(ctx, grad):
        events.append("attention")
        return original_backward(ctx, grad)

    monkeypatch.setattr(ckpt._OffloadedInput, "start_fetch", fetch)
    monkeypatch.setattr(hg._HeadGroupedAttention, "backward", staticmethod(backward))
    for layer in model.model.layers:
        layer.input_layernorm.register_full_backward_hook(lambda *_: events.append("norm"))
    ids = torch.randint(0, 257, (2, 13))
    model(input_ids=ids, labels=ids).loss.backward()
    # layer 1: its own input, its attention, then layer 0's input, then its input norm; layer 0 likewise
    assert events == ["fetch", "attention", "fetch", "norm", "attention", "norm"]


def test_short_inputs_masks_inference_and_unmarked_models_keep_the_plain_call(monkeypatch) -> None:
    model = tiny_llama(layers=1)
    enable_checkpointing(model, "recompute")
    calls = []
    original = hg._HeadGroupedAttention.apply
    monkeypatch.setattr(hg._HeadGroupedAttention, "apply", lambda *a: calls.append(1) or original(*a))
    enable_head_groups(model)
    ids = torch.randint(0, 257, (1, 23))
    model(input_ids=ids, labels=ids).loss.backward()
    assert not calls  # far below MIN_QUERY_BYTES
    _force_groups(monkeypatch)
    with torch.no_grad():
        model(input_ids=ids)
    assert not calls  # no graph, no backward workspace
    padded = torch.ones_like(ids).index_fill_(1, torch.tensor([0]), 0)
    model(input_ids=ids, attention_mask=padded, labels=ids).loss.backward()
    assert not calls  # a padding mask: transformers' own call
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == 1
    disable_head_groups(model)
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == 1


def test_eager_attention_models_are_left_alone() -> None:
    model = tiny_llama(layers=1, attn_implementation="eager")
    assert enable_head_groups(model) == 0


@pytest.mark.gpu
def test_on_the_gpu_the_backward_peak_falls_and_gradients_match() -> None:
    """cuDNN/flash attention on the GPU: the same gradients in bf16, and a lower backward peak."""
    heads, kv, seq, dim = 16, 4, 32768, 64
    torch.manual_seed(0)

    def run(groups):
        q, k, v = (
            torch.randn(1, seq, h, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for h in (heads, kv, kv)
        )
        views = [t.transpose(1, 2) for t in (q, k, v)]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        if groups == 1:
            out = F.scaled_dot_product_attention(*views, is_causal=True, enable_gqa=True).transpose(1, 2)
        else:
            out = head_grouped_attention(*views, groups)
        out.backward(torch.ones_like(out))
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, [t.grad.float() for t in (q, k, v)]

    torch.manual_seed(0)
    peak_one, ref = run(1)
    torch.manual_seed(0)
    peak_groups, grads = run(4)
    for got, want in zip(grads, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    assert peak_groups < peak_one, (peak_groups / 2**20, peak_one / 2**20)


@pytest.mark.parametrize("checkpointing", ["recompute", "offload"])
def test_set_up_with_every_kernel_the_groups_change_no_number(monkeypatch, checkpointing) -> None:
    """Through ``setup_model`` (Triton kernels, fused LoRA, our checkpointing): the grouped run against
    the same set-up with one SDPA call."""
    from cpt_plugin import CPTConfig, setup_model
    from cpt_plugin.patching.registry import unpatch
    from tests.patching.models import batch, train_step

    def build():
        model = tiny_model("llama", num_hidden_layers=2)
        model.set_attn_implementation("sdpa")
        config = CPTConfig(
            lora_r=8, kernels=True, gradient_checkpointing=checkpointing, offload_embeddings=False
        )
        model = setup_model(model, config)
        with torch.no_grad():  # PEFT starts B at zero, which would hide an error in the LoRA branch
            for name, param in sorted(model.named_parameters()):
                if "lora_B" in name:
                    param.copy_(0.1 * torch.randn(param.shape, generator=torch.Generator().manual_seed(5)))
        return model

    inputs = batch()
    try:
        want_loss, want_grads, _ = train_step(build(), inputs)
        _force_groups(monkeypatch)
        calls = []
        original = hg._HeadGroupedAttention.apply
        monkeypatch.setattr(hg._HeadGroupedAttention, "apply", lambda *a: calls.append(1) or original(*a))
        replay = replay_module._Replay.apply
        monkeypatch.setattr(replay_module._Replay, "apply", lambda *a: calls.append(2) or replay(*a))
        loss, grads, _ = train_step(build(), inputs)
    finally:
        unpatch()
    # groups in the recompute (on the CPU "offload" keeps the input instead: there is no pinned memory;
    # the offloaded replay is tested with simulated offloading above)
    assert set(calls) == {1}
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == want_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.gpu
def test_on_the_gpu_a_whole_offloaded_model_gives_the_same_gradients(monkeypatch) -> None:
    """bf16 Llama with offloaded checkpointing on the GPU: grouped against one SDPA call per layer."""
    reference = gpu_bf16_llama(256, 4096)
    model = copy.deepcopy(reference)
    enable_checkpointing(model, "offload")
    enable_checkpointing(reference, "offload")
    assert enable_head_groups(model) == 2
    ids = torch.randint(0, 257, (1, 2048), device="cuda")
    ref_loss, ref = _grads(reference, ids)
    _force_groups(monkeypatch)
    loss, grads = _grads(model, ids)
    torch.testing.assert_close(loss.float(), ref_loss.float(), rtol=1e-3, atol=1e-3)
    assert_grads_close_in_norm(grads, ref)
