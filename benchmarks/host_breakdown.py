"""Where the host's time goes in one training forward, by Python function: inclusive and self ms per step.

  python -m benchmarks.host_breakdown [--system cpt_nogc] [--workload llama-1b] [--shape 4x2048] [--out DIR]

Why: a profile of cpt_nogc on an H200 (docs/BENCHMARKS.md, seventh session) showed the forward taking
50 ms of host time against 68 ms of wall, with the device idle before the first kernel of many LoRA
groups, RoPE and RMSNorm calls: the forward is launch-bound. torch.profiler and cProfile inflate exactly
these costs, so here the functions that make up a decoder layer's forward (the layer, attention, MLP,
norms, RoPE, SDPA, PEFT's LoRA layers, our fused LoRA functions, Triton's launcher, the fused loss) are
wrapped by a light stack timer (~1 µs per call) and only the host clock is read: nothing synchronizes
inside a forward. Each forward is followed by its backward and optimizer step (untimed), as in training.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any


class StackTimer:
    """Inclusive and self time per name for nested wrapped calls on one thread."""

    def __init__(self) -> None:
        self.stack: list[list[Any]] = []
        self.totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])  # count, inclusive, self
        self.enabled = False

    def wrap(self, name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.enabled:
                return fn(*args, **kwargs)
            frame = [time.perf_counter(), 0.0]
            self.stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                self.stack.pop()
                inclusive = time.perf_counter() - frame[0]
                entry = self.totals[name]
                entry[0] += 1
                entry[1] += inclusive
                entry[2] += inclusive - frame[1]
                if self.stack:
                    self.stack[-1][1] += inclusive

        return timed


def instrument(timer: StackTimer, model: Any, model_type: str) -> None:
    """Wraps the functions of one forward at the places the model looks them up at call time."""
    import importlib

    import triton.runtime.jit as triton_jit
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    modeling = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    prefix = {"llama": "Llama", "mistral": "Mistral", "qwen3": "Qwen3", "qwen2": "Qwen2"}[model_type]

    def wrap_attr(owner: Any, attr: str, name: str) -> None:
        original = getattr(owner, attr, None)
        if original is not None:
            setattr(owner, attr, timer.wrap(name, original))

    wrap_attr(getattr(modeling, f"{prefix}Model"), "forward", "model body")
    wrap_attr(getattr(modeling, f"{prefix}RotaryEmbedding"), "forward", "rotary embedding")
    wrap_attr(modeling, "create_causal_mask", "causal mask")
    wrap_attr(getattr(modeling, f"{prefix}DecoderLayer"), "forward", "decoder layer")
    wrap_attr(getattr(modeling, f"{prefix}Attention"), "forward", "attention module")
    wrap_attr(getattr(modeling, f"{prefix}MLP"), "forward", "mlp module")
    wrap_attr(modeling, "apply_rotary_pos_emb", "rope")
    norm_classes = {type(m) for m in model.modules() if type(m).__name__.endswith("RMSNorm")}
    for cls in norm_classes:
        wrap_attr(cls, "forward", "rms_norm module")
    if "sdpa" in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = timer.wrap("sdpa", ALL_ATTENTION_FUNCTIONS["sdpa"])
    wrap_attr(triton_jit.JITFunction, "run", "triton launch")
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear

        wrap_attr(LoraLinear, "forward", "peft lora layer")
    except ImportError:
        pass
    try:
        import cpt_plugin.kernels.fused_linear_cross_entropy as fused_loss
        import cpt_plugin.patching.lora as patching_lora

        for attr in ("lora_grouped_linear", "lora_linear", "lora_gated_mlp", "projection_of"):
            wrap_attr(patching_lora, attr, attr)
        wrap_attr(fused_loss, "fused_linear_cross_entropy", "fused loss")
    except ImportError:
        pass


def breakdown(
    system: str, workload_name: str, batch: int, seq: int, steps: int, device: str = "cuda"
) -> dict[str, Any]:
    import torch

    from benchmarks.hw import synchronize
    from benchmarks.systems import build_system
    from benchmarks.worker import batch_for_step, train_step
    from benchmarks.workloads import resolve_workload

    workload = resolve_workload(workload_name, device)
    torch.manual_seed(0)
    built = build_system(system, workload, device, seed=0, max_seq_length=seq)
    model, optimizer = built.model, built.optimizer
    for i in range(3):
        train_step(model, optimizer, batch_for_step(i, batch, seq, workload.vocab_size, 0).to(device), device)
    timer = StackTimer()
    instrument(timer, model, workload.model_type)
    forward_ms = []
    for i in range(3, 3 + steps):
        ids = batch_for_step(i, batch, seq, workload.vocab_size, 0).to(device)
        synchronize(device)
        timer.enabled = True
        start = time.perf_counter()
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        forward_ms.append(1e3 * (time.perf_counter() - start))
        timer.enabled = False
        synchronize(device)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    rows = {
        name: {
            "calls_per_step": count / steps,
            "inclusive_ms": 1e3 * inclusive / steps,
            "self_ms": 1e3 * own / steps,
            "us_per_call": 1e6 * inclusive / max(count, 1),
        }
        for name, (count, inclusive, own) in sorted(timer.totals.items(), key=lambda kv: -kv[1][2])
    }
    forward_ms.sort()
    return {
        "system": system,
        "workload": workload.name,
        "batch": batch,
        "seq": seq,
        "steps": steps,
        "forward_host_ms_median": forward_ms[len(forward_ms) // 2],
        "functions": rows,
    }


def render(result: dict[str, Any]) -> str:
    lines = [
        f"### Host time of one forward: {result['system']}, {result['workload']} "
        f"{result['batch']} x {result['seq']} (median forward host {result['forward_host_ms_median']:.1f} ms)",
        "",
        "| function | calls/step | inclusive ms | self ms | µs/call |",
        "|---|---|---|---|---|",
    ]
    for name, row in result["functions"].items():
        lines.append(
            f"| {name} | {row['calls_per_step']:.0f} | {row['inclusive_ms']:.2f} | {row['self_ms']:.2f} "
            f"| {row['us_per_call']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--systems", default="cpt_nogc")
    parser.add_argument("--workload", default="llama-1b")
    parser.add_argument("--shape", default="4x2048")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    batch, seq = (int(v) for v in args.shape.split("x"))
    for system in args.systems.split(","):
        result = breakdown(system, args.workload, batch, seq, args.steps, args.device)
        text = render(result)
        print(text)
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{system}_host_breakdown.json").write_text(json.dumps(result, indent=1))
            (out / f"{system}_host_breakdown.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
