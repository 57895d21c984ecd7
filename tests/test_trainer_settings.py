"""resolve(): a CPTConfig key that is set wins; an unset one follows the Trainer's settings."""

from __future__ import annotations

from transformers import TrainingArguments

from cpt_plugin import CPTConfig
from cpt_plugin.trainer_settings import TrainerSettings, resolve


def test_unset_keys_follow_the_trainer(tmp_path):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        learning_rate=3e-4,
        weight_decay=0.1,
        optim="adamw_torch",
        gradient_checkpointing=True,
        warmup_steps=7,
        report_to=[],
    )
    settings = resolve(CPTConfig(), TrainerSettings.from_training_args(args, total_steps=100))
    assert (settings.checkpointing, settings.optimizer) == ("auto", "adamw_torch")
    assert (settings.learning_rate, settings.weight_decay, settings.warmup_steps(100)) == (3e-4, 0.1, 7)


def test_set_keys_win():
    config = CPTConfig(
        learning_rate=1e-4,
        weight_decay=0.0,
        optimizer="adamw_8bit",
        gradient_checkpointing="recompute",
        warmup_ratio=0.05,
    )
    trainer = TrainerSettings(learning_rate=3e-4, weight_decay=0.1, optim="sgd", warmup_steps=7)
    settings = resolve(config, trainer)
    assert (settings.checkpointing, settings.optimizer) == ("recompute", "adamw_8bit")
    assert (settings.learning_rate, settings.weight_decay, settings.warmup_steps(100)) == (1e-4, 0.0, 5)


def test_no_trainer_checkpointing_means_off_and_unknown_optim_means_fused_adamw():
    settings = resolve(CPTConfig(), TrainerSettings(optim="sgd"))
    assert (settings.checkpointing, settings.optimizer) == ("off", "adamw_torch_fused")
