"""Where one training step's GPU time goes: torch.profiler over a few steps after warm-up, per system.

  python -m benchmarks.profile_step --systems cpt_offload,unsloth [--workload llama-1b] [--shape 4x2048]
                                    [--warmup 3] [--steps 2] [--out DIR] [--device cpu]

Each system runs in its own process (the harness's worker, mode ``profile``), builds exactly what
``benchmarks.run`` measures, trains ``--warmup`` steps, then profiles ``--steps`` steps. Writes per system
DIR/<system>_profile.txt (the top-30 GPU kernels by time, the dtype-copy ops, and
``key_averages().table(sort_by="cuda_time_total")``, host vs wall time per step and per phase, and the
matrix products by M x K -> N with their TFLOP/s from one more step profiled with shapes) and
DIR/<system>_profile.json, DIR/<system>_python.txt (cProfile of one step on the caller's and the autograd
engine's thread: where the host's time goes); DIR/profile.json holds
every system's summary. The dtype-copy ops are aten::copy_, aten::to and aten::_to_copy: their counts per
step and the device time under each (inclusive, so aten::to contains its aten::_to_copy and aten::copy_)
as a share of all kernel time. On ``--device cpu`` the same runs on tiny models with CPU times only.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

COPY_OPS = ("aten::copy_", "aten::to", "aten::_to_copy")
TOP = 30
SYNC_SITES = 12  # distinct source lines of synchronizing calls listed


def host_and_syncs(step: Any, first: int, steps: int, device: str) -> dict[str, Any]:
    """Is the step bound by the host? Unprofiled steps timed twice: until ``step`` returns (the host has
    queued everything, or waited at a sync) and until the device is done. Host time close to wall time,
    with the device idle for the difference, says the GPU waits for Python and launches, not the reverse.
    Then one step under ``torch.cuda.set_sync_debug_mode("warn")``: every call that makes the host wait
    for the device, counted by the source line that made it (a sync stops the host from running ahead)."""
    import warnings

    import torch

    from benchmarks.hw import synchronize

    host, wall = [], []
    for i in range(first, first + steps):
        synchronize(device)
        start = time.perf_counter()
        step(i)
        host.append(time.perf_counter() - start)
        synchronize(device)
        wall.append(time.perf_counter() - start)
    sites: dict[str, int] = defaultdict(int)
    if device.startswith("cuda"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step(first + steps)
                synchronize(device)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        for w in caught:
            if "synchroniz" in str(w.message):
                sites[f"{w.filename}:{w.lineno}"] += 1
    return {
        "host_ms_per_step": 1e3 * sum(host) / len(host),
        "wall_ms_per_step": 1e3 * sum(wall) / len(wall),
        "syncs_per_step": sum(sites.values()),
        "sync_sites": dict(sorted(sites.items(), key=lambda kv: -kv[1])[:SYNC_SITES]),
    }


def phase_times(
    model: Any,
    optimizer: Any,
    ids_for: Callable[[int], Any],
    first: int,
    steps: int,
    device: str,
    step_context: Any = None,
) -> dict[str, dict[str, float]]:
    """Host and wall ms of forward, backward and the optimizer step, each phase started on an idle device.

    Host = until the phase's Python returns; wall = until the device has finished it too. A phase whose
    host time is close to its wall time keeps the device waiting for the host (launch-bound)."""
    import contextlib

    import torch

    from benchmarks.hw import synchronize

    totals: dict[str, list[float]] = {p: [0.0, 0.0] for p in ("forward", "backward", "optimizer")}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        synchronize(device)
        start = time.perf_counter()
        out = fn()
        totals[name][0] += time.perf_counter() - start
        synchronize(device)
        totals[name][1] += time.perf_counter() - start
        return out

    for i in range(first, first + steps):
        ids = ids_for(i)
        with (step_context or contextlib.nullcontext)():

            def forward(ids: Any = ids) -> Any:
                with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
                    return model(input_ids=ids, labels=ids).loss

            loss = timed("forward", forward)
            timed("backward", loss.backward)
        timed("optimizer", lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True)))
    return {name: {"host_ms": 1e3 * h / steps, "wall_ms": 1e3 * w / steps} for name, (h, w) in totals.items()}


def python_hotspots(step: Callable[[int], Any], index: int, top: int = 40) -> str:
    """cProfile of one step on both threads that run Python, the caller's (forward, optimizer) and the
    autograd engine's (backward, recompute), sorted by own time.

    From Python 3.12 cProfile sits on ``sys.monitoring``, which sees every thread and allows one profiler
    at a time, so one profiler covers both. Before 3.12 it sees only the thread that enabled it: a second
    one is started in the engine thread by a hook on the loss and stopped when the engine's queue drains.
    Never fails the profile: an error is returned as the text."""
    import cProfile
    import io
    import pstats

    import torch

    profilers: list[tuple[str, cProfile.Profile]] = []
    main = cProfile.Profile()
    original = torch.Tensor.backward
    per_thread = sys.version_info < (3, 12)
    if per_thread:
        engine = cProfile.Profile()
        caller = threading.get_ident()
        profilers = [("caller thread (forward, optimizer)", main), ("autograd thread (backward)", engine)]

        def backward(self: Any, *args: Any, **kwargs: Any) -> Any:
            if self.requires_grad and self.grad_fn is not None:

                def start(grad: Any) -> Any:
                    if threading.get_ident() != caller:  # CPU runs backward on the caller's thread
                        engine.enable()
                        torch.autograd.Variable._execution_engine.queue_callback(engine.disable)
                    return grad

                self.register_hook(start)
            return original(self, *args, **kwargs)

        torch.Tensor.backward = backward  # type: ignore[method-assign]
    else:
        profilers = [("every thread (caller: forward, optimizer; autograd engine: backward)", main)]
    try:
        main.enable()
        try:
            step(index)
        finally:
            main.disable()
    except Exception as exc:  # noqa: BLE001 - a diagnostic must not cost the profile
        return f"python hotspots failed: {type(exc).__name__}: {exc}\n"
    finally:
        torch.Tensor.backward = original  # type: ignore[method-assign]
    text = io.StringIO()
    for title, prof in profilers:
        text.write(f"### {title}\n")
        try:
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
        except TypeError:  # nothing was recorded on that thread
            text.write("(nothing recorded)\n")
    return text.getvalue()


def idle_gaps(intervals: list[tuple[float, float, str]], steps: int, top: int = 12) -> dict[str, Any]:
    """How long the device sat idle between compute kernels, and before which kernels.

    ``intervals`` are (start us, end us, kernel name) of the profiled steps' kernels; copies (the offload's
    side stream) do not count as busy. The idle time is grouped by the kernel that ended the wait: a
    launch the host was late with, or the first kernel after a synchronization."""
    compute = sorted((a, b, n) for a, b, n in intervals if not n.startswith(("Memcpy", "Memset")))
    if not compute:
        return {"idle_ms_per_step": None, "busy_ms_per_step": None, "gaps_before": []}
    busy = 0.0
    idle = 0.0
    by_next: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    cur_start, cur_end = compute[0][0], compute[0][1]
    for start, end, name in compute[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            gap = start - cur_end
            idle += gap
            entry = by_next[name]
            entry[0] += 1
            entry[1] += gap
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    busy += cur_end - cur_start
    ranked = sorted(by_next.items(), key=lambda kv: kv[1][1], reverse=True)[:top]
    return {
        "busy_ms_per_step": busy / 1e3 / steps,
        "idle_ms_per_step": idle / 1e3 / steps,
        "gaps_before": [
            {"kernel": name, "gaps_per_step": n / steps, "idle_ms_per_step": us / 1e3 / steps}
            for name, (n, us) in ranked
        ],
    }


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm")


def gemm_shapes(prof: Any, steps: int, top: int = 25) -> list[dict[str, Any]]:
    """The matrix products of a profile recorded with shapes, by (op, M, K, N): calls and device time per
    step and the TFLOP/s they ran at, largest time first. Says which projection's GEMM is slow (the
    kernel names alone do not carry their shapes)."""
    rows = []
    for avg in prof.key_averages(group_by_input_shape=True):
        if avg.key not in GEMM_OPS or not avg.input_shapes:
            continue
        # the two factors: mm(a, b[, out]), bmm(a, b[, out]); addmm(self, a, b[, out]), baddbmm likewise
        first = 1 if avg.key in ("aten::addmm", "aten::addmm_", "aten::baddbmm") else 0
        shapes = list(avg.input_shapes)[first : first + 2]
        if len(shapes) < 2 or not all(isinstance(s, list) and len(s) >= 2 for s in shapes):
            continue
        (*batch_a, m, k), (*_, k2, n) = shapes
        batches = 1
        for b in batch_a:
            batches *= b
        device_us = float(
            getattr(avg, "self_device_time_total", 0.0) or getattr(avg, "device_time_total", 0.0)
        )
        flops = 2.0 * batches * m * k * n * avg.count
        rows.append(
            {
                "op": avg.key,
                "m": m,
                "k": k,
                "n": n,
                "batch": batches,
                "calls_per_step": avg.count / steps,
                "device_ms_per_step": device_us / 1e3 / steps,
                "tflops": flops / (device_us * 1e6) if device_us else None,
                "k_matches": k == k2,
            }
        )
    return sorted(rows, key=lambda r: r["device_ms_per_step"], reverse=True)[:top]


def summarize(prof: Any, steps: int, cuda: bool) -> dict[str, Any]:
    """Top kernels by device time and the dtype-copy ops' counts and shares, from a finished profile."""
    from torch.autograd import DeviceType

    kernels: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    intervals: list[tuple[float, float, str]] = []
    for event in prof.events():
        if getattr(event, "device_type", None) == DeviceType.CUDA:
            entry = kernels[event.name]
            entry[0] += 1
            entry[1] += event.time_range.elapsed_us()
            intervals.append((event.time_range.start, event.time_range.end, event.name))
    kernel_us = sum(us for _, us in kernels.values())
    top = sorted(kernels.items(), key=lambda kv: kv[1][1], reverse=True)[:TOP]
    averages = {avg.key: avg for avg in prof.key_averages()}
    total_cpu_us = sum(getattr(a, "self_cpu_time_total", 0.0) for a in averages.values())
    copies = {}
    for name in COPY_OPS:
        avg = averages.get(name)
        device_us = float(getattr(avg, "device_time_total", 0.0)) if avg is not None else 0.0
        cpu_us = float(getattr(avg, "cpu_time_total", 0.0)) if avg is not None else 0.0
        copies[name] = {
            "count": int(avg.count) if avg is not None else 0,
            "count_per_step": (avg.count / steps) if avg is not None else 0.0,
            "device_us": device_us,
            "share_of_kernel_time": device_us / kernel_us if kernel_us else None,
            "cpu_us": cpu_us,
        }
    return {
        "steps_profiled": steps,
        "kernel_time_us_per_step": kernel_us / steps,
        "kernel_launches_per_step": sum(n for n, _ in kernels.values()) / steps,
        "self_cpu_time_us_per_step": total_cpu_us / steps,
        "top_kernels": [
            {
                "name": name,
                "count": int(n),
                "total_us": us,
                "share": us / kernel_us if kernel_us else None,
            }
            for name, (n, us) in top
        ],
        "copy_ops": copies,
        "device_idle": idle_gaps(intervals, steps),
        "table": prof.key_averages().table(
            sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=TOP, max_name_column_width=60
        ),
    }


def render_text(system: str, summary: dict[str, Any]) -> str:
    """The human-readable profile of one system."""
    steps = summary["steps_profiled"]
    lines = [
        f"# {system}: {steps} profiled steps; kernel time {summary['kernel_time_us_per_step'] / 1e3:.1f} ms "
        f"per step, {summary['kernel_launches_per_step']:.0f} kernel launches per step",
        "",
        f"## Top {TOP} GPU kernels by time",
        f"{'share':>7} {'total ms':>9} {'calls':>7}  kernel",
    ]
    for k in summary["top_kernels"]:
        share = f"{100 * k['share']:6.1f}%" if k["share"] is not None else "      –"
        lines.append(f"{share} {k['total_us'] / 1e3:9.2f} {k['count']:7d}  {k['name'][:140]}")
    lines += ["", "## dtype copies (inclusive device time; aten::to contains _to_copy and copy_)"]
    for name, c in summary["copy_ops"].items():
        if c["share_of_kernel_time"] is None:  # no GPU kernels (a CPU run): host time instead
            timing = f"{c['cpu_us'] / 1e3 / steps:8.2f} ms/step on the host"
        else:
            timing = (
                f"{c['device_us'] / 1e3 / steps:8.2f} ms/step  "
                f"{100 * c['share_of_kernel_time']:.1f}% of kernel time"
            )
        lines.append(f"{name:<16} {c['count_per_step']:8.0f} calls/step  {timing}")
    idle = summary.get("device_idle") or {}
    if idle.get("idle_ms_per_step") is not None:
        lines += [
            "",
            f"## device idle between compute kernels: {idle['idle_ms_per_step']:.1f} ms per step "
            f"(busy {idle['busy_ms_per_step']:.1f} ms); idle time by the kernel that ended the wait",
        ]
        lines += [
            f"{g['idle_ms_per_step']:8.2f} ms {g['gaps_per_step']:7.1f} gaps  {g['kernel'][:120]}"
            for g in idle["gaps_before"]
        ]
    timing = summary.get("host")
    if timing:
        lines += [
            "",
            "## host vs device (unprofiled steps)",
            f"host {timing['host_ms_per_step']:.1f} ms per step until the step returns; wall "
            f"{timing['wall_ms_per_step']:.1f} ms until the device is done; {timing['syncs_per_step']} "
            "synchronizing calls in one step",
            *(f"  {count:5d}  {site}" for site, count in timing["sync_sites"].items()),
        ]
    phases = summary.get("phases")
    if phases:
        lines += ["", "## phases (each started on an idle device): host ms / wall ms per step"]
        lines += [f"{name:<10} {p['host_ms']:8.1f} / {p['wall_ms']:8.1f}" for name, p in phases.items()]
    gemms = summary.get("gemms")
    if gemms:
        lines += [
            "",
            "## matrix products by shape (one more step, profiled with shapes): M x K @ K x N",
            f"{'op':<13} {'M':>6} {'K':>6} {'N':>6} {'calls':>6} {'ms/step':>8} {'TFLOP/s':>8}",
        ]
        for g in gemms:
            rate = f"{g['tflops']:8.0f}" if g["tflops"] is not None else "       –"
            batch = f" (x{g['batch']})" if g["batch"] > 1 else ""
            lines.append(
                f"{g['op']:<13} {g['m']:>6} {g['k']:>6} {g['n']:>6} {g['calls_per_step']:6.0f} "
                f"{g['device_ms_per_step']:8.2f} {rate}{batch}"
            )
    lines += ["", "## key_averages", summary["table"]]
    return "\n".join(lines) + "\n"


def run_profile(args: dict[str, Any]) -> dict[str, Any]:
    """The child process: build the system as the benchmark does, warm up, profile, write the files."""
    from benchmarks.systems import UNSLOTH_SYSTEMS

    system = args["system"]
    if system in UNSLOTH_SYSTEMS:
        from benchmarks.unsloth_system import preimport_unsloth

        preimport_unsloth()  # before transformers
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.hw import synchronize
    from benchmarks.systems import SystemUnavailable, build_system
    from benchmarks.worker import batch_for_step, train_step
    from benchmarks.workloads import resolve_workload

    device = args.get("device", "cuda")
    workload = resolve_workload(args["workload"], device)
    batch, seq, seed = int(args["batch"]), int(args["seq"]), int(args.get("seed", 0))
    warmup, steps = int(args.get("warmup", 3)), int(args.get("steps", 2))
    torch.manual_seed(seed)
    try:
        built = build_system(system, workload, device, seed=seed, max_seq_length=seq)
    except SystemUnavailable as exc:
        return {"status": "unavailable", "error": str(exc)[:2000]}
    cuda = device.startswith("cuda")

    def step(i: int) -> None:
        ids = batch_for_step(i, batch, seq, workload.vocab_size, seed).to(device)
        train_step(built.model, built.optimizer, ids, device, built.step_context)

    for i in range(warmup):
        step(i)
    synchronize(device)
    host = host_and_syncs(step, warmup, steps, device)
    warmup += steps + 1
    phases = phase_times(
        built.model,
        built.optimizer,
        lambda i: batch_for_step(i, batch, seq, workload.vocab_size, seed).to(device),
        warmup,
        steps,
        device,
        built.step_context,
    )
    warmup += steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for i in range(warmup, warmup + steps):
            step(i)
        synchronize(device)
    with profile(activities=activities, record_shapes=True) as shaped:  # its own step: shapes cost host time
        step(warmup + steps)
        synchronize(device)
    hotspots = python_hotspots(step, warmup + steps + 1)  # after torch.profiler: both hook the interpreter
    summary = {
        **summarize(prof, steps, cuda),
        "host": host,
        "phases": phases,
        "gemms": gemm_shapes(shaped, 1),
    }
    out = Path(args["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{system}_profile.txt").write_text(render_text(system, summary))
    (out / f"{system}_python.txt").write_text(hotspots)
    record = {"system": system, "workload": workload.name, "batch": batch, "seq": seq, **summary}
    record.pop("table")
    (out / f"{system}_profile.json").write_text(json.dumps(record, indent=1))
    return {"status": "ok", **record}


def main(argv: list[str] | None = None) -> int:
    from benchmarks.run import parse_shapes, run_worker
    from benchmarks.systems import EXTRA_SYSTEMS, SYSTEMS

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.profile_step",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--systems", default="cpt_offload", help="comma-separated, each in its own process")
    parser.add_argument("--workload", default="llama-1b")
    parser.add_argument("--shape", type=parse_shapes, default=((4, 2048),), help="BATCHxSEQ")
    parser.add_argument("--warmup", type=int, default=3, help="steps before profiling (Unsloth compiles)")
    parser.add_argument("--steps", type=int, default=2, help="steps profiled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", default="outputs/profile")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for all systems together")
    args = parser.parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    for name in systems:
        if name not in SYSTEMS + EXTRA_SYSTEMS:
            parser.error(f"unknown system {name!r}; choose from {', '.join(SYSTEMS + EXTRA_SYSTEMS)}")
    (batch, seq), out = args.shape[0], Path(args.out)
    results, deadline = [], time.monotonic() + args.timeout
    for i, system in enumerate(systems):
        job = dict(
            mode="profile",
            system=system,
            workload=args.workload,
            batch=batch,
            seq=seq,
            warmup=args.warmup,
            steps=args.steps,
            seed=args.seed,
            device=args.device,
            out=str(out),
        )
        result = run_worker(job, (deadline - time.monotonic()) / (len(systems) - i))
        results.append(result)
        if result.get("status") == "ok":
            print((out / f"{system}_profile.txt").read_text().split("## key_averages")[0], flush=True)
        else:
            print(f"# {system}: {result.get('status')}: {str(result.get('error', ''))[:300]}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
