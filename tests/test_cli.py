"""The CLI's embedded default, shrunk to seconds: corpora → tokenizer → base → CPT with replay → summary."""

import json

import pytest

from cpt_plugin.cli import main
from cpt_plugin.cli.pipeline import RunConfig, default_config_text
from cpt_plugin.integrations.hf import uninstall_trainer_hooks

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


def test_default_tells_the_readme_story(tmp_path):
    """The story the README tells of the default job, on a shrunk model with enough steps to show it:
    CPT lowers the new domain's held-out loss, and replay forgets less of the old domain than no replay."""
    steps = ["base_pretraining.max_steps=200", "training.max_steps=100", "training.learning_rate=0.005"]
    small = [s for s in SMALL if not s.startswith(("training.max_steps", "base_pretraining.max_steps"))]
    assert (
        main(["train", "--output-dir", str(tmp_path), "--set", *small, *steps, "cpt.eval_every_steps=0"]) == 0
    )
    table = json.loads((tmp_path / "summary.json").read_text())["heldout_loss"]
    new, old = "new domain (stdlib code)", "old domain (stdlib prose)"
    base, replay, no_replay = table["base"], table["CPT, replay 25%"], table["CPT, no replay"]
    assert replay[new] < base[new] and no_replay[new] < base[new]  # the new domain was learned
    assert replay[old] < no_replay[old]  # replay forgets less


def test_embedded_default_end_to_end(tmp_path, capsys):
    """The default job, shrunk: the printed table, summary.json's values, the PNG, adapter + base reload."""
    small = [*SMALL, "training.max_steps=4", "cpt.eval_every_steps=2"]
    assert main(["train", "--output-dir", str(tmp_path), "--set", *small]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    new, old = "new domain (stdlib code)", "old domain (stdlib prose)"
    table = summary["heldout_loss"]
    assert set(table) == {"base", "CPT, replay 25%", "CPT, no replay"}
    assert all(set(row) == {new, old} and all(3 < v < 8 for v in row.values()) for row in table.values())
    curves = summary["heldout_curves"]["CPT, replay 25%"]
    assert [c["step"] for c in curves] == [0, 2, 4]  # the base at step 0, then every 2 steps
    assert curves[0]["new"] == table["base"][new] and curves[-1]["old"] == table["CPT, replay 25%"][old]
    assert [c["tokens_seen"] for c in curves] == [0, 2 * 2 * 64, 4 * 2 * 64]
    out = capsys.readouterr().out
    assert new in out and old in out
    change = table["CPT, replay 25%"][new] - table["base"][new]
    assert f"{table['CPT, replay 25%'][new]:.3f} ({change:+.3f})" in out
    assert str(tmp_path / "summary.json") in out and "held-out loss before training (the base model)" in out
    assert "held-out loss at step 2 (256 tokens seen)" in out
    from PIL import Image

    png = Image.open(tmp_path / "loss_curve.png")
    assert png.size[0] > png.size[1] * 2  # two panels: training loss | held-out loss
    # the adapter names its saved base model, so it reloads (and exports) without the run
    from peft import AutoPeftModelForCausalLM

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "base-model").resolve())
    model = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"))
    assert model.peft_config["default"].r == 4
    assert (tmp_path / "merged" / "model.safetensors").exists()  # the run writes its merged model
    # the replay defaults' domain_shift_ratio: the new domain's own token rows, told in the summary
    shifted = summary["domain_shifted_rows"]
    assert shifted["ratio"] == 4 and 0 < shifted["rows"] < shifted["of"]
    assert f"embeddings:  {shifted['rows']} of {shifted['of']} rows are the new domain's own tokens" in out
    # the other two replay defaults, told in the summary too
    assert summary["replay_recipe"] == {"output_row_projection": 4, "final_step_back": 0.975}
    assert "forgetting:  lm_head updates kept off 4 directions of the old domain" in out
    assert main(["export", str(tmp_path), "--to", "merged", "--out", str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported" / "model.safetensors").exists()


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("cpt-plugin 0.")


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


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.trian=x.txt", r"Unknown run config 'data' key 'trian'\. Did you mean 'train'\?"),
        (
            "model.tiny_llama.hiden_size=8",
            r"'model.tiny_llama' \(LlamaConfig\) key 'hiden_size'.*'hidden_size'",
        ),
        ("model.dtype=bf16", r"'model.dtype': unknown dtype 'bf16'"),
        (
            "training.max_step=3",
            r"'training' \(TrainingArguments\) key 'max_step'\. Did you mean 'max_steps'\?",
        ),
        (
            "base_pretraining.learning_rate=3e-3",
            r"'base_pretraining.learning_rate': expected a number.*write 0\.003 \(or 3\.0e-3\)",
        ),
        ("training.logging_steps=true", r"'training.logging_steps': expected a number, got True"),
        ("data.eval_max_blocks=many", r"'data.eval_max_blocks': expected a whole number, got 'many'"),
        ("tokenizer=gpt2", r"Run config 'tokenizer': expected a mapping"),
        ("compare_without_replay=yes please", r"'compare_without_replay': expected a bool"),
        ("export_merged=sure", r"'export_merged': expected a bool"),
    ],
)
def test_every_section_is_checked_before_anything_runs(tmp_path, capsys, override, message):
    import re

    assert main(["train", "--output-dir", str(tmp_path), "--set", override]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "corpora").exists()  # nothing was written, built or trained


def test_missing_or_bad_data_found_before_base_pretraining(tmp_path, capsys):
    """Was: a missing data.train was found only after base pretraining (minutes in)."""
    out = tmp_path / "out"
    missing = tmp_path / "missing.txt"
    assert main(["train", "--output-dir", str(out), "--set", f"data.train={missing}"]) == 2
    err = capsys.readouterr().err
    assert f"Run config 'data.train': The data source '{missing}' does not exist" in err
    assert not (out / "corpora").exists() and not (out / "base").exists()
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"text": "a"}\n{"body": "b"}\n', encoding="utf-8")
    assert main(["train", "--output-dir", str(out), "--set", f"data.eval_new={bad}"]) == 2
    assert (
        "'data.eval_new': " in (err := capsys.readouterr().err)
        and "line 2 (byte 14) has no field 'text'" in err
    )
    no_replay = ["data.default_corpora=false", f"data.train={bad}", "base_pretraining=null"]
    assert main(["train", "--output-dir", str(out), "--set", *no_replay]) == 2
    assert "'cpt.replay_ratio' is 0.25, but there is no data.replay" in capsys.readouterr().err


def test_readme_reference_matches_the_config_classes():
    """The README's run-config table is generated (python -m cpt_plugin.cli.reference --write README.md)."""
    from pathlib import Path

    from cpt_plugin.cli.reference import END, START, reference_markdown

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = readme.split(START, 1)[1].split(END, 1)[0].strip()
    assert block == reference_markdown(), "run: python -m cpt_plugin.cli.reference --write README.md"


def test_a_user_run_writes_no_merged_copy_unless_asked():
    """A merged 16-bit copy is as big as the model (~14 GB at 7B): only `export_merged: true` writes it
    (the embedded default sets it)."""
    from cpt_plugin.cli.pipeline import RunConfig, default_config_text
    from cpt_plugin.config import load_yaml_mapping

    raw = dict(
        load_yaml_mapping(None, expected="a run config", where="default", text=default_config_text()).data
    )
    assert RunConfig.from_dict(raw).export_merged is True
    raw.pop("export_merged")
    assert RunConfig.from_dict(raw).export_merged is False
