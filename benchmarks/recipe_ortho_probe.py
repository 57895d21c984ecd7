"""Recipe-study probe: output-row updates kept off the old domain's main hidden directions.

  python -m benchmarks.recipe_ortho_probe --out outputs/recipe-study --seeds 0,1,2,3,4 --directions 4

Why: with domain-shifted rows (``domain_shift_ratio: 4``, docs/RECIPE.md) the study reaches the 1.0 ratio's
new-domain loss but forgets about 0.04 nats more than the 0.1 ratio, and its probes found that gain and
that forgetting in the *output* rows. Raising a token's output row along a direction the old domain's
final hidden states share raises its logit in old-domain contexts too. Here the configuration
``row-aware-shift`` of the study is trained as it is, except that after every optimizer step the update
of each output-embedding row (``--rows all``, or only the rows at the fresh-row LR: ``boosted``) is
projected off the ``--directions`` leading directions of the old domain's final hidden states (their mean
and the first principal directions after it), computed once at the start from old-domain training text
with the model as it starts. cpt-plugin has no option for this; the probe patches the study's Trainer.

Each run is paired by seed with the study's cached ``baseline``, ``emb-lr-1.0`` and ``row-aware-shift``
runs in ``OUT/runs`` (run them first with ``python -m benchmarks.recipe_study --out OUT --only baseline
emb-lr-1.0 row-aware-shift --seeds N --threads 2``). Results: ``OUT/ortho/`` (one JSON per run).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

OLD_TEXTS = 64  # documents of the old domain's training text that give the directions
TOKENS_PER_TEXT = 128


def _final_hidden(model: Any, study: Any, corpus: str) -> torch.Tensor:
    """(tokens x hidden) post-norm final hidden states (the lm_head's input) of a corpus' first texts."""
    from benchmarks.recipe_study import _texts

    base = model.get_base_model().model
    states = []
    with torch.no_grad():
        for text in _texts(study.corpora[corpus])[:OLD_TEXTS]:
            ids = study.tokenizer(text)["input_ids"][:TOKENS_PER_TEXT]
            if len(ids) >= 16:
                states.append(base(input_ids=torch.tensor([ids])).last_hidden_state[0].float())
    return torch.cat(states)


def old_domain_directions(model: Any, study: Any, count: int, basis: str = "principal") -> torch.Tensor:
    """(count x hidden) orthonormal rows to keep output-row updates off, from the model as it is.

    ``principal``: the old domain's mean final hidden state, then its leading principal directions.
    ``discriminative``: the directions where old-domain hidden states are strongest relative to new-domain
    ones (the leading generalized eigenvectors of their second moments, old against new): a row's update
    along them moves its logit in old contexts much more than in new ones."""
    hidden = _final_hidden(model, study, "old_train")
    if basis == "discriminative":
        new = _final_hidden(model, study, "new_train")
        old_moment = hidden.t() @ hidden / len(hidden)
        new_moment = new.t() @ new / len(new)
        ridge = 1e-3 * new_moment.diagonal().mean() * torch.eye(len(new_moment))
        # C_new^-1/2 C_old C_new^-1/2, whose eigenvectors map back to the generalized ones
        values, vectors = torch.linalg.eigh(new_moment + ridge)
        whiten = vectors @ torch.diag(values.rsqrt()) @ vectors.t()
        _, directions = torch.linalg.eigh(whiten @ old_moment @ whiten)
        leading = (whiten @ directions[:, -count:]).flip(1)
        q, _ = torch.linalg.qr(leading)
        return q.t()
    mean = hidden.mean(0)
    columns = [mean[:, None]]
    if count > 1:
        columns.append(torch.linalg.svd(hidden - mean, full_matrices=False)[2][: count - 1].t())
    q, _ = torch.linalg.qr(torch.cat(columns, 1))
    return q.t()


class ProjectOutputRows(TrainerCallback):
    """After each optimizer step, takes the update of the chosen lm_head rows off ``directions``."""

    def __init__(
        self, study: Any, directions: int, rows: str, refresh: int = 0, basis: str = "principal"
    ) -> None:
        self.study, self.count, self.rows, self.refresh, self.basis = study, directions, rows, refresh, basis

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **_: Any
    ):
        held = {"basis": old_domain_directions(model, self.study, self.count, self.basis), "steps": 0}
        weight = next(p for n, p in model.named_parameters() if "lm_head" in n and p.requires_grad)
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper has no step hooks
        group = next(g for g in inner.param_groups if any(p is weight for p in g["params"]))
        if self.rows == "boosted":
            rows = (group["cpt_row_scale"] > group["cpt_known_row_scale"] + 1e-9).nonzero().flatten()
        else:
            rows = torch.arange(weight.shape[0])
        before: dict[str, torch.Tensor] = {}

        def save(*_: Any) -> None:
            held["steps"] += 1
            if (
                self.refresh and held["steps"] % self.refresh == 0
            ):  # the old domain's directions as they are now
                held["basis"] = old_domain_directions(model, self.study, self.count, self.basis)
            before["rows"] = weight.detach()[rows].float().clone()

        def project(*_: Any) -> None:
            basis = held["basis"]
            with torch.no_grad():
                delta = weight[rows].float() - before["rows"]
                weight[rows] = (before["rows"] + delta - (delta @ basis.t()) @ basis).to(weight.dtype)

        inner.register_step_pre_hook(save)
        inner.register_step_post_hook(project)


def main(argv: list[str] | None = None) -> int:
    import benchmarks.recipe_study as study_module

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/recipe-study"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--directions", type=int, default=4)
    parser.add_argument("--rows", choices=("all", "boosted"), default="all")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--basis", choices=("principal", "discriminative"), default="principal")
    parser.add_argument(
        "--refresh", type=int, default=0, help="recompute the directions every N steps (0: once)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    study = study_module.prepare_study(args.out, study_module.FULL)
    spec = next(s for s in study_module.GRID if s.name == "row-aware-shift")
    fit = study_module._fit
    probe = ProjectOutputRows(study, args.directions, args.rows, args.refresh, args.basis)
    study_module._fit = lambda model, dataset, train_args, callbacks: fit(
        model, dataset, train_args, [*callbacks, probe]
    )
    (args.out / "ortho").mkdir(parents=True, exist_ok=True)
    for seed in (int(s) for s in args.seeds.split(",")):
        result = study_module.train_run(study, spec, seed)
        reference = {
            name: json.loads((args.out / "runs" / f"{name}-seed{seed}.json").read_text())
            for name in ("baseline", "emb-lr-1.0", "row-aware-shift")
        }
        refreshed = (f"-refresh{args.refresh}" if args.refresh else "") + (
            "-discriminative" if args.basis == "discriminative" else ""
        )
        name = f"ortho-{args.rows}-{args.directions}{refreshed}-seed{seed}.json"
        (args.out / "ortho" / name).write_text(json.dumps({**result, "reference": reference}, indent=1))
        print(
            f"seed {seed} ({args.rows} rows, {args.directions} directions{refreshed}): new {result['new']:.3f}, forgetting "
            f"{result['forgetting']:+.3f} | shifted rows alone {reference['row-aware-shift']['new']:.3f} "
            f"{reference['row-aware-shift']['forgetting']:+.3f} | x0.1 {reference['baseline']['new']:.3f} "
            f"{reference['baseline']['forgetting']:+.3f} | x1.0 {reference['emb-lr-1.0']['new']:.3f} "
            f"{reference['emb-lr-1.0']['forgetting']:+.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
