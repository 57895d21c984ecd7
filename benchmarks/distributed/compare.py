"""Compares the runs of the multi-GPU check with the single-process reference; exits 1 on a mismatch.

    python -m benchmarks.distributed.compare OUT_DIR [--out OUT_DIR/summary.md]

Reads every ``*.json`` that ``train.py`` wrote (or a stub ``{"label", "unavailable" | "failed"}`` left by
``multi_gpu_check.sh``), prints a markdown report and writes it to ``--out``. The reference is the run
whose engine is ``single`` (one process, the whole global batch per step).

Checks, for every run (the reference included where it applies):
- batches: per step, the multiset of row hashes over all ranks equals the reference's (same global batch);
- loss: the Trainer's logged loss per step within the tolerance of the reference's (below);
- gathered: the logged loss equals the global loss rebuilt from every rank's own forward loss (so the
  Trainer's loss is the mean over all ranks, not rank 0's; the ranks' losses differ, see train.py);
- lr: the logged LoRA and embedding learning rates equal the reference's at every step;
- embedding group: the optimizer, after the Trainer/accelerate prepared (and for FSDP2 sharded) it, has
  an ``embeddings`` group with initial lr = 1/10 of the LoRA group's and a non-zero parameter count;
- kernels (CUDA runs that asked for them): the four kernels patched in and each kernel module has at
  least one compiled Triton kernel in the process;
- checkpointing: the mode that ran is the one asked for (offload on the CPU falls back to recompute);
  offload also left host buffers allocated on every rank.

Loss tolerance. Every run sees the same rows and starts from the same weights, so the differences are
floating-point only: reduction order (gradients all-reduced / reduce-scattered over 2 ranks, matmuls
over 2 rows instead of 4), bf16 gradient communication (FSDP2 reduces in bf16 under accelerate's policy,
DeepSpeed communicates bf16 gradients), bf16 copies of the fp32-mastered LoRA/embedding weights
(DeepSpeed) and a bf16 residual stream (FSDP2 gathers the fp32 embeddings in bf16; the reference keeps
the embedding output in fp32). Each perturbs gradients or activations by ~1e-3 relative or less;
AdamW turns that into weight differences of the same relative order, which add up over the steps. So
we expect per-step loss differences of order 1e-3 relative at most and allow 1e-2 (``BF16_RTOL``):
several times that expectation, yet tight enough that gross faults show (on these data, which ranks see
rows of very different loss, a loss from rank 0 only, an unsynchronised gradient or embeddings at the
LoRA learning rate are expected to move the loss by more; the exact checks above catch the first and
the LR ones in any case). fp32 runs (the CPU tests) agree to ~1e-7; they get ``FP32_RTOL`` = 1e-4.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

BF16_RTOL = 1e-2
FP32_RTOL = 1e-4
GATHER_RTOL = 1e-5  # logged loss vs the sum of the ranks' losses: the same fp32 numbers, summed differently
# FSDP2 under accelerate's bf16 policy casts every unit's output to bf16 (output_dtype), the root's loss
# included: the Trainer then logs a bf16-rounded loss (half an ulp = 2**-9 relative) while train.py's
# forward hook, which runs before FSDP2's, records the fp32 one.
GATHER_RTOL_BF16_OUTPUT = 2**-8
LR_RTOL = 1e-6
EMBEDDING_RATIO = 0.1
KERNEL_MODULES = ("rms_norm", "rope", "swiglu", "fused_linear_cross_entropy")
REFERENCE_ENGINE = "single"


def load_runs(paths: list[Path]) -> list[dict[str, Any]]:
    files: list[Path] = []
    for path in paths:
        files.extend(sorted(path.glob("*.json")) if path.is_dir() else [path])
    runs = []
    for file in files:
        try:
            run = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as error:
            run = {"label": file.stem, "failed": f"unreadable JSON ({error})"}
        if isinstance(run, dict) and "label" in run:
            run.setdefault("file", file.name)
            runs.append(run)
    return runs


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def loss_rtol(run: dict[str, Any]) -> float:
    return FP32_RTOL if run.get("precision") == "fp32" else BF16_RTOL


def step_hashes(run: dict[str, Any]) -> list[Counter]:
    ranks = run.get("rank_row_hashes") or []
    steps = min((len(r) for r in ranks), default=0)
    return [Counter(h for r in ranks for h in r[i]) for i in range(steps)]


def embedding_group(run: dict[str, Any]) -> tuple[dict | None, dict | None]:
    """The lora and embeddings groups of the prepared optimizer; ``total_numel`` counts every rank's
    share under DeepSpeed (whose groups hold this rank's flat fp32 partition), the global size otherwise
    (FSDP2's DTensors report their global size)."""
    groups = run.get("param_groups") or []
    if str(run.get("engine", "")).startswith("deepspeed"):
        per_rank = run.get("param_groups_local_numel_per_rank") or []
        totals = [sum(x) for x in zip(*per_rank, strict=True)] if per_rank else []
    else:
        totals = [g.get("numel", 0) for g in groups]
    groups = [{**g, "total_numel": n} for g, n in zip(groups, totals, strict=False)]
    lora = next((g for g in groups if str(g.get("cpt_group")) == "lora"), None)
    embed = next((g for g in groups if str(g.get("cpt_group", "")).startswith("embeddings")), None)
    return lora, embed


def check_run(run: dict[str, Any], ref: dict[str, Any] | None) -> dict[str, Any]:
    """The checks of one run; ``problems`` lists what failed (empty: the run passes)."""
    out: dict[str, Any] = {"problems": []}
    problems = out["problems"]
    losses = run.get("loss") or []
    if not losses:
        problems.append("no logged losses")
        return out
    if ref is not None and ref is not run:
        ref_losses = ref.get("loss") or []
        if len(ref_losses) != len(losses):
            problems.append(f"{len(losses)} logged steps, reference has {len(ref_losses)}")
        diffs = [abs(a - b) for a, b in zip(losses, ref_losses, strict=False)]
        rels = [_rel(a, b) for a, b in zip(losses, ref_losses, strict=False)]
        if rels:
            out["max_abs_diff"] = max(diffs)
            out["max_rel_diff"] = max(rels)
            out["worst_step"] = rels.index(max(rels)) + 1
            tol = loss_rtol(run)
            out["rtol"] = tol
            if max(rels) > tol:
                problems.append(
                    f"loss differs by {max(rels):.2e} relative at step {out['worst_step']} (> {tol:g})"
                )
        mine, theirs = step_hashes(run), step_hashes(ref)
        same = len(mine) == len(theirs) and all(a == b for a, b in zip(mine, theirs, strict=True))
        out["same_batches"] = same
        if not same:
            problems.append("the global batches differ from the reference's (row hashes)")
        for key in ("learning_rate", "embedding_learning_rate"):
            a, b = run.get(key) or [], ref.get(key) or []
            if len(a) != len(b) or any(
                x is None or y is None or abs(x - y) > LR_RTOL * max(abs(y), 1e-12)
                for x, y in zip(a, b, strict=True)
            ):
                problems.append(f"{key} per step differs from the reference's")
    rebuilt = run.get("global_loss_from_ranks") or []
    bf16_output = str(run.get("engine", "")).startswith("fsdp") and run.get("precision") == "bf16"
    gather_rtol = GATHER_RTOL_BF16_OUTPUT if bf16_output else GATHER_RTOL
    gathered = len(rebuilt) == len(losses) and all(
        _rel(a, b) <= gather_rtol for a, b in zip(losses, rebuilt, strict=True)
    )
    out["gathered"] = gathered
    if not gathered:
        problems.append("the logged loss is not the global loss rebuilt from all ranks")
    lora, embed = embedding_group(run)
    out["embedding_group"] = embed
    if embed is None or lora is None:
        problems.append("no embeddings/lora parameter group in the prepared optimizer")
    else:
        if _rel(embed["initial_lr"], EMBEDDING_RATIO * lora["initial_lr"]) > LR_RTOL:
            problems.append(
                f"embedding group initial lr {embed['initial_lr']:g} is not {EMBEDDING_RATIO} x {lora['initial_lr']:g}"
            )
        if not embed.get("total_numel"):
            problems.append("the embedding group holds no parameters")
    if run.get("device") == "cuda" and run.get("kernels_requested"):
        state = run.get("kernels") or {}
        patched = state.get("patched") or {}
        missing = [k for k in KERNEL_MODULES if not patched.get(k)]
        compiled = state.get("triton_compiled")
        if isinstance(compiled, dict):
            for module in KERNEL_MODULES:
                n = sum(
                    v for k, v in compiled.items() if k.startswith(module + ".") and k.endswith("_kernel")
                )
                if n < 1 and module not in missing:
                    missing.append(f"{module} (not compiled)")
        out["kernels_ok"] = not missing
        if missing:
            problems.append(f"kernels not in use: {', '.join(missing)}")
    requested, ran = run.get("checkpointing_requested"), run.get("checkpointing_mode")
    expected = "recompute" if requested == "offload" and run.get("device") != "cuda" else requested
    if ran != expected:
        problems.append(f"checkpointing ran as {ran!r}, expected {expected!r}")
    if ran == "offload":
        pools = run.get("offload_pool_per_rank") or []
        if not pools or any(not p.get("allocations") for p in pools):
            problems.append("offload left no host buffers on some rank")
    return out


def _fmt(x: Any, spec: str = ".4f", none: str = "–") -> str:
    return none if x is None else format(x, spec)


def report(runs: list[dict[str, Any]]) -> tuple[str, bool]:
    """The markdown report and whether every run passed."""
    refs = [r for r in runs if r.get("engine") == REFERENCE_ENGINE and not r.get("failed")]
    ref = refs[0] if refs else None
    order = {"single": 0, "ddp": 1, "fsdp2": 2, "fsdp1": 3}
    runs = sorted(runs, key=lambda r: (order.get(str(r.get("engine")), 4), str(r.get("label"))))
    lines = ["## Multi-GPU check: engines vs the single-process run (same global batch)", ""]
    ok = ref is not None
    if ref is None:
        lines.append("**No single-process reference run: losses cannot be compared.**\n")
    else:
        losses = ref["loss"]
        lines.append(
            f"Reference `{ref['label']}`: {ref.get('workload')} on {ref.get('gpu') or ref.get('device')}, "
            f"{ref.get('global_batch')} x {ref.get('seq_len')} tokens per step, {ref.get('steps')} steps, "
            f"lr {ref.get('lr')} (embeddings x{EMBEDDING_RATIO}), {ref.get('precision')}; loss "
            f"{losses[0]:.4f} -> {losses[-1]:.4f}. Tolerance: max relative loss difference per step "
            f"{loss_rtol(ref):g} (see compare.py)."
        )
        lines.append("")
    header = (
        "| run | engine | GPUs | ckpt | final loss | max \\|Δloss\\| (rel) | batches | loss gathered "
        "| embedding group lr / params | tokens/s per GPU | tokens/s total | peak GiB (max rank) | status |"
    )
    lines += [header, "|" + "---|" * 13]
    for run in runs:
        label = run.get("label")
        if run.get("unavailable"):
            lines.append(
                f"| {label} | – | – | – | – | – | – | – | – | – | – | – | unavailable: {run['unavailable']} |"
            )
            continue
        if run.get("failed"):
            ok = False
            lines.append(
                f"| {label} | – | – | – | – | – | – | – | – | – | – | – | **FAILED**: {run['failed']} |"
            )
            continue
        result = check_run(run, ref)
        ok = ok and not result["problems"]
        lora, embed = embedding_group(run)
        embed_text = (
            f"{embed['initial_lr']:.1e} (LoRA {lora['initial_lr']:.1e}) / {embed['total_numel'] / 1e6:.2f}M"
            if embed and lora
            else "missing"
        )
        if embed and embed.get("dtensors"):
            embed_text += " (DTensor)"
        peaks = [p for p in run.get("peak_allocated_gib_per_rank") or [] if p is not None]
        diff = (
            "reference"
            if run is ref
            else f"{_fmt(result.get('max_abs_diff'))} ({_fmt(result.get('max_rel_diff'), '.1e')})"
        )
        batches = "reference" if run is ref else ("same" if result.get("same_batches") else "DIFFER")
        status = "ok" if not result["problems"] else "**FAIL**: " + "; ".join(result["problems"])
        lines.append(
            f"| {label} | {run.get('engine')} | {run.get('world_size')} | {run.get('checkpointing_mode')} "
            f"| {run['loss'][-1]:.4f} | {diff} | {batches} | {'yes' if result.get('gathered') else 'NO'} "
            f"| {embed_text} | {_fmt(run.get('tokens_per_second_per_gpu'), ',.0f')} "
            f"| {_fmt(run.get('tokens_per_second'), ',.0f')} | {_fmt(max(peaks) if peaks else None, '.2f')} "
            f"| {status} |"
        )
    trained = [r for r in runs if r.get("loss") and not r.get("failed") and not r.get("unavailable")]
    if trained:
        lines += ["", "Per-step logged loss:", ""]
        lines.append("| step | " + " | ".join(str(r["label"]) for r in trained) + " |")
        lines.append("|---|" + "---|" * len(trained))
        for i in range(max(len(r["loss"]) for r in trained)):
            cells = [_fmt(r["loss"][i]) if i < len(r["loss"]) else "–" for r in trained]
            lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
        first = trained[0]
        lines += [
            "",
            f"Versions: {', '.join(f'{k} {v}' for k, v in (first.get('versions') or {}).items())}. "
            f"Optimizers (outermost first): "
            + "; ".join(f"{r['label']}: {' > '.join(r.get('optimizer_chain') or [])}" for r in trained)
            + ". Kernels in use: "
            + "; ".join(f"{r['label']}: {_kernel_text(r)}" for r in trained)
            + ".",
        ]
    lines += ["", f"**Overall: {'PASS' if ok else 'FAIL'}**"]
    return "\n".join(lines) + "\n", ok


def _kernel_text(run: dict[str, Any]) -> str:
    patched = (run.get("kernels") or {}).get("patched") or {}
    names = [k for k in KERNEL_MODULES if patched.get(k)]
    return ", ".join(names) if names else "none"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="JSON files or folders holding them")
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    args = parser.parse_args(argv)
    runs = load_runs(args.paths)
    if not runs:
        print("no run JSON found", file=sys.stderr)
        return 2
    text, ok = report(runs)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
