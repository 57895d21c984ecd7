"""Resume that survives crashes: incomplete checkpoints skipped, a changed adapter refused before any step."""

from __future__ import annotations

import logging

import pytest
import torch

from cpt_plugin import CPTConfigError, prepare_model
from cpt_plugin.integrations.hf import uninstall_trainer_hooks
from cpt_plugin.safety import check_adapter_matches, missing_parts
from tests.safety.helpers import Snapshots, make_trainer, messages
from tests.tiny import tiny_llama


@pytest.fixture(autouse=True)
def _restore_trainer():
    yield
    uninstall_trainer_hooks()


@pytest.fixture
def saved_run(tmp_path):
    """A finished 4-step run with checkpoint-2 and checkpoint-4 (lora_r=4, lora_alpha=32)."""
    make_trainer(tmp_path, max_steps=4, save_strategy="steps", save_steps=2).train()
    return tmp_path / "out"


def _crash_while_saving(out, step=6):
    """What a process killed during a save left behind: a README and a temporary file."""
    folder = out / f"checkpoint-{step}"
    folder.mkdir()
    (folder / "README.md").write_text("model card")
    (folder / "tmpa1b2c3.safetensors").write_bytes(b"\0" * 16)
    return folder


def test_resume_true_skips_an_incomplete_checkpoint(tmp_path, saved_run, caplog):
    caplog.set_level(logging.WARNING)
    broken = _crash_while_saving(saved_run)
    trained = Snapshots()
    trainer = make_trainer(tmp_path, callbacks=[trained], max_steps=6, save_strategy="no")
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 6 and sorted(trained.weights) == [5, 6]  # resumed after step 4
    warned = [m for m in messages(caplog) if "incomplete checkpoint" in m]
    assert warned and str(broken) in warned[0] and "trainer_state.json" in warned[0]
    assert str(saved_run / "checkpoint-4") in warned[0]


def test_an_explicit_incomplete_checkpoint_is_refused_naming_the_complete_one(tmp_path, saved_run):
    broken = _crash_while_saving(saved_run)
    trainer = make_trainer(tmp_path, max_steps=6)
    with pytest.raises(CPTConfigError, match="incomplete") as raised:
        trainer.train(resume_from_checkpoint=str(broken))
    assert str(saved_run / "checkpoint-4") in str(raised.value)
    assert trainer.state.global_step == 0


def test_no_complete_checkpoint_at_all_is_a_clear_error(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    broken = _crash_while_saving(out, step=2)
    with pytest.raises(CPTConfigError, match="no complete checkpoint") as raised:
        make_trainer(tmp_path, max_steps=4).train(resume_from_checkpoint=True)
    assert str(broken) in str(raised.value)


def test_what_complete_means(saved_run):
    checkpoint = saved_run / "checkpoint-4"
    assert missing_parts(str(checkpoint)) == []
    state = checkpoint / "trainer_state.json"
    state.write_text(state.read_text()[:20])  # a torn last write
    assert missing_parts(str(checkpoint)) == ["a readable trainer_state.json (it is cut short)"]
    (checkpoint / "optimizer.pt").unlink()
    assert "optimizer.pt" in missing_parts(str(checkpoint))
    assert "optimizer.pt" not in missing_parts(str(checkpoint), require_optimizer=False)


@pytest.mark.parametrize(
    ("change", "key", "config_key"),
    [({"lora_r": 8}, "r=4", "lora_r"), ({"lora_alpha": 64.0}, "lora_alpha=32.0", "lora_alpha")],
)
def test_a_changed_adapter_is_refused_before_any_step(tmp_path, saved_run, change, key, config_key):
    trainer = make_trainer(tmp_path, max_steps=6, cpt=change)
    with pytest.raises(CPTConfigError) as raised:
        trainer.train(resume_from_checkpoint=True)
    message = str(raised.value)
    assert key in message and f"'{config_key}'" in message and "checkpoint-4" in message
    assert str(next(iter(change.values()))) in message  # this run's value too
    assert trainer.state.global_step == 0


@pytest.mark.parametrize(
    ("before", "after", "named"),
    [
        ({"use_rslora": True}, {"use_rslora": False}, "use_rslora"),
        ({}, {"target_modules": ["q_proj", "v_proj"]}, "target_modules"),
        ({}, {"train_embeddings": False}, "train_embeddings"),
        (
            {"trained_embeddings_dtype": "float32"},
            {"trained_embeddings_dtype": "model"},
            "trained_embeddings_dtype",
        ),
    ],
)
def test_every_adapter_key_is_compared(tmp_path, before, after, named):
    def model(settings):
        return prepare_model(tiny_llama(seed=1).to(torch.bfloat16), lora_r=4, **settings)

    model(before).save_pretrained(str(tmp_path / "checkpoint-1"))
    check_adapter_matches(str(tmp_path / "checkpoint-1"), model(before))  # the same: fine
    with pytest.raises(CPTConfigError, match=f"'{named}'"):
        check_adapter_matches(str(tmp_path / "checkpoint-1"), model(after))
