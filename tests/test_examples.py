"""The single-process examples run on the tiny default on CPU (as users would start them)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["hf_trainer.py", "trl_sft.py"])
def test_single_process_example_runs(tmp_path, script):
    if script == "trl_sft.py":
        pytest.importorskip("trl")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)  # a user's CPU run: kernels off by default
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--max-steps", "2", "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert "cpt-plugin: trainable" in result.stdout + result.stderr
    noise = ("Failed to load CPU gemm_4bit", "FutureWarning", "pin_memory", "UserWarning")
    assert not [word for word in noise if word in result.stderr], result.stderr[-3000:]


def test_example_help_writes_nothing(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "hf_trainer.py"), "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert result.returncode == 0 and "--output-dir" in result.stdout
    assert list(tmp_path.iterdir()) == []
