"""One flag on a stock transformers.Trainer: param groups, schedule, metrics, save and exact resume."""

import os

import pytest
import torch
from transformers import Trainer

from cpt_plugin import CPTCallback, CPTConfigError
from cpt_plugin.integrations.hf import uninstall_trainer_hooks
from cpt_plugin.schedules import plan_of
from tests.tiny import RandomBlocks, tiny_llama, training_args


@pytest.fixture(autouse=True)
def _restore_trainer():
    yield
    uninstall_trainer_hooks()


def _args(tmp_path, **overrides):
    values = dict(max_steps=6, save_steps=3, save_strategy="steps", warmup_steps=2)
    return training_args(tmp_path, **{**values, **overrides})


def _losses(trainer):
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def test_one_flag_gives_groups_schedule_and_metrics(tmp_path):
    trainer = Trainer(
        model=tiny_llama(tied=False),
        args=_args(tmp_path, max_steps=4, save_strategy="no"),
        train_dataset=RandomBlocks(),
        callbacks=[CPTCallback(lora_r=8, schedule="cosine", min_lr_ratio=0.1)],
    )
    assert type(trainer.model).__name__ == "PeftModelForCausalLM"
    trainer.train()
    groups = {g["cpt_group"]: g for g in trainer.optimizer.param_groups}
    assert groups["embeddings"]["lr"] == pytest.approx(groups["lora"]["lr"] / 10)
    assert groups["embeddings"]["initial_lr"] == pytest.approx(1e-4)
    assert plan_of(trainer.lr_scheduler).name == "cosine"  # ours, not the Trainer's linear default
    assert groups["lora"]["lr"] == pytest.approx(1e-3 * plan_of(trainer.lr_scheduler).factor(4))
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all("embedding_learning_rate" in h for h in logged)
    assert logged[-1]["embedding_learning_rate"] == pytest.approx(logged[-1]["learning_rate"] / 10)
    assert any("train_tokens_per_second" in h for h in logged)


def test_trainer_without_callback_is_untouched(tmp_path):
    CPTCallback()  # installs the hooks
    trainer = Trainer(
        model=tiny_llama(),
        args=_args(tmp_path, max_steps=1, save_strategy="no"),
        train_dataset=RandomBlocks(),
    )
    assert type(trainer.model).__name__ == "LlamaForCausalLM"
    trainer.train()
    assert not any("cpt_group" in g for g in trainer.optimizer.param_groups)


def test_resume_continues_exactly(tmp_path):
    def run(resume=None):
        trainer = Trainer(
            model=tiny_llama(tied=True, seed=1),
            args=_args(tmp_path),
            train_dataset=RandomBlocks(seed=3),
            callbacks=[CPTCallback(lora_r=8, schedule="infinite_cosine", cooldown_steps=2, anneal_steps=2)],
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run()
    full_losses = _losses(full)
    checkpoint = os.path.join(tmp_path, "out", "checkpoint-3")
    assert os.path.exists(
        os.path.join(checkpoint, "adapter_model.safetensors")
    )  # an adapter, not full weights
    resumed = run(resume=checkpoint)
    resumed_losses = _losses(resumed)
    assert resumed.state.global_step == 6 and set(resumed_losses) >= {4, 5, 6}
    for step in (4, 5, 6):
        assert resumed_losses[step] == pytest.approx(full_losses[step], rel=1e-5, abs=1e-6)
    lrs_full = [g["lr"] for g in full.optimizer.param_groups]
    lrs_resumed = [g["lr"] for g in resumed.optimizer.param_groups]
    assert lrs_resumed == pytest.approx(lrs_full)
    state_full = full.optimizer.state_dict()["state"]
    state_resumed = resumed.optimizer.state_dict()["state"]
    for key in state_full:
        torch.testing.assert_close(
            state_resumed[key]["exp_avg_sq"], state_full[key]["exp_avg_sq"], rtol=1e-5, atol=1e-9
        )


def test_unwritable_output_dir_fails_before_training(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(CPTConfigError, match="not writable"):
        Trainer(
            model=tiny_llama(),
            args=_args(tmp_path, output_dir=str(blocked / "out")),
            train_dataset=RandomBlocks(),
            callbacks=[CPTCallback(lora_r=4)],
        )


def test_bitsandbytes_8bit_adamw_is_batched_and_resumes_exactly(tmp_path, monkeypatch):
    """``optim="adamw_bnb_8bit"``: bitsandbytes' update stepped per group (optim_8bit), and a resumed run
    continues with the same losses and 8-bit states."""
    pytest.importorskip("bitsandbytes")
    from cpt_plugin import optim_8bit
    from cpt_plugin.optim_8bit import BatchedAdamW8bit

    monkeypatch.setattr(optim_8bit, "FLAT_DEVICE_TYPES", ("cpu",))  # the accelerators' path, here

    def run(resume=None):
        trainer = Trainer(
            model=tiny_llama(tied=False, seed=1),
            args=_args(tmp_path, optim="adamw_bnb_8bit"),
            train_dataset=RandomBlocks(seed=3),
            # r=128 on hidden 32: most LoRA factors reach bitsandbytes' 4096-element 8-bit minimum
            callbacks=[CPTCallback(lora_r=128, train_embeddings=False)],
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run()
    assert isinstance(full.optimizer.optimizer, BatchedAdamW8bit)
    resumed = run(resume=os.path.join(tmp_path, "out", "checkpoint-3"))
    full_losses, resumed_losses = _losses(full), _losses(resumed)
    for step in (4, 5, 6):
        assert resumed_losses[step] == pytest.approx(full_losses[step], rel=1e-6, abs=1e-7)
    states_full = full.optimizer.optimizer.state.values()
    states_resumed = resumed.optimizer.optimizer.state.values()
    eight_bit = 0
    for a, b in zip(states_full, states_resumed, strict=True):
        eight_bit += a["state1"].dtype == torch.uint8
        for key in ("state1", "state2"):
            assert torch.equal(a[key], b[key]), key
    assert eight_bit >= 8
