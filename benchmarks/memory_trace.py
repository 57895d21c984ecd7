"""Where the peak GPU memory of one training step goes: the allocations alive at the peak, by source line.

Why: the memory-per-token slope is one layer's recompute working set plus whatever else grows with the
sequence; which tensors make it up decides what to chunk or offload next. This replays PyTorch's CUDA
allocator trace (``torch.cuda.memory._record_memory_history``) of one step, finds the peak, and groups
the blocks alive there by the innermost Python frames that allocated them.

    python -m benchmarks.memory_trace --workload mistral-7b-qlora --system cpt_offload \
        --layers 2 --seqs 8192,16384 --out outputs/trace

Prints one table per sequence length and the per-token difference between the first two lengths.
CUDA only (the allocator trace does not exist on CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

_SKIP_FRAMES = ("torch/nn/modules/module.py", "torch/utils/_contextlib.py", "<frozen", "functools.py")


def frame_key(frames: Sequence[dict[str, Any]], depth: int = 2) -> str:
    """The ``depth`` innermost Python frames, skipping module-call plumbing, as ``file:line fn`` joined."""
    picked = []
    for frame in frames:
        filename = str(frame.get("filename", ""))
        if not filename or any(s in filename for s in _SKIP_FRAMES) or filename.endswith((".cpp", ".h")):
            continue
        short = "/".join(filename.split("/")[-2:])
        picked.append(f"{short}:{frame.get('line')} {frame.get('name')}")
        if len(picked) == depth:
            break
    return " < ".join(picked) or "(no python frame)"


_NATIVE_MARKS = ("at::native::", "autograd::generated::", "cudnn", "at::_ops::")
_NATIVE_SKIP = ("empty", "Allocator", "allocator", "at::detail::")


def native_key(frames: Sequence[dict[str, Any]], depth: int = 3) -> str:
    """The innermost ATen/autograd C++ functions above the allocator (only with ``stacks="all"``):
    names the op behind a block that Python saw only as ``backward()``."""
    picked: list[str] = []
    for frame in frames:
        name = str(frame.get("name", ""))
        if not any(m in name for m in _NATIVE_MARKS) or any(s in name for s in _NATIVE_SKIP):
            continue
        short = name.split("(")[0][-70:]
        if short not in picked:
            picked.append(short)
        if len(picked) == depth:
            break
    return " < ".join(picked)


def live_at_peak(events: Iterable[dict[str, Any]]) -> tuple[int, list[dict[str, Any]]]:
    """Replays alloc/free events; returns the peak of live bytes (relative to the start) and the blocks
    alive at that moment. Blocks allocated before the trace started are not seen (they are the base)."""
    live: dict[int, dict[str, Any]] = {}
    current = peak = 0
    at_peak: list[dict[str, Any]] = []
    for event in events:
        action, addr, size = event.get("action"), event.get("addr"), int(event.get("size", 0))
        if action == "alloc":
            live[addr] = event
            current += size
            if current > peak:
                peak, at_peak = current, list(live.values())
        elif action == "free_requested" and addr in live:
            current -= int(live.pop(addr).get("size", 0))
    return peak, at_peak


def group_blocks(blocks: Iterable[dict[str, Any]], depth: int = 2) -> list[tuple[str, int, int]]:
    """(source key, bytes, count) of ``blocks``, largest first."""
    sizes: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for block in blocks:
        key = frame_key(block.get("frames", []), depth)
        sizes[key] += int(block.get("size", 0))
        counts[key] += 1
    return [(key, size, counts[key]) for key, size in sizes.most_common()]


def block_rows(blocks: Iterable[dict[str, Any]], min_bytes: int) -> list[dict[str, Any]]:
    """Each block of at least ``min_bytes`` alive at the peak, largest first, in allocation order within
    a size: its size, Python source and (with C++ stacks) the native op that asked for it."""
    rows = [
        {
            "mib": int(b.get("size", 0)) / 2**20,
            "source": frame_key(b.get("frames", []), 3),
            "native": native_key(b.get("frames", [])),
        }
        for b in blocks
        if int(b.get("size", 0)) >= min_bytes
    ]
    return sorted(rows, key=lambda r: -r["mib"])


def _trace_one(built: Any, workload: Any, seq: int, device: str, stacks: str = "python") -> dict[str, Any]:
    import torch

    from benchmarks.worker import batch_for_step, train_step

    ids = batch_for_step(0, 1, seq, workload.vocab_size, 0).to(device)
    train_step(built.model, built.optimizer, ids, device, built.step_context)  # warm: states, buffers
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks=stacks)
    # torch 2.11 loses the early-stop exception of checkpoint inside custom Functions while the history
    # is recorded (pytorch/pytorch#179536): recompute whole layers while tracing.
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):
        train_step(built.model, built.optimizer, ids, device, built.step_context)
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    index = torch.cuda.current_device()
    events = snapshot["device_traces"][index]
    peak, blocks = live_at_peak(events)
    # The allocation that set the peak says in which phase it sits (which layer's backward, the loss, ...).
    # (``live_at_peak`` keeps allocation order, and the peak is set by an allocation: the last block.)
    newest = blocks[-1] if blocks else {}
    return {
        "peak_allocation": frame_key(newest.get("frames", []), depth=6) if newest else "",
        "seq": seq,
        "base_gib": base / 2**30,
        "max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "trace_peak_gib": peak / 2**30,
        "events": len(events),
        "blocks": block_rows(blocks, min_bytes=seq * 256),  # from 1/16 of a 2048-wide bf16 hidden state
        "groups": [
            {"source": key, "mib": size / 2**20, "blocks": count} for key, size, count in group_blocks(blocks)
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="mistral-7b-qlora")
    parser.add_argument("--system", default="cpt_offload")
    parser.add_argument(
        "--layers", type=int, default=2, help="decoder layers (fewer: faster, same per-layer set)"
    )
    parser.add_argument("--seqs", default="8192,16384")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--cpp", action="store_true", help="record C++ frames too (slower): names the op behind each block"
    )
    args = parser.parse_args(argv)

    import torch

    from benchmarks.systems import build_system
    from benchmarks.workloads import WORKLOADS

    if not torch.cuda.is_available():
        print("memory_trace: needs a CUDA device")
        return 2
    os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    workload = dataclasses.replace(WORKLOADS[args.workload], num_hidden_layers=args.layers)
    built = build_system(args.system, workload, "cuda")
    results = []
    for seq in (int(s) for s in args.seqs.split(",")):
        result = _trace_one(built, workload, seq, "cuda", stacks="all" if args.cpp else "python")
        results.append(result)
        print(
            f"\n== {args.system} {workload.name} layers={args.layers} seq={seq}: base {result['base_gib']:.2f} GiB,"
            f" step peak {result['max_allocated_gib']:.2f} GiB, trace peak +{result['trace_peak_gib']:.2f} GiB"
        )
        print(f"peak reached by: {result['peak_allocation']}")
        for group in result["groups"][: args.top]:
            kib = group["mib"] * 1024 / seq
            print(f"{group['mib']:9.1f} MiB {kib:7.1f} KiB/tok {group['blocks']:4d}  {group['source']}")
        print("blocks:")
        for block in result["blocks"][: args.top]:
            print(f"{block['mib']:9.1f} MiB  {block['source']}  {block['native']}")
    if len(results) >= 2:
        a, b = results[0], results[1]
        slope = (b["max_allocated_gib"] - a["max_allocated_gib"]) * 2**20 / (b["seq"] - a["seq"])
        print(f"\nslope of step peak: {slope:.1f} KiB/token ({a['seq']} -> {b['seq']})")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        path = Path(args.out) / f"memory_trace_{args.system}_{workload.name}.json"
        path.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
