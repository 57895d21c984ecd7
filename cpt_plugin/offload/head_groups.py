"""Attention over groups of heads at long context, so that its backward holds one group's workspace.

Why: at 1 x 131,072 tokens on Llama-1B shapes the largest block alive at a training step's peak was
cuDNN's attention-backward workspace, 2,064 MiB (four hidden states per token), allocated on top of dq,
dk and dv (H200, 2026-12-02, ``benchmarks/memory_trace.py --cpp``). Attention heads are independent, so
SDPA run on G groups of heads (each group with its own key/value heads) gives every head the same
result while one backward holds 1/G of that workspace.

How, without a second copy of the output: each group's output is copied into the one (batch, seq,
heads, head_dim) buffer that transformers' SDPA path returns (and the output projection keeps), and the
group's own output storage is freed. SDPA's backward saved that output; it is written back from the
buffer just before the group's backward and freed again after it. The write goes through a separate
tensor on the same storage, so the saved tensor's version counter does not move.

When: causal attention without a mask or dropout over a query of at least ``MIN_QUERY_BYTES`` (at
shorter lengths the workspace is small and the extra launches cost more than they save), in our own
checkpoint: the recompute of a checkpointed layer runs it over groups here; with ``replay``
(``attention_replay``, on by default) an offloaded layer records its attention in the forward and its
recompute replays it instead where attention is a large enough share of the layer's work
(``attention_replay.py``; groups included, and from shorter lengths than the groups'). A
kept layer (no checkpointing, or kept by the planner because memory allows) chose speed: one call. The
groups cost speed: 1.5% of a 131K-token Llama-1B step on an H200 (with the later fetch of the layer
below's input, measured before the replay existed). Everything else runs transformers' own SDPA
function unchanged. Installed per model by ``core.setup_model`` (``enable_head_groups``); the models'
attention modules carry the flag.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from cpt_plugin.offload.attention_replay import (
    group_leaves,
    head_major_buffer,
    replay_or_record,
    replays_at,
)
from cpt_plugin.offload.checkpointing import in_lean_recompute, peak_passed

logger = logging.getLogger(__name__)

MIN_QUERY_BYTES = 256 * 2**20  # below: one SDPA call (Llama-1B: under 65,536 tokens)
# the query bytes of one group, at most (when the key/value heads allow): Llama-1B at 131K in 4 groups.
# Smaller groups cost speed: each SDPA call ends in a partly idle wave of the GPU.
GROUP_QUERY_BYTES = 128 * 2**20
_FLAG = "_cpt_head_groups"
_REPLAY_FLAG = "_cpt_attention_replay"
_STORAGE_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)


def head_groups(query: torch.Tensor, key: torch.Tensor) -> int:
    """How many groups of heads to run: 1 below ``MIN_QUERY_BYTES``, else the fewest groups whose query
    part is at most ``GROUP_QUERY_BYTES`` among the divisors of the key/value head count (at most that
    count: each group has its own key/value heads)."""
    heads, kv_heads = query.shape[1], key.shape[1]
    if kv_heads < 1 or heads % kv_heads:
        return 1
    query_bytes = query.numel() * query.element_size()
    if query_bytes < MIN_QUERY_BYTES:
        return 1
    wanted = math.ceil(query_bytes / GROUP_QUERY_BYTES)
    divisors = [d for d in range(1, kv_heads + 1) if kv_heads % d == 0]
    return next((d for d in divisors if d >= wanted), kv_heads)


def _exclusive_storage(tensor: torch.Tensor) -> bool:
    """The tensor covers its whole storage, and only it and autograd's saved copy of it refer to it."""
    if _STORAGE_USE_COUNT is None:
        return False
    storage = tensor.untyped_storage()
    if storage.nbytes() != tensor.numel() * tensor.element_size():
        return False
    # this tensor, autograd's saved shallow copy, and the storage object made just above
    return _STORAGE_USE_COUNT(storage._cdata) <= 3


def _park(tensor: torch.Tensor) -> None:
    tensor.untyped_storage().resize_(0)


def _unpark(tensor: torch.Tensor, values: torch.Tensor, nbytes: int) -> None:
    """Gives the freed storage back its values, through another tensor on it (the saved tensor's version
    counter must not move, or autograd would refuse it)."""
    storage = tensor.untyped_storage()
    storage.resize_(nbytes)
    alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    alias.set_(storage, tensor.storage_offset(), tensor.size(), tensor.stride())
    alias.copy_(values)


class _HeadGroupedAttention(torch.autograd.Function):
    """Causal SDPA over ``groups`` groups of heads; returns (batch, seq, heads, head_dim) as transformers'
    SDPA function does. Each group's graph is built in forward and run in backward, one group at a time."""

    @staticmethod
    def forward(ctx, query, key, value, groups: int, scale: float | None):  # type: ignore[override]
        batch, heads, seq, _ = query.shape
        per_q, per_kv = heads // groups, key.shape[1] // groups
        out = query.new_empty(batch, seq, heads, value.shape[-1])
        parts = []
        for g in range(groups):
            leaves = group_leaves(query, key, value, g, groups)
            with torch.enable_grad():
                part = F.scaled_dot_product_attention(
                    *leaves, is_causal=True, scale=scale, enable_gqa=per_q != per_kv
                )
            out[:, :, g * per_q : (g + 1) * per_q].copy_(part.detach().transpose(1, 2))
            nbytes = part.untyped_storage().nbytes()
            parked = _exclusive_storage(part)
            if parked:
                _park(part)
            parts.append((leaves, part, parked, nbytes))
        ctx.parts, ctx.per_q, ctx.per_kv = parts, per_q, per_kv
        ctx.needs = (query.requires_grad, key.requires_grad, value.requires_grad)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        (out,) = ctx.saved_tensors
        parts, per_q, per_kv = ctx.parts, ctx.per_q, ctx.per_kv
        ctx.parts = None
        first = parts[0][0]
        widths = (per_q, per_kv, per_kv)
        grads = [
            head_major_buffer(leaf, len(parts) * width) if need else None
            for leaf, width, need in zip(first, widths, ctx.needs, strict=True)
        ]
        for g in range(len(parts)):
            leaves, part, parked, nbytes = parts[g]
            parts[g] = None  # the group's graph goes with its backward
            heads = slice(g * per_q, (g + 1) * per_q)
            if parked:
                _unpark(part, out[:, :, heads].transpose(1, 2), nbytes)
            torch.autograd.backward(part, grad_out[:, :, heads].transpose(1, 2))
            del part
            for grad, leaf, width in zip(grads, leaves, widths, strict=True):
                if grad is not None and leaf.grad is not None:
                    grad[:, g * width : (g + 1) * width].copy_(leaf.grad)
                leaf.grad = None
            del leaves
        peak_passed()  # the layer's largest working set is behind: the next layer input may travel
        return grads[0], grads[1], grads[2], None, None


def head_grouped_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, groups: int, scale: float | None = None
) -> torch.Tensor:
    """Causal attention of (batch, heads, seq, dim) inputs over ``groups`` groups of heads, returned as
    (batch, seq, heads, dim); the same values and gradients as one SDPA call."""
    return _HeadGroupedAttention.apply(query, key, value, groups, scale)


def _plain_causal_call(
    module: nn.Module, query, key, value, attention_mask, dropout, is_causal, kwargs
) -> bool:
    """A marked module's causal self-attention without a mask, dropout, bias or softcap."""
    if not module.__dict__.get(_FLAG) or attention_mask is not None or dropout:
        return False
    if kwargs.get("position_bias") is not None or kwargs.get("softcap"):
        return False
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not causal or query.shape[2] != key.shape[2] or query.shape[2] < 2:
        return False
    if key.shape[-1] != value.shape[-1] or query.shape[0] != key.shape[0] or key.shape[1] < 1:
        return False
    return query.shape[1] % key.shape[1] == 0


def _long_enough_to_replay(module: nn.Module, query: torch.Tensor, key: torch.Tensor) -> bool:
    """The replay pays for this layer at this batch's shape (``attention_replay.replays_at``)."""
    config = getattr(module, "config", None)
    q_width, kv_width = query.shape[1] * query.shape[3], key.shape[1] * key.shape[3]
    hidden = int(getattr(config, "hidden_size", None) or q_width)
    intermediate = int(getattr(config, "intermediate_size", None) or 4 * hidden)
    seq = query.shape[2]
    return replays_at(seq, hidden, intermediate, q_width, kv_width, tokens=query.shape[0] * seq)


def _grouped_here(query, key, value) -> bool:
    """Groups only in a checkpointed layer's recompute: a kept layer (no checkpointing, or kept by the
    planner because memory allows) chose speed over memory. Only in our own checkpoint's recompute:
    torch's (under torch.distributed) matches what its recompute saves against the forward."""
    needs_grad = query.requires_grad or key.requires_grad or value.requires_grad
    return torch.is_grad_enabled() and needs_grad and in_lean_recompute()


def _wrap_sdpa(original: Callable) -> Callable:
    def sdpa_attention_forward(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        is_causal: bool | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        """transformers' SDPA attention; at long context in our checkpointing, over groups of heads and
        (offloaded layers) not recomputed (cpt-plugin: offload/head_groups.py, attention_replay.py)."""
        if _plain_causal_call(module, query, key, value, attention_mask, dropout, is_causal, kwargs):
            groups = head_groups(query, key)
            if module.__dict__.get(_REPLAY_FLAG) and _long_enough_to_replay(module, query, key):
                replayed = replay_or_record(query, key, value, groups, scaling)
                if replayed is not None:
                    return replayed, None
            if groups > 1 and _grouped_here(query, key, value):
                return head_grouped_attention(query, key, value, groups, scaling), None
        return original(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )

    sdpa_attention_forward.__cpt_patched__ = True  # type: ignore[attr-defined]
    sdpa_attention_forward.__cpt_original__ = original  # type: ignore[attr-defined]
    return sdpa_attention_forward


def _attention_registry() -> dict | None:
    try:
        from transformers.modeling_utils import AttentionInterface
    except ImportError:
        return None
    mapping = getattr(AttentionInterface, "_global_mapping", None)
    return mapping if isinstance(mapping, dict) and "sdpa" in mapping else None


def _install_wrapper() -> bool:
    mapping = _attention_registry()
    if mapping is None:
        return False
    if not getattr(mapping["sdpa"], "__cpt_patched__", False):
        mapping["sdpa"] = _wrap_sdpa(mapping["sdpa"])
    return True


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """Modules that call the attention interface with themselves first (transformers' attention classes)."""
    return [m for m in model.modules() if hasattr(m, "num_key_value_groups") and hasattr(m, "is_causal")]


def enable_head_groups(model: nn.Module, replay: bool = False) -> int:
    """Marks ``model``'s attention modules for head-grouped SDPA at long context (and, with ``replay``,
    for offloaded layers' recompute without attention: ``attention_replay.py``); returns how many.

    Only models running transformers' "sdpa" attention are marked; others keep their attention."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not _install_wrapper():
        return 0
    modules = _attention_modules(model)
    for module in modules:
        module.__dict__[_FLAG] = True
        module.__dict__[_REPLAY_FLAG] = replay
    return len(modules)


def replays_attention(module: nn.Module) -> bool:
    """Whether ``module`` is an attention module marked for the replay in offloaded layers."""
    return bool(module.__dict__.get(_REPLAY_FLAG))


def disable_head_groups(model: nn.Module) -> None:
    for module in _attention_modules(model):
        module.__dict__.pop(_FLAG, None)
        module.__dict__.pop(_REPLAY_FLAG, None)
