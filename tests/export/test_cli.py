"""`cpt-plugin export RUN_OR_ADAPTER --to merged|gguf`, through run_export."""

from __future__ import annotations

import argparse

import torch

from cpt_plugin.export.cli import add_export_parser, run_export
from tests.export.helpers import byte_bpe_tokenizer, cpt_model
from tests.patching.models import tiny_model


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cpt-plugin")
    add_export_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["export", *argv])


def _run_dir(tmp_path):
    """A run as cpt-plugin writes it: run/adapter with the tokenizer; the base saved locally."""
    from transformers import AutoModelForCausalLM

    tiny_model("qwen3", vocab_size=300).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    model = cpt_model("qwen3")  # same architecture and seed as the saved base
    model.get_base_model().config._name_or_path = str(tmp_path / "base")
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "run" / "adapter")
    byte_bpe_tokenizer().save_pretrained(tmp_path / "run" / "adapter")
    del base
    return tmp_path / "run"


def test_export_merged_then_gguf(tmp_path, capsys):
    run = _run_dir(tmp_path)
    assert run_export(_args(str(run), "--to", "merged")) == 0
    assert (run / "merged" / "config.json").is_file() and (run / "merged" / "tokenizer.json").is_file()
    assert run_export(_args(str(run), "--to", "gguf", "--outtype", "q8_0")) == 0
    assert (run / "model-q8_0.gguf").is_file()
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []  # staging merge removed
    assert run_export(_args(str(run / "merged"), "--to", "gguf", "--out", str(tmp_path / "m.gguf"))) == 0
    assert (tmp_path / "m.gguf").is_file()
    assert "cpt-plugin: exported" in capsys.readouterr().out


def test_export_errors_are_one_line_and_exit_2(tmp_path, capsys):
    run = _run_dir(tmp_path)
    (run / "merged").mkdir()
    assert run_export(_args(str(run), "--to", "merged")) == 2
    assert "already exists" in capsys.readouterr().err
    assert run_export(_args(str(tmp_path / "nowhere"), "--to", "gguf")) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert (
        run_export(_args(str(run), "--to", "merged", "--out", str(tmp_path / "x"), "--base", "/no/base")) == 2
    )
    assert "not a local model directory" in capsys.readouterr().err


def test_console_entry_point_runs_export(tmp_path):
    """`cpt-plugin export ...` goes through cpt_plugin.cli.main, the console script."""
    from cpt_plugin.cli import main

    run = _run_dir(tmp_path)
    assert main(["export", str(run), "--to", "merged", "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_export_prints_no_warning_looking_lines(tmp_path, caplog, monkeypatch):
    """Was: "[transformers] The following layers were not sharded: ..." on every load (transformers checks the
    tensor-parallel plan when transformers.modeling_utils' own level is WARNING, which the CLI set) and
    huggingface_hub's "Model weights successfully saved to <the temporary folder>!"."""
    import logging

    import transformers.modeling_utils as modeling_utils

    checked: list = []
    original = modeling_utils.verify_tp_plan
    monkeypatch.setattr(modeling_utils, "verify_tp_plan", lambda *a: checked.append(a) or original(*a))
    monkeypatch.setattr(logging.getLogger("transformers.modeling_utils"), "level", logging.NOTSET)
    run = _run_dir(tmp_path)
    with caplog.at_level(logging.INFO):
        assert run_export(_args(str(run), "--to", "merged")) == 0
    assert checked == []
    assert not [r for r in caplog.records if "successfully saved" in r.getMessage()]
