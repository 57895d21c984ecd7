"""Training benchmark: every (system, workload, batch x seq) in its own subprocess, then a report.

  python -m benchmarks.run --suite quick|full [--systems hf,liger,cpt,cpt_offload] [--workloads ...]
                           [--shapes 4x2048,1x16384] [--out DIR] [--device cpu] [--time-budget S]

Results are written to DIR/results.json after every measurement (a killed run keeps what it measured),
then DIR/report.md and PNGs. ``--device cpu`` runs the same code on tiny models: a dry run, no timings.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.flops import flops_per_token, mfu
from benchmarks.search import memory_slope_kib_per_token, search_max_context
from benchmarks.systems import EXTRA_SYSTEMS, SYSTEMS
from benchmarks.worker import RESULT_PREFIX
from benchmarks.workloads import CPU_MAXCTX, CPU_SHAPES, CPU_STEPS, SUITES, WORKLOADS, resolve_workload

REPO_ROOT = Path(__file__).resolve().parent.parent
SLOPE_MIN_SEQ = 16384  # fit the memory slope on lengths where activations dominate


def parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
    """'4x2048,1x16384' -> ((4, 2048), (1, 16384))."""
    shapes = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        batch, _, seq = item.partition("x")
        if not batch.isdigit() or not seq.isdigit() or int(batch) < 1 or int(seq) < 1:
            raise argparse.ArgumentTypeError(f"bad shape {item!r}; use BATCHxSEQ, e.g. 4x2048")
        shapes.append((int(batch), int(seq)))
    return tuple(shapes)


def _names(
    text: str, valid: tuple[str, ...] | list[str], what: str, trees: dict[str, str] | None = None
) -> list[str]:
    """Comma-separated names, each one of ``valid``; with ``trees``, also ``NAME@TREE`` (that system run
    from another checkout, see ``--tree``)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        base, _, tree = name.partition("@")
        if base not in valid:
            raise argparse.ArgumentTypeError(f"unknown {what} {base!r}; choose from {', '.join(valid)}")
        if tree and tree not in (trees or {}):
            raise argparse.ArgumentTypeError(
                f"{name!r}: no tree {tree!r}; name it with --tree {tree}=PATH (a checkout of this repository)"
            )
    return names


def _trees(specs: list[str]) -> dict[str, str]:
    """``--tree NAME=PATH`` options as {name: absolute path}; each path must hold a benchmarks/worker.py."""
    trees = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        root = Path(path).resolve()
        if not (sep and name and (root / "benchmarks" / "worker.py").is_file()):
            raise argparse.ArgumentTypeError(
                f"--tree {spec!r}: expected NAME=PATH with PATH a checkout holding benchmarks/worker.py"
            )
        trees[name] = str(root)
    return trees


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--suite", choices=sorted(SUITES), default="quick")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated, in run order")
    p.add_argument(
        "--tree",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="another checkout (an earlier commit, say): SYSTEM@NAME in --systems runs SYSTEM from it, in "
        "the same run as the others (A/B of two commits on one card)",
    )
    p.add_argument("--workloads", default=None, help="comma-separated (default: the suite's)")
    p.add_argument("--shapes", type=parse_shapes, default=None, help="BATCHxSEQ list (default: the suite's)")
    p.add_argument(
        "--maxctx-systems", default=None, help="systems to search the max context of (default: --systems)"
    )
    p.add_argument("--maxctx-cap", type=int, default=None)
    p.add_argument("--maxctx-start", type=int, default=None)
    p.add_argument("--maxctx-granularity", type=int, default=None)
    p.add_argument("--no-maxctx", action="store_true", help="skip the max-context search")
    p.add_argument("--no-train", action="store_true", help="skip the throughput runs")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every system this many times, in turns (A B C A B C): a card whose speed drifts "
        "during the call then moves every system alike; the report takes each system's median round",
    )
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--out", default="outputs/bench", help="output directory")
    p.add_argument("--time-budget", type=float, default=float("inf"), help="seconds for the whole run")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds per throughput subprocess")
    p.add_argument("--probe-timeout", type=float, default=150.0, help="seconds per max-context probe")
    p.add_argument(
        "--min-probe-s", type=float, default=30.0, help="start no probe with less budget left than this"
    )
    p.add_argument("--no-report", action="store_true")
    return p


def resolve_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line and fills suite defaults (CPU: tiny shapes and few steps)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    suite = SUITES[args.suite]
    try:
        args.trees = _trees(args.tree)
        args.systems = _names(args.systems, SYSTEMS + EXTRA_SYSTEMS, "system", args.trees)
        args.workloads = (
            _names(args.workloads, [w for w in WORKLOADS], "workload")
            if args.workloads
            else list(suite.workloads)
        )
        args.maxctx_systems = (
            _names(args.maxctx_systems, SYSTEMS + EXTRA_SYSTEMS, "system")
            if args.maxctx_systems
            else [s for s in args.systems if "@" not in s]  # the max-context search: this checkout only
        )
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    cpu = args.device == "cpu"
    args.shapes = args.shapes or (CPU_SHAPES if cpu else suite.shapes)
    args.maxctx_workloads = [w for w in suite.maxctx_workloads if w in args.workloads] or args.workloads[:1]
    args.maxctx_start = args.maxctx_start or (CPU_MAXCTX["start"] if cpu else suite.maxctx_start)
    args.maxctx_cap = args.maxctx_cap or (CPU_MAXCTX["cap"] if cpu else suite.maxctx_cap)
    args.maxctx_granularity = args.maxctx_granularity or (
        CPU_MAXCTX["granularity"] if cpu else suite.maxctx_granularity
    )
    args.warmup = args.warmup if args.warmup is not None else (CPU_STEPS["warmup"] if cpu else suite.warmup)
    args.steps = args.steps if args.steps is not None else (CPU_STEPS["steps"] if cpu else suite.steps)
    return args


def child_env(device: str, root: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTORCH_ALLOC_CONF"] = "expandable_segments:True"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root or str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    if device == "cuda":
        env.pop("TRITON_INTERPRET", None)  # real kernels on the GPU, whatever the caller's shell says
    else:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_worker(job: dict[str, Any], timeout: float, root: str | None = None) -> dict[str, Any]:
    """Runs one worker subprocess (from the checkout ``root``, by default this one); a crash, a timeout or
    a missing result line becomes a recorded failure."""
    cmd = [sys.executable, "-m", "benchmarks.worker", "--json-args", json.dumps(job)]
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=max(0.01, timeout),  # callers budget their own floor (Harness: >= 1 s)
            env=child_env(job.get("device", "cuda"), root),
            cwd=root or str(REPO_ROOT),
        )
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stderr or b"")[-2000:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return {
            "status": "timeout",
            "error": f"no result within {timeout:.0f} s",
            "stderr_tail": tail,
            "args": job,
            "wall_s": time.perf_counter() - started,
        }
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX) :])
            if result.get("status") != "ok":
                result["stderr_tail"] = proc.stderr[-2000:]
            return result
    status = "oom" if "out of memory" in proc.stderr.lower() else "crash"
    return {
        "status": status,
        "error": f"exit code {proc.returncode}, no result line",
        "args": job,
        "stderr_tail": proc.stderr[-3000:],
        "wall_s": time.perf_counter() - started,
    }


class Harness:
    """Runs the jobs of one suite within a time budget and keeps results.json up to date."""

    def __init__(self, args: argparse.Namespace, argv: list[str] | None) -> None:
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self.deadline = self.started + args.time_budget
        command = "python -m benchmarks.run " + " ".join(
            shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
        )
        self.results: dict[str, Any] = {
            "meta": {
                "suite": args.suite,
                "device": args.device,
                "command": command,
                "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "systems": args.systems,
                "trees": getattr(args, "trees", {}),
                "workloads": args.workloads,
                "shapes": [list(s) for s in args.shapes],
                "warmup": args.warmup,
                "steps": args.steps,
                "seed": args.seed,
                "rounds": args.rounds,
                "precision": (
                    "bf16 weights, bf16 autocast; LoRA parameters as PEFT creates them (fp32); trained "
                    "embedding copies bf16 with stochastically rounded updates for cpt-plugin (its default "
                    "trained_embeddings_dtype: bfloat16_sr), bf16 for HF/Liger/Unsloth"
                ),
                "allocator": "PYTORCH_ALLOC_CONF=expandable_segments:True",
            },
            "hardware": {},
            "train": [],
            "maxctx": [],
        }

    # -- bookkeeping ---------------------------------------------------------------------------
    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:6.0f}s] {text}", flush=True)

    def save(self) -> Path:
        path = self.out / "results.json"
        self.results["meta"]["elapsed_s"] = time.monotonic() - self.started
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.results, indent=1))
        tmp.replace(path)
        return path

    def job(self, **kw: Any) -> dict[str, Any]:
        return {"device": self.args.device, "seed": self.args.seed, **kw}

    # -- stages --------------------------------------------------------------------------------
    def measure_hardware(self) -> None:
        result = run_worker(self.job(mode="matmul"), min(120.0, max(1.0, self.remaining())))
        self.results["hardware"] = result
        env = result.get("environment", {})
        self.log(
            f"card {env.get('card')}; bf16 matmul {result.get('matmul_tflops', float('nan')):.1f} TFLOP/s "
            f"({result.get('status')})"
        )
        self.save()

    def train(self) -> None:
        tflops = self.results["hardware"].get("matmul_tflops")
        unavailable: set[str] = set()
        for wname in self.args.workloads:
            workload = resolve_workload(wname, self.args.device)
            turns = [(rnd, system) for rnd in range(self.args.rounds) for system in self.args.systems]
            for batch, seq in self.args.shapes:
                for rnd, system in turns:
                    record: dict[str, Any] = {"system": system, "workload": wname, "batch": batch, "seq": seq}
                    if self.args.rounds > 1:
                        record["round"] = rnd
                    if system in unavailable and rnd > 0:
                        continue  # said once, in its first round
                    if system in unavailable:
                        record.update(status="unavailable", error="see the first row of this system")
                    elif self.remaining() < 20:
                        record.update(status="skipped", error="time budget spent")
                    else:
                        base, _, tree = system.partition("@")
                        job = self.job(
                            mode="train",
                            system=base,
                            workload=wname,
                            batch=batch,
                            seq=seq,
                            warmup=self.args.warmup,
                            steps=self.args.steps,
                        )
                        root = self.args.trees.get(tree) if tree else None
                        record.update(run_worker(job, min(self.args.timeout, self.remaining()), root))
                        record["system"] = system  # the worker reports the base name
                    if record["status"] == "unavailable":
                        unavailable.add(system)
                    if record["status"] == "ok":
                        flops = flops_per_token(workload, seq)
                        record["gflop_per_token"] = flops.total / 1e9
                        if tflops and self.args.device == "cuda":
                            record["mfu"] = mfu(workload, seq, record["tokens_per_s"], tflops * 1e12)
                    self.results["train"].append(record)
                    self.save()
                    self.log(describe_train(record))
        self.unavailable = unavailable

    def maxctx(self) -> None:
        unavailable = getattr(self, "unavailable", set())
        for wname in self.args.maxctx_workloads:
            systems = [s for s in self.args.maxctx_systems]
            for i, system in enumerate(systems):
                record: dict[str, Any] = {
                    "system": system,
                    "workload": wname,
                    "start": self.args.maxctx_start,
                    "cap": self.args.maxctx_cap,
                    "granularity": self.args.maxctx_granularity,
                }
                if system in unavailable:
                    record.update(status="unavailable", max_ok=None, min_fail=None, probes=[])
                    self.results["maxctx"].append(record)
                    self.save()
                    continue
                pending = [s for s in systems[i:] if s not in unavailable]
                share = self.remaining() / max(1, len(pending))

                def probe(
                    seq: int, timeout: float, system: str = system, wname: str = wname
                ) -> dict[str, Any]:
                    job = self.job(mode="probe", system=system, workload=wname, batch=1, seq=seq)
                    limit = min(self.args.probe_timeout, timeout)
                    result = run_worker(job, limit)
                    if result.get("status") == "timeout" and limit < self.args.probe_timeout:
                        result["status"] = "budget"  # cut by the time budget, not by the probe's own limit
                    keep = (
                        "status",
                        "error",
                        "peak_allocated_gib",
                        "peak_reserved_gib",
                        "static_allocated_gib",
                        "median_step_s",
                        "wall_s",
                    )
                    row = {k: result[k] for k in keep if k in result}
                    self.log(
                        f"probe {wname} {system} 1x{seq}: {row.get('status')} "
                        f"peak {row.get('peak_allocated_gib', float('nan')):.2f} GiB"
                    )
                    return row

                found = search_max_context(
                    probe,
                    self.args.maxctx_start,
                    self.args.maxctx_cap,
                    self.args.maxctx_granularity,
                    budget_s=share,
                    min_probe_s=self.args.min_probe_s,
                )
                record.update(found.to_dict())
                ok_points = [
                    (p["seq"], p.get("peak_allocated_gib")) for p in found.probes if p.get("status") == "ok"
                ]
                res_points = [
                    (p["seq"], p.get("peak_reserved_gib")) for p in found.probes if p.get("status") == "ok"
                ]
                min_seq = SLOPE_MIN_SEQ if self.args.device == "cuda" else 0
                record["kib_per_token"] = memory_slope_kib_per_token(ok_points, min_seq)
                record["reserved_kib_per_token"] = memory_slope_kib_per_token(res_points, min_seq)
                self.results["maxctx"].append(record)
                self.save()
                self.log(
                    f"max context {wname} {system}: ok {record['max_ok']}, fail {record['min_fail']} "
                    f"({record['status']}), {record['kib_per_token']} KiB/token"
                )


def describe_train(r: dict[str, Any]) -> str:
    head = f"train {r['workload']} {r['batch']}x{r['seq']} {r['system']}: "
    if r.get("status") != "ok":
        return head + f"{r.get('status')}: {str(r.get('error', ''))[:200]}"
    losses = r.get("losses") or []
    return head + (
        f"{r['tokens_per_s']:,.0f} tok/s, peak {r.get('peak_allocated_gib', float('nan')):.2f} GiB, "
        f"MFU {r.get('mfu', float('nan')):.1%}, loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    )


def main(argv: list[str] | None = None) -> int:
    args = resolve_args(argv)
    harness = Harness(args, argv)
    harness.log(
        f"suite {args.suite} on {args.device}: systems {args.systems}, workloads {args.workloads}, "
        f"shapes {args.shapes}; out {harness.out}"
    )
    harness.measure_hardware()
    if not args.no_train:
        harness.train()
    if not args.no_maxctx:
        harness.maxctx()
    path = harness.save()
    harness.log(f"wrote {path}")
    if not args.no_report:
        from benchmarks.report import write_report

        write_report(harness.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
