"""CPTCallback: the one flag that gives a stock ``transformers.Trainer`` (or a TRL trainer) the CPT set-up.

``Trainer(..., callbacks=[CPTCallback()])`` is all a user adds. The whole Trainer integration lives here:
the callback (event listener and the per-run state the hooks use) and the pass-through hooks on the
Trainer class that creating a callback installs. Why hooks and not only a callback: the model must be
wrapped (PEFT) before the Trainer stores it, and the optimizer's parameter groups must exist when the
optimizer is created (groups added later disagree with the scheduler and with checkpointed optimizer
state, which breaks resume). A TrainerCallback sees neither moment. Each hook calls the original method
unchanged when the trainer has no CPTCallback.

Auto-activation (``auto.py``) builds on this module, never the other way: it hands in a factory with
:func:`set_auto_callback`.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import TrainerCallback

from cpt_plugin.config import CPTConfig, CPTConfigError
from cpt_plugin.trainer_settings import TrainerSettings, resolve

logger = logging.getLogger(__name__)


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
        eval_new / eval_old: held-out data of the new / old domain (a CPTDataset, a datasets.Dataset or
            blocks with ``input_ids``): held-out loss every ``eval_every_steps`` (cpt_plugin/evaluation.py).
    """

    def __init__(
        self,
        config: CPTConfig | dict | str | None = None,
        *,
        eval_new: Any = None,
        eval_old: Any = None,
        **overrides: Any,
    ) -> None:
        self.config = CPTConfig.coerce(config, **overrides)
        self._tokens_since_log = 0
        self.tokens_seen = 0  # training tokens (input_ids) of this process, for the evaluator's x axis
        self.domain_shifted_rows: int | None = None  # rows marked by domain_shift_ratio, once prepared
        from cpt_plugin.evaluation import HeldoutEvaluator

        # the held-out evaluator, added to the trainer by the __init__ hook
        self.evaluator: HeldoutEvaluator | None = None
        if eval_new is not None or eval_old is not None:
            self.evaluator = HeldoutEvaluator(
                eval_new,
                eval_old,
                every_steps=self.config.eval_every_steps,
                max_tokens=self.config.eval_tokens,
                tokens_seen=self._global_tokens_seen,
            )
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
        from cpt_plugin.monitoring import monitoring_callbacks

        # samples before/after, memory report (cpt_plugin/monitoring), added to the trainer by __init__'s hook
        self.monitors: list[TrainerCallback] = monitoring_callbacks(self.config)
        install_trainer_hooks()

    # --- called by the Trainer hooks -------------------------------------------------------------
    def prepare_model_for_trainer(self, model: Any, args: Any, trainer_arguments: Any = None) -> Any:
        """Kernels, the PEFT recipe and checkpointing, applied to the model before the Trainer stores it.

        ``trainer_arguments`` (the Trainer's constructor arguments by name) feed the pre-flight checks:
        tokenizer vs embedding size, replay that the dataset would not do.
        """
        from cpt_plugin.preflight import check_trainer_inputs
        from cpt_plugin.vocabulary.extension import check_trainer_vocabulary

        check_trainer_vocabulary(self.config, model)  # new_tokens: add_new_tokens before tokenizing
        given = dict(trainer_arguments or {})
        from cpt_plugin.replay_defaults import check_replay_options, resolve_replay_defaults

        self._train_dataset = given.get("train_dataset")
        check_replay_options(self.config, self._train_dataset)
        from cpt_plugin.model_parts import embeddings_tied

        self.config = resolve_replay_defaults(self.config, self._train_dataset, tied=embeddings_tied(model))
        tokenizer = given.get("processing_class", given.get("tokenizer"))
        check_trainer_inputs(self.config, model, tokenizer, given.get("train_dataset"))
        self._replay_checked = given.get("train_dataset") is not None
        if getattr(model, "cpt_config", None) is not None:
            return model  # already prepared (e.g. a second Trainer over the same model)
        check_output_dir(getattr(args, "output_dir", None))
        from cpt_plugin.core import setup_model
        from cpt_plugin.offload.planner import find_planner

        settings = resolve(self.config, TrainerSettings.from_training_args(args))
        prepared = setup_model(model, self.config, checkpointing=settings.checkpointing)
        if self.config.domain_shift_ratio and self.config.train_embeddings:
            from cpt_plugin.vocabulary.domain_rows import mark_domain_shifted_rows

            # after setup_model: healing has reset never-seen rows first (it leaves rows marked fresh alone)
            self.domain_shifted_rows = mark_domain_shifted_rows(
                prepared, given.get("train_dataset"), self.config.domain_shift_ratio
            )
        self._planner = find_planner(prepared)
        return prepared

    def count_tokens(self, inputs: Any) -> None:
        input_ids = inputs.get("input_ids") if hasattr(inputs, "get") else None
        if isinstance(input_ids, torch.Tensor):
            self._tokens_since_log += input_ids.numel()
            self.tokens_seen += input_ids.numel()

    def _global_tokens_seen(self) -> int:
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        return self.tokens_seen * world

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
                # row-aware groups run at the fresh-row LR; known rows at cpt_known_row_scale of it
                self._embedding_lr = float(group["lr"]) * float(group.get("cpt_known_row_scale", 1.0))
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
        self._project_output_rows(state, model, kwargs.get("optimizer"), kwargs.get("train_dataloader"))
        return control

    def _project_output_rows(self, state: Any, model: Any, optimizer: Any, loader: Any) -> None:
        """``output_row_projection``: the directions from the replay data, the hooks on the optimizer."""
        count = self.config.output_row_projection
        projection = getattr(self, "_projection", None)
        if projection is not None:
            projection.detach()  # a second train() call: attach again to this run's optimizer
            self._projection = None
        if not count or model is None or optimizer is None:
            return
        from cpt_plugin.output_rows import install_output_row_projection
        from cpt_plugin.replay_defaults import check_replay_options

        dataset = getattr(self, "_train_dataset", None) or getattr(loader, "dataset", None)
        check_replay_options(self.config, dataset, required=True)
        self._projection = install_output_row_projection(
            model, optimizer, dataset.token_pieces(replay=True), count, self.config.seed,
            step_of=lambda: state.global_step, refresh=self.config.output_row_projection_refresh,
            resumed_from=getattr(self, "resumed_from", None),
        )  # fmt: skip

    def on_save(self, args, state, control, **kwargs):  # noqa: D401 - HF signature
        """The output-row projection's directions beside the checkpoint (output_rows.py: exact resume)."""
        projection = getattr(self, "_projection", None)
        if projection is not None and state.is_world_process_zero:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            if os.path.isdir(folder):
                projection.save(folder)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):  # noqa: D401 - HF signature
        """``final_step_back``: the trained weights a little back toward the start of CPT (step_back.py),
        before the evaluator's last evaluation, the samples and the user's save see them."""
        alpha = self.config.final_step_back
        if alpha is not None and alpha != 1.0 and model is not None:
            from cpt_plugin.step_back import step_back

            self.stepped_back = step_back(model, alpha)
            if self.evaluator is not None:  # its end-of-training numbers are the final model's
                self.evaluator.weights_changed()
        return control


# --- the pass-through hooks on transformers.Trainer ----------------------------------------------

_INSTALLED: dict[str, Any] = {}
# {"factory": f} when auto-activation is on: f(trainer, arguments) -> CPTCallback | None
_AUTO: dict[str, Callable[[Any, Any], CPTCallback | None]] = {}


def set_auto_callback(factory: Callable[[Any, Any], CPTCallback | None] | None) -> None:
    """Auto-activation: a Trainer built without a CPTCallback gets ``factory(trainer, arguments)``'s
    (``arguments``: the constructor's arguments by name); None from the factory leaves it untouched."""
    if factory is None:
        _AUTO.clear()
    else:
        _AUTO["factory"] = factory


def find_cpt_callback(callbacks: Any) -> CPTCallback | None:
    for callback in callbacks or ():
        if isinstance(callback, CPTCallback):
            return callback
    return None


def trainer_cpt_callback(trainer: Any) -> CPTCallback | None:
    """The CPTCallback a trainer carries, or None."""
    handler = getattr(trainer, "callback_handler", None)
    return find_cpt_callback(getattr(handler, "callbacks", None))


def install_trainer_hooks() -> None:
    """Idempotent: wraps Trainer.__init__, create_optimizer, create_scheduler, training_step and log."""
    from transformers import Trainer

    if _INSTALLED:
        return
    from cpt_plugin.safety.hooks import SAFETY_METHODS, safety_hooks

    originals = {
        name: getattr(Trainer, name)
        for name in (
            "__init__",
            "create_optimizer",
            "create_scheduler",
            "training_step",
            "log",
            *SAFETY_METHODS,
        )
        if hasattr(Trainer, name)
    }
    init_signature = inspect.signature(originals["__init__"])

    @functools.wraps(originals["__init__"])
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        bound = init_signature.bind_partial(self, *args, **kwargs)
        callback = find_cpt_callback(bound.arguments.get("callbacks"))
        if callback is None and "factory" in _AUTO:
            callback = _AUTO["factory"](self, bound.arguments)  # None: left untouched
            if callback is not None:
                bound.arguments["callbacks"] = [*(bound.arguments.get("callbacks") or []), callback]
        model = bound.arguments.get("model")
        if callback is not None and model is not None:
            bound.arguments["model"] = callback.prepare_model_for_trainer(
                model, bound.arguments.get("args"), bound.arguments
            )
        originals["__init__"](*bound.args, **bound.kwargs)
        evaluator = getattr(callback, "evaluator", None)
        if evaluator is not None:  # held-out evaluation logs through this trainer's log
            evaluator.trainer = self
            if evaluator not in self.callback_handler.callbacks:
                self.add_callback(evaluator)
        for monitor in getattr(callback, "monitors", ()):
            if monitor not in self.callback_handler.callbacks:
                self.add_callback(monitor)  # cpt_plugin/monitoring

    @functools.wraps(originals["create_optimizer"])
    def create_optimizer(self, *args: Any, **kwargs: Any) -> Any:
        callback = trainer_cpt_callback(self)
        if callback is None or self.optimizer is not None:
            return originals["create_optimizer"](self, *args, **kwargs)
        from cpt_plugin.optim import create_optimizer as build

        settings = resolve(callback.config, TrainerSettings.from_training_args(self.args))
        config = callback.config
        if config.optimizer is None:
            config = config.replace(optimizer=settings.optimizer)
        model = (args[0] if args else kwargs.get("model")) or self.model
        self.optimizer = build(
            model,
            config,
            learning_rate=settings.learning_rate,
            weight_decay=settings.weight_decay,
            betas=(self.args.adam_beta1, self.args.adam_beta2),
            eps=self.args.adam_epsilon,
        )
        return self.optimizer

    @functools.wraps(originals["create_scheduler"])
    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        callback = trainer_cpt_callback(self)
        if callback is None or callback.config.schedule == "none" or self.lr_scheduler is not None:
            return originals["create_scheduler"](self, num_training_steps, optimizer)
        from cpt_plugin.schedules import create_scheduler as build

        trainer_settings = TrainerSettings.from_training_args(self.args, num_training_steps)
        warmup = resolve(callback.config, trainer_settings).warmup_steps(num_training_steps)
        self.lr_scheduler = build(optimizer or self.optimizer, callback.config, num_training_steps, warmup)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    @functools.wraps(originals["training_step"])
    def training_step(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        callback = trainer_cpt_callback(self)
        if callback is None:
            return originals["training_step"](self, model, inputs, *args, **kwargs)
        callback.count_tokens(inputs)
        from cpt_plugin.offload.oom_retry import run_with_oom_retry

        step = functools.partial(originals["training_step"], self, model, inputs, *args, **kwargs)
        loss = run_with_oom_retry(step, model, trainer=self)  # the memory planner's OOM recovery
        if getattr(callback, "guard", None) is not None:
            callback.guard.observe_loss(loss)  # the training guard (safety/guard.py)
        return loss

    @functools.wraps(originals["log"])
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        callback = trainer_cpt_callback(self)
        if callback is not None and "loss" in logs:
            logs.update(callback.metrics())
        return originals["log"](self, logs, *args, **kwargs)

    for name, hook in (
        ("__init__", __init__),
        ("create_optimizer", create_optimizer),
        ("create_scheduler", create_scheduler),
        ("training_step", training_step),
        ("log", log),
        *safety_hooks(originals, trainer_cpt_callback).items(),  # lock, safe resume, guard (safety/hooks.py)
    ):
        setattr(Trainer, name, hook)
    _INSTALLED.update(originals)


def uninstall_trainer_hooks() -> None:
    """Restores the Trainer's original methods (tests, or a user who wants them back)."""
    from transformers import Trainer

    for name, original in _INSTALLED.items():
        setattr(Trainer, name, original)
    _INSTALLED.clear()
    _AUTO.clear()
