"""The multi-GPU check on the CPU: 2 processes (gloo) through the real ``accelerate launch`` of
benchmarks/distributed/train.py, under DDP and FSDP2, against one process with the same global batch.

fp32 on the CPU: the per-step losses agree to ~1e-7 (checked at 1e-5). The kernels are patched in
(``--kernels on``) but run their PyTorch fallbacks (TRITON_INTERPRET unset: the interpreter would take
seconds per step), so the patched model code runs under each engine, the fused loss's direct read of the
LM head's weight under FSDP2 included. FSDP2 runs through train.py's
CPU shim (accelerate 1.15 only enables FSDP for GPU-type devices; torch's fully_shard works with gloo),
so the Trainer's real FSDP2 path runs: accelerate's fsdp2_prepare_model and the optimizer's parameters
switched to the sharded DTensors. DeepSpeed needs a GPU here: it runs in benchmarks/multi_gpu_check.sh.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.distributed import compare

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "benchmarks" / "distributed" / "train.py"
ARGS = ["--cpu", "--steps", "4", "--seq-len", "32", "--global-batch", "4", "--lora-r", "4", "--kernels", "on"]
WORLD = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    skip = ("ACCELERATE_", "FSDP_", "TRITON_INTERPRET")
    env = {k: v for k, v in os.environ.items() if not k.startswith(skip)}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    return env


def _launch(config: str, out: Path) -> dict:
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "benchmarks" / "distributed" / f"{config}.yaml"),
        "--num_processes", str(WORLD), "--main_process_port", str(_free_port()), "--mixed_precision", "no",
        str(TRAIN), *ARGS, "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """single (one process), ddp and fsdp2 (two each): the launches first, so that no accelerate state of
    the in-process reference can leak into them."""
    tmp = tmp_path_factory.mktemp("dist")
    out = {name: _launch(name, tmp / f"{name}.json") for name in ("ddp", "fsdp2")}
    proc = subprocess.run(
        [sys.executable, str(TRAIN), *ARGS, "--out", str(tmp / "single.json")],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out["single"] = json.loads((tmp / "single.json").read_text())
    return out


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_two_processes_match_one_with_the_same_global_batch(runs, engine):
    run, ref = runs[engine], runs["single"]
    assert run["engine"] == engine and run["world_size"] == WORLD and ref["world_size"] == 1
    assert run["per_device_batch"] * WORLD == ref["per_device_batch"] == 4
    result = compare.check_run(run, ref)
    assert result["problems"] == [], result["problems"]
    assert result["same_batches"] and result["gathered"]
    assert all(run["kernels"]["patched"][k] for k in compare.KERNEL_MODULES)
    torch.testing.assert_close(run["loss"], ref["loss"], rtol=1e-5, atol=0)
    assert ref["loss"][-1] < ref["loss"][0]  # it trains
    # the ranks saw different rows with different losses, so "gathered" is a real check
    assert all(abs(a - b) > 1e-3 for a, b in zip(*run["rank_losses"], strict=True))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_embedding_group_survives_preparation(runs, engine):
    groups = {g["cpt_group"]: g for g in runs[engine]["param_groups"]}
    assert groups["embeddings"]["initial_lr"] == pytest.approx(groups["lora"]["initial_lr"] / 10)
    assert groups["embeddings"]["numel"] == runs["single"]["param_groups"][1]["numel"] > 0
    if engine == "fsdp2":
        assert runs[engine]["cpu_fsdp_shim"] and runs[engine]["wrapped_model"].startswith("FSDP")
        for group in groups.values():  # the optimizer steps the sharded parameters the model uses
            assert group["dtensors"] == group["tensors"] and group["local_numel"] < group["numel"]
        per_rank = runs[engine]["param_groups_local_numel_per_rank"]
        assert [sum(x) for x in zip(*per_rank, strict=True)] == [
            g["numel"] for g in runs[engine]["param_groups"]
        ]
    log = runs[engine]
    assert log["embedding_learning_rate"] == pytest.approx([x / 10 for x in log["learning_rate"]])


def test_compare_passes_and_catches_faults(runs, tmp_path):
    for name, run in runs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(run))
    (tmp_path / "deepspeed_zero2.json").write_text(json.dumps({"label": "ds", "unavailable": "no GPU"}))
    assert compare.main([str(tmp_path), "--out", str(tmp_path / "summary.md")]) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "**Overall: PASS**" in summary and "unavailable: no GPU" in summary

    ref = runs["single"]
    broken = copy.deepcopy(runs["ddp"])
    broken["loss"][-1] *= 1.001  # beyond the fp32 tolerance
    assert any("loss differs" in p for p in compare.check_run(broken, ref)["problems"])
    broken = copy.deepcopy(runs["ddp"])
    broken["loss"] = [r[0] * WORLD for r in zip(*broken["rank_losses"], strict=True)]  # rank 0's loss only
    assert any("global loss" in p for p in compare.check_run(broken, ref)["problems"])
    broken = copy.deepcopy(runs["fsdp2"])
    broken["param_groups"] = [g for g in broken["param_groups"] if g["cpt_group"] != "embeddings"]
    assert any("parameter group" in p for p in compare.check_run(broken, ref)["problems"])
    broken = copy.deepcopy(runs["ddp"])
    broken["rank_row_hashes"][1][0][0] += 1
    assert any("batches differ" in p for p in compare.check_run(broken, ref)["problems"])
    failed = {"label": "fsdp2_offload", "failed": "timed out"}
    _, ok = compare.report([ref, runs["ddp"], failed])
    assert not ok


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
def test_multi_gpu_check_script_dry_run_on_cpu(tmp_path):
    """The lead's 2-GPU script end to end on the CPU (DEVICE=cpu: tiny model, gloo): stages, files, verdict."""
    env = _env() | {
        "DEVICE": "cpu",
        "STAGES": "single ddp",
        "TOTAL_BUDGET": "200",
        "TRAIN_ARGS": "--steps 2 --seq-len 32 --global-batch 4 --lora-r 4",
        "OUT": str(tmp_path),
        "PYTHON": sys.executable,
        "MASTER_PORT_BASE": str(_free_port()),  # not the script's fixed default: two suites may run at once
    }
    script = ROOT / "benchmarks" / "multi_gpu_check.sh"
    proc = subprocess.run(
        ["bash", str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=280
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name for p in tmp_path.iterdir()} >= {"single.json", "ddp.json", "summary.md", "stages.log"}
    summary = (tmp_path / "summary.md").read_text()
    assert "| ddp | ddp | 2 |" in summary and "**Overall: PASS**" in summary
