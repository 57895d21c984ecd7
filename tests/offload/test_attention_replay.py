"""An offloaded layer's recompute without attention: the forward's graph replayed with the recompute's
q, k, v gives the same loss and gradients, runs no attention forward in backward, keeps nothing of the
forward's q, k, v on the device, and falls back to computing when the calls do not match."""

from __future__ import annotations

import copy

import pytest
import torch
from offload_models import assert_grads_close_in_norm, gpu_bf16_llama, tiny_llama

import cpt_plugin.offload.attention_replay as replay
import cpt_plugin.offload.head_groups as hg
from cpt_plugin.offload.checkpointing import enable_checkpointing
from cpt_plugin.offload.head_groups import enable_head_groups
from tests.patching.models import FAMILIES, tiny_model


def _long(monkeypatch, one_group: bool = False) -> None:
    monkeypatch.setattr(hg, "MIN_QUERY_BYTES", 0)
    monkeypatch.setattr(replay, "REPLAY_MIN_SHARE", 0.0)
    monkeypatch.setattr(hg, "GROUP_QUERY_BYTES", 2**40 if one_group else 1)


def _grads(model, batches):
    model.zero_grad(set_to_none=True)
    losses = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss / len(batches)
        loss.backward()
        losses.append(loss.detach())
    return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _same(got, want, rtol=1e-4, atol=1e-5) -> None:
    (losses, grads), (ref_losses, ref) = got, want
    for a, b in zip(losses, ref_losses, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref.keys() and grads
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], rtol=rtol, atol=atol, msg=name)


def _counting(monkeypatch, target, name: str) -> list:
    calls: list = []
    original = getattr(target, name)
    monkeypatch.setattr(target, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


@pytest.mark.parametrize("one_group", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_same_loss_and_gradients_and_no_attention_in_the_recompute(monkeypatch, family, one_group) -> None:
    reference = tiny_model(family, num_hidden_layers=3)
    if not reference._supports_sdpa:  # Gemma 2: eager attention, left alone
        return
    reference.set_attn_implementation("sdpa")
    model = copy.deepcopy(reference)
    enable_head_groups(model, replay=True)
    enable_checkpointing(model, "offload", _simulate_offload=True)
    _long(monkeypatch, one_group)
    batches = [torch.randint(0, model.config.vocab_size, (2, 19)) for _ in range(2)]  # accumulation
    want = _grads(reference, batches)
    sdpa = _counting(monkeypatch, torch.nn.functional, "scaled_dot_product_attention")  # every caller
    replays = _counting(monkeypatch, replay._Replay, "apply")
    got = _grads(model, batches)
    _same(got, want)
    if family == "gemma3_text":  # both tiny layers are sliding-window ones: a mask, transformers' call
        assert not replays
        return
    groups = 1 if one_group else model.config.num_key_value_heads
    # every SDPA call ran in the forward (one per group, per layer, per micro-batch); none in backward
    assert len(sdpa) == 3 * 2 * groups and len(replays) == 3 * 2


def test_the_forward_keeps_none_of_its_q_k_v_and_parks_the_output(monkeypatch) -> None:
    model = tiny_llama(layers=2)
    enable_head_groups(model, replay=True)
    enable_checkpointing(model, "offload", _simulate_offload=True)
    _long(monkeypatch)
    recorded = []
    original = replay.record

    def spy(*args):
        out = original(*args)
        recorded.append(args[-1].items[-1])
        return out

    monkeypatch.setattr(replay, "record", spy)
    ids = torch.randint(0, 257, (2, 13))
    loss = model(input_ids=ids, labels=ids).loss
    assert len(recorded) == 2
    for item in recorded:
        for leaves, part in item.groups:
            assert all(t.untyped_storage().nbytes() == 0 for t in (*leaves, part))  # freed on the device
        kinds = [slot[0] for slot in item.slots]
        assert kinds.count("input") == 3 * len(item.groups) and "output" in kinds
        assert item.output_handle._host.numel() == 2 * 13 * 64  # the whole output, in host memory
    loss.backward()
    assert all(not item.groups and not item.slots for item in recorded)  # dropped after their backward


def test_a_recompute_call_that_does_not_match_computes_attention(monkeypatch) -> None:
    reference = tiny_llama(layers=2)
    model = copy.deepcopy(reference)
    enable_head_groups(model, replay=True)
    enable_checkpointing(model, "offload", _simulate_offload=True)
    _long(monkeypatch)
    ids = torch.randint(0, 257, (2, 13))
    want = _grads(reference, [ids])
    original_key = replay._key
    monkeypatch.setattr(
        replay, "_key", lambda *a: original_key(*a) + (torch.is_grad_enabled(),)
    )  # the recompute's key differs from the forward's
    replays = _counting(monkeypatch, replay._Replay, "apply")
    groups = _counting(monkeypatch, hg._HeadGroupedAttention, "apply")
    _same(_grads(model, [ids]), want)
    assert not replays and len(groups) == 2  # computed again, over groups of heads


def _offloaded_toy():
    """A 2-layer toy, a copy of it offloaded with the replay on, and its widths for ``replays_at``."""
    reference = tiny_llama(layers=2)
    model = copy.deepcopy(reference)
    enable_head_groups(model, replay=True)
    enable_checkpointing(model, "offload", _simulate_offload=True)
    config = reference.config
    shape = (config.hidden_size, config.intermediate_size, config.hidden_size)
    shape += (config.num_key_value_heads * config.hidden_size // config.num_attention_heads,)
    return reference, model, shape


@pytest.mark.parametrize("seq", [12, 13])
def test_replay_starts_where_attention_is_a_large_enough_share(monkeypatch, seq) -> None:
    """From the length where attention is ``REPLAY_MIN_SHARE`` of a layer's FLOPs, offloaded layers replay
    their attention even where no head groups apply (one group); shorter sequences are recomputed."""
    reference, model, shape = _offloaded_toy()
    share = (replay.attention_share(12, *shape) + replay.attention_share(13, *shape)) / 2
    monkeypatch.setattr(replay, "REPLAY_MIN_SHARE", share)  # MIN_QUERY_BYTES stays: one group
    ids = torch.randint(0, 257, (2, seq))
    want = _grads(reference, [ids])
    records = _counting(monkeypatch, replay, "record")
    replays = _counting(monkeypatch, replay._Replay, "apply")
    groups = _counting(monkeypatch, hg._HeadGroupedAttention, "apply")
    _same(_grads(model, [ids]), want)
    assert len(records) == len(replays) == (2 if seq == 13 else 0)
    assert not groups


def test_the_measured_lengths_of_llama_1b() -> None:
    """Llama-3.2-1B's shapes: the replay starts between 8,192 tokens (measured slower on an H200) and
    16,384 (faster)."""
    shape = (2048, 8192, 2048, 512)
    assert replay.attention_share(2048, *shape) == pytest.approx(0.065, abs=0.002)
    assert replay.attention_share(131072, *shape) == pytest.approx(0.815, abs=0.002)
    assert not replay.replays_at(8192, *shape) and replay.replays_at(16384, *shape)


def test_large_layers_replay_from_a_smaller_share() -> None:
    """Mistral-7B's layers at 1 x 8192 (4.1 TFLOP per forward, attention 13% of it) replay: measured faster
    on an H200. The same layers at 4 x 2048 (a 4% share) and Llama-1B's small layers at 8,192 do not."""
    mistral = (4096, 14336, 4096, 1024)
    assert replay.attention_share(8192, *mistral) == pytest.approx(0.133, abs=0.002)
    assert replay.layer_forward_flops(8192, 8192, *mistral) == pytest.approx(4.13e12, rel=0.01)
    assert replay.replays_at(8192, *mistral, tokens=8192)
    assert not replay.replays_at(2048, *mistral, tokens=8192)  # a large layer, attention too small a part
    assert not replay.replays_at(4096, *mistral, tokens=4096)  # 7%, and under the layer size
    llama = (2048, 8192, 2048, 512)
    assert not replay.replays_at(8192, *llama, tokens=8192)
    assert not replay.replays_at(2048, *llama, tokens=8192)


@pytest.mark.parametrize("batch", [1, 2])
def test_the_layer_size_counts_the_micro_batch(monkeypatch, batch) -> None:
    """The large-layer rule reads the micro-batch's tokens (batch x seq) from the attention call: with the
    share rule out of reach, the toy replays at batch 2 and recomputes at batch 1."""
    reference, model, shape = _offloaded_toy()
    bar = (replay.layer_forward_flops(13, 13, *shape) + replay.layer_forward_flops(26, 13, *shape)) / 2
    monkeypatch.setattr(replay, "REPLAY_MIN_SHARE", 1.1)
    monkeypatch.setattr(replay, "LARGE_LAYER_MIN_SHARE", 0.0)
    monkeypatch.setattr(replay, "LARGE_LAYER_FLOPS", bar)
    ids = torch.randint(0, 257, (batch, 13))
    want = _grads(reference, [ids])
    records = _counting(monkeypatch, replay, "record")
    _same(_grads(model, [ids]), want)
    assert len(records) == (2 if batch == 2 else 0)


def test_recompute_mode_and_kept_layers_do_not_record(monkeypatch) -> None:
    model = tiny_llama(layers=2)
    enable_head_groups(model, replay=True)
    enable_checkpointing(model, "recompute")
    _long(monkeypatch)
    records = _counting(monkeypatch, replay, "record")
    ids = torch.randint(0, 257, (2, 13))
    model(input_ids=ids, labels=ids).loss.backward()
    assert not records


@pytest.mark.gpu
@pytest.mark.parametrize("one_group", [False, True])
def test_on_the_gpu_the_replayed_backward_gives_the_same_gradients(monkeypatch, one_group) -> None:
    """cuDNN/flash attention saves other tensors than the CPU kernel (RNG seeds, its own log-sum-exp
    layout): bf16 Llama layers, offloaded, replayed against computed again."""
    reference = gpu_bf16_llama(512, 8192)
    model = copy.deepcopy(reference)
    enable_checkpointing(reference, "offload")
    enable_checkpointing(model, "offload")
    enable_head_groups(model, replay=True)
    _long(monkeypatch, one_group)
    ids = torch.randint(0, 257, (1, 4096), device="cuda")
    ref_losses, ref = _grads(reference, [ids])
    replays = _counting(monkeypatch, replay._Replay, "apply")
    losses, grads = _grads(model, [ids])
    assert len(replays) == 2
    torch.testing.assert_close(losses[0].float(), ref_losses[0].float(), rtol=1e-3, atol=1e-3)
    assert_grads_close_in_norm(grads, ref)


@pytest.mark.parametrize("mode", ["off", "recompute", "offload"])
def test_set_up_says_once_when_the_option_does_nothing(caplog, mode) -> None:
    from cpt_plugin import CPTConfig, setup_model

    model = tiny_llama(layers=1)
    with caplog.at_level("WARNING"):
        setup_model(model, CPTConfig(lora_r=2, gradient_checkpointing=mode, attention_replay=True))
    said = [r.getMessage() for r in caplog.records if "attention_replay" in r.getMessage()]
    assert len(said) == (mode != "offload")
    if said:
        assert f"gradient_checkpointing is {mode}" in said[0]
    layers_marked = [m for m in model.modules() if m.__dict__.get("_cpt_attention_replay")]
    assert len(layers_marked) == 1


def test_set_up_says_so_for_a_model_without_sdpa_attention(caplog) -> None:
    from cpt_plugin import CPTConfig, setup_model

    with caplog.at_level("WARNING"):
        setup_model(
            tiny_llama(layers=1, attn_implementation="eager"),
            CPTConfig(lora_r=2, gradient_checkpointing="offload", attention_replay=True),
        )
    assert "does not run transformers' sdpa attention" in caplog.text


@pytest.mark.parametrize("value,marked", [(None, True), (False, False)])
def test_the_default_replays_where_it_applies_and_says_nothing(caplog, value, marked) -> None:
    """``attention_replay`` unset (None) is on for offloaded layers at long enough lengths and, unlike an
    explicit true, never warns where it cannot apply; false marks nothing."""
    from cpt_plugin import CPTConfig, setup_model

    model = tiny_llama(layers=1)
    with caplog.at_level("WARNING"):
        setup_model(model, CPTConfig(lora_r=2, gradient_checkpointing="off", attention_replay=value))
    assert "attention_replay" not in caplog.text
    assert any(m.__dict__.get("_cpt_attention_replay") for m in model.modules()) == marked


def test_a_full_host_recomputes_the_attention_and_says_so_once(monkeypatch, caplog) -> None:
    """Parking is optional: with no room in host memory (and no free pooled buffer) the layers compute
    their attention in the recompute, the numbers are the same, and one warning says why."""
    import cpt_plugin.offload.checkpointing as checkpointing

    reference = tiny_llama(layers=2)
    model = copy.deepcopy(reference)
    enable_head_groups(model, replay=True)
    enable_checkpointing(model, "offload", _simulate_offload=True)
    _long(monkeypatch)
    monkeypatch.setattr(replay, "_said_host_full", False)
    monkeypatch.setattr(checkpointing.POOL, "has_free", lambda *a: False)
    monkeypatch.setattr(
        checkpointing, "host_memory_available", lambda: checkpointing.HOST_RESERVE_BYTES + 1.0
    )
    ids = torch.randint(0, 257, (2, 13))
    want = _grads(reference, [ids])
    records = _counting(monkeypatch, replay, "record")
    with caplog.at_level("WARNING"):
        _same(_grads(model, [ids]), want)
        _same(_grads(model, [ids]), want)
    assert not records
    assert caplog.text.count("host memory is short") == 1
    monkeypatch.setattr(checkpointing, "host_memory_available", lambda: None)  # not Linux: no bound
    _same(_grads(model, [ids]), want)
    assert len(records) == 2


@pytest.mark.parametrize("one_group", [False, True])
def test_one_group_hands_back_its_own_gradients(monkeypatch, one_group) -> None:
    """With one group the replayed backward returns the group's dq, dk, dv as they are: no buffers for a
    second copy (1.5 hidden states per token at the layer's backward peak); several groups fill them."""
    reference = tiny_llama(layers=2)
    model = copy.deepcopy(reference)
    enable_head_groups(model, replay=True)
    enable_checkpointing(model, "offload", _simulate_offload=True)
    _long(monkeypatch, one_group)
    buffers = _counting(monkeypatch, replay, "head_major_buffer")
    ids = torch.randint(0, 257, (2, 13))
    want = _grads(reference, [ids])
    buffers.clear()
    _same(_grads(model, [ids]), want)
    assert len(buffers) == (0 if one_group else 2 * 3)  # two layers, q/k/v each
