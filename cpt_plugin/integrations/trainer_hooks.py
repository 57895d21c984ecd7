"""Pass-through hooks on ``transformers.Trainer`` that act only for trainers carrying a CPTCallback.

Why hooks and not only a callback: the model must be wrapped (PEFT) before the Trainer stores it, and the
optimizer's parameter groups must exist when the optimizer is created (groups added later disagree with
the scheduler and with checkpointed optimizer state, which breaks resume). A TrainerCallback sees neither
moment. Each hook calls the original method unchanged when the trainer has no CPTCallback.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

_INSTALLED: dict[str, Any] = {}
_AUTO: dict[str, Any] = {}  # {"config": CPTConfig} when auto-activation is on


def set_auto_config(config: Any) -> None:
    """Auto-activation: every Trainer without a CPTCallback that auto-activation can serve gets one built
    from ``config`` (a CPTConfig, or a function returning one, called at Trainer construction)."""
    if config is None:
        _AUTO.clear()
    else:
        _AUTO["config"] = config


def find_cpt_callback(callbacks: Any) -> Any:
    from cpt_plugin.integrations.hf import CPTCallback

    for callback in callbacks or ():
        if isinstance(callback, CPTCallback):
            return callback
    return None


def trainer_cpt_callback(trainer: Any) -> Any:
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
        if callback is None and "config" in _AUTO:
            from cpt_plugin.integrations.auto import auto_callback

            callback = auto_callback(self, bound.arguments, _AUTO["config"])  # None: left untouched
            if callback is not None:
                bound.arguments["callbacks"] = [*(bound.arguments.get("callbacks") or []), callback]
        model = bound.arguments.get("model")
        if callback is not None and model is not None:
            bound.arguments["model"] = callback.prepare_model_for_trainer(
                model, bound.arguments.get("args"), bound.arguments
            )
        originals["__init__"](*bound.args, **bound.kwargs)

    @functools.wraps(originals["create_optimizer"])
    def create_optimizer(self, *args: Any, **kwargs: Any) -> Any:
        callback = trainer_cpt_callback(self)
        if callback is None or self.optimizer is not None:
            return originals["create_optimizer"](self, *args, **kwargs)
        from cpt_plugin.optim import create_optimizer as build
        from cpt_plugin.optim import optimizer_name_from_trainer

        config = callback.config
        if config.optimizer is None:
            config = config.replace(
                optimizer=optimizer_name_from_trainer(self.args.optim) or "adamw_torch_fused"
            )
        model = (args[0] if args else kwargs.get("model")) or self.model
        self.optimizer = build(
            model,
            config,
            learning_rate=config.learning_rate or self.args.learning_rate,
            weight_decay=config.weight_decay if config.weight_decay is not None else self.args.weight_decay,
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
        from cpt_plugin.schedules import resolve_warmup_steps

        warmup = resolve_warmup_steps(
            callback.config, num_training_steps, self.args.get_warmup_steps(num_training_steps)
        )
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
