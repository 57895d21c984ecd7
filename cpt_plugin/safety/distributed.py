"""One decision for all processes: a check made on one rank (or on each rank's shard) is shared."""

from __future__ import annotations

import torch


def any_rank(flag: bool, device: torch.device | str) -> bool:
    """True on every rank when ``flag`` is true on any; just ``flag`` without a process group.

    Every rank must call it (it is a collective), with a tensor on the backend's device (CUDA for NCCL).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
