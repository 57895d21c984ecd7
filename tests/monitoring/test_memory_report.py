"""The memory report: byte counts of a known tiny model, the table in the log, the PNG, the planner's plan."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from cpt_plugin.monitoring import MemoryReportCallback
from cpt_plugin.monitoring.memory_report import NOT_ON_CPU, Snapshot, format_bytes, format_table
from tests.monitoring.helpers import make_trainer

# tiny_llama (tied, vocab 257, hidden 32, MLP 48, 2 layers, 4 heads of 8, 2 KV heads), fp32:
# embeddings 257*32; per layer q, o 32*32, k, v 32*16, gate, up, down 32*48, two norms 32; final norm 32
BASE_PARAMS = 257 * 32 + 2 * (2 * 1024 + 2 * 512 + 3 * 1536 + 64) + 32  # 23744
# LoRA r=4 on the 7 projections: A (4 x in) + B (out x 4); plus one trained copy of the tied embeddings
LORA_PARAMS = 2 * (256 + 192 + 192 + 256 + 320 + 320 + 320)  # 3712
TRAINED_PARAMS = LORA_PARAMS + 257 * 32


def report_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "cpt_plugin.monitoring.memory_report"]


def test_table_counts_png_and_json(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="cpt_plugin.monitoring")
    trainer = make_trainer(tmp_path)  # memory_report is on by default
    trainer.train()
    tables = [m for m in report_lines(caplog) if m.startswith("cpt-plugin memory on cpu")]
    assert len(tables) == 2  # step 1 and the end, nothing in between
    first, last = tables
    assert first.startswith("cpt-plugin memory on cpu at step 1:")
    for line, value in (
        ("frozen weights", BASE_PARAMS * 4),
        ("trained weights", TRAINED_PARAMS * 4),
        ("gradients", TRAINED_PARAMS * 4),
    ):
        row = next(r for r in first.splitlines() if r.strip().startswith(line))
        assert row.split()[-2:] == format_bytes(value).split()
    assert NOT_ON_CPU in first and "end (step 3)" in last
    out = tmp_path / "out"
    record = json.loads((out / "memory_report.json").read_text())
    column = record["columns"]["step 1"]
    assert column["frozen_weights"] == BASE_PARAMS * 4
    assert column["trained_weights"] == column["gradients"] == TRAINED_PARAMS * 4
    # AdamW: two fp32 moments per trained parameter, plus a step counter per tensor
    assert 2 * TRAINED_PARAMS * 4 <= column["optimizer_states"] <= 2 * TRAINED_PARAMS * 4 + 4 * 64
    assert column["activations"] is None and record["plan"] is None
    assert (out / "memory_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_planner_plan_beside_the_table(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="cpt_plugin.monitoring")
    make_trainer(tmp_path, gradient_checkpointing=True).train()  # checkpointing auto: the memory planner
    first = next(m for m in report_lines(caplog) if m.startswith("cpt-plugin memory on cpu at step 1"))
    assert "memory plan: keep 2, recompute 0, offload 0, tiled MLP 0 for 32 tokens" in first
    record = json.loads((tmp_path / "out" / "memory_report.json").read_text())
    assert record["plan"]["plan"].startswith("keep 2") and record["plan"]["tokens"] == 32


def test_switched_off(tmp_path):
    trainer = make_trainer(tmp_path, cpt={"memory_report": False})
    assert not any(isinstance(c, MemoryReportCallback) for c in trainer.callback_handler.callbacks)
    trainer.train()
    assert not (tmp_path / "out" / "memory_report.png").exists()


def test_cuda_table_rows_and_plan():
    """The layout with allocator statistics (what a GPU run prints), from hand-made snapshots."""
    mib = 2**20
    rows = dict(
        frozen_weights=100 * mib,
        trained_weights=20 * mib,
        gradients=20 * mib,
        optimizer_states=40 * mib,
        buffers=0,
        activations=300 * mib,
        other=5 * mib,
        frozen_weights_host=64 * mib,
        activations_host=128 * mib,
    )
    snapshot = Snapshot(step=1, rows=rows, peak=485 * mib)
    plan = {
        "plan": "keep 10, recompute 4, offload 2, tiled MLP 0",
        "tokens": 8192,
        "predicted_peak": 500.0 * mib,
        "budget": 600.0 * mib,
        "calibrated": True,
    }
    text = format_table("title", {"step 1": snapshot}, "cuda:0", plan)
    assert "activations offloaded to the host" in text and "frozen weights on the host" in text
    assert "peak allocated on cuda:0" in text and "485 MiB" in text and NOT_ON_CPU not in text
    assert "predicted peak 500 MiB (calibrated) of a 600 MiB budget" in text
    # the device rows add up to the measured peak
    device = sum(v for k, v in rows.items() if not k.endswith("_host"))
    assert device == snapshot.peak


@pytest.mark.gpu
def test_cuda_run_measures_activations(tmp_path):
    from transformers import Trainer, TrainingArguments

    from cpt_plugin import CPTCallback
    from tests.tiny import RandomBlocks, tiny_llama

    trainer = Trainer(
        model=tiny_llama(seed=0).cuda(),
        args=TrainingArguments(
            output_dir=str(tmp_path / "out"),
            max_steps=2,
            per_device_train_batch_size=2,
            report_to=[],
            save_strategy="no",
            disable_tqdm=True,
            gradient_checkpointing=True,
        ),
        train_dataset=RandomBlocks(n=8, seed=3),
        callbacks=[CPTCallback(lora_r=4, max_seq_length=16, gradient_checkpointing="offload", kernels=False)],
    )
    trainer.train()
    record = json.loads((tmp_path / "out" / "memory_report.json").read_text())
    column = record["columns"]["step 1"]
    assert column["peak"] > 0 and column["activations"] > 0
    device_rows = (
        "frozen_weights",
        "trained_weights",
        "gradients",
        "optimizer_states",
        "buffers",
        "activations",
        "other",
    )
    assert sum(column[k] for k in device_rows) >= column["peak"]  # "other" is clamped at 0
    assert column["activations_host"] > 0  # the offloaded layer inputs' pinned buffers
    assert torch.cuda.is_available()
