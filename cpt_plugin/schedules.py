"""Learning-rate schedules for continued pretraining.

Each schedule is a multiplier of the peak learning rate, applied through one ``LambdaLR`` so that every
parameter group (LoRA at ``learning_rate``, embeddings at ``embedding_learning_rate``) is scaled by the
same factor at every step and the ratio between them never drifts.

The "infinite" schedules follow Ibrahim et al. 2024 ("Simple and Scalable Strategies to Continually
Pre-train Large Language Models"): warm-up, cool-down to a constant rate, an open-ended constant phase,
and an optional final exponential anneal. The constant phase is not tied to a token budget: a run can
be extended (more steps) without changing the LR seen so far, as long as the anneal has not started.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from cpt_plugin.config import CPTConfig


@dataclass(frozen=True)
class SchedulePlan:
    """Step counts and ratios of one run; every value is relative to the peak LR (1.0)."""

    name: str
    total_steps: int
    warmup_steps: int
    min_ratio: float
    constant_ratio: float = 0.5
    decay_steps: int = 0  # wsd: steps of the final decay
    cooldown_steps: int = 0  # infinite: T_cd
    anneal_steps: int = 0  # infinite: T_ann
    inv_sqrt_alpha: float = 10.0

    def factor(self, step: int) -> float:
        """LR multiplier at ``step`` (0-based optimizer steps)."""
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return step / self.warmup_steps
        t = step - self.warmup_steps
        if self.name == "constant":
            return 1.0
        if self.name == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, t / span)
            return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.name == "wsd":
            decay_start = self.total_steps - self.decay_steps
            if step < decay_start or self.decay_steps == 0:
                return 1.0
            progress = min(1.0, (step - decay_start) / self.decay_steps)
            return 1.0 - (1.0 - self.min_ratio) * progress
        if self.name in ("infinite_cosine", "infinite_inv_sqrt"):
            return max(self.min_ratio, self._infinite(step, t))
        raise ValueError(f"unknown schedule {self.name!r}")

    def _infinite(self, step: int, t: int) -> float:
        const = self.constant_ratio
        anneal_start = self.total_steps - self.anneal_steps
        if self.anneal_steps > 0 and step >= anneal_start:
            # eta_const * exp(-k t), k = -ln(eta_min / eta_const) / T_ann
            k = -math.log(max(self.min_ratio, 1e-12) / const) / self.anneal_steps
            return const * math.exp(-k * (step - anneal_start))
        if self.cooldown_steps > 0 and t < self.cooldown_steps:
            x = t / self.cooldown_steps
            if self.name == "infinite_cosine":
                return const + (1.0 - const) / 2.0 * (1.0 + math.cos(math.pi * x))
            alpha = self.inv_sqrt_alpha

            def f(u: float) -> float:
                return 1.0 / math.sqrt(1.0 + alpha * u) - 1.0

            return 1.0 + (const - 1.0) * f(x) / f(1.0)
        return const


def build_plan(config: CPTConfig, total_steps: int, warmup_steps: int) -> SchedulePlan:
    """Turns the config into concrete step counts for a run of ``total_steps`` optimizer steps."""
    if total_steps <= 0:
        raise ValueError(f"the schedule needs a positive number of training steps, got {total_steps}.")
    cooldown = config.cooldown_steps if config.cooldown_steps is not None else round(0.2 * total_steps)
    anneal = config.anneal_steps if config.anneal_steps is not None else round(0.1 * total_steps)
    return SchedulePlan(
        name=config.schedule,
        total_steps=total_steps,
        warmup_steps=min(warmup_steps, total_steps),
        min_ratio=config.min_lr_ratio,
        constant_ratio=config.constant_lr_ratio,
        decay_steps=round(config.decay_ratio * total_steps),
        cooldown_steps=cooldown,
        anneal_steps=min(anneal, total_steps),
        inv_sqrt_alpha=config.inv_sqrt_alpha,
    )


def create_scheduler(
    optimizer: Optimizer, config: CPTConfig, total_steps: int, warmup_steps: int
) -> LambdaLR:
    """One LambdaLR for all groups: each group's own peak LR times the same factor."""
    plan = build_plan(config, total_steps, warmup_steps)

    def factor(step: int) -> float:  # a plain function: LambdaLR keeps it out of the checkpointed state
        return plan.factor(step)

    factor.plan = plan  # type: ignore[attr-defined]  # on the function, so it stays out of state_dict
    return LambdaLR(optimizer, factor)


def plan_of(scheduler: LambdaLR) -> SchedulePlan | None:
    """The SchedulePlan behind a scheduler made by create_scheduler (None for any other scheduler)."""
    lambdas = getattr(scheduler, "lr_lambdas", None) or [None]
    return getattr(lambdas[0], "plan", None)
