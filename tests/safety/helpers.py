"""Tiny Trainer runs for the safety tests (tiny Llama, random blocks, a handful of CPU steps)."""

from __future__ import annotations

import torch
from transformers import Trainer, TrainerCallback

from cpt_plugin import CPTCallback
from tests.tiny import RandomBlocks, tiny_llama, training_args


def make_trainer(tmp_path, *, trainer_class=Trainer, callbacks=(), model=None, cpt=None, **args) -> Trainer:
    return trainer_class(
        model=model if model is not None else tiny_llama(seed=1),
        args=training_args(tmp_path, **args),
        train_dataset=RandomBlocks(seed=3),
        callbacks=[CPTCallback(**{"lora_r": 4, **(cpt or {})}), *callbacks],
    )


class NanLossTrainer(Trainer):
    """A Trainer whose loss is NaN on the optimizer steps listed in ``nan_steps`` (1-based)."""

    nan_steps: set[int] = set()

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        if self.state.global_step + 1 in self.nan_steps:
            loss = loss * float("nan")
        return loss


class Snapshots(TrainerCallback):
    """Trainable weights and optimizer state after each step."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.moments: dict[int, list[torch.Tensor]] = {}
        self.lrs: dict[int, float] = {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        step = state.global_step
        self.weights[step] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.moments[step] = [
            v.detach().clone()
            for s in optimizer.state.values()
            for v in s.values()
            if isinstance(v, torch.Tensor)
        ]
        self.lrs[step] = lr_scheduler.get_last_lr()[0]
        return control


def messages(caplog, name: str = "cpt_plugin") -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith(name)]
