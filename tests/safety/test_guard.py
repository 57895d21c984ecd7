"""The training guard: non-finite steps skipped, a diverged run stopped, NaN never saved, collapse named."""

from __future__ import annotations

import logging
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from cpt_plugin import CPTConfig, CPTConfigError
from cpt_plugin.integrations.hf import uninstall_trainer_hooks
from cpt_plugin.safety import TrainingGuard
from cpt_plugin.safety.guard import _scaler_handles_it
from tests.safety.helpers import NanLossTrainer, Snapshots, make_trainer, messages


@pytest.fixture(autouse=True)
def _restore_trainer():
    yield
    uninstall_trainer_hooks()


def test_a_non_finite_step_changes_neither_weights_nor_optimizer_state(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    snapshots = Snapshots()
    NanLossTrainer.nan_steps = {3}
    trainer = make_trainer(tmp_path, trainer_class=NanLossTrainer, callbacks=[snapshots], max_steps=5)
    trainer.train()
    assert trainer.state.global_step == 5  # one bad step does not stop the run
    for name, before in snapshots.weights[2].items():
        torch.testing.assert_close(snapshots.weights[3][name], before, rtol=0, atol=0)
        assert torch.isfinite(snapshots.weights[5][name]).all()
    for after, before in zip(snapshots.moments[3], snapshots.moments[2], strict=True):
        torch.testing.assert_close(after, before, rtol=0, atol=0)  # moments and step counts kept
    assert any(not torch.equal(snapshots.weights[4][n], w) for n, w in snapshots.weights[3].items())
    assert snapshots.lrs[3] != snapshots.lrs[2]  # the schedule moves on (documented choice)
    logged = messages(caplog)
    assert any("step 3: non-finite loss (nan)" in m and "update was skipped" in m for m in logged)


def test_bad_steps_in_a_row_stop_the_run_with_guidance(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    NanLossTrainer.nan_steps = set(range(3, 20))
    trainer = make_trainer(
        tmp_path, trainer_class=NanLossTrainer, max_steps=10, cpt={"guard_max_bad_steps": 2}
    )
    trainer.train()
    assert trainer.state.global_step == 4
    stop = [m for m in messages(caplog) if "stopping the run at step 4" in m]
    assert stop, messages(caplog)
    for hint in ("steps 3-4", "lower the learning rate", "check the data", "bf16"):
        assert hint in stop[0]


class PoisonAfterSave(TrainerCallback):
    """Writes a NaN into one LoRA weight right after checkpoint ``step`` is saved (the issue's case)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            name, param = next((n, p) for n, p in model.named_parameters() if "lora_A" in n)
            with torch.no_grad():
                param.view(-1)[0] = float("nan")
        return control


def test_nan_weights_are_never_saved_and_rotation_keeps_the_last_finite_checkpoint(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    trainer = make_trainer(
        tmp_path,
        callbacks=[PoisonAfterSave(4)],
        max_steps=10,
        save_strategy="steps",
        save_steps=2,
        save_total_limit=2,
    )
    trainer.train()
    out = tmp_path / "out"
    assert trainer.state.global_step == 7  # steps 5-7 non-finite: stopped
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-2",
        "checkpoint-4",
    ]
    weights = load_file(str(out / "checkpoint-4" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    refused = [m for m in messages(caplog) if "checkpoint-6 was not saved" in m]
    assert refused and "step 6" in refused[0] and "lora_A" in refused[0]
    assert str(out / "checkpoint-4") in refused[0]  # names the checkpoint that is kept
    trainer.save_model(str(tmp_path / "final"))
    assert not os.path.exists(tmp_path / "final" / "adapter_model.safetensors")


def test_a_collapsed_run_is_named(tmp_path, caplog):
    """Final norm at 0: logits 0, loss exactly ln(vocab), every gradient exactly 0 (what LR 1e3 can do)."""
    caplog.set_level(logging.WARNING)
    trainer = make_trainer(tmp_path, max_steps=4, cpt={"guard_collapse_steps": 3})
    with torch.no_grad():
        trainer.model.get_base_model().model.norm.weight.zero_()
    trainer.train()
    logged = messages(caplog)
    assert any("step 1: the gradient norm is exactly 0" in m for m in logged), logged
    collapse = [m for m in logged if "ln(vocab_size 257)" in m]
    assert collapse and f"{math.log(257):.4f}" in collapse[0] and "for 3 steps" in collapse[0]


def test_a_healthy_run_gets_no_guard_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    make_trainer(tmp_path, max_steps=3, cpt={"guard_collapse_steps": 2}).train()
    assert not [m for m in messages(caplog, "cpt_plugin.safety")]


def test_guard_off_leaves_the_trainer_as_it_was(tmp_path):
    NanLossTrainer.nan_steps = set(range(2, 20))
    trainer = make_trainer(tmp_path, trainer_class=NanLossTrainer, max_steps=5, cpt={"guard": False})
    trainer.train()
    assert trainer.state.global_step == 5
    assert not any(isinstance(c, TrainingGuard) for c in trainer.callback_handler.callbacks)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("guard", "yes"),
        ("guard_max_bad_steps", 0),
        ("guard_max_bad_steps", 1.5),
        ("guard_collapse_steps", -1),
    ],
)
def test_guard_settings_are_validated(key, value):
    with pytest.raises(CPTConfigError, match=f"'{key}'"):
        CPTConfig(**{key: value})


class _Scaler:
    def __init__(self, scale: float) -> None:
        self.scale = scale

    def is_enabled(self) -> bool:
        return True

    def get_scale(self) -> float:
        return self.scale


class _Optimizer:
    def __init__(self, scale: float) -> None:
        self.scaler = _Scaler(scale)


def test_fp16_overflows_are_the_grad_scalers_business_until_its_scale_is_spent():
    assert _scaler_handles_it(_Optimizer(1024.0))
    assert not _scaler_handles_it(_Optimizer(1.0))
    assert not _scaler_handles_it(object())


@pytest.mark.gpu
def test_fp16_overflow_steps_are_left_to_the_grad_scaler_and_nan_losses_still_stop(tmp_path, caplog):
    """On CUDA with fp16: a scale far too high makes the first steps overflow (the scaler's normal job, so the
    run goes on); NaN losses are still counted and stop the run."""
    caplog.set_level(logging.INFO)
    trainer = make_trainer(tmp_path, max_steps=8, use_cpu=False, fp16=True)
    trainer.accelerator.scaler._init_scale = 2.0**30  # every early step overflows fp16
    trainer.train()
    assert trainer.state.global_step == 8
    assert any("fp16 gradient overflow" in m for m in messages(caplog))
    assert not any("stopping the run" in m for m in messages(caplog))
    uninstall_trainer_hooks()
    NanLossTrainer.nan_steps = set(range(2, 20))
    trainer = make_trainer(
        tmp_path / "nan", trainer_class=NanLossTrainer, max_steps=8, use_cpu=False, fp16=True
    )
    trainer.train()
    assert trainer.state.global_step == 4
    assert any("you train in fp16" in m for m in messages(caplog))
