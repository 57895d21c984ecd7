"""Recipe-study probe: the trained weights interpolated back toward the start of CPT (WiSE-FT style).

  python -m benchmarks.recipe_interpolation_probe --out outputs/recipe-study --seeds 0,1,2 --config shift-ortho

Why: no configuration of the study yet reaches the 1.0 ratio's new-domain loss *and* the 0.1 ratio's
forgetting (docs/RECIPE.md). Near the end of training the new-domain loss may be flat along the update,
so a small step back along it could cost little on the new domain and buy back forgetting. Each run here
trains one configuration as the study does (``--config shift-ortho``: ``row-aware-shift`` with the output-row
updates projected off 4 old-domain directions, recomputed every 25 steps, as ``recipe_ortho_probe``;
``row-aware-shift`` and ``emb-lr-1.0``: the study's runs as they are), keeps every trainable tensor at the start (before the first
step) and at the end, and for each ``--alphas`` value sets every trained tensor to start + alpha * (end -
start), except LoRA's A matrices, which keep their trained value (lora_B starts at zero, so the LoRA delta
B @ A scales by alpha). The embedding copies that train (embed_tokens / lm_head rows) move back toward their
values at the start of CPT (the healed base). Held-out losses come from the study's own evaluation (the
same blocks, the same ``heldout_loss``) and forgetting from the same base loss. At alpha 1 the probe's
evaluation is checked against the run's own numbers (``alpha1_check``).

Each run is paired by seed with the study's cached ``baseline``, ``emb-lr-1.0`` and ``row-aware-shift``
runs in ``OUT/runs`` (run them first with ``python -m benchmarks.recipe_study --out OUT --only baseline
emb-lr-1.0 row-aware-shift --seeds N --threads 2``). Results: ``OUT/interp/`` (one JSON per configuration
and seed); ``--summarize`` prints the paired table of the JSONs there without training.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

REFERENCES = ("baseline", "emb-lr-1.0", "row-aware-shift")
# probe config -> study spec ("row-aware-shift": the study's run as it is, no projection)
# ("default": cpt-plugin's replay defaults, whose output-row projection is the library's own, without its
# final step back, which the probe does at every alpha)
CONFIGS = {
    "shift-ortho": "row-aware-shift",
    "row-aware-shift": "row-aware-shift",
    "emb-lr-1.0": "emb-lr-1.0",
    "default": "default-no-step-back",
}


class KeepStart(TrainerCallback):
    """Copies every trainable tensor at the start of training (after the optimizer exists, before step 1)."""

    def __init__(self) -> None:
        self.start: dict[str, torch.Tensor] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **_: Any):
        self.start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def interpolate(
    model: Any, start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], alpha: float
) -> None:
    """Sets the trained tensors to start + alpha * (end - start); LoRA's A matrices stay at their end."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, first in start.items():
            last = end[name]
            value = last if "lora_A" in name else first + alpha * (last - first)
            params[name].copy_(value)


def _stats(values: list[float]) -> dict[str, float]:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    se = sd / math.sqrt(n) if n > 1 else 0.0
    return {"mean": mean, "sd": sd, "se": se, "t": mean / se if se else math.nan, "n": n}


def summarize(folder: Path, config: str, seeds: list[int] | None = None) -> str:
    """The paired table of ``folder``'s JSONs for one configuration: per alpha, new and forgetting (mean ±
    SD), new minus x1.0's new and forgetting minus x0.1's forgetting (mean ± SD, SE, t) over the seeds."""
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob(f"{config}-seed*.json"))]
    runs = [r for r in runs if seeds is None or r["seed"] in seeds]
    if not runs:
        return f"{config}: no runs in {folder}"
    alphas = [a["alpha"] for a in runs[0]["alphas"]]
    lines = [
        f"{config}: {len(runs)} seeds ({', '.join(str(r['seed']) for r in sorted(runs, key=lambda r: r['seed']))})",
        "| alpha | new (mean ± SD) | forgetting (mean ± SD) | new − x1.0 new: mean ± SD, SE, t "
        "| forgetting − x0.1 forgetting: mean ± SD, SE, t | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for alpha in alphas:
        rows = [next(a for a in r["alphas"] if a["alpha"] == alpha) for r in runs]
        new = _stats([a["new"] for a in rows])
        forgetting = _stats([a["forgetting"] for a in rows])
        dnew = _stats(
            [a["new"] - r["reference"]["emb-lr-1.0"]["new"] for a, r in zip(rows, runs, strict=True)]
        )
        dforget = _stats(
            [
                a["forgetting"] - r["reference"]["baseline"]["forgetting"]
                for a, r in zip(rows, runs, strict=True)
            ]
        )
        lines.append(
            f"| {alpha:g} | {new['mean']:.4f} ± {new['sd']:.4f} | {forgetting['mean']:+.4f} ± "
            f"{forgetting['sd']:.4f} | {dnew['mean']:+.4f} ± {dnew['sd']:.4f}, {dnew['se']:.4f}, "
            f"{dnew['t']:+.1f} | {dforget['mean']:+.4f} ± {dforget['sd']:.4f}, {dforget['se']:.4f}, "
            f"{dforget['t']:+.1f} | {new['n']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import benchmarks.recipe_study as study_module
    from cpt_plugin.cli.pipeline import heldout_loss

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/recipe-study"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--config", choices=tuple(CONFIGS), default="shift-ortho")
    parser.add_argument("--alphas", default="1.0,0.95,0.9,0.85,0.8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--summarize", action="store_true", help="print the table of OUT/interp only")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    folder = args.out / "interp"
    if args.summarize:
        print(summarize(folder, args.config, seeds))
        return 0
    alphas = [float(a) for a in args.alphas.split(",")]
    torch.set_num_threads(args.threads)
    study = study_module.prepare_study(args.out, study_module.FULL)
    spec = study_module.select([CONFIGS[args.config]])[0]
    extra: list[Any] = []
    if args.config == "shift-ortho":
        from benchmarks.recipe_ortho_probe import ProjectOutputRows

        extra.append(ProjectOutputRows(study, directions=4, rows="all", refresh=25, basis="principal"))
    keep = KeepStart()
    held: dict[str, Any] = {}
    fit = study_module._fit

    def fit_and_interpolate(model: Any, dataset: Any, train_args: Any, callbacks: list[Any]) -> Any:
        trainer = fit(model, dataset, train_args, [*callbacks, *extra, keep])
        trained = trainer.model
        end = {n: p.detach().clone() for n, p in trained.named_parameters() if p.requires_grad}
        results = []
        for alpha in alphas:
            interpolate(trained, keep.start, end, alpha)
            losses = {d: heldout_loss(trained, blocks) for d, blocks in study.eval_blocks.items()}
            results.append(
                {"alpha": alpha, **losses, "forgetting": losses["old"] - study.base["loss"]["old"]}
            )
        interpolate(trained, keep.start, end, 1.0)  # the run's own evaluation (train_run) sees the end
        held["alphas"] = results
        held["trainable"] = {
            n: {"shape": list(t.shape), "start_abs_max": float(keep.start[n].abs().max())}
            for n, t in end.items()
        }
        held["moved"] = {n: float((end[n] - keep.start[n]).norm()) for n in end}
        return trainer

    study_module._fit = fit_and_interpolate
    folder.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        result = study_module.train_run(study, spec, seed)
        reference = {
            name: json.loads((args.out / "runs" / f"{name}-seed{seed}.json").read_text())
            for name in REFERENCES
            if (args.out / "runs" / f"{name}-seed{seed}.json").is_file()
        }
        one = next((a for a in held["alphas"] if a["alpha"] == 1.0), None)
        check = (
            {"new": one["new"] - result["new"], "forgetting": one["forgetting"] - result["forgetting"]}
            if one
            else None
        )
        record = {"config": args.config, "seed": seed, "alphas": held["alphas"], "alpha1_check": check}
        record |= {"run": result, "trainable": held["trainable"], "moved": held["moved"]}
        record["reference"] = reference
        (folder / f"{args.config}-seed{seed}.json").write_text(json.dumps(record, indent=1))
        line = ", ".join(f"a={a['alpha']:g} {a['new']:.4f} {a['forgetting']:+.4f}" for a in held["alphas"])
        refs = " | ".join(
            f"{name} {reference[name]['new']:.4f} {reference[name]['forgetting']:+.4f}" for name in reference
        )
        print(
            f"seed {seed} {args.config}: run {result['new']:.4f} {result['forgetting']:+.4f} ({result['seconds']:.0f} s)"
            f" | {line} | alpha-1 check {check} | {refs}",
            flush=True,
        )
    if all(
        len(json.loads((folder / f"{args.config}-seed{s}.json").read_text())["reference"]) == 3 for s in seeds
    ):
        print(summarize(folder, args.config, seeds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
