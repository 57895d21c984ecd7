"""One place where a CPTConfig meets the Trainer's own settings, and what each setting resolves to.

A ``cpt:`` / CPTConfig key that is set wins; one left unset follows the Trainer (as ``TrainingArguments``
or Axolotl's keys say). Every entry point resolves through :func:`resolve`: the HF Trainer hooks
(``integrations/hf.py``, which auto-activation also goes through), the Axolotl plugin, and the CLI job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from cpt_plugin.config import CPTConfig

DEFAULT_OPTIMIZER = "adamw_torch_fused"


def optimizer_name_from_trainer(optim: Any) -> str | None:
    """Maps TrainingArguments.optim (or Axolotl's ``optimizer``) to the AdamW kinds we build; None otherwise."""
    optim = str(getattr(optim, "value", optim) or "")
    if "8bit" in optim and "adam" in optim:
        return "adamw_8bit"
    if optim in ("adamw_torch", "adamw_torch_fused"):
        return optim
    return None


def checkpointing_requested(args: Any) -> bool:
    """TrainingArguments' checkpointing switch (``activation_checkpointing`` in 5.24, older name before)."""
    return bool(
        getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", False)
    )


@dataclass(frozen=True)
class TrainerSettings:
    """What the Trainer was told, in the terms a CPTConfig is resolved against (None: not known here)."""

    learning_rate: float | None = None
    weight_decay: float | None = None
    optim: Any = None
    gradient_checkpointing: bool = False
    warmup_steps: int = 0  # the Trainer's own warm-up for this run's length

    @classmethod
    def from_training_args(cls, args: Any, total_steps: int | None = None) -> TrainerSettings:
        """From ``TrainingArguments`` (the warm-up is the Trainer's for ``total_steps`` when given)."""
        if args is None:
            return cls()
        warmup = args.get_warmup_steps(total_steps) if total_steps is not None else 0
        return cls(
            learning_rate=getattr(args, "learning_rate", None),
            weight_decay=getattr(args, "weight_decay", None),
            optim=getattr(args, "optim", None),
            gradient_checkpointing=checkpointing_requested(args),
            warmup_steps=warmup,
        )


@dataclass(frozen=True)
class ResolvedSettings:
    """The values training runs with, after CPTConfig and the Trainer's settings are combined."""

    checkpointing: str  # "off" | "recompute" | "offload" | "auto" (the memory planner)
    optimizer: str
    learning_rate: float | None
    weight_decay: float | None
    kernels: tuple[str, ...]
    config: CPTConfig
    trainer_warmup_steps: int = 0

    def warmup_steps(self, total_steps: int) -> int:
        """CPTConfig's warm-up wins over the Trainer's; a ratio is taken of the total steps."""
        if self.config.warmup_steps is not None:
            return self.config.warmup_steps
        if self.config.warmup_ratio is not None:
            return math.ceil(self.config.warmup_ratio * total_steps)
        return self.trainer_warmup_steps


def resolve(config: CPTConfig, trainer: TrainerSettings | None = None) -> ResolvedSettings:
    """CPTConfig against the Trainer's settings: a key that is set wins, an unset one follows the Trainer.

    - checkpointing ``auto``: the memory planner when the Trainer asks for gradient checkpointing, else off;
    - optimizer unset: the Trainer's ``optim`` when it is an AdamW we build, else ``adamw_torch_fused``;
    - learning rate / weight decay unset: the Trainer's;
    - warm-up unset: the Trainer's (see :meth:`ResolvedSettings.warmup_steps`);
    - kernels ``auto``: all of them on CUDA, none on the CPU (``CPTConfig.enabled_kernels``).
    """
    trainer = trainer or TrainerSettings()
    mode = config.gradient_checkpointing
    if mode == "auto":
        mode = "auto" if trainer.gradient_checkpointing else "off"
    return ResolvedSettings(
        checkpointing=mode,
        optimizer=config.optimizer or optimizer_name_from_trainer(trainer.optim) or DEFAULT_OPTIMIZER,
        learning_rate=config.learning_rate or trainer.learning_rate,
        weight_decay=config.weight_decay if config.weight_decay is not None else trainer.weight_decay,
        kernels=config.enabled_kernels(),
        config=config,
        trainer_warmup_steps=trainer.warmup_steps,
    )
