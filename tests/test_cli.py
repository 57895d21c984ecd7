"""The CLI's embedded default, shrunk to seconds: corpora → tokenizer → base → CPT with replay → summary."""

import json

import pytest

from cpt_plugin.cli import main
from cpt_plugin.integrations.trainer_hooks import uninstall_trainer_hooks
from cpt_plugin.pipeline import RunConfig, default_config_text

SMALL = [
    "training.max_steps=2",
    "training.per_device_train_batch_size=2",
    "training.logging_steps=1",
    "training.save_steps=2",
    "base_pretraining.max_steps=2",
    "base_pretraining.per_device_train_batch_size=2",
    "data.corpora_max_mb=0.4",
    "data.eval_max_blocks=2",
    "model.tiny_llama.num_hidden_layers=1",
    "model.tiny_llama.hidden_size=32",
    "model.tiny_llama.intermediate_size=48",
    "tokenizer.train_vocab_size=300",
    "cpt.max_seq_length=64",
    "cpt.lora_r=4",
]


@pytest.fixture(autouse=True)
def _restore_trainer():
    yield
    uninstall_trainer_hooks()


def test_embedded_default_end_to_end(tmp_path, capsys):
    assert main(["train", "--output-dir", str(tmp_path), "--set", *SMALL]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    table = summary["heldout_loss"]
    assert set(table) == {"base", "CPT, replay 25%", "CPT, no replay"}
    assert set(table["base"]) == {"new domain", "old domain"}
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    out = capsys.readouterr().out
    assert "Held-out loss" in out and "old domain" in out


def test_default_config_is_valid_and_printable(capsys):
    run = RunConfig.from_dict(__import__("yaml").safe_load(default_config_text()))
    assert run.cpt.replay_ratio > 0 and run.model["tiny_llama"]
    assert main(["default-config"]) == 0
    assert "tiny_llama" in capsys.readouterr().out


@pytest.mark.parametrize(
    "override, message",
    [
        ("cpt.lora_rank=8", "lora_rank.*lora_r"),
        ("trainer.max_steps=3", "Unknown section 'trainer'.*'training'"),
        ("training.max_steps=0", "max_steps"),
        ("cpt.replay_ratio=1.5", "replay_ratio"),
    ],
)
def test_bad_config_fails_fast_with_the_key(tmp_path, capsys, override, message):
    assert main(["train", "--output-dir", str(tmp_path), "--set", override]) == 2
    import re

    assert re.search(message, capsys.readouterr().err)
