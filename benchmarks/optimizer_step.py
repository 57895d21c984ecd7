"""Host and wall time of one 8-bit AdamW step over a workload's LoRA factors: bitsandbytes' AdamW8bit
against cpt-plugin's BatchedAdamW8bit (``optim_8bit``), without building the model.

Why: in the Mistral-7B QLoRA step the optimizer phase was 30 ms of host-bound wall time (one launch and
one device synchronization per tensor, 448 LoRA factors); this measures that phase alone, in seconds,
for each implementation. Each step starts on an idle device, as the profile's phases do.

    python -m benchmarks.optimizer_step --workload mistral-7b-qlora --out DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.workloads import LORA_TARGETS, WORKLOADS


def _fans(w, target: str) -> tuple[int, int]:
    """(in, out) of a LoRA target of workload ``w``."""
    h, i = w.hidden_size, w.intermediate_size
    q, kv = w.num_attention_heads * w.resolved_head_dim, w.num_key_value_heads * w.resolved_head_dim
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}[target]  # fmt: skip


def lora_factors(workload: str, device: str, layers: int | None = None) -> list[torch.nn.Parameter]:
    """fp32 LoRA A (r x in) and B (out x r) for every target of every layer, with gradients, as PEFT
    makes them."""
    w = WORKLOADS[workload]
    r = w.recipe.lora_r
    params = []
    for _ in range(layers or w.num_hidden_layers):
        for target in LORA_TARGETS:
            fan_in, fan_out = _fans(w, target)
            for shape in ((r, fan_in), (fan_out, r)):
                p = torch.nn.Parameter(torch.randn(shape, device=device) * 0.01)
                p.grad = torch.randn_like(p) * 1e-3
                params.append(p)
    return params


def time_steps(optimizer: torch.optim.Optimizer, device: str, steps: int) -> dict:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    optimizer.step()  # states created, plans built
    host, wall = [], []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        optimizer.step()
        host.append(time.perf_counter() - start)
        sync()
        wall.append(time.perf_counter() - start)
    return {"host_ms": statistics.median(host) * 1e3, "wall_ms": statistics.median(wall) * 1e3}


def measure(workload: str, device: str, steps: int, layers: int | None = None) -> list[dict]:
    import bitsandbytes as bnb

    from cpt_plugin.optim_8bit import BatchedAdamW8bit

    rows = []
    for cls in (bnb.optim.AdamW8bit, BatchedAdamW8bit):
        params = lora_factors(workload, device, layers)
        row = {"optimizer": cls.__name__, "tensors": len(params), "elements": sum(p.numel() for p in params)}
        row.update(time_steps(cls(params, lr=1e-4, weight_decay=0.0), device, steps))
        rows.append(row)
        del params
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="mistral-7b-qlora", choices=sorted(WORKLOADS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the workload's")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = measure(args.workload, args.device, args.steps, args.layers)
    for row in rows:
        print(
            f"{row['optimizer']:>18}: {row['tensors']} tensors, {row['elements'] / 1e6:.1f}M elements: "
            f"host {row['host_ms']:.2f} ms, wall {row['wall_ms']:.2f} ms per step"
        )
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "optimizer_step.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
