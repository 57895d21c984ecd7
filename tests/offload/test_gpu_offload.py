"""Offloaded checkpointing on a real GPU: streams, pinned memory, peak memory and speed."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cpt_plugin.offload import checkpointing as ckpt
from cpt_plugin.offload.checkpointing import enable_checkpointing
from cpt_plugin.offload.tiled_mlp import enable_tiled_mlp

pytestmark = pytest.mark.gpu


def _llama(
    layers: int, hidden: int, inter: int, heads: int, kv: int, dtype=torch.bfloat16
) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=1024,
        max_position_embeddings=65536,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).to("cuda", dtype).train()


def _grads(model, batches):
    model.zero_grad(set_to_none=True)
    for ids in batches:
        (model(input_ids=ids, labels=ids).loss / len(batches)).backward()
    return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tiled", [False, True])
def test_cuda_offload_gradients_match(tiled: bool) -> None:
    reference = _llama(3, 64, 96, 4, 2, dtype=torch.float32)
    model = copy.deepcopy(reference)
    assert enable_checkpointing(model, "offload") == "offload"
    if tiled:
        enable_tiled_mlp(model, chunk_tokens=50)
    batches = [torch.randint(0, 1024, (2, 77), device="cuda") for _ in range(2)]
    ref = _grads(reference, batches)
    got = _grads(model, batches)
    assert ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)


def test_cuda_pool_is_pinned_and_flat() -> None:
    model = _llama(2, 64, 96, 4, 2)
    enable_checkpointing(model, "offload")
    stats = []
    for _ in range(10):
        ids = torch.randint(0, 1024, (1, 128), device="cuda")
        model(input_ids=ids, labels=ids).loss.backward()
        stats.append(ckpt.POOL.stats())
    torch.cuda.synchronize()
    assert stats[1] == stats[-1]
    assert all(b.is_pinned() for free in ckpt.POOL._free.values() for b in free)


def _peak(model, embeds) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    model(inputs_embeds=embeds).logits.float().square().mean().backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def test_peak_memory_lower_with_offload() -> None:
    model = _llama(8, 1024, 2816, 8, 4)
    model.requires_grad_(False)
    seq = 16384
    embeds = torch.randn(1, seq, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    peaks = {}
    for mode in ("recompute", "offload"):
        enable_checkpointing(model, mode)
        _peak(model, embeds)  # warm-up (pinned buffers, allocator)
        peaks[mode] = _peak(model, embeds)
    layer_input = seq * 1024 * 2
    print(f"peak recompute {peaks['recompute'] / 2**20:.0f} MiB, offload {peaks['offload'] / 2**20:.0f} MiB")
    assert peaks["offload"] < peaks["recompute"] - 4 * layer_input


@pytest.mark.parametrize("seq", [8192, 16384])
def test_offload_speed_close_to_recompute(seq: int) -> None:
    model = _llama(8, 2048, 8192, 32, 8)  # Llama-3.2-1B layer shapes
    model.requires_grad_(False)
    embeds = torch.randn(1, seq, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        model(inputs_embeds=embeds).logits.float().square().mean().backward()

    times = {}
    for mode in ("recompute", "offload", "recompute", "offload"):  # interleaved against drift
        enable_checkpointing(model, mode)
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        times.setdefault(mode, []).append((time.perf_counter() - start) / 5)
    rec, off = min(times["recompute"]), min(times["offload"])
    print(
        f"seq {seq}: recompute {rec * 1e3:.1f} ms/step, offload {off * 1e3:.1f} ms/step, ratio {off / rec:.3f}"
    )
    assert off / rec < 1.15


def test_offloaded_backward_and_the_fused_loss_never_wait_for_the_gpu() -> None:
    """The host must queue backward while the GPU still runs forward: one sync there (the fused loss
    once read its grad_output) cost 17 ms of a Llama-1B step, whose backward is bound by the host."""
    from cpt_plugin.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

    model = _llama(2, 128, 256, 4, 2)
    enable_checkpointing(model, "offload")
    enable_tiled_mlp(model, chunk_tokens=64)
    ids = torch.randint(0, 1024, (2, 96), device="cuda")
    hidden = torch.randn(191, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(1024, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 1024, (191,), device="cuda")
    for warm in (True, False):  # the first round compiles and fills the pool
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        ce = fused_linear_cross_entropy(hidden, weight, labels) * 0.5
        if not warm:
            torch.cuda.set_sync_debug_mode("error")
        try:
            loss.backward()
            ce.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
