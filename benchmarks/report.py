"""Markdown tables (ratios against HF, and for cpt-plugin rows against Unsloth measured in the same run),
PNGs and the docs/BENCHMARKS.md section from the results JSON.

  python -m benchmarks.report DIR [--docs docs/BENCHMARKS.md] [--summary]

DIR holds results.json (from benchmarks.run) and/or kernels.json (from benchmarks.kernels).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

from benchmarks.flops import FORMULA
from benchmarks.hw import PACKAGES
from benchmarks.search import memory_slope_kib_per_token

BASELINE = "hf"
# cpt-plugin rows are also compared with Unsloth: checkpointed rows with its default (offloaded)
# checkpointing, rows without checkpointing with its no-checkpointing system.
UNSLOTH_GC, UNSLOTH_NOGC = "unsloth", "unsloth_nogc"


def load(out_dir: str | Path) -> dict[str, Any]:
    """results.json and kernels.json of one output directory, merged ({} where absent); throughput rows of
    several rounds (``--rounds``) collapsed to one per system and shape (see collapse_rounds)."""
    out = Path(out_dir)
    data: dict[str, Any] = {}
    if (out / "results.json").exists():
        data = json.loads((out / "results.json").read_text())
    if (out / "kernels.json").exists():
        data["kernels"] = json.loads((out / "kernels.json").read_text())
    if data.get("train"):
        data["train"] = collapse_rounds(data["train"])
    return data


def collapse_rounds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (workload, batch, seq, system), in first-seen order: the round with the median tokens/s
    (the lower middle of an even count), its peak memory replaced by the highest of any round, and every
    round's tokens/s kept in ``rounds_tokens_per_s``. A system with no successful round keeps its first row."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        key = (row.get("workload"), row.get("batch"), row.get("seq"), row.get("system"))
        groups.setdefault(key, []).append(row)
    collapsed = []
    for group in groups.values():
        ok = [r for r in group if r.get("status") == "ok" and r.get("tokens_per_s")]
        if len(group) == 1 or not ok:
            collapsed.append(group[0])
            continue
        ok.sort(key=lambda r: r["tokens_per_s"])
        row = dict(ok[(len(ok) - 1) // 2])
        row["rounds_tokens_per_s"] = [r["tokens_per_s"] for r in ok]
        for key in ("peak_allocated_gib", "peak_reserved_gib"):
            values = [r[key] for r in ok if r.get(key) is not None]
            if values:
                row[key] = max(values)
        collapsed.append(row)
    return collapsed


def _f(value: Any, spec: str = ".2f", suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:{spec}}{suffix}"


def _ratio(value: Any, base: Any) -> str:
    if not value or not base:
        return "–"
    return f"{value / base:.2f}x"


def _status(row: dict[str, Any]) -> str:
    status = row.get("status", "?")
    rounds = row.get("rounds_tokens_per_s")
    if status == "ok" and rounds:
        return f"ok, median of {len(rounds)} rounds ({min(rounds):,.0f}–{max(rounds):,.0f} tok/s)"
    if status == "ok":
        return "ok"
    error = str(row.get("error", "")).replace("|", "/").replace("\n", " ")
    return f"{status}: {error[:120]}" if error else status


def environment_lines(data: dict[str, Any]) -> list[str]:
    env = data.get("hardware", {}).get("environment") or data.get("kernels", {}).get("environment") or {}
    meta = data.get("meta", {})
    lines = []
    if env:
        mem = env.get("card_memory_gib")
        lines.append(f"- Card: **{env.get('card')}**" + (f" ({mem:.1f} GiB visible)" if mem else ""))
        versions = ", ".join(f"{k} {env.get(k)}" for k in ("torch", *PACKAGES) if env.get(k))
        lines.append(f"- Versions: {versions}; CUDA {env.get('cuda')}")
        lines.append(f"- Date: {env.get('date')}")
    if meta:
        lines.append(
            f"- Command: `{meta.get('command')}` (suite {meta.get('suite')}, device {meta.get('device')}, "
            f"{meta.get('warmup')} warm-up + {meta.get('steps')} timed steps, seed {meta.get('seed')})"
        )
        lines.append(f"- Precision: {meta.get('precision')}; {meta.get('allocator')}")
    hw = data.get("hardware", {})
    if hw.get("matmul_tflops"):
        lines.append(
            f"- bf16 matmul rate measured in this run: {hw['matmul_tflops']:.1f} TFLOP/s "
            f"({hw.get('matmul_n')}³, median)"
        )
    kern = data.get("kernels", {})
    if kern.get("copy_gbps"):
        lines.append(
            f"- Device copy rate measured in the kernel run: {kern['copy_gbps']:.0f} GB/s (read + write)"
        )
    return lines


def _baseline(
    rows: list[dict[str, Any]], row: dict[str, Any], system: str = BASELINE
) -> dict[str, Any] | None:
    """The ok row of ``system`` (default: HF) with the same workload and shape, or None."""
    for other in rows:
        if (
            other["system"] == system
            and other.get("status") == "ok"
            and other["workload"] == row["workload"]
            and other["batch"] == row["batch"]
            and other["seq"] == row["seq"]
        ):
            return other
    return None


def unsloth_reference(row: dict[str, Any]) -> str | None:
    """The Unsloth system a cpt-plugin row is compared with (None for other systems)."""
    if not row["system"].startswith("cpt"):
        return None
    mode = ((row.get("info") or {}).get("cpt_config") or {}).get("gradient_checkpointing")
    if mode is None:  # no info (a failed row): the variant's name says it
        mode = "off" if "nogc" in row["system"] else "recompute"
    return UNSLOTH_NOGC if mode == "off" else UNSLOTH_GC


def _unsloth_ratio(rows: list[dict[str, Any]], row: dict[str, Any], key: str) -> str:
    """'1.21x': ``row[key]`` over the same-run Unsloth row's (see unsloth_reference); '–' where none."""
    ref = unsloth_reference(row)
    other = (_baseline(rows, row, ref) or {}) if ref else {}
    return _ratio(row.get(key) if row.get("status") == "ok" else None, other.get(key))


def _vs_unsloth(rows: list[dict[str, Any]], row: dict[str, Any], key: str) -> str:
    """'1.21x (unsloth)', naming the Unsloth system compared with; '–' where there is none."""
    ratio = _unsloth_ratio(rows, row, key)
    return f"{ratio} ({unsloth_reference(row)})" if ratio != "–" else ratio


def train_table(data: dict[str, Any]) -> list[str]:
    rows = data.get("train", [])
    if not rows:
        return []
    out = [
        "| workload | batch × seq | system | tokens/s | vs HF | vs Unsloth | MFU | peak alloc (GiB) | vs HF | "
        "vs Unsloth | peak reserved (GiB) | trainable params | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = _baseline(rows, r) or {}
        ok = r.get("status") == "ok"
        tps = r.get("tokens_per_s") if ok else None
        peak = r.get("peak_allocated_gib") if ok else None
        trainable = (r.get("info") or {}).get("trainable_params")
        out.append(
            f"| {r['workload']} | {r['batch']} × {r['seq']} | {r['system']} | {_f(tps, ',.0f')} | "
            f"{_ratio(tps, base.get('tokens_per_s'))} | {_vs_unsloth(rows, r, 'tokens_per_s')} | "
            f"{_f(r.get('mfu', None) and 100 * r['mfu'], '.1f', '%')} | "
            f"{_f(peak)} | {_ratio(peak, base.get('peak_allocated_gib'))} | "
            f"{_vs_unsloth(rows, r, 'peak_allocated_gib')} | "
            f"{_f(r.get('peak_reserved_gib') if ok else None)} | {_f(trainable and trainable / 1e6, '.1f', 'M')} | "
            f"{_status(r)} |"
        )
    if any(unsloth_reference(r) for r in rows):
        out += [
            "",
            f"vs Unsloth: each cpt-plugin row against Unsloth in the same run — `{UNSLOTH_GC}` (its offloaded "
            f"checkpointing) for rows with checkpointing, `{UNSLOTH_NOGC}` for rows without.",
        ]
    return out


def loss_table(data: dict[str, Any]) -> list[str]:
    rows = [r for r in data.get("train", []) if r.get("status") == "ok" and r.get("losses")]
    if not rows:
        return []
    out = [
        "| workload | batch × seq | system | losses (warm-up + timed steps) | max abs diff vs HF |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        base = _baseline(rows, r)
        diff = None
        if base and base.get("losses"):
            pairs = list(zip(r["losses"], base["losses"], strict=False))
            diff = max(abs(a - b) for a, b in pairs) if pairs else None
        losses = " ".join(f"{x:.3f}" for x in r["losses"])
        out.append(
            f"| {r['workload']} | {r['batch']} × {r['seq']} | {r['system']} | {losses} | {_f(diff, '.4f')} |"
        )
    return out


def maxctx_table(data: dict[str, Any]) -> list[str]:
    rows = data.get("maxctx", [])
    if not rows:
        return []
    out = [
        "| workload | system | largest seq trained (batch 1) | first failure | search | KiB/token (alloc) | "
        "KiB/token (reserved) | peak alloc / reserved at largest (GiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        probes = r.get("probes") or []
        largest = next((p for p in probes if p.get("seq") == r.get("max_ok") and p.get("status") == "ok"), {})
        fail = next((p for p in probes if p.get("seq") == r.get("min_fail")), {})
        status = r.get("status")
        if status == "cap":
            status = f"≥ cap {r.get('cap'):,}"
        elif status == "exact":
            status = f"within {r.get('granularity'):,}"
        fail_text = f"{r['min_fail']:,} ({fail.get('status')})" if r.get("min_fail") else "–"
        out.append(
            f"| {r['workload']} | {r['system']} | {_f(r.get('max_ok'), ',')} | {fail_text} | {status} | "
            f"{_f(r.get('kib_per_token'), '.0f')} | {_f(r.get('reserved_kib_per_token'), '.0f')} | "
            f"{_f(largest.get('peak_allocated_gib'))} / {_f(largest.get('peak_reserved_gib'))} |"
        )
    return out


def _batch1_points(data: dict[str, Any]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Successful batch-1 training rows grouped by (workload, system), sorted by length."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in data.get("train", []):
        if r.get("status") == "ok" and r.get("batch") == 1 and r.get("peak_allocated_gib") is not None:
            groups.setdefault((r["workload"], r["system"]), []).append(r)
    return {k: sorted(v, key=lambda r: r["seq"]) for k, v in groups.items()}


def slope_table(data: dict[str, Any]) -> list[str]:
    """Memory per token of context: the slope of peak memory over the batch-1 training rows (>= 2 lengths),
    with each length's tokens/s next to the baseline's."""
    groups = {k: v for k, v in _batch1_points(data).items() if len({r["seq"] for r in v}) >= 2}
    if not groups:
        return []
    seqs = sorted({r["seq"] for rows in groups.values() for r in rows})
    head = " | ".join(f"tokens/s at {s:,} (vs HF)" for s in seqs)
    out = [
        f"| workload | system | KiB/token (alloc) | vs HF | peak alloc (GiB) at {', '.join(f'{s:,}' for s in seqs)} | {head} |",
        "|---|---|---|---|---|" + "---|" * len(seqs),
    ]
    slopes = {
        key: memory_slope_kib_per_token([(r["seq"], r["peak_allocated_gib"]) for r in rows])
        for key, rows in groups.items()
    }
    train_rows = data.get("train", [])
    for (workload, system), rows in groups.items():
        by_seq = {r["seq"]: r for r in rows}
        peaks = " / ".join(_f(by_seq[s]["peak_allocated_gib"]) if s in by_seq else "–" for s in seqs)
        speeds = []
        for s in seqs:
            r = by_seq.get(s)
            base = (_baseline(train_rows, r) or {}) if r else {}
            vs_unsloth = _vs_unsloth(train_rows, r, "tokens_per_s") if r else "–"
            speeds.append(
                f"{_f(r['tokens_per_s'], ',.0f')} ({_ratio(r['tokens_per_s'], base.get('tokens_per_s'))}"
                + (f"; {vs_unsloth} vs Unsloth)" if vs_unsloth != "–" else ")")
                if r
                else "–"
            )
        slope = slopes[(workload, system)]
        out.append(
            f"| {workload} | {system} | {_f(slope, '.0f')} | {_ratio(slope, slopes.get((workload, BASELINE)))} | "
            f"{peaks} | " + " | ".join(speeds) + " |"
        )
    return out


def plan_table(data: dict[str, Any]) -> list[str]:
    """The memory planner's predicted peak against the peak measured over the timed steps."""
    rows = [r for r in data.get("train", []) if r.get("status") == "ok" and r.get("memory_plan")]
    if not rows:
        return []
    lines = [
        "| workload | batch × seq | system | plan | budget (GiB) | predicted peak | measured peak (+ graph pool) | error "
        "| longest predicted to fit (tokens) | loss chunk (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        plan = r["memory_plan"]
        measured = r.get("timed_peak_allocated_gib", r.get("peak_allocated_gib"))
        if measured is not None:  # the graphs' pool is reserved, not allocated; the prediction counts it
            measured += plan.get("graph_pool_gib") or 0.0
        error = (plan["predicted_peak_gib"] - measured) / measured if measured else None
        lines.append(
            f"| {r['workload']} | {r['batch']} × {r['seq']} | {r['system']} | {plan['plan']}"
            f"{'; MLP products kept' if plan.get('mlp_products') else ''} | "
            f"{_f(plan.get('budget_gib'))} | {_f(plan['predicted_peak_gib'])} | {_f(measured)} | "
            f"{_f(error and 100 * error, '+.1f', '%')} | {plan.get('longest_tokens', '–')} | "
            f"{plan.get('loss_chunk_mib') or 'default'} |"
        )
    return lines


def kernel_table(data: dict[str, Any]) -> list[str]:
    kern = data.get("kernels", {})
    rows = kern.get("rows", [])
    if not rows:
        return []
    out = [
        "| op (shape) | impl | fwd+bwd (ms) | vs eager | GB/s | % of copy rate | TFLOP/s | extra peak (GiB) | "
        "rel. err vs eager | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        eager = next(
            (e for e in rows if e["op"] == r["op"] and e["impl"] == "eager" and e.get("status") == "ok"), {}
        )
        ms = r.get("ms") if r.get("status") == "ok" else None
        speedup = f"{eager['ms'] / ms:.2f}x" if ms and eager.get("ms") else "–"
        out.append(
            f"| {r['op']} ({r.get('shape', '')}) | {r['impl']} | {_f(ms, '.3f')} | {speedup} | {_f(r.get('gbps'), '.0f')} | "
            f"{_f(r.get('pct_copy'), '.0f', '%')} | {_f(r.get('tflops'), '.0f')} | {_f(r.get('extra_peak_gib'), '.2f')} | "
            f"{_f(r.get('rel_err'), '.1e')} | {_status(r)} |"
        )
    return out


def render_markdown(data: dict[str, Any], images: list[str] | None = None) -> str:
    meta = data.get("meta", {})
    suite = meta.get("suite", "kernels")
    lines = [
        f"## Results: {suite} suite ({meta.get('device', data.get('kernels', {}).get('device', '?'))})",
        "",
    ]
    lines += environment_lines(data) + [""]
    if meta.get("device") == "cpu":
        lines += ["**CPU dry run: tiny models, the numbers below are not timings of anything real.**", ""]
    for title, table in (
        ("Training throughput and memory", train_table(data)),
        ("First losses (same seed, same data for every system)", loss_table(data)),
        (
            "Memory per token of context (batch 1, slope of peak memory over the lengths run)",
            slope_table(data),
        ),
        ("Largest context at batch 1", maxctx_table(data)),
        ("The memory planner: predicted against measured peak (timed steps)", plan_table(data)),
        ("Kernels (forward + backward)", kernel_table(data)),
    ):
        if table:
            lines += [f"### {title}", ""] + table + [""]
    if data.get("train"):
        lines += [f"MFU = model FLOPs per token × tokens/s ÷ the bf16 matmul rate above; {FORMULA}.", ""]
    for image in images or []:
        lines += [f"![{image}]({image})", ""]
    return "\n".join(lines)


# -- figures ---------------------------------------------------------------------------------------
def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except Exception:  # noqa: BLE001 - matplotlib is optional on the GPU machine
        return None


def plot_training(data: dict[str, Any], path: Path) -> bool:
    """Grouped bars: tokens/s and peak allocated memory per (workload, batch x seq), one bar per system."""
    plt = _pyplot()
    rows = [r for r in data.get("train", []) if r.get("status") == "ok"]
    if plt is None or not rows:
        return False
    cases = list(dict.fromkeys((r["workload"], r["batch"], r["seq"]) for r in rows))
    systems = list(dict.fromkeys(r["system"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.5 * len(cases) * 2), 4.5))
    width = 0.8 / len(systems)
    for ax, key, label in (
        (axes[0], "tokens_per_s", "tokens/s"),
        (axes[1], "peak_allocated_gib", "peak allocated (GiB)"),
    ):
        for j, system in enumerate(systems):
            values = []
            for case in cases:
                match = [
                    r for r in rows if (r["workload"], r["batch"], r["seq"]) == case and r["system"] == system
                ]
                values.append(match[0].get(key) or 0.0 if match else 0.0)
            ax.bar([i + j * width for i in range(len(cases))], values, width, label=system)
        ax.set_xticks([i + width * (len(systems) - 1) / 2 for i in range(len(cases))])
        ax.set_xticklabels([f"{w}\n{b}×{s}" for w, b, s in cases], fontsize=8)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    card = (data.get("hardware", {}).get("environment") or {}).get("card", "")
    fig.suptitle(f"CPT workload: throughput and peak memory ({card})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_memory_vs_length(data: dict[str, Any], path: Path) -> bool:
    """Peak allocated memory against sequence length at batch 1, one line per (workload, system), from the
    training rows and the max-context probes together."""
    plt = _pyplot()
    points: dict[tuple[str, str], dict[int, float]] = {}
    for key, rows in _batch1_points(data).items():
        points.setdefault(key, {}).update({r["seq"]: r["peak_allocated_gib"] for r in rows})
    for r in data.get("maxctx", []):
        for p in r.get("probes") or []:
            if p.get("status") == "ok" and p.get("peak_allocated_gib") is not None:
                points.setdefault((r["workload"], r["system"]), {}).setdefault(
                    p["seq"], p["peak_allocated_gib"]
                )
    points = {k: v for k, v in points.items() if len(v) >= 2}
    if plt is None or not points:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for (workload, system), by_seq in points.items():
        seqs = sorted(by_seq)
        slope = memory_slope_kib_per_token([(s, by_seq[s]) for s in seqs])
        label = (
            f"{workload} {system} ({slope:.0f} KiB/token)" if slope is not None else f"{workload} {system}"
        )
        ax.plot(seqs, [by_seq[s] for s in seqs], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length at batch 1 (tokens)")
    ax.set_ylabel("peak allocated (GiB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    card = (data.get("hardware", {}).get("environment") or {}).get("card", "")
    ax.set_title(f"Peak memory against context length ({card})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_maxctx(data: dict[str, Any], path: Path) -> bool:
    """Peak allocated memory of every max-context probe against its length; failures marked with x."""
    plt = _pyplot()
    rows = [r for r in data.get("maxctx", []) if r.get("probes")]
    if plt is None or not rows:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in rows:
        ok = sorted(
            (p["seq"], p.get("peak_allocated_gib"))
            for p in r["probes"]
            if p.get("status") == "ok" and p.get("peak_allocated_gib") is not None
        )
        label = f"{r['workload']} {r['system']}"
        line = ax.plot([s for s, _ in ok], [m for _, m in ok], marker="o", label=label)[0] if ok else None
        fails = [p["seq"] for p in r["probes"] if p.get("status") not in ("ok", "unavailable")]
        if fails:
            top = max([m for _, m in ok], default=0.0)
            ax.scatter(
                fails,
                [top] * len(fails),
                marker="x",
                color=line.get_color() if line else None,
                label=None if line else label,
            )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length at batch 1 (tokens)")
    ax.set_ylabel("peak allocated (GiB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Max-context probes (x: failed length)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- outputs ---------------------------------------------------------------------------------------
MARK_START = "<!-- results:{key}:start -->"
MARK_END = "<!-- results:{key}:end -->"


def update_docs(docs_path: str | Path, markdown: str, key: str) -> None:
    """Replaces the marked block ``key`` of docs/BENCHMARKS.md (appends it when absent)."""
    path = Path(docs_path)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start, end = MARK_START.format(key=key), MARK_END.format(key=key)
    block = f"{start}\n{markdown.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def write_report(out_dir: str | Path, docs: str | Path | None = None) -> str:
    """Writes DIR/report.md and the PNGs; optionally updates the docs section of this suite and device."""
    out = Path(out_dir)
    data = load(out)
    images = []
    if plot_training(data, out / "training.png"):
        images.append("training.png")
    if plot_maxctx(data, out / "maxctx.png"):
        images.append("maxctx.png")
    if plot_memory_vs_length(data, out / "memory_vs_length.png"):
        images.append("memory_vs_length.png")
    markdown = render_markdown(data, images)
    (out / "report.md").write_text(markdown + "\n")
    if docs:
        meta = data.get("meta", {})
        key = f"{meta.get('suite', 'kernels')}-{meta.get('device', data.get('kernels', {}).get('device', 'cuda'))}"
        update_docs(docs, markdown, key)
    return markdown


def summary(data: dict[str, Any]) -> str:
    """A compact plain-text summary (the last lines of gpu_check.sh's output)."""
    lines = ["==== SUMMARY ===="]
    env = data.get("hardware", {}).get("environment") or data.get("kernels", {}).get("environment") or {}
    if env:
        lines.append(
            f"card {env.get('card')} | torch {env.get('torch')} | transformers {env.get('transformers')} | "
            f"peft {env.get('peft')} | triton {env.get('triton')} | liger {env.get('liger-kernel')}"
        )
    hw = data.get("hardware", {})
    if hw.get("matmul_tflops"):
        lines.append(f"bf16 matmul {hw['matmul_tflops']:.0f} TFLOP/s")
    rows = data.get("train", [])
    for r in rows:
        base = _baseline(rows, r) or {}
        if r.get("status") == "ok":
            lines.append(
                f"{r['workload']:>10} {r['batch']}x{r['seq']:<6} {r['system']:<12} {r['tokens_per_s']:>9,.0f} tok/s "
                f"({_ratio(r['tokens_per_s'], base.get('tokens_per_s'))})  peak {_f(r.get('peak_allocated_gib'))} GiB "
                f"({_ratio(r.get('peak_allocated_gib'), base.get('peak_allocated_gib'))})  "
                + (
                    f"vs {unsloth_reference(r)} {_unsloth_ratio(rows, r, 'tokens_per_s')} tok/s, "
                    f"{_unsloth_ratio(rows, r, 'peak_allocated_gib')} peak  "
                    if _unsloth_ratio(rows, r, "tokens_per_s") != "–"
                    else ""
                )
                + f"MFU {_f(r.get('mfu', None) and 100 * r['mfu'], '.1f', '%')}  "
                f"loss {r['losses'][0]:.3f}->{r['losses'][-1]:.3f}"
            )
            if r.get("memory_plan"):
                plan = r["memory_plan"]
                lines.append(
                    f"{'':>10} plan: {plan['plan']}; predicted {_f(plan['predicted_peak_gib'])} GiB, measured "
                    f"{_f(r.get('timed_peak_allocated_gib', r.get('peak_allocated_gib')))} GiB (timed steps); "
                    f"longest predicted to fit {plan.get('longest_tokens', '–')} tokens"
                )
        else:
            lines.append(f"{r['workload']:>10} {r['batch']}x{r['seq']:<6} {r['system']:<12} {_status(r)}")
    for r in data.get("maxctx", []):
        lines.append(
            f"maxctx {r['workload']} {r['system']:<12} ok {_f(r.get('max_ok'), ',')} fail "
            f"{_f(r.get('min_fail'), ',')} [{r.get('status')}] {_f(r.get('kib_per_token'), '.0f')} KiB/token"
        )
    kern = data.get("kernels", {})
    if kern.get("copy_gbps"):
        lines.append(
            f"copy {kern['copy_gbps']:.0f} GB/s, matmul {_f(kern.get('matmul_tflops'), '.0f')} TFLOP/s"
        )
    for r in kern.get("rows", []):
        if r.get("status") == "ok":
            lines.append(
                f"kernel {r['op']:<10} {r['impl']:<6} {r['ms']:8.3f} ms  {_f(r.get('pct_copy'), '.0f', '%')} of copy  "
                f"{_f(r.get('tflops'), '.0f')} TFLOP/s  +{_f(r.get('extra_peak_gib'))} GiB  err {_f(r.get('rel_err'), '.1e')}"
            )
        else:
            lines.append(f"kernel {r['op']:<10} {r['impl']:<6} {_status(r)[:100]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out_dir", help="directory with results.json and/or kernels.json")
    parser.add_argument(
        "--docs", default=None, help="update this markdown file's results section (docs/BENCHMARKS.md)"
    )
    parser.add_argument("--summary", action="store_true", help="print only the plain-text summary")
    args = parser.parse_args(argv)
    if args.summary:
        print(summary(load(args.out_dir)))
        return 0
    print(write_report(args.out_dir, args.docs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
