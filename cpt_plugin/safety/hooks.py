"""Where the safety pieces plug into ``transformers.Trainer``: pass-through method wrappers.

``integrations/hf.py`` installs these next to its own hooks; each acts only for a trainer
carrying a CPTCallback (found through ``find_callback``, handed in so that this package never imports the
integration layer) and otherwise calls the original unchanged.

- ``train``: takes the output-directory lock, resolves ``resume_from_checkpoint`` to a complete
  checkpoint and checks its adapter against the model (before any step), adds the guard callback;
- ``_get_grad_norm``: shows the guard the Trainer's gradient norm (global across processes);
- ``_save_checkpoint`` / ``save_model``: refused while the trainable weights hold NaN/Inf.

The loss reaches the guard from the ``training_step`` hook in ``integrations/hf.py``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Callable, Iterator
from typing import Any

from cpt_plugin.safety.distributed import any_rank
from cpt_plugin.safety.resume import check_adapter_matches, resolve_resume_checkpoint
from cpt_plugin.safety.run_lock import OutputDirInUseError, acquire

# Trainer methods wrapped here (those a transformers version lacks are left alone).
SAFETY_METHODS = ("train", "_get_grad_norm", "_save_checkpoint", "save_model")


def guard_of(callback: Any) -> Any:
    """The TrainingGuard of a CPTCallback, or None (guard=False, or no callback)."""
    return getattr(callback, "guard", None) if callback is not None else None


@contextlib.contextmanager
def _output_dir_held(trainer: Any, enabled: bool) -> Iterator[None]:
    """The main process takes the output-directory lock; every process stops when it cannot."""
    lock, error = None, None
    if enabled and trainer.is_world_process_zero():
        try:
            lock = acquire(trainer.args.output_dir)
        except OutputDirInUseError as refused:
            error = refused
    if enabled and any_rank(error is not None, trainer.args.device):
        raise error or OutputDirInUseError(
            "cpt-plugin: the main process found the output directory in use by another run (its error says "
            "which); this process stops too."
        )
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def safety_hooks(originals: dict[str, Any], find_callback: Callable[[Any], Any]) -> dict[str, Any]:
    """Wrappers for the methods of ``SAFETY_METHODS`` present in ``originals``."""
    hooks: dict[str, Any] = {}

    if "train" in originals:
        original_train = originals["train"]
        train_signature = inspect.signature(original_train)

        @functools.wraps(original_train)
        def train(self, *args: Any, **kwargs: Any) -> Any:
            callback = find_callback(self)
            if callback is None:
                return original_train(self, *args, **kwargs)
            bound = train_signature.bind_partial(self, *args, **kwargs)
            with _output_dir_held(self, bool(callback.config.output_dir_lock)):
                resume = bound.arguments.get("resume_from_checkpoint")
                if resume:
                    resume = resolve_resume_checkpoint(
                        self.args.output_dir, resume, require_optimizer=not self.args.save_only_model
                    )
                    if isinstance(resume, str):
                        check_adapter_matches(resume, self.model)
                    bound.arguments["resume_from_checkpoint"] = resume
                callback.resumed_from = resume if isinstance(resume, str) else None  # for state beside it
                guard = guard_of(callback)
                if guard is not None and guard not in self.callback_handler.callbacks:
                    self.add_callback(guard)
                return original_train(*bound.args, **bound.kwargs)

        hooks["train"] = train

    if "_get_grad_norm" in originals:
        original_grad_norm = originals["_get_grad_norm"]

        @functools.wraps(original_grad_norm)
        def _get_grad_norm(self, *args: Any, **kwargs: Any) -> Any:
            grad_norm = original_grad_norm(self, *args, **kwargs)
            guard = guard_of(find_callback(self))
            if guard is not None:
                guard.observe_grad_norm(grad_norm)
            return grad_norm

        hooks["_get_grad_norm"] = _get_grad_norm

    if "_save_checkpoint" in originals:
        original_save_checkpoint = originals["_save_checkpoint"]

        @functools.wraps(original_save_checkpoint)
        def _save_checkpoint(self, model: Any, trial: Any, *args: Any, **kwargs: Any) -> Any:
            guard = guard_of(find_callback(self))
            if guard is None:
                return original_save_checkpoint(self, model, trial, *args, **kwargs)
            step = self.state.global_step
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{step}")
            if not guard.may_save(self.model, step, folder):
                return None  # nothing written, so the rotation that follows a save does not run either
            result = original_save_checkpoint(self, model, trial, *args, **kwargs)
            guard.last_saved_checkpoint = folder
            return result

        hooks["_save_checkpoint"] = _save_checkpoint

    if "save_model" in originals:
        original_save_model = originals["save_model"]
        save_signature = inspect.signature(original_save_model)

        @functools.wraps(original_save_model)
        def save_model(self, *args: Any, **kwargs: Any) -> Any:
            guard = guard_of(find_callback(self))
            bound = save_signature.bind_partial(self, *args, **kwargs)
            if guard is not None and not bound.arguments.get("_internal_call", False):
                target = bound.arguments.get("output_dir") or self.args.output_dir
                if not guard.may_save(self.model, self.state.global_step, f"the model in {target}"):
                    return None
            return original_save_model(self, *args, **kwargs)

        hooks["save_model"] = save_model

    return hooks
