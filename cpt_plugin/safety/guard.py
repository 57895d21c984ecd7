"""The training guard: a non-finite step never reaches the weights, and a dead run is named.

What it does, per optimizer step (``on_pre_optimizer_step``, right before ``optimizer.step()``):

- a non-finite loss or gradient norm skips the update: every gradient is set to ``None``, which every
  torch optimizer (and bitsandbytes') treats as "this parameter has no update", so the parameters *and*
  the optimizer state (moments, step counts) stay exactly as they were. The LR scheduler still steps:
  the schedule stays tied to ``global_step``, so ``max_steps`` and an exact resume keep their meaning;
- after ``max_bad_steps`` such steps in a row the run stops (``control.should_training_stop``) with
  guidance: lower the learning rate, check the data, fp16 overflow -> bf16;
- a collapsed run gets one warning: a gradient norm of exactly 0, or a loss flat at ln(vocab_size)
  (the loss of a uniform guess) for ``collapse_steps`` steps.

A checkpoint of a model whose trainable weights hold NaN/Inf is refused (``may_save``, called by the
Trainer hooks before ``_save_checkpoint`` and ``save_model``). Because only finite checkpoints are ever
written and a refused save also skips the Trainer's checkpoint rotation, ``save_total_limit`` can never
delete the last finite checkpoint in favour of a broken one.

Under fp16 the AMP grad scaler skips overflowing steps itself and lowers its scale; such steps count
as bad only once the scale has fallen to 1 or below (then the gradients overflow fp16 unscaled).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from transformers import TrainerCallback

from cpt_plugin.safety.distributed import any_rank

logger = logging.getLogger(__name__)

# A loss within this many nats of ln(vocab_size), step after step, is a uniform guess.
_UNIFORM_LOSS_TOLERANCE = 1e-3


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2), or the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def non_finite_parameter(model: torch.nn.Module) -> str | None:
    """The name of the first trainable parameter holding NaN/Inf, or None (one device sync)."""
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    if not named:
        return None
    device = named[0][1].device
    flags = torch.stack([torch.isfinite(_local(p).detach()).all().to(device) for _, p in named]).cpu()
    bad_index = int((~flags).nonzero()[0]) if not bool(flags.all()) else -1
    bad = any_rank(bad_index >= 0, device)
    if not bad:
        return None
    return named[bad_index][0] if bad_index >= 0 else "(a weight on another process)"


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().item())
    return float(value)


class TrainingGuard(TrainerCallback):
    """Skips non-finite updates, stops a diverged run, refuses non-finite saves, warns on collapse.

    Added by CPTCallback to every trainer it serves (``CPTConfig.guard``, on by default).

    Args:
        max_bad_steps: non-finite steps in a row after which the run stops.
        collapse_steps: steps with the loss flat at ln(vocab_size) before the collapse warning (0: off).
    """

    def __init__(self, max_bad_steps: int = 3, collapse_steps: int = 20) -> None:
        self.max_bad_steps = max_bad_steps
        self.collapse_steps = collapse_steps
        self.skipped_steps = 0
        self.last_saved_checkpoint: str | None = None
        self._reset()

    def _reset(self) -> None:
        self._loss_sum: torch.Tensor | None = None
        self._grad_norm: Any = None
        self.bad_in_a_row = 0
        self._vocab_size: int | None = None
        self._warned_zero_grad = False
        self._warned_collapse = False
        self._flat_steps = 0

    # --- fed by the Trainer hooks ------------------------------------------------------------------
    def observe_loss(self, loss: Any) -> None:
        """The loss ``training_step`` returned (summed over micro-batches: the step's loss). No sync."""
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().float().sum()
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss.to(self._loss_sum)

    def observe_grad_norm(self, grad_norm: Any) -> None:
        """The Trainer's gradient norm of this step (global across processes)."""
        self._grad_norm = grad_norm

    # --- checkpoints ---------------------------------------------------------------------------------
    def may_save(self, model: torch.nn.Module, step: int, target: str) -> bool:
        """False (with a warning naming the step) when the trainable weights hold NaN/Inf."""
        bad = non_finite_parameter(model)
        if bad is None:
            return True
        kept = (
            f" The last finite checkpoint, {self.last_saved_checkpoint}, is kept."
            if (self.last_saved_checkpoint)
            else ""
        )
        logger.warning(
            "cpt-plugin guard: step %d: %s was not saved: the trainable weight '%s' holds NaN/Inf, and a "
            "checkpoint of it could only spread the damage.%s",
            step,
            target,
            bad,
            kept,
        )
        return False

    # --- TrainerCallback events ----------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._reset()
        config = getattr(model, "config", None)
        vocab_size = getattr(config, "vocab_size", None)
        self._vocab_size = int(vocab_size) if isinstance(vocab_size, int) and vocab_size > 1 else None
        return control

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step + 1  # global_step counts finished updates; this is the one being taken
        loss = _as_float(self._loss_sum)
        grad_norm = _as_float(self._grad_norm)
        if grad_norm is None and optimizer is not None:
            grad_norm = _grad_norm_of(optimizer)
        self._loss_sum, self._grad_norm = None, None
        loss_ok = loss is None or math.isfinite(loss)
        norm_ok = grad_norm is None or math.isfinite(grad_norm)
        talk = state.is_local_process_zero
        if loss_ok and norm_ok:
            self.bad_in_a_row = 0
            if talk:
                self._check_collapse(step, loss, grad_norm, _peak_lr(optimizer, args))
            return control
        if loss_ok and _scaler_handles_it(optimizer):
            if talk:
                logger.info(
                    "cpt-plugin guard: step %d: fp16 gradient overflow; the grad scaler skips it.", step
                )
            return control
        skipped = _skip_update(optimizer, args)
        self.skipped_steps += int(skipped)
        self.bad_in_a_row += 1
        if talk:
            what = " and ".join(
                part
                for part in (
                    None if loss_ok else f"loss ({loss})",
                    None if norm_ok else f"gradient norm ({grad_norm})",
                )
                if part
            )
            action = (
                "the optimizer update was skipped (weights and optimizer state kept as before this step)"
                if skipped
                else "DeepSpeed applies the update itself, so it could not be skipped"
            )
            logger.warning(
                "cpt-plugin guard: step %d: non-finite %s; %s. Bad steps in a row: %d; the run stops at %d "
                "(guard_max_bad_steps).",
                step,
                what,
                action,
                self.bad_in_a_row,
                self.max_bad_steps,
            )
        if self.bad_in_a_row >= self.max_bad_steps:
            control.should_training_stop = True
            message = self._stop_message(
                step, args, model, _peak_lr(optimizer, args)
            )  # on every rank: it may gather across them
            if talk:
                logger.error(message)
        return control

    # ------------------------------------------------------------------------------------------------
    def _stop_message(self, step: int, args: Any, model: Any, learning_rate: str) -> str:
        first_bad = step - self.bad_in_a_row + 1
        cause = ""
        if model is not None:
            bad_weight = non_finite_parameter(model)
            if bad_weight is not None:
                cause = (
                    f" The trainable weight '{bad_weight}' itself holds NaN/Inf (skipped updates never "
                    "write one, so something else did, e.g. a callback or a loaded checkpoint)."
                )
        fp16 = (
            "you train in fp16, whose range the gradients overflow: use bf16 (TrainingArguments(bf16=True))"
            if getattr(args, "fp16", False)
            else "with fp16, an overflow: use bf16 (TrainingArguments(bf16=True))"
        )
        return (
            f"cpt-plugin guard: stopping the run at step {step}: steps {first_bad}-{step} had a non-finite "
            f"loss or gradient norm ({self.bad_in_a_row} in a row; their updates were skipped).{cause} "
            f"What to try: lower the learning rate (peak {learning_rate}); check the "
            f"data fed around step {first_bad} (empty, corrupt or extreme batches); {fp16}. "
            "guard_max_bad_steps sets how many bad steps in a row are tolerated."
        )

    def _check_collapse(
        self, step: int, loss: float | None, grad_norm: float | None, learning_rate: str
    ) -> None:
        if grad_norm == 0.0 and not self._warned_zero_grad:
            self._warned_zero_grad = True
            logger.warning(
                "cpt-plugin guard: step %d: the gradient norm is exactly 0: no trainable weight gets a "
                "gradient, so the model learns nothing. A learning rate far too high (peak %s) can saturate "
                "the model this way; lower it, and check that the loss depends on the trained weights.",
                step,
                learning_rate,
            )
        if not self.collapse_steps or self._vocab_size is None or loss is None or self._warned_collapse:
            return
        uniform = math.log(self._vocab_size)
        self._flat_steps = self._flat_steps + 1 if abs(loss - uniform) <= _UNIFORM_LOSS_TOLERANCE else 0
        if self._flat_steps >= self.collapse_steps:
            self._warned_collapse = True
            logger.warning(
                "cpt-plugin guard: step %d: the loss has stayed at %.4f = ln(vocab_size %d), the loss of a "
                "uniform guess, for %d steps: the model has collapsed and predicts nothing. This is what a "
                "learning rate far too high (peak %s) does; lower it and restart from a checkpoint saved "
                "before the collapse.",
                step,
                loss,
                self._vocab_size,
                self._flat_steps,
                learning_rate,
            )


def _peak_lr(optimizer: Any, args: Any) -> str:
    """The peak learning rate of the parameter groups (the schedule's base; CPTConfig may override the Trainer's)."""
    rates = [
        group.get("initial_lr", group.get("lr")) for group in getattr(optimizer, "param_groups", None) or []
    ]
    rates = [float(rate) for rate in rates if isinstance(rate, (int, float))]
    return f"{max(rates):.3g}" if rates else str(getattr(args, "learning_rate", "?"))


def _grad_norm_of(optimizer: Any) -> float | None:
    """Fallback when the Trainer's own gradient norm was not seen: the local norm of the gradients."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return None
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(_local(g)) for g in grads])))


def _scaler_handles_it(optimizer: Any) -> bool:
    """fp16 with a grad scaler whose scale is still above 1: an overflow is its normal business."""
    scaler = getattr(optimizer, "scaler", None)
    if scaler is None or not getattr(scaler, "is_enabled", lambda: False)():
        return False
    return float(scaler.get_scale()) > 1.0


def _skip_update(optimizer: Any, args: Any) -> bool:
    """Drops every gradient so ``optimizer.step()`` changes nothing. False where that cannot work."""
    if optimizer is None or getattr(args, "deepspeed", None):
        return False
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = None
    return True
