"""The LoRA factors of one fused call in the compute dtype: cast into one buffer, and kept between calls
while the factors are unchanged.

Why keep them: a training forward on an H200 waits on the host, and casting a call's factors anew costs
about 17 host operations (an allocation, a split, a view per factor, the copy, the slices of the stacked
A) before the call's first GEMM. A kept cast costs a version check while the factors are unchanged, and one
``_foreach_copy_`` into the same buffer (its views made once) after an optimizer step changed them.

When a kept cast is stale: any factor's ``_version`` or storage moved (in-place updates, ``param.data =``)
or any ``torch.optim`` optimizer stepped since (a global step hook: optimizers that write through
``param.data``, or through a raw pointer like bitsandbytes' 8-bit ones, bump no version).

Never a wrong answer from a refresh in place: the buffer is rewritten only while no autograd graph holds
it (each call that saved it holds a lease until its graph is freed). Otherwise (a second forward before the
first one's backward, a graph kept alive by the caller) the refresh writes a new buffer, as without the
cache. Inside a CUDA-graph capture nothing is kept: a captured graph must cast what its replay reads.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch

FactorGroups = Sequence[tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]]
CastGroups = list[tuple[torch.Tensor, list[torch.Tensor]]]

_generation = 0  # bumped by every optimizer step (see _watch_optimizers)
_watching = False


def _bump_generation(*_: Any) -> None:
    global _generation
    _generation += 1


def _watch_optimizers() -> None:
    """Registers the global optimizer step hook once (on the first kept cast)."""
    global _watching
    if not _watching:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(_bump_generation)
        _watching = True


class KeptCasts(dict):
    """A projection's kept casts (layout of the call -> :class:`CastSite`), reachable for
    :func:`release_kept_casts` while the projection lives."""

    def __init__(self) -> None:
        super().__init__()
        _LIVE[id(self)] = self


_LIVE: weakref.WeakValueDictionary[int, KeptCasts] = weakref.WeakValueDictionary()


def release_kept_casts() -> None:
    """Drops every kept cast (a buffer a pending graph still reads lives until that graph is freed).

    For a new checkpointing plan (a layer now checkpointed would carry its kept cast past its forward) and
    before an out-of-memory retry; the next kept call casts anew."""
    for kept in list(_LIVE.values()):
        kept.clear()


def forget_kept_casts() -> None:
    """Marks every kept cast stale. For code that changes LoRA factors in place without an optimizer step
    and without a version bump (writes through ``param.data``); optimizer steps do this themselves."""
    _bump_generation()


def _state(factors: Sequence[torch.Tensor]) -> tuple:
    return (_generation, *[(f._version, f.data_ptr(), f.shape) for f in factors])


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class CastSite:
    """One fused call's kept cast: its factors, the buffer and its views, the state it was cast at, and how
    many live autograd graphs saved it (``leases``)."""

    __slots__ = ("factors", "dtype", "casts", "groups", "state", "leases")

    def __init__(
        self, factors: tuple[torch.Tensor, ...], dtype: torch.dtype, casts: list, groups: CastGroups
    ):
        self.factors, self.dtype, self.casts, self.groups = factors, dtype, casts, groups
        self.state = _state(factors)
        self.leases = 0

    def matches(self, factors: Sequence[torch.Tensor], dtype: torch.dtype) -> bool:
        return (
            dtype == self.dtype
            and len(factors) == len(self.factors)
            and all(f is g for f, g in zip(factors, self.factors, strict=True))
        )


class Lease:
    """Held by a call's autograd context while its graph may still read the site's buffer."""

    __slots__ = ("site",)

    def __init__(self, site: CastSite) -> None:
        self.site = site
        site.leases += 1

    def __del__(self) -> None:
        self.site.leases -= 1


def _cast_into_new_buffer(groups: FactorGroups, dtype: torch.dtype) -> tuple[list, CastGroups]:
    """(a view per factor, per group (its A factors stacked, its Bs)), all in one new buffer.

    Each group's A factors come first and next to each other, so a group's stacked A (its shared
    ``x A^T`` GEMM) is a view, not a ``cat``; one ``_foreach_copy_`` (one kernel on CUDA) fills it all."""
    factors = [f for lora_as, lora_bs in groups for f in (*lora_as, *lora_bs)]
    numels = [f.numel() for f in factors]
    flat = torch.empty(sum(numels), dtype=dtype, device=factors[0].device)
    casts = [part.view(f.shape) for part, f in zip(flat.split(numels), factors, strict=True)]
    torch._foreach_copy_(casts, factors)
    out: CastGroups = []
    start = index = 0
    for lora_as, lora_bs in groups:
        n_a = sum(numels[index : index + len(lora_as)])
        a_stack = flat[start : start + n_a].view(-1, lora_as[0].shape[1])
        index += len(lora_as)
        out.append((a_stack, casts[index : index + len(lora_bs)]))
        start += n_a + sum(numels[index : index + len(lora_bs)])
        index += len(lora_bs)
    return casts, out


def cast_factors(
    groups: FactorGroups, dtype: torch.dtype, keep: dict | None = None
) -> tuple[CastGroups, CastSite | None]:
    """Per group of (A factors, B factors): (its A factors stacked as one (sum r) x in matrix, its Bs), in
    ``dtype``, and the site the call must lease (None: nothing kept).

    ``keep``: where this call's cast is kept between calls (a dict owned by the call's first projection);
    None casts anew. Factors already in ``dtype`` are used as they are."""
    factors = tuple(f for lora_as, lora_bs in groups for f in (*lora_as, *lora_bs))
    if all(f.dtype == dtype for f in factors):
        return [
            (lora_as[0] if len(lora_as) == 1 else torch.cat(list(lora_as)), list(lora_bs))
            for lora_as, lora_bs in groups
        ], None
    if keep is None or _capturing(factors[0].device):
        return _cast_into_new_buffer(groups, dtype)[1], None
    layout = tuple((len(lora_as), len(lora_bs)) for lora_as, lora_bs in groups)
    site: CastSite | None = keep.get(layout)
    if site is not None and site.matches(factors, dtype):
        state = _state(factors)
        if state == site.state:
            return site.groups, site
        same_storage = all(new[1:] == old[1:] for new, old in zip(state[1:], site.state[1:], strict=True))
        if site.leases == 0 and same_storage:  # no graph reads the buffer: refreshed in place
            with torch.no_grad():  # the views come from one split: writable only without grad mode
                torch._foreach_copy_(site.casts, list(factors))
            site.state = state
            return site.groups, site
    _watch_optimizers()
    casts, out = _cast_into_new_buffer(groups, dtype)
    site = keep[layout] = CastSite(factors, dtype, casts, out)
    return out, site
