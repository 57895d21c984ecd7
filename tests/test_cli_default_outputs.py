"""What the embedded default shows and leaves behind (issue 11): before/after sample completions, the
evaluator's PNG, and a merged model that reloads with transformers alone and computes the adapter's logits."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import yaml

from cpt_plugin.cli import main
from cpt_plugin.cli.pipeline import default_config_text
from cpt_plugin.integrations.hf import uninstall_trainer_hooks
from tests.test_cli import SMALL

RUNS = ("CPT, replay 25%", "CPT, no replay")


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The shrunk default, run once for the tests below: its folder, stdout and log lines."""
    out = tmp_path_factory.mktemp("default")
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Keep(level=logging.INFO)
    loggers = [logging.getLogger(name) for name in ("cpt_plugin", "cpt_plugin.monitoring.samples")]
    previous = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.INFO)
    logging.getLogger().addHandler(handler)
    import contextlib
    import io

    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            assert main(["train", "--output-dir", str(out), "--set", *SMALL, "training.max_steps=4"]) == 0
    finally:
        logging.getLogger().removeHandler(handler)
        for lg, level in zip(loggers, previous, strict=True):
            lg.setLevel(level)
        uninstall_trainer_hooks()
    return out, stdout.getvalue(), records


def test_default_config_has_prompts_of_both_domains():
    prompts = yaml.safe_load(default_config_text())["cpt"]["sample_prompts"]
    assert 2 <= len(prompts) <= 4
    assert any(p.startswith("def ") for p in prompts)  # the new domain: code
    assert any(p[0].isupper() and not p.startswith("def ") for p in prompts)  # the old one: English


def test_samples_before_and_after_are_streamed_and_summarised(default_run):
    out, stdout, records = default_run
    prompts = yaml.safe_load(default_config_text())["cpt"]["sample_prompts"]
    # streamed through logging while the runs train: the base at the start, the trained model at the end
    assert any(r.startswith("cpt-plugin samples before training (base model") for r in records)
    assert any(r.startswith("cpt-plugin samples after training (step 4") for r in records)
    assert any(r.strip() == f"[1] {prompts[0]}" for r in records)
    # the summary: one row per prompt, the base's completion and each run's
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["samples"]
    assert [row["prompt"] for row in rows] == prompts
    assert all(set(row) == {"prompt", "base", *RUNS} for row in rows)
    assert "Samples (greedy; the base before CPT, each run after it)" in stdout
    assert f"[3] {prompts[2]}" in stdout and "    CPT, no replay   | " in stdout
    assert (out / "samples.md").is_file() and (out / "no-replay" / "samples.md").is_file()
    assert f"samples:     {out / 'samples.md'}" in stdout


def test_evaluator_png_is_written_and_named(default_run):
    out, stdout, _ = default_run
    from PIL import Image

    png = out / "heldout_loss.png"
    assert Image.open(png).size[0] > 0
    assert json.loads((out / "summary.json").read_text())["heldout_plots"][0] == str(png)
    assert f"held-out:    {png}" in stdout


def test_merged_model_reloads_and_computes_the_adapter_logits(default_run):
    """Loaded with transformers alone (no cpt-plugin kernels), against the adapter model reloaded by PEFT.
    The demo model is fp32, so the bound is fp32 summation noise."""
    out, stdout, _ = default_run
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpt_plugin.patching.registry import unpatch

    unpatch()
    merged_dir = out / "merged"
    assert json.loads((out / "summary.json").read_text())["merged"] == str(merged_dir)
    assert f"merged:      {merged_dir}" in stdout
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    adapter = AutoPeftModelForCausalLM.from_pretrained(str(out / "adapter")).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    ids = tokenizer(["def read_lines(path):\n    with open(path) as f:"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want, got = adapter(input_ids=ids).logits, merged(input_ids=ids).logits
    assert float((got - want).norm() / want.norm()) < 1e-5
    # untied, as the default's model (the replay defaults were measured on untied embeddings)
    assert not merged.config.tie_word_embeddings and not (merged_dir / "adapter_config.json").exists()


def test_a_second_run_replaces_the_merged_model_of_the_first(tmp_path):
    """The run owns output_dir/merged: `make default` twice in the same place works; a failed export puts
    the earlier one back."""
    from cpt_plugin.cli.pipeline import _write_merged
    from tests.export.helpers import byte_bpe_tokenizer, cpt_model

    folder = tmp_path / "merged"
    folder.mkdir()
    (folder / "old.txt").write_text("earlier run")
    _write_merged(cpt_model("llama"), byte_bpe_tokenizer(), folder)
    assert (folder / "model.safetensors").is_file() and not (folder / "old.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # nothing left beside it

    from cpt_plugin import CPTConfigError

    with pytest.raises(CPTConfigError, match="merge\\(\\) got a object"):
        _write_merged(object(), None, folder)  # not a model: the export fails
    assert (folder / "model.safetensors").is_file()  # the earlier merged model is back
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]
