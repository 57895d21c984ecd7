"""The replay defaults' twenty-seed comparison as a picture (docs/RECIPE.md, "The defaults chosen").

  python -m benchmarks.recipe_defaults_plot [docs/recipe/defaults-twenty-seeds.json] [OUT.png]

Left: new-domain loss against forgetting, mean ± SE over the seeds, for x0.1, x1.0 and the defaults at
each step-back alpha. Right: per seed, the defaults minus x1.0 (new domain) and minus x0.1 (forgetting),
paired; the lower-left quadrant is dominance of both, the squares are the means with 95% intervals.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

ALPHAS = ((1.0, "tab:cyan"), (0.975, "tab:blue"), (0.95, "tab:purple"))
T_95 = 2.09  # Student t, 19 degrees of freedom


def _mean_se(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) / len(values) ** 0.5


def _at(run: dict[str, Any], alpha: float, key: str) -> float:
    return next(a for a in run["alphas"] if a["alpha"] == alpha)[key]


def plot(runs: list[dict[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    points = {
        "x0.1 (baseline)": (
            [r["x0.1"]["forgetting"] for r in runs],
            [r["x0.1"]["new"] for r in runs],
            "tab:gray",
        ),
        "x1.0": ([r["x1.0"]["forgetting"] for r in runs], [r["x1.0"]["new"] for r in runs], "tab:red"),
    }
    for alpha, color in ALPHAS:
        name = f"defaults, step back {alpha:g}" + (" (the default)" if alpha == 0.975 else "")
        points[name] = (
            [_at(r, alpha, "forgetting") for r in runs],
            [_at(r, alpha, "new") for r in runs],
            color,
        )
    for name, (forgetting, new, color) in points.items():
        (fx, fe), (nx, ne) = _mean_se(forgetting), _mean_se(new)
        left.errorbar(fx, nx, xerr=fe, yerr=ne, fmt="o", color=color, label=name, capsize=3)
    left.set_xlabel("forgetting: old-domain loss − base (nats/token, lower is better)")
    left.set_ylabel("new-domain loss (nats/token, lower is better)")
    left.set_title(f"{len(runs)} seeds, mean ± SE")
    left.legend(fontsize=8)
    for alpha, color in ALPHAS:
        dn = [_at(r, alpha, "new") - r["x1.0"]["new"] for r in runs]
        df = [_at(r, alpha, "forgetting") - r["x0.1"]["forgetting"] for r in runs]
        right.scatter(df, dn, s=14, color=color, alpha=0.55, label=f"step back {alpha:g}: per seed")
        (fx, fe), (nx, ne) = _mean_se(df), _mean_se(dn)
        right.errorbar(fx, nx, xerr=T_95 * fe, yerr=T_95 * ne, fmt="s", color=color, capsize=4, markersize=8)
    right.axhline(0, color="k", lw=0.8)
    right.axvline(0, color="k", lw=0.8)
    right.set_xlabel("forgetting − x0.1's (paired by seed)")
    right.set_ylabel("new-domain loss − x1.0's (paired by seed)")
    right.set_title("dominance is the lower-left quadrant (squares: mean, 95% CI)")
    right.legend(fontsize=8)
    fig.suptitle("cpt-plugin's replay defaults on the recipe study's analogue (docs/RECIPE.md)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    source = Path(args[0]) if args else Path("docs/recipe/defaults-twenty-seeds.json")
    out = Path(args[1]) if len(args) > 1 else source.with_suffix(".png")
    print(plot(json.loads(source.read_text())["refresh_25"], out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
