"""Tokens/s against peak memory for the memory planner's budgets, beside Unsloth and the fixed modes.

Why: the planner's point (issue 16) is that more memory buys speed; one picture of a W1 sweep over
``cpt_auto_*`` budgets answers "how much faster at how much memory" better than a table.

    python -m benchmarks.budget_curve RESULTS.json [RESULTS.json ...] --out budget_curve.png

Every system's step times are pooled over the rounds (and files) given; its point is the pooled median
step's tokens/s at its highest measured peak. Planner rows are labelled with their budget and plan.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def pooled_points(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per system: tokens/s of the pooled median step, the highest peak, the budget and plan (planner)."""
    points: dict[str, dict[str, Any]] = {}
    for result in results:
        for row in result.get("train", []):
            times = row.get("step_times_s") or []
            if not times or row.get("status", "ok") != "ok":
                continue
            point = points.setdefault(row["system"], {"times": [], "peak": 0.0, "tokens": 0})
            point["times"] += times
            point["peak"] = max(point["peak"], row.get("peak_allocated_gib") or 0.0)
            point["tokens"] = row["batch"] * row["seq"]
            plan = row.get("memory_plan")  # the planner rows only (benchmarks.worker.memory_plan)
            if plan:
                point["budget"] = plan.get("budget_gib")
                point["plan"] = plan.get("plan")
    for point in points.values():
        point["tokens_per_s"] = point["tokens"] / statistics.median(point.pop("times"))
    return points


def _short(plan: str) -> str:
    """'keep 2, recompute 5, offload 9, tiled MLP 0' -> 'keep 2 / rec 5 / off 9'."""
    parts = [p.strip() for p in plan.split(",") if p.strip() and not p.strip().endswith(" 0")]
    short = " / ".join(parts).replace("recompute", "rec").replace("offload", "off")
    return short.replace("tiled MLP", "tiled")


def plot(points: dict[str, dict[str, Any]], out: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    planned = sorted(
        ((p["peak"], p["tokens_per_s"], name, p) for name, p in points.items() if p.get("budget")),
        key=lambda item: item[0],
    )
    if planned:
        ax.plot([x for x, *_ in planned], [y for _, y, *_ in planned], "o-", color="tab:blue",
                label="cpt-plugin, gradient_checkpointing: auto")  # fmt: skip
        for index, (x, y, _name, point) in enumerate(planned):
            offset = (6, -16) if index % 2 == 0 else (6, 8)  # alternate sides: neighbours do not overlap
            ax.annotate(f"{point['budget']:.3g} GiB: {_short(point['plan'])}", (x, y), fontsize=7,
                        xytext=offset, textcoords="offset points")  # fmt: skip
    styles = {"unsloth": ("s", "tab:red", "Unsloth (its offloaded checkpointing)")}
    for name, point in points.items():
        if point.get("budget"):
            continue
        marker, color, label = styles.get(name, ("^", "tab:green", f"cpt-plugin {name}"))
        ax.plot(point["peak"], point["tokens_per_s"], marker, color=color, label=label, markersize=8)
    ax.set_xlabel("peak allocated memory (GiB)")
    ax.set_ylabel("tokens/s (pooled median step)")
    ax.set_title(title or "W1 (Llama-1B shapes, CPT recipe): speed against memory", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("budget_curve.png"))
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    results = [json.loads(path.read_text()) for path in args.results]
    points = pooled_points(results)
    for name, point in sorted(points.items(), key=lambda item: item[1]["peak"]):
        budget = f"budget {point['budget']:.3g} GiB, {point['plan']}" if point.get("budget") else ""
        print(f"{name:18s} {point['tokens_per_s']:>9,.0f} tok/s  peak {point['peak']:.2f} GiB  {budget}")
    print(f"wrote {plot(points, args.out, args.title)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
