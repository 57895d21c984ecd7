"""One measurement in its own process, so memory statistics never mix: prints one ``BENCH_RESULT`` line.

Modes:
  train   warm-up + timed steps at (batch, seq): tokens/s (median step), peak memory, losses
  probe   one training step at batch 1 (optimizer states created first): does it fit, and its peak memory
  matmul  the bf16 matmul rate (for MFU) and the environment (card, versions)
  profile torch.profiler over a few steps after warm-up (benchmarks/profile_step.py writes the tables)
Usage: python -m benchmarks.worker --json-args '{"mode": "train", "system": "hf", ...}'
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from typing import Any

RESULT_PREFIX = "BENCH_RESULT "


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "cublas_status_alloc_failed" in text


def _memory(device: str) -> dict[str, float]:
    import torch

    if not device.startswith("cuda"):
        return {}
    gib = 2**30
    return {
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / gib,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / gib,
    }


def batch_for_step(step: int, batch: int, seq: int, vocab: int, seed: int):
    """Random token ids of one step: the same for every system (CPU generator, seeded per step)."""
    import torch

    gen = torch.Generator().manual_seed(seed * 7919 + step)
    return torch.randint(0, vocab, (batch, seq), generator=gen)


def train_step(model, optimizer, input_ids, device: str, step_context=None):
    """Forward under bf16 autocast (labels = inputs), backward, optimizer step; returns the loss.
    ``step_context`` (a factory) is entered around forward and backward, as TRL/Axolotl do."""
    import contextlib

    import torch

    with (step_context or contextlib.nullcontext)():
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _prime_optimizer(model, optimizer) -> None:
    """Creates the optimizer states with zero gradients (no parameter moves: Adam's update of zero moments
    is zero, weight decay is 0), so a one-step probe sees the steady-state memory of training."""
    import torch

    for param in model.parameters():
        if param.requires_grad:
            param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def memory_plan(model: Any) -> dict[str, Any] | None:
    """The memory planner's plan (``gradient_checkpointing: auto`` systems): what it predicted, next to
    the measured peak of the timed steps (its error is what docs/BENCHMARKS.md reports)."""
    try:
        from cpt_plugin.offload.planner import find_planner
    except ImportError:
        return None
    planner = find_planner(model)
    if planner is None or planner.plan is None:
        return None
    return {
        "plan": planner.plan.describe(),
        "tokens": planner.tokens,
        "predicted_peak_gib": planner.predicted / 2**30,
        "budget_gib": planner.budget / 2**30 if planner.budget else None,
        "longest_tokens": planner.longest_tokens(),  # the longest micro-batch it predicts to fit
        "loss_chunk_mib": (getattr(planner, "loss_chunk_bytes", None) or 0) // 2**20,  # 0: the default
        "mlp_products": bool(getattr(planner, "mlp_products", False)),  # kept layers keep act(gate) * up
        "calibrated": planner.calibrated,
        # peaks over the budget with CUDA graphs captured: graphs off, re-planned eagerly (planner._overrun)
        "overruns": getattr(planner, "overruns", 0),
        # the checkpointed layers' CUDA graphs' pool: reserved, not allocated, so the measured allocated
        # peak plus this is what the prediction (which counts it) is compared with
        "graph_pool_gib": getattr(planner, "graph_pool_bytes", 0.0) / 2**30,
        # what the prediction is made of: the static part it planned with, and the last probe it was
        # calibrated on (its measured peak, static part, modelled activations and per-token correction)
        "static_planned_gib": getattr(planner, "static_planned_bytes", 0.0) / 2**30,
        "probe": _probe_in_gib(getattr(planner, "last_probe", None)),
    }


def _probe_in_gib(probe: dict[str, Any] | None) -> dict[str, Any] | None:
    """The planner's ``last_probe`` with its byte counts in GiB (``peak_bytes`` -> ``peak_gib``)."""
    if probe is None:
        return None
    out: dict[str, Any] = {}
    for key, value in probe.items():
        if key.endswith("_bytes"):
            out[key.removesuffix("_bytes") + "_gib"] = value / 2**30
        else:
            out[key] = value
    return out


def run_train(args: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.systems import UNSLOTH_SYSTEMS  # torch only: transformers is not imported yet

    if args.get("system") in UNSLOTH_SYSTEMS:
        from benchmarks.unsloth_system import preimport_unsloth

        preimport_unsloth()  # before transformers and peft, as Unsloth requires
    import torch

    from benchmarks.hw import synchronize
    from benchmarks.systems import SystemUnavailable, build_system
    from benchmarks.workloads import resolve_workload

    device, mode = args.get("device", "cuda"), args["mode"]
    workload = resolve_workload(args["workload"], device)
    batch, seq, seed = int(args["batch"]), int(args["seq"]), int(args.get("seed", 0))
    warmup = int(args.get("warmup", 3)) if mode == "train" else 0
    steps = int(args.get("steps", 10)) if mode == "train" else 1
    out: dict[str, Any] = {"workload_built": workload.name}
    torch.manual_seed(seed)
    try:
        built = build_system(args["system"], workload, device, seed=seed, max_seq_length=seq)
    except SystemUnavailable as exc:
        return {**out, "status": "unavailable", "error": str(exc)[:2000]}
    out["info"] = built.info
    model, optimizer = built.model, built.optimizer
    if mode == "probe":
        _prime_optimizer(model, optimizer)
    gc.collect()
    synchronize(device)
    if device.startswith("cuda"):
        out["static_allocated_gib"] = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    warmup_peak = 0.0
    try:
        for step in range(warmup + steps):
            if step == warmup and warmup and device.startswith("cuda"):
                # the timed steps' own peak too: a planner's probe (in warm-up) may run another plan
                warmup_peak = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
            input_ids = batch_for_step(step, batch, seq, workload.vocab_size, seed).to(device)
            synchronize(device)
            start = time.perf_counter()
            losses.append(train_step(model, optimizer, input_ids, device, built.step_context))
            synchronize(device)
            times.append(time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001 - recorded, never raised
        out.update(_memory(device))
        out["steps_done"] = len(times)
        status = "oom" if _is_oom(exc) else "error"
        return {**out, "status": status, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    timed = times[warmup:]
    median = statistics.median(timed)
    out.update(_memory(device))
    if warmup_peak:
        out["timed_peak_allocated_gib"] = out["peak_allocated_gib"]
        out["peak_allocated_gib"] = max(warmup_peak, out["peak_allocated_gib"])
    plan = memory_plan(model)
    if plan is not None:
        out["memory_plan"] = plan
    chosen = [
        m.__dict__["cpt_loss_chunk_chosen"] for m in model.modules() if "cpt_loss_chunk_chosen" in m.__dict__
    ]
    if chosen:  # checkpointing off: the fused loss' chunk taken from free memory (0: the default)
        out["loss_chunk_mib"] = (chosen[0] or 0) // 2**20
    room = [
        m.__dict__["cpt_mlp_products_tokens"]
        for m in model.modules()
        if "cpt_mlp_products_tokens" in m.__dict__
    ]
    if room:  # checkpointing off: the MLPs keep act(gate) * up for micro-batches up to this many tokens
        out["mlp_products_tokens"] = room[0]
    out.update(
        status="ok",
        losses=[float(x) for x in losses],
        step_times_s=timed,
        warmup_times_s=times[:warmup],
        median_step_s=median,
        tokens_per_s=batch * seq / median,
    )
    return out


def run_matmul(args: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.hw import environment, matmul_tflops

    device = args.get("device", "cuda")
    return {"status": "ok", "environment": environment(device), **matmul_tflops(device)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json-args", required=True, help="the measurement, as a JSON object")
    args = json.loads(parser.parse_args(argv).json_args)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    try:
        if args["mode"] in ("train", "probe"):
            result = run_train(args)
        elif args["mode"] == "matmul":
            result = run_matmul(args)
        elif args["mode"] == "profile":
            from benchmarks.profile_step import run_profile

            result = run_profile(args)
        else:
            raise ValueError(f"unknown mode {args['mode']!r}")
    except Exception as exc:  # noqa: BLE001 - the harness records it
        result = {
            "status": "oom" if _is_oom(exc) else "error",
            "error": f"{type(exc).__name__}: {exc}"[:2000],
            "traceback": traceback.format_exc()[-4000:],
        }
    result["args"] = args
    result["wall_s"] = time.perf_counter() - started
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
