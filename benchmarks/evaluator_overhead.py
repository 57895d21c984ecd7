"""What the held-out evaluator adds to a run's wall time at its default frequency (issue 11: < 5%).

  python -m benchmarks.evaluator_overhead [--system cpt_offload] [--workload llama-1b] [--shape 4x2048]
                                          [--every 100] [--tokens 65536] [--out DIR] [--device cpu]

One process builds the system exactly as ``benchmarks.run`` measures it, times ``--steps`` training steps
after warm-up, then times one evaluation of ``cpt_plugin.evaluation.HeldoutEvaluator`` (the callback the
run gets with ``eval_new`` / ``eval_old``): ``--tokens`` tokens (default: ``eval_tokens``'s) of each of two domains in blocks of the
training length, at the Trainer's default eval batch of 8, after one untimed evaluation. The overhead is
one evaluation over ``--every`` training steps (``eval_every_steps``'s default is 100): the evaluator runs
once per that many steps, plus once at the start (the base) and once at the end. Writes DIR/evaluator.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def measure(system: str, workload_name: str, batch: int, seq: int, steps: int, every: int, tokens: int,
            device: str, seed: int = 0) -> dict[str, Any]:  # fmt: skip
    import torch

    from benchmarks.hw import synchronize
    from benchmarks.systems import build_system
    from benchmarks.worker import batch_for_step, train_step
    from benchmarks.workloads import resolve_workload
    from cpt_plugin.evaluation import HeldoutEvaluator

    workload = resolve_workload(workload_name, device)
    torch.manual_seed(seed)
    built = build_system(system, workload, device, seed=seed, max_seq_length=seq)

    def step(i: int) -> None:
        ids = batch_for_step(i, batch, seq, workload.vocab_size, seed).to(device)
        train_step(built.model, built.optimizer, ids, device, built.step_context)

    for i in range(2):
        step(i)
    synchronize(device)
    start = time.perf_counter()
    for i in range(2, 2 + steps):
        step(i)
    synchronize(device)
    step_seconds = (time.perf_counter() - start) / steps
    generator = torch.Generator().manual_seed(seed + 1)
    per_domain = max(tokens // seq, 1)

    def blocks() -> list[dict[str, list[int]]]:
        ids = torch.randint(0, workload.vocab_size, (per_domain, seq), generator=generator)
        positions = list(range(seq))  # one document per block, as CPTDataset packs
        return [{"input_ids": row.tolist(), "labels": row.tolist(), "position_ids": positions} for row in ids]

    evaluator = HeldoutEvaluator(every_steps=every, max_tokens=tokens, plot=False)
    evaluator.blocks = {"new": blocks(), "old": blocks()}
    evaluator.evaluate(built.model)  # warm-up: the eval-mode shapes' first kernels and allocations
    synchronize(device)
    start = time.perf_counter()
    losses = evaluator.evaluate(built.model)
    synchronize(device)
    eval_seconds = time.perf_counter() - start
    return {
        "system": system, "workload": workload.name, "batch": batch, "seq": seq, "device": device,
        "step_seconds": step_seconds, "eval_seconds": eval_seconds, "eval_tokens_per_domain": per_domain * seq,
        "eval_every_steps": every, "overhead": eval_seconds / (every * step_seconds), "losses": losses,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from benchmarks.run import parse_shapes
    from cpt_plugin.config import CPTConfig

    parser = argparse.ArgumentParser(prog="python -m benchmarks.evaluator_overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--system", default="cpt_offload")
    parser.add_argument("--workload", default="llama-1b")
    parser.add_argument("--shape", type=parse_shapes, default=((4, 2048),), help="BATCHxSEQ")
    parser.add_argument("--steps", type=int, default=5, help="training steps timed")
    parser.add_argument("--every", type=int, default=CPTConfig.eval_every_steps, help="eval_every_steps")
    parser.add_argument("--tokens", type=int, default=CPTConfig.eval_tokens, help="eval_tokens (per domain)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", default="outputs/evaluator")
    args = parser.parse_args(argv)
    (batch, seq) = args.shape[0]
    result = measure(args.system, args.workload, batch, seq, args.steps, args.every, args.tokens, args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluator.json").write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"evaluator on {result['system']} {result['workload']} {batch}x{seq}: one evaluation "
        f"({result['eval_tokens_per_domain']} tokens x 2 domains) {result['eval_seconds']:.2f} s, a step "
        f"{result['step_seconds'] * 1e3:.0f} ms: {100 * result['overhead']:.2f}% of the wall time at one "
        f"evaluation per {args.every} steps"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
