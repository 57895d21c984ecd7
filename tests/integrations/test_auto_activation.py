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
