"""CPTPlugin for Axolotl.

Two parts: the precedence rules (pure Python, main environment), and the real thing: Axolotl pins older
transformers/peft/trl, so it lives in its own virtual environment (``.venv-axolotl``, created here when
missing) where ``axolotl_env/run_axolotl_checks.py`` loads the plugin through Axolotl's PluginManager and
runs a two-step ``axolotl.train`` on a tiny local Llama.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cpt_plugin.config import CPTConfigError
from cpt_plugin.integrations.axolotl import PLUGIN_NAME, check_config
from cpt_plugin.integrations.axolotl_settings import resolve_settings

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv-axolotl"
CHECKS = Path(__file__).parent / "axolotl_env" / "run_axolotl_checks.py"
NETWORK_ERRORS = (
    "Could not find a version",
    "No matching distribution",
    "NewConnectionError",
    "Temporary failure",
)


def _cfg(**extra):
    return {"plugins": [PLUGIN_NAME], "sequence_len": 256, **extra}


# --- precedence rules (no Axolotl needed) ---------------------------------------------------------------
def test_cpt_block_builds_config_and_follows_axolotl_data_settings():
    out, config, notes = resolve_settings(_cfg(cpt={"lora_r": 16, "schedule": "wsd"}))
    assert (config.lora_r, config.schedule, config.max_seq_length) == (16, "wsd", 256)
    assert out["adapter"] == "cpt" and out["lora_r"] == 16 and out["peft_use_rslora"] is True
    assert out["cpt"]["lora_r"] == 16
    assert any("adapter: (unset) → cpt" in n for n in notes)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"cpt": {"lora_rr": 8}}, "Did you mean 'lora_r'"),
        ({"cpt": {"schedule": "cosin"}}, "Did you mean 'cosine'"),
        ({"cpt": {"lora_r": -1}}, "'lora_r'"),
        ({"cpt": ["lora_r"]}, "must be a mapping"),
        ({"cpt_lora_r": 8}, "under the 'cpt:' mapping"),
        ({"adapter": "qlora"}, "adapter: qlora cannot be combined"),
        ({"cpt": {"replay_ratio": 0.1}}, "another entry of datasets"),
        ({"cpt": {"domain_shift_ratio": 4}}, "Remove it from the cpt: block"),
    ],
)
def test_bad_input_is_a_clear_error(extra, needle):
    with pytest.raises(CPTConfigError, match=None) as info:
        resolve_settings(_cfg(**extra))
    assert needle in str(info.value)


def test_our_keys_without_the_plugin_line():
    with pytest.raises(CPTConfigError) as info:
        check_config({"cpt": {"lora_r": 8}, "adapter": "lora"})
    assert PLUGIN_NAME in str(info.value) and "plugins:" in str(info.value)
    assert check_config({"adapter": "lora"}) == []  # a plain Axolotl config is none of our business


@pytest.mark.parametrize(
    ("extra", "expect", "needle"),
    [
        ({"lora_modules_to_save": ["embed_tokens"]}, {"lora_modules_to_save": None}, "cpt.train_embeddings"),
        ({"lora_modules_to_save": ["embed_tokens", "lm_head"]}, {"lora_modules_to_save": None}, None),
        ({"peft_use_rslora": False}, {"peft_use_rslora": True}, "cpt.use_rslora=True wins"),
        ({"embedding_lr_scale": 0.5}, {"embedding_lr_scale": None}, "cpt.embedding_lr_ratio=0.1 wins"),
        ({"embedding_lr_scale": 0.1}, {"embedding_lr_scale": None}, None),
        (
            {"embedding_lr": 1e-6, "learning_rate": 1e-4},
            {"embedding_lr": None},
            "embedding_lr: 1e-06 ignored",
        ),
        (
            {"gradient_checkpointing": "offload"},
            {"gradient_checkpointing": True, "activation_offloading": False},
            "(→ offload) wins",
        ),
        (
            {"gradient_checkpointing": True, "activation_offloading": True},
            {"gradient_checkpointing": True, "activation_offloading": False},
            "activation_offloading: True (Axolotl's activation offloading) turned off",
        ),
        (
            {"gradient_checkpointing": True, "cpt": {"gradient_checkpointing": "off"}},
            {"gradient_checkpointing": False},
            "cpt.gradient_checkpointing=off wins",
        ),
        ({"adapter": "lora", "lora_r": 16}, {"adapter": "cpt", "lora_r": 128}, "lora_r: 16 ignored"),
        ({"lr_scheduler": "linear"}, {}, "cpt.schedule=cosine wins"),
        ({"lr_scheduler": "linear", "cpt": {"schedule": "none"}}, {}, None),
        ({"optimizer": "muon"}, {}, "cpt-plugin builds AdamW"),
        ({"loraplus_lr_ratio": 16}, {"loraplus_lr_ratio": None}, "LoRA+"),
    ],
)
def test_overlapping_axolotl_settings_cpt_wins_with_a_message(extra, expect, needle):
    out, _, notes = resolve_settings(_cfg(**extra))
    for key, value in expect.items():
        assert out[key] == value, (key, out[key])
    relevant = [n for n in notes if not n.startswith("adapter: (unset)")]
    if needle is None:
        assert not relevant, relevant
    else:
        assert any(needle in n for n in relevant), relevant


def test_check_config_reads_the_example_yaml():
    messages = check_config(ROOT / "examples" / "axolotl_cpt.yaml")
    assert not any("ignored" in m for m in messages), messages


# --- the real Axolotl -------------------------------------------------------------------------------------
def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as error:
        pytest.fail(
            f"{' '.join(cmd[:5])} took over {timeout:.0f} s (a busy machine or a slow index?): {error}"
        )


def _ensure_venv() -> Path:
    """Creates or refreshes .venv-axolotl (torch pinned to the main environment's build, cpt-plugin editable)."""
    python = VENV / "bin" / "python"
    probe = [str(python), "-c", "import axolotl, cpt_plugin; print(cpt_plugin.__file__)"]
    lock_dir = ROOT / ".venv-axolotl-lock"  # a folder: .gitignore's ".venv-*/" covers it
    lock_dir.mkdir(exist_ok=True)
    with open(lock_dir / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if python.exists():
            result = _run(probe, 120)
            if result.returncode == 0 and str(ROOT) in result.stdout:
                return python
        import torch

        torch_pin = "torch==" + torch.__version__.split("+")[0]
        steps = []
        if not python.exists():
            steps.append([sys.executable, "-m", "venv", str(VENV)])
        # --no-compile: no .pyc for the 2.6 GB Axolotl brings (the few modules it imports compile on import)
        pip = [str(python), "-m", "pip", "install", "-q", "--no-compile"]
        steps += [
            [*pip, torch_pin],
            [*pip, "axolotl", "pluggy", torch_pin],  # pluggy: cpt-plugin's registry
            [*pip, "--no-deps", "-e", str(ROOT)],
        ]
        for step in steps:
            result = _run(step, 900)
            if result.returncode != 0:
                text = result.stdout + result.stderr
                if any(e in text for e in NETWORK_ERRORS):
                    pytest.skip(f"cannot install Axolotl here (no package index?): {text[-400:]}")
                pytest.fail(f"creating {VENV} failed at {' '.join(step[2:5])}:\n{text[-3000:]}")
        result = _run(probe, 120)
        assert result.returncode == 0 and str(ROOT) in result.stdout, result.stdout + result.stderr
    return python


@pytest.fixture(scope="module")
def axolotl_report(tmp_path_factory) -> dict:
    python = _ensure_venv()
    work = tmp_path_factory.mktemp("axolotl")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "CPT_PLUGIN")}
    env["TRITON_INTERPRET"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run(
        [str(python), str(CHECKS), str(work)], capture_output=True, text=True, timeout=600, cwd=work, env=env
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("CPT_AXOLOTL_REPORT ")]
    assert lines, f"no report (rc={result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    report = json.loads(lines[-1].split(" ", 1)[1])
    assert "crash" not in report, report["crash"] + "\n" + result.stderr[-3000:]
    return report


def test_axolotl_versions(axolotl_report):
    versions = axolotl_report["versions"]
    assert versions["torch"].split("+")[0] == __import__("torch").__version__.split("+")[0], versions


@pytest.mark.parametrize(
    "name",
    [
        "typo_key",
        "bad_value",
        "stray_prefixed_key",
        "qlora_adapter",
        "keys_without_plugin",
        "precedence",
        "message[adapter: lora]",
        "message[lora_r: 4]",
        "message[peft_use_rslora]",
        "message[lora_modules_to_save]",
        "message[embedding_lr_scale]",
        "message[gradient_checkpointing: offload]",
        "model_prepared_by_cpt_plugin",
        "callback_attached",
        "param_groups",
        "cpt_schedule",
        "rslora_scale",
        "modules_to_save",
        "message[optimizer: muon]",
        "checkpointing_on",
        "trained_steps",
        "cpt_metrics_logged",
        "adapter_saved",
    ],
)
def test_axolotl_check(axolotl_report, name):
    result = axolotl_report["checks"].get(name)
    assert result is not None, f"check {name} did not run; ran: {sorted(axolotl_report['checks'])}"
    assert result["ok"], result
