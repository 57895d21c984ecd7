"""The recompute of an offloaded layer skips its attention: the forward keeps the attention's graph, and
what that graph saved goes to host memory with the layer input.

Why: at long context attention is most of a step (quadratic in the length), and a checkpointed layer
computes it twice, in the forward and again in the recompute. Its backward needs only the query, key and
value (which the recompute computes anyway, cheaply: projections and RoPE), the attention output and the
log-sum-exp. So in the graph-free forward of an offloaded layer the attention is run building its
autograd graph on leaves detached from q, k and v, one SDPA call per group of heads (``head_groups``),
and every tensor the graph saves is handed over through saved-tensor hooks:

* q, k, v, or views of them: not kept. The forward's copies are freed when the layer's forward is done;
  in backward the graph reads the recompute's q, k, v instead, the same numbers.
* each group's output: its values are copied into the (batch, seq, heads, dim) output, whose storage is
  parked in host memory beside the layer input (``LayerStash``) and freed on the device; the recompute
  gets that output back instead of computing it, and the graph reads its groups' views of it.
* anything else of ``PARK_BYTES`` or more (the log-sum-exp): parked the same way; smaller tensors (RNG
  seeds) stay where they are.

In the recompute, the attention call returns the fetched output through ``_Replay``, whose backward
runs the forward's graphs with the recompute's q, k, v, one group at a time (so the backward holds one
group's workspace), and then lets the layer below's input travel (``peak_passed``). Only inside our own
checkpoint, only for offloaded layers (a recomputed one would have to keep the output on the device),
only where it pays (``replays_at``), and never when the recompute's call does not match the forward's
(then it computes attention as before). It pays where attention is at least ``REPLAY_MIN_SHARE`` of the
layer's forward FLOPs (long context), and in layers large enough for the step to wait on the GPU
(``LARGE_LAYER_FLOPS`` per micro-batch) from ``LARGE_LAYER_MIN_SHARE``: a small layer's step waits on
the host, which the replay's parking and its lost CUDA graph make slower than the attention it saves.
On by default (``attention_replay`` unset); the planner's speed model uses the same rule.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from cpt_plugin.offload.checkpointing import (
    HOST_RESERVE_BYTES,
    LayerStash,
    current_stash,
    in_lean_recompute,
    peak_passed,
)

logger = logging.getLogger(__name__)

PARK_BYTES = 2**20  # saved tensors this large go to host memory with the layer input; smaller stay
# The replay runs where attention is at least this share of a layer's forward FLOPs. Measured on an H200
# (Llama-1B shapes, offload + tiled MLP, 2026-12-02): at 8,192 tokens (a 22% share) replaying was 16% slower,
# at 16,384 (36%) 10% faster, at 32,768 13%, at 131,072 21%.
REPLAY_MIN_SHARE = 0.3
# Large layers replay from a smaller share: their step is bound by the GPU, so the attention forward the
# recompute skips is time saved, and their transfers hide behind more compute. 2.5 TFLOP is about 3 ms at
# an H200's bf16 rate, above the ~2.5 ms of host time an eager layer forward takes (profiles, 2026-12-03).
# Measured on an H200 (2026-12-03): Mistral-7B QLoRA at 1 x 8192 (4.1 TFLOP per layer forward, attention a
# 13% share) ran 11,244 tokens/s replayed against 10,689 recomputed (two rounds) and 1.16x Unsloth's speed
# against 1.09x; Llama-1B layers (1.0-1.2 TFLOP at 8,192 tokens) are under the bar and keep the share rule.
LARGE_LAYER_FLOPS = 2.5e12
LARGE_LAYER_MIN_SHARE = 0.1


def attention_share(seq: int, hidden: int, intermediate: int, q_width: int, kv_width: int) -> float:
    """The causal attention's share of a decoder layer's forward FLOPs at sequence length ``seq``: about
    2 s^2 q_width per sequence against 2 s W for the layer's W projection weights."""
    weights = hidden * (2 * q_width + 2 * kv_width) + 3 * hidden * intermediate
    attention = seq * q_width
    return attention / (attention + weights)


def layer_forward_flops(
    tokens: int, seq: int, hidden: int, intermediate: int, q_width: int, kv_width: int
) -> float:
    """A decoder layer's forward FLOPs over a micro-batch of ``tokens`` (sequences of ``seq``): its
    projections, 2 W per token, and causal attention, 2 seq q_width per token."""
    weights = hidden * (2 * q_width + 2 * kv_width) + 3 * hidden * intermediate
    return 2.0 * tokens * (weights + seq * q_width)


def replays_at(
    seq: int, hidden: int, intermediate: int, q_width: int, kv_width: int, tokens: int | None = None
) -> bool:
    """Whether the replay pays for sequences of ``seq`` tokens in a micro-batch of ``tokens`` (``seq``
    when not given): attention at least ``REPLAY_MIN_SHARE`` of the layer's forward FLOPs, or at least
    ``LARGE_LAYER_MIN_SHARE`` in a layer of ``LARGE_LAYER_FLOPS`` or more."""
    share = attention_share(seq, hidden, intermediate, q_width, kv_width)
    if share >= REPLAY_MIN_SHARE:
        return True
    flops = layer_forward_flops(tokens or seq, seq, hidden, intermediate, q_width, kv_width)
    return share >= LARGE_LAYER_MIN_SHARE and flops >= LARGE_LAYER_FLOPS


def _storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _layout(t: torch.Tensor) -> tuple:
    return (t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def _key(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, groups: int, scale) -> tuple:
    return (*((_layout(t), t.dtype, t.device) for t in (query, key, value)), groups, scale)


class _Recorded:
    """One attention call of an offloaded layer's forward: its graphs (one per group of heads) and how
    each tensor they saved comes back in backward."""

    def __init__(self, key: tuple) -> None:
        # layouts and dtypes of q, k, v, the groups and the scale: the recompute's call must match
        self.key = key
        self.groups: list[tuple[tuple[torch.Tensor, ...], torch.Tensor]] = []  # (leaves, output) per group
        self.slots: list[Any] = []  # per saved tensor: how to get it back
        self._settled = 0
        self.output_layout: tuple = ()
        self.output_handle: Any = None
        self.bound: tuple[torch.Tensor, ...] = ()  # the recompute's q, k, v and the output, in backward

    def pack(self, tensor: torch.Tensor) -> int:
        self.slots.append(tensor)  # classified by settle() once every group has run
        return len(self.slots) - 1

    def unpack(self, index: int) -> torch.Tensor:
        kind, *rest = self.slots[index]
        if kind in ("input", "output"):
            which, (offset, shape, stride) = rest
            return self.bound[which].as_strided(shape, stride, offset)
        if kind == "parked":
            return rest[0].get()
        return rest[0]

    def settle(self, stash: LayerStash, inputs: tuple, part: torch.Tensor, heads_view: torch.Tensor) -> None:
        """Classifies what one group's graph saved (the slots not classified yet): views of the inputs,
        its output ``part`` (whose values are in ``heads_view``, a view of the whole output), the rest."""
        pointers = [_storage_ptr(t) for t in inputs]
        for index in range(self._settled, len(self.slots)):
            tensor = self.slots[index]
            pointer = _storage_ptr(tensor)
            if pointer in pointers:
                self.slots[index] = ("input", pointers.index(pointer), _layout(tensor))
            elif pointer == _storage_ptr(part) and tensor.shape == part.shape:
                self.slots[index] = ("output", 3, _layout(heads_view))
            elif tensor.numel() * tensor.element_size() >= PARK_BYTES:
                self.slots[index] = ("parked", stash.park(tensor.detach()))
            else:
                self.slots[index] = ("kept", tensor)
        self._settled = len(self.slots)


def record(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    groups: int,
    scale: float | None,
    stash: LayerStash,
) -> torch.Tensor:
    """Causal attention of (batch, heads, seq, dim) inputs, returned as (batch, seq, heads, dim) without
    a graph; its graphs and saved tensors are kept for the recompute as the module doc says."""
    batch, heads, seq, _ = query.shape
    per_q, per_kv = heads // groups, key.shape[1] // groups
    output = query.new_empty(batch, seq, heads, value.shape[-1])
    recorded = _Recorded(_key(query, key, value, groups, scale))
    inputs = (query, key, value)
    for g in range(groups):
        leaves = group_leaves(query, key, value, g, groups, every=True)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(recorded.pack, recorded.unpack):
            part = F.scaled_dot_product_attention(
                *leaves, is_causal=True, scale=scale, enable_gqa=per_q != per_kv
            )
        heads_view = output[:, :, g * per_q : (g + 1) * per_q].transpose(1, 2)
        heads_view.copy_(part.detach())
        recorded.settle(stash, inputs, part, heads_view)
        part.untyped_storage().resize_(0)  # shape and graph stay; its numbers come back in backward
        recorded.groups.append((leaves, part))
    recorded.output_layout = _layout(output)
    recorded.output_handle = stash.park(output)
    stash.items.append(recorded)
    stash.on_forward_done(lambda: [t.untyped_storage().resize_(0) for t in inputs])
    return output


class _Replay(torch.autograd.Function):
    """The forward's attention output, fetched; backward runs the forward's graphs on these q, k, v."""

    @staticmethod
    def forward(ctx, query, key, value, recorded: _Recorded):  # type: ignore[override]
        offset, shape, stride = recorded.output_layout
        fetched = recorded.output_handle.get()
        ctx.recorded = recorded
        ctx.save_for_backward(query, key, value, fetched)
        return fetched.as_strided(shape, stride, offset)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):  # type: ignore[override]
        recorded, ctx.recorded = ctx.recorded, None
        query, key, value, fetched = ctx.saved_tensors
        recorded.bound = (query, key, value, fetched)
        groups, recorded.groups = recorded.groups, []
        # one group: its gradients are the whole ones (no second copy of dq, dk, dv at the peak)
        grads = None if len(groups) == 1 else [head_major_buffer(t) for t in (query, key, value)]
        per_q = query.shape[1] // len(groups)
        try:
            for g in range(len(groups)):
                leaves, part = groups[g]
                groups[g] = None  # type: ignore[call-overload]  # the group's graph goes with its backward
                heads = slice(g * per_q, (g + 1) * per_q)
                parts = torch.autograd.grad(part, leaves, grad_output[:, :, heads].transpose(1, 2))
                del part
                if grads is None:
                    grads = list(parts)
                else:
                    for grad, part_grad, leaf in zip(grads, parts, leaves, strict=True):
                        width = leaf.shape[1]
                        grad[:, g * width : (g + 1) * width].copy_(part_grad)
                del parts, leaves
        finally:
            recorded.bound, recorded.slots = (), []
        peak_passed()
        assert grads is not None  # a recorded call has at least one group
        return grads[0], grads[1], grads[2], None


def head_major_buffer(like: torch.Tensor, heads: int | None = None) -> torch.Tensor:
    """An empty (batch, heads, seq, dim) tensor laid out as (batch, seq, heads, dim), as the projections'
    outputs are, so the transposes and views after it cost nothing (``heads``: ``like``'s by default)."""
    batch, own, seq, dim = like.shape
    return like.new_empty(batch, seq, heads or own, dim).transpose(1, 2)


def group_leaves(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, g: int, groups: int, every: bool = False
) -> tuple[torch.Tensor, ...]:
    """Group ``g``'s query heads and its own key/value heads, as leaves detached from the inputs (same
    storage) that require grad where the inputs do (``every``: all three, for a graph-free forward)."""
    per_q, per_kv = query.shape[1] // groups, key.shape[1] // groups
    return tuple(
        t[:, g * n : (g + 1) * n].detach().requires_grad_(every or t.requires_grad)
        for t, n in ((query, per_q), (key, per_kv), (value, per_kv))
    )


_said_host_full = False


def _host_has_room_for(query: torch.Tensor, value: torch.Tensor, stash: LayerStash) -> bool:
    """Room in host memory for this call's output and log-sum-exp; says once when there is none (the
    layer then recomputes its attention, as without the replay)."""
    global _said_host_full
    batch, heads, seq, _ = query.shape
    nbytes = batch * seq * heads * (value.shape[-1] * value.element_size() + 4)
    if stash.has_room(nbytes):
        return True
    if not _said_host_full:
        _said_host_full = True
        logger.warning(
            "cpt-plugin: host memory is short (less than %.1f GiB would be left free), so offloaded layers "
            "recompute their attention instead of keeping its output in host memory (attention_replay): "
            "slower at long context, same results. Free host memory to get the replay back.",
            HOST_RESERVE_BYTES / 2**30,
        )
    return False


def replay_or_record(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, groups: int, scale: float | None
) -> torch.Tensor | None:
    """Inside an offloaded layer of our checkpoint: records the call in its graph-free forward, replays it
    in its recompute (the output, (batch, seq, heads, dim)); None where neither applies."""
    stash = current_stash()
    if stash is None:
        return None
    if not stash.replaying:
        if torch.is_grad_enabled() or not _host_has_room_for(query, value, stash):
            return None
        return record(query, key, value, groups, scale, stash)
    if not (in_lean_recompute() and torch.is_grad_enabled()):
        return None
    recorded = stash.take()
    if recorded is None or recorded.key != _key(query, key, value, groups, scale):
        return None
    return _Replay.apply(query, key, value, recorded)
