"""An out-of-memory error in a training micro-batch: free, step the memory plan down, retry the same batch.

Why it is exact. A micro-batch's step (forward + backward) changes nothing but the ``.grad`` of trainable
parameters (and the RNG, restored before the retry). The forward writes no gradient, so an OOM there
leaves them as they were. In a backward, autograd accumulates each parameter's gradient exactly once, in
one AccumulateGrad call with the sum over all its uses (shared weights and tiled MLP chunks included):
either the parameter has received its whole contribution of this micro-batch, or nothing. A backward that
failed midway therefore leaves two sets of parameters: those done (their ``.grad`` = earlier micro-batches
+ this one, complete) and those untouched. The retry runs the micro-batch again with the done ones frozen
(``requires_grad=False``), so only the untouched ones accumulate: afterwards every gradient is exactly
what one successful attempt gives, the earlier micro-batches of the accumulation window included.

Why this way: snapshotting gradients (or computing each micro-batch into fresh buffers and adding them)
costs a copy of every gradient in device memory, exactly when memory is short. Telling which parameters
were done costs nothing: before the attempt we note each gradient's identity and version counter (ints,
not references: holding the tensor would make autograd accumulate out of place), and compare after.
When every parameter was done (the OOM came after the last accumulation), the smallest one is kept
trainable and its gradient restored from a copy after the retry, so that the retry still has a backward
and returns its loss as the Trainer computes it.

Not attempted under torch.distributed with more than one process, nor under DeepSpeed or FSDP: the other
ranks wait in collectives of the failed step and the engines keep gradients in their own buffers. There
the error is raised as before.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from cpt_plugin.offload.planner import MemoryPlanner, distributed_world, find_planner

logger = logging.getLogger(__name__)

MAX_RETRIES = 8


def _grad_mark(param: torch.Tensor) -> tuple[int, int, int] | None:
    grad = param.grad
    if grad is None:
        return None
    return (id(grad), grad._version, grad.data_ptr())


def _free_device_memory() -> None:
    gc.collect()  # the failed attempt's graph sits in reference cycles of the traceback's frames
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    cuda = (
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    )
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def retry_supported(trainer: Any = None) -> bool:
    """False where a single rank cannot retry alone (several processes, DeepSpeed, FSDP)."""
    if distributed_world() > 1:
        return False
    return not (getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False))


def run_with_oom_retry(
    step: Callable[[], Any],
    model: torch.nn.Module,
    *,
    planner: MemoryPlanner | None = None,
    trainer: Any = None,
) -> Any:
    """``step()`` (one micro-batch's forward and backward); on OOM, a smaller plan and the same batch again.

    Without a memory planner on ``model`` (fixed checkpointing modes), or where retrying is not supported,
    it is just ``step()``.
    """
    planner = planner or find_planner(model)
    if planner is None or not retry_supported(trainer):
        return step()
    params = [p for p in model.parameters() if p.requires_grad]
    frozen: list[torch.Tensor] = []
    restore: tuple[torch.Tensor, torch.Tensor | None] | None = None
    rng = _rng_state()
    try:
        for attempt in range(MAX_RETRIES + 1):
            marks = [_grad_mark(p) for p in params]
            error = None
            try:
                return step()
            except torch.OutOfMemoryError as exc:
                error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            # outside the except block: the exception and its frames can be collected
            done = [
                p for p, mark in zip(params, marks, strict=True) if p.requires_grad and _grad_mark(p) != mark
            ]
            _free_device_memory()
            if attempt == MAX_RETRIES or not planner.step_down():
                raise torch.OutOfMemoryError(
                    f"cpt-plugin: out of memory with the smallest memory plan ({planner.plan.describe()}) "
                    f"after {attempt + 1} attempt(s) of this batch ({error}). Lower the tokens per "
                    "micro-batch (batch size or max_seq_length)."
                )
            _freeze(done, frozen)
            if not any(p.requires_grad for p in params) and restore is None:
                keep = min(frozen, key=lambda p: p.numel())
                restore = (keep, keep.grad.detach().clone() if keep.grad is not None else None)
                keep.requires_grad_(True)
                frozen.remove(keep)
            logger.warning(
                "cpt-plugin: out of memory in a training step (%s); retrying the same batch with a "
                "smaller memory plan: %s (predicted peak %.3g GiB).",
                error,
                planner.plan.describe(),
                planner.predicted / 2**30,
            )
            _set_rng_state(rng)
        raise AssertionError("unreachable")
    finally:
        for p in frozen:
            p.requires_grad_(True)
        if restore is not None:
            keep, grad = restore
            keep.grad = grad


def _freeze(done: Sequence[torch.Tensor], frozen: list[torch.Tensor]) -> None:
    for p in done:
        p.requires_grad_(False)
        frozen.append(p)
