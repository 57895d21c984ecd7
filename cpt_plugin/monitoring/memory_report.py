"""Where a run's memory goes: a table at the first step and at the end, and a PNG chart of both.

Rows (bytes, counted once per storage, so tied weights count once):

- frozen and trained weights, buffers: counted from the model's tensors, by where they live (the training
  device, or the host for weights moved off it, e.g. ``offload_embeddings``);
- gradients: the trainable parameters' ``.grad`` after the first backward (``on_pre_optimizer_step``,
  before the guard may drop a bad step's gradients);
- optimizer states: every tensor in ``optimizer.state`` after the first optimizer step;
- activations and temporaries (CUDA only): the step's peak of allocated memory minus what was allocated
  right after backward; "other" is what was allocated after backward beyond the counted tensors, so the
  device rows add up to the measured peak. Without CUDA there are no allocator statistics: activations
  are not measured and the table says so;
- activations offloaded to the host: the pinned buffers held by offloaded checkpointing's pool
  (``offload.checkpointing.offload_pool_stats``).

The first table covers the first step of ``train()``; the last one the step with the highest peak so far
(the weights and states counted at the end). When the memory planner runs (``gradient_checkpointing:
auto``), its plan, predicted peak and budget are printed beside the table and drawn on the chart.
Costs: a pass over the parameters at the first step and at the end, two allocator reads per step.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

JSON_NAME = "memory_report.json"
PNG_NAME = "memory_report.png"
NOT_ON_CPU = "activations: not measured without CUDA (no allocator statistics)"

# Row keys in table order, with their labels.
ROWS = {
    "frozen_weights": "frozen weights",
    "trained_weights": "trained weights",
    "gradients": "gradients",
    "optimizer_states": "optimizer states",
    "buffers": "buffers",
    "activations": "activations and temporaries",
    "other": "other (allocated after backward)",
    "frozen_weights_host": "frozen weights on the host",
    "trained_weights_host": "trained weights on the host",
    "activations_host": "activations offloaded to the host",
}
DEVICE_ROWS = ("frozen_weights", "trained_weights", "gradients", "optimizer_states", "buffers")


def format_bytes(count: float) -> str:
    """Bytes for a reader: 3 significant digits in B, KiB, MiB or GiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(count) >= size:
            return f"{count / size:.3g} {unit}"
    return f"{int(count)} B"


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2), or the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def _unique_bytes(tensors: Any, seen: set[tuple[str, int]]) -> dict[str, int]:
    """Bytes of ``tensors`` by device type ("cuda", "cpu", ...), each storage counted once across ``seen``."""
    out: dict[str, int] = {}
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor):
            continue
        tensor = _local(tensor)
        if tensor.device.type == "meta":
            continue
        key = (str(tensor.device), tensor.data_ptr())
        if key[1] and key in seen:
            continue
        seen.add(key)
        out[tensor.device.type] = out.get(tensor.device.type, 0) + tensor.numel() * tensor.element_size()
    return out


def count_model(model: torch.nn.Module) -> dict[str, dict[str, int]]:
    """Frozen weights, trained weights and buffers of ``model``, in bytes by device type."""
    seen: set[tuple[str, int]] = set()
    params = list(model.parameters())
    return {
        "trained_weights": _unique_bytes((p for p in params if p.requires_grad), seen),
        "frozen_weights": _unique_bytes((p for p in params if not p.requires_grad), seen),
        "buffers": _unique_bytes(model.buffers(), seen),
    }


def count_gradients(model: torch.nn.Module) -> dict[str, int]:
    return _unique_bytes((p.grad for p in model.parameters() if p.grad is not None), set())


def count_optimizer_states(optimizer: Any) -> dict[str, int]:
    tensors = [
        value
        for state in getattr(optimizer, "state", {}).values()
        if isinstance(state, dict)
        for value in state.values()
    ]
    return _unique_bytes(tensors, set())


@dataclass
class Snapshot:
    """One column of the report: bytes per row (None: not measured), the step and the measured peak."""

    step: int
    rows: dict[str, int | None] = field(default_factory=dict)
    peak: int | None = None  # peak allocated on the device (CUDA)


def plan_summary(planner: Any) -> dict[str, Any] | None:
    """The memory planner's plan, predicted peak and budget (bytes), or None without a planner."""
    if planner is None:
        return None
    return {
        "plan": planner.plan.describe(),
        "tokens": int(planner.tokens),
        "predicted_peak": float(planner.predicted) if planner.tokens and planner.predicted > 0 else None,
        "budget": float(planner.budget) if planner.budget is not None else None,
        "calibrated": bool(planner.calibrated),
    }


def format_table(title: str, columns: dict[str, Snapshot], device: str, plan: dict[str, Any] | None) -> str:
    """The report as aligned text lines (what the log shows)."""
    names = list(columns)
    keys = [
        key
        for key in ROWS
        if key in DEVICE_ROWS or any(columns[n].rows.get(key) not in (None, 0) for n in names)
    ]
    cells = {
        key: [format_bytes(v) if (v := columns[n].rows.get(key)) is not None else "-" for n in names]
        for key in keys
    }
    cuda = any(columns[n].peak is not None for n in names)
    if cuda:
        cells["peak"] = [format_bytes(columns[n].peak or 0) for n in names]
    labels = {**ROWS, "peak": f"peak allocated on {device}"}
    width = max(len(labels[k]) for k in cells) + 2
    col = max(12, *(len(n) for n in names), *(len(c) for row in cells.values() for c in row)) + 2
    lines = [title, "  " + "".ljust(width) + "".join(n.rjust(col) for n in names)]
    for key, row in cells.items():
        lines.append("  " + labels[key].ljust(width) + "".join(c.rjust(col) for c in row))
    if not cuda:
        lines.append(f"  {NOT_ON_CPU}")
    if plan is not None:
        text = f"  memory plan: {plan['plan']}"
        if plan["tokens"]:
            text += f" for {plan['tokens']} tokens"
        if plan["predicted_peak"] is not None:
            state = "calibrated" if plan["calibrated"] else "uncalibrated"
            text += f"; predicted peak {format_bytes(plan['predicted_peak'])} ({state})"
        if plan["budget"] is not None:
            text += f" of a {format_bytes(plan['budget'])} budget"
        lines.append(text)
    return "\n".join(lines)


def plot_report(
    columns: dict[str, Snapshot], plan: dict[str, Any] | None, path: str, device: str
) -> str | None:
    """A stacked horizontal bar per column; the planner's predicted peak and budget as lines.

    Uses matplotlib's object API with the Agg canvas, so the process-wide backend (a notebook's) is left
    alone. None when matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    names = list(columns)
    keys = [k for k in ROWS if any(columns[n].rows.get(k) for n in names)]
    figure = Figure(figsize=(8, 2.2 + 0.5 * len(names)))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    largest = max(
        [sum(columns[n].rows.get(k) or 0 for k in keys) for n in names]
        + [columns[n].peak or 0 for n in names]
    )
    unit, scale = next(((u, b) for u, b in (("GiB", 2**30), ("MiB", 2**20)) if largest >= b), ("KiB", 2**10))
    left = [0.0] * len(names)
    for index, key in enumerate(keys):
        widths = [(columns[n].rows.get(key) or 0) / scale for n in names]
        hatch = "//" if key.endswith("_host") else None
        ax.barh(names, widths, left=left, label=ROWS[key], color=f"C{index}", hatch=hatch, edgecolor="white")
        left = [a + b for a, b in zip(left, widths, strict=True)]
    if plan is not None and plan["predicted_peak"] is not None:
        ax.axvline(
            plan["predicted_peak"] / scale, color="black", linestyle="--", label="planner: predicted peak"
        )
    if plan is not None and plan["budget"] is not None:
        ax.axvline(plan["budget"] / scale, color="red", linestyle=":", label="planner: budget")
    ax.invert_yaxis()
    host = any(k.endswith("_host") for k in keys)
    ax.set_xlabel(unit + (" (hatched: on the host)" if host else ""))
    cuda = any(columns[n].peak is not None for n in names)
    ax.set_title(f"cpt-plugin memory on {device}" + ("" if cuda else f"\n({NOT_ON_CPU})"), fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


class MemoryReportCallback(TrainerCallback):
    """Measures at the first step and every step's peak; logs a table at step 1 and at the end, with a PNG."""

    def __init__(self) -> None:
        self._first: Snapshot | None = None
        self._gradients: dict[str, int] | None = None
        self._after_backward: int | None = None  # allocated right after this step's backward (CUDA)
        self._peak: int | None = None  # highest peak of the run, and allocated after backward at that step
        self._peak_after_backward: int | None = None
        self._peak_step = 0
        self._host_activations = 0
        self.device = "cpu"

    # --- measuring -----------------------------------------------------------------------------
    @staticmethod
    def _cuda_device(model: Any) -> torch.device | None:
        if not torch.cuda.is_available() or model is None:
            return None
        for param in model.parameters():
            if param.device.type == "cuda":
                return param.device
        return None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._first, self._gradients, self._peak = None, None, None
        cuda = self._cuda_device(model)
        self.device = str(cuda) if cuda is not None else "cpu"
        return control

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None:
            return control
        if self._gradients is None:
            self._gradients = count_gradients(model)
        cuda = self._cuda_device(model)
        if cuda is not None:
            self._after_backward = torch.cuda.memory_allocated(cuda)
        return control

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            return control
        from cpt_plugin.offload.checkpointing import offload_pool_stats

        self._host_activations = max(self._host_activations, int(offload_pool_stats()["bytes"]))
        cuda = self._cuda_device(model)
        if cuda is not None:
            peak = torch.cuda.max_memory_allocated(cuda)
            if self._peak is None or peak > self._peak:
                self._peak, self._peak_after_backward, self._peak_step = (
                    peak,
                    self._after_backward,
                    state.global_step,
                )
        if self._first is None:
            self._first = self._snapshot(
                model, optimizer, state.global_step, self._peak, self._after_backward
            )
            if state.is_world_process_zero:
                logger.info(self._table({f"step {state.global_step}": self._first}, model))
        return control

    def _snapshot(
        self, model: Any, optimizer: Any, step: int, peak: int | None, after_backward: int | None
    ) -> Snapshot:
        counted = count_model(model)
        counted["gradients"] = dict(self._gradients or {})
        counted["optimizer_states"] = count_optimizer_states(optimizer)
        on_device = "cuda" if self.device != "cpu" else "cpu"
        rows: dict[str, int | None] = {key: counted[key].get(on_device, 0) for key in DEVICE_ROWS}
        if on_device == "cuda":
            rows["frozen_weights_host"] = counted["frozen_weights"].get("cpu", 0)
            rows["trained_weights_host"] = counted["trained_weights"].get("cpu", 0)
        rows["activations_host"] = self._host_activations
        if peak is not None and after_backward is not None:
            rows["activations"] = max(peak - after_backward, 0)
            rows["other"] = max(after_backward - sum(rows[k] or 0 for k in DEVICE_ROWS), 0)
        else:
            rows["activations"] = None
        return Snapshot(step=step, rows=rows, peak=peak)

    # --- reporting -------------------------------------------------------------------------------
    def _table(self, columns: dict[str, Snapshot], model: Any) -> str:
        from cpt_plugin.offload.planner import find_planner

        return format_table(
            f"cpt-plugin memory on {self.device} at {' and at the '.join(columns)}:",
            columns,
            self.device,
            plan_summary(find_planner(model)),
        )

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self._first is None or model is None:
            return control
        from cpt_plugin.offload.planner import find_planner

        peak_step = self._peak_step or state.global_step
        last = self._snapshot(model, optimizer, peak_step, self._peak, self._peak_after_backward)
        end = "peak" if last.peak is not None else "end"
        columns = {f"step {self._first.step}": self._first, f"{end} (step {peak_step})": last}
        if not state.is_world_process_zero:
            return control
        plan = plan_summary(find_planner(model))
        logger.info(self._table(columns, model))
        if args.output_dir:
            os.makedirs(args.output_dir, exist_ok=True)
            record = {
                "device": self.device,
                "columns": {name: {"step": s.step, "peak": s.peak, **s.rows} for name, s in columns.items()},
                "plan": plan,
            }
            json_path = os.path.join(args.output_dir, JSON_NAME)
            with open(json_path, "w", encoding="utf-8") as handle:
                json.dump(record, handle, indent=2)
            png = plot_report(columns, plan, os.path.join(args.output_dir, PNG_NAME), self.device)
            if png is None:
                logger.info("cpt-plugin: memory report in %s (no PNG: pip install matplotlib)", json_path)
            else:
                logger.info("cpt-plugin: memory report in %s and %s", json_path, png)
        return control
