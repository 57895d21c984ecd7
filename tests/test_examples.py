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
    assert "cpt-plugin: trainable" in result.stdout
