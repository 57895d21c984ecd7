"""CPTCallback: the one flag that gives a stock ``transformers.Trainer`` (or a TRL trainer) the CPT set-up.

``Trainer(..., callbacks=[CPTCallback()])`` is all a user adds. A TrainerCallback alone cannot replace
the model or the optimizer, so creating the callback installs a few pass-through hooks on the Trainer
class (see ``trainer_hooks.py``); they act only for trainers that carry a CPTCallback.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any

import torch
from transformers import TrainerCallback

from cpt_plugin.config import CPTConfig, CPTConfigError

logger = logging.getLogger(__name__)


def checkpointing_requested(args: Any) -> bool:
    """TrainingArguments' checkpointing switch (``activation_checkpointing`` in 5.24, older name before)."""
    return bool(
        getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", False)
    )


def resolve_checkpointing_mode(config: CPTConfig, args: Any) -> str:
    """auto: the memory planner whenever the Trainer asks for gradient checkpointing, off otherwise."""
    if config.gradient_checkpointing != "auto":
        return config.gradient_checkpointing
    return "auto" if checkpointing_requested(args) else "off"


def check_output_dir(path: str | None) -> None:
    """Fails before training starts when checkpoints could not be written."""
    if not path:
        return
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".cpt-write-check-"):
            pass
    except OSError as error:
        raise CPTConfigError(
            f"cpt-plugin: the output directory {path!r} is not writable ({error.strerror}). "
            "Set TrainingArguments(output_dir=...) to a folder you can write to."
        ) from error


class CPTCallback(TrainerCallback):
    """Continued pretraining for HF Trainer / TRL with one flag.

    Args:
        config: a ``CPTConfig``, a dict of its keys, or a YAML path; keyword arguments override it.
    """

    def __init__(self, config: CPTConfig | dict | str | None = None, **overrides: Any) -> None:
        self.config = CPTConfig.coerce(config, **overrides)
        self._tokens_since_log = 0
        self._last_log_time: float | None = None
        self._embedding_lr: float | None = None
        self._planner: Any = None  # the memory planner of the prepared model (checkpointing auto)
        from cpt_plugin.safety.guard import TrainingGuard

        # the training guard (cpt_plugin/safety), added to the trainer by the train() hook
        self.guard: TrainingGuard | None = (
            TrainingGuard(self.config.guard_max_bad_steps, self.config.guard_collapse_steps)
            if self.config.guard
            else None
        )
        from cpt_plugin.integrations.trainer_hooks import install_trainer_hooks

        install_trainer_hooks()

    # --- called by the Trainer hooks -------------------------------------------------------------
    def prepare_model_for_trainer(self, model: Any, args: Any, trainer_arguments: Any = None) -> Any:
        """Kernels, the PEFT recipe and checkpointing, applied to the model before the Trainer stores it.

        ``trainer_arguments`` (the Trainer's constructor arguments by name) feed the pre-flight checks:
        tokenizer vs embedding size, replay that the dataset would not do.
        """
        from cpt_plugin.preflight import check_trainer_inputs

        given = dict(trainer_arguments or {})
        tokenizer = given.get("processing_class", given.get("tokenizer"))
        check_trainer_inputs(self.config, model, tokenizer, given.get("train_dataset"))
        self._replay_checked = given.get("train_dataset") is not None
        if getattr(model, "cpt_config", None) is not None:
            return model  # already prepared (e.g. a second Trainer over the same model)
        check_output_dir(getattr(args, "output_dir", None))
        from cpt_plugin.core import setup_model
        from cpt_plugin.offload.planner import find_planner

        prepared = setup_model(
            model, self.config, checkpointing=resolve_checkpointing_mode(self.config, args)
        )
        self._planner = find_planner(prepared)
        return prepared

    def count_tokens(self, inputs: Any) -> None:
        input_ids = inputs.get("input_ids") if hasattr(inputs, "get") else None
        if isinstance(input_ids, torch.Tensor):
            self._tokens_since_log += input_ids.numel()

    def metrics(self) -> dict[str, float]:
        """Extra training metrics, logged through the Trainer (so W&B/TensorBoard see them)."""
        if not self.config.log_metrics:
            return {}
        out: dict[str, float] = {}
        if self._embedding_lr is not None:
            out["embedding_learning_rate"] = self._embedding_lr
        now = time.perf_counter()
        if self._last_log_time is not None and now > self._last_log_time and self._tokens_since_log:
            out["train_tokens_per_second"] = round(self._tokens_since_log / (now - self._last_log_time), 1)
        self._last_log_time, self._tokens_since_log = now, 0
        if torch.cuda.is_available():
            out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        if self._planner is not None:
            out.update(self._planner.pop_log())  # the memory plan, when it changed since the last log
        return out

    # --- TrainerCallback events --------------------------------------------------------------------
    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        """Reads the embedding LR used by this step (the Trainer logs its LR before the scheduler moves)."""
        for group in getattr(optimizer, "param_groups", None) or []:
            if str(group.get("cpt_group", "")).startswith("embeddings"):
                self._embedding_lr = float(group["lr"])
                break
        return control

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: D401 - HF signature
        self._last_log_time, self._tokens_since_log = time.perf_counter(), 0
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        model = kwargs.get("model")
        if model is not None and getattr(model, "cpt_config", None) is None:
            logger.warning(
                "cpt-plugin: the Trainer's model was not prepared by CPTCallback (was the callback added "
                "after the Trainer was built?). Pass it in Trainer(..., callbacks=[CPTCallback()])."
            )
        from cpt_plugin.preflight import check_replay, check_tokenizer_fits

        if model is not None:  # the tokenizer a trainer loaded itself (TRL) is known only now
            check_tokenizer_fits(model, kwargs.get("processing_class"))
        if not getattr(self, "_replay_checked", False):  # train_dataset not given at construction
            check_replay(self.config, getattr(kwargs.get("train_dataloader"), "dataset", None))
        return control
