"""CPT_PLUGIN=1 + the installed package: an unmodified Trainer script gets the CPT set-up."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cpt_plugin.integrations.auto import switch_on

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {root!r})
    from transformers import Trainer, TrainingArguments
    from tests.tiny import RandomBlocks, tiny_llama

    trainer = Trainer(model=tiny_llama(), train_dataset=RandomBlocks(n=8),
                      args=TrainingArguments(output_dir={out!r}, max_steps=1, report_to=[], use_cpu=True,
                                             per_device_train_batch_size=4, save_strategy="no"))
    trainer.train()
    print(json.dumps({{"model": type(trainer.model).__name__,
                       "groups": sorted(g.get("cpt_group", "-") for g in trainer.optimizer.param_groups),
                       "r": trainer.model.peft_config["default"].r if hasattr(trainer.model, "peft_config") else None}}))
    """
)


def _installed() -> bool:
    import importlib.metadata

    try:
        files = importlib.metadata.distribution("cpt-plugin").files or []
    except importlib.metadata.PackageNotFoundError:
        return False
    return any(str(f).endswith("cpt_plugin_autoactivate.pth") for f in files)


def _run(tmp_path, **env):
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT.format(root=str(ROOT), out=str(tmp_path / "out")))
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CPT_PLUGIN")}
    environ.update(env)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=environ, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_switch_values():
    assert switch_on({"CPT_PLUGIN": "1"}) and switch_on({"CPT_PLUGIN": "true"})
    assert not switch_on({}) and not switch_on({"CPT_PLUGIN": "0"})


@pytest.mark.skipif(
    not _installed(), reason="needs `pip install -e .` (make install) for the .pth start-up hook"
)
def test_unmodified_script_gets_cpt_with_switch_and_config(tmp_path):
    config = tmp_path / "cpt.yaml"
    config.write_text("lora_r: 4\n")
    result = _run(tmp_path, CPT_PLUGIN="1", CPT_PLUGIN_CONFIG=str(config))
    assert result["model"] == "PeftModelForCausalLM" and result["r"] == 4
    assert {"lora", "embeddings"} <= set(result["groups"])


@pytest.mark.skipif(
    not _installed(), reason="needs `pip install -e .` (make install) for the .pth start-up hook"
)
def test_without_switch_nothing_changes(tmp_path):
    result = _run(tmp_path)
    assert result["model"] == "LlamaForCausalLM" and result["groups"] == ["-", "-"]


# --- auto-activation never breaks a program it cannot serve ------------------------------------------
ROBUST_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, {root!r})
    from transformers import Trainer, TrainingArguments  # a bad CPT_PLUGIN_CONFIG must not fail here
    from tests.tiny import RandomBlocks, tiny_llama

    def args(name):
        return TrainingArguments(output_dir=os.path.join({out!r}, name), max_steps=1, report_to=[], use_cpu=True,
                                 per_device_train_batch_size=4, save_strategy="no")

    out = {{"imported": True, "errors": {{}}}}
    for name, path in {configs!r}:
        os.environ["CPT_PLUGIN_CONFIG"] = path
        try:
            Trainer(model=tiny_llama(), train_dataset=RandomBlocks(n=8), args=args(name))
            out["errors"][name] = None
        except Exception as error:
            out["errors"][name] = [type(error).__name__, str(error)]
    os.environ.pop("CPT_PLUGIN_CONFIG")

    import torch
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForSequenceClassification

    class Labelled(RandomBlocks):
        def __getitem__(self, index):
            return {{"input_ids": self.blocks[index], "labels": torch.tensor(index % 2)}}

    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=257, pad_token_id=0)
    for run in range(2):  # two Trainers: still one notice
        trainer = Trainer(model=LlamaForSequenceClassification(config), train_dataset=Labelled(n=8),
                          args=args("seqcls"))
        trainer.train()
    out["seqcls"] = type(trainer.model).__name__
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, vocab_size=257))
    out["bert"] = type(Trainer(model=bert, args=args("bert")).model).__name__
    print(json.dumps(out))
    """
)


@pytest.mark.skipif(
    not _installed(), reason="needs `pip install -e .` (make install) for the .pth start-up hook"
)
def test_bad_config_errors_at_trainer_and_unservable_trainers_left_untouched(tmp_path):
    typo = tmp_path / "typo.yaml"
    typo.write_text("lora_r: 4\nlora_alhpa: 8\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("lora_r: 4\nschedule: [cosine\n")
    configs = [("typo", str(typo)), ("missing", str(tmp_path / "missing.yaml")), ("broken", str(broken))]
    script = tmp_path / "user_script.py"
    script.write_text(ROBUST_SCRIPT.format(root=str(ROOT), out=str(tmp_path / "out"), configs=configs))
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CPT_PLUGIN")}
    environ.update(CPT_PLUGIN="1", CPT_PLUGIN_CONFIG=str(typo))  # bad from the start: import must work
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=environ, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    errors = out["errors"]
    assert errors["typo"][0] == "CPTConfigError"
    assert str(typo) in errors["typo"][1] and "line 2" in errors["typo"][1]
    assert "'lora_alhpa'" in errors["typo"][1] and "Did you mean 'lora_alpha'" in errors["typo"][1]
    assert errors["missing"][0] == "CPTConfigError" and "no such file" in errors["missing"][1]
    assert errors["broken"][0] == "CPTConfigError" and "not valid YAML" in errors["broken"][1]
    assert all("unset CPT_PLUGIN_CONFIG" in error[1] for error in errors.values())
    # unservable Trainers run untouched, with one notice each saying why and how to silence it
    assert out["seqcls"] == "LlamaForSequenceClassification" and out["bert"] == "BertModel"
    notices = [line for line in result.stderr.splitlines() if "leaves this Trainer untouched" in line]
    assert len(notices) == 2, notices
    assert "LlamaForSequenceClassification is not a causal language model" in notices[0]
    assert "BertModel is not a causal language model" in notices[1]
    assert all("Unset CPT_PLUGIN to silence this notice" in line for line in notices)


def test_unservable_reasons():
    """In-process: which Trainers auto-activation leaves alone, and why (no subprocess needed)."""
    from peft import LoraConfig, get_peft_model

    from cpt_plugin.integrations.auto import unservable_reason
    from tests.tiny import tiny_llama

    class DPOTrainer:  # stands in for TRL's: judged by the module it comes from
        __module__ = "trl.trainer.dpo_trainer"

    class SFTTrainer:
        __module__ = "trl.trainer.sft_trainer"

    plain = object()
    assert unservable_reason(plain, {"model": tiny_llama()}) is None
    assert unservable_reason(SFTTrainer(), {"model": tiny_llama()}) is None
    assert "not a continued-pretraining trainer" in unservable_reason(DPOTrainer(), {"model": tiny_llama()})
    assert "model_init" in unservable_reason(plain, {"model": None})
    assert "own peft_config" in unservable_reason(plain, {"model": tiny_llama(), "peft_config": object()})
    adapted = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    assert "already carries a PEFT adapter" in unservable_reason(plain, {"model": adapted})
