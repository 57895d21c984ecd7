"""The recipe study (issue 12, part 4): which CPT settings learn a new domain and forget least, measured.

``python -m benchmarks.recipe_study --out DIR [--seeds 2] [--only NAME ...] [--quick]``

An offline analogue of continued pretraining into a new domain that brings tokens the base never saw:

1. corpora: English prose (the OLD domain) and Python code (the NEW domain) from this Python install
   (``cpt_plugin.cli.corpora.write_default_corpora``);
2. a byte-level BPE tokenizer trained on both domains, so it holds code tokens the prose never contains;
3. a tiny Llama base with untied embeddings, pretrained ONCE on the prose and cached in ``DIR/base``
   (the rows of tokens the prose never contains stay untrained: their input rows at initialisation);
4. each run: that base with the never-seen rows healed and marked fresh (the exact ids: healing's detector
   finds none of them on this base), ``CPTCallback`` on a stock ``transformers.Trainer``, CPT on the code
   with replay of the prose, the same token budget; held-out loss on both domains after training.
   Forgetting is the old domain's loss after CPT minus the (unhealed) base's.

The grid (``GRID``): one baseline shared by every axis (rsLoRA r=128, embedding LR = LoRA LR / 10, 25%
replay, cosine re-warm) and one change at a time along four axes: embedding LR ratio 0.1 / 0.3 / 1.0 and
row-aware (known rows at the ratio, fresh rows at the LoRA LR; known rows at 0.1 and at 0.3), rsLoRA vs
plain LoRA at r=128 and r=256, replay 0 / 5 / 25 %, cosine re-warm vs the two infinite schedules.

Every run is cached as ``DIR/runs/NAME-seedS.json``: a re-run trains only what is missing (or stale, when
the study's settings changed). ``DIR/results.json`` holds every seed, the mean and the spread (half the
range over seeds) and the per-seed differences against the baseline (paired: the same seed shares the data
order, so its noise cancels); ``DIR/results.md`` the table; ``DIR/pareto.png`` new-domain loss against forgetting
with the Pareto front; ``DIR/axes.png`` one bar chart per axis. The pieces come from the CLI's pipeline
(``cpt_plugin/cli``): the study is the CLI's demo job, varied along the axes of the grid.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("benchmarks.recipe_study")

DOMAIN_NAMES = {"new": "new domain (stdlib code)", "old": "old domain (stdlib prose)"}


@dataclasses.dataclass(frozen=True)
class StudySettings:
    """Model, data and budget of the study; every run of one study shares them (and the base)."""

    hidden_size: int = 128
    intermediate_size: int = 344
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    tie_word_embeddings: bool = False  # untied: rows of tokens the base never saw keep their init
    vocab_size: int = 8192  # 22% of it never occurs in the prose (issue 12's English->German test: 30%)
    corpora_max_mb: float = 2.0
    seq_length: int = 128
    batch_size: int = 8
    base_steps: int = 600
    base_learning_rate: float = 3e-3
    cpt_steps: int = 64  # sized so that base + 24 runs fit in 30 minutes on the shared 2-core CPU machine
    learning_rate: float = 2e-3  # the LoRA LR (and the fresh-row LR of row-aware runs)
    warmup_ratio: float = 0.05
    lora_alpha: float = 32.0
    eval_blocks: int = 128  # held-out blocks per domain (the same blocks for every run)
    shuffle_buffer: int = 256  # blocks: the CPT seed changes the data order too

    def base_fields(self) -> dict[str, Any]:
        """The settings the cached base depends on (the CPT budget may change without rebuilding it)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k in BASE_FIELDS}

    @property
    def cpt_tokens(self) -> int:
        return self.cpt_steps * self.batch_size * self.seq_length


BASE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "tie_word_embeddings",
    "vocab_size",
    "corpora_max_mb",
    "seq_length",
    "batch_size",
    "base_steps",
    "base_learning_rate",
    "eval_blocks",
    "shuffle_buffer",
)
FULL = StudySettings()
QUICK = StudySettings(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    vocab_size=400,
    corpora_max_mb=0.4,
    seq_length=32,
    batch_size=2,
    base_steps=4,
    cpt_steps=3,
    eval_blocks=2,
    shuffle_buffer=4,
)


# --- the grid ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One configuration of the grid: CPTConfig keys over the shared ones, and the axes it belongs to."""

    name: str
    label: str  # what the configuration is, for tables and plots
    cpt: Mapping[str, Any]
    axes: tuple[str, ...]
    needs: str | None = None  # a capability that must exist (checked, never faked): "row_aware"


# The baseline, shared by every axis: rsLoRA r=128, embedding LR = LoRA LR / 10, 25% replay, cosine re-warm.
BASELINE: dict[str, Any] = {
    "lora_r": 128,
    "use_rslora": True,
    "embedding_lr_ratio": 0.1,
    "row_aware_embedding_lr": False,
    "replay_ratio": 0.25,
    "schedule": "cosine",
    # cpt-plugin's replay defaults (replay_defaults.py) off, so each axis changes one thing
    "domain_shift_ratio": 0.0,
    "output_row_projection": 0,
    "final_step_back": 1.0,
}
# cpt-plugin's own defaults with replay: domain-shifted rows at 2x the LoRA LR, lm_head updates off 4 old-domain
# directions, the final step back to 0.975 (None: replay_defaults.py resolves them against the dataset)
REPLAY_DEFAULTS_OF_THE_LIBRARY: dict[str, Any] = {
    "row_aware_embedding_lr": True,
    "domain_shift_ratio": None,
    "output_row_projection": None,
    "final_step_back": None,
}
AXES: dict[str, str] = {
    "embedding_lr": "embedding learning rate",
    "lora": "LoRA scaling and rank",
    "replay": "replay of the old domain",
    "schedule": "learning-rate schedule",
}


def _spec(name: str, label: str, axes: tuple[str, ...], needs: str | None = None, **changes: Any) -> RunSpec:
    return RunSpec(name, label, {**BASELINE, **changes}, axes, needs)


GRID: tuple[RunSpec, ...] = (
    _spec("baseline", "baseline: rsLoRA r128, emb LR x0.1, replay 25%, cosine", tuple(AXES)),
    _spec("emb-lr-0.3", "emb LR x0.3", ("embedding_lr",), embedding_lr_ratio=0.3),
    _spec("emb-lr-1.0", "emb LR x1.0", ("embedding_lr",), embedding_lr_ratio=1.0),
    _spec(
        "row-aware",
        "row-aware: known rows x0.1, fresh rows x1.0",
        ("embedding_lr",),
        needs="row_aware",
        row_aware_embedding_lr=True,
    ),
    _spec(
        "row-aware-0.3",
        "row-aware: known rows x0.3, fresh rows x1.0",
        ("embedding_lr",),
        needs="row_aware",
        row_aware_embedding_lr=True,
        embedding_lr_ratio=0.3,
    ),
    _spec(
        "row-aware-shift",
        "row-aware + domain-shifted rows (>= 4x more frequent in the code): x0.1 known, 2x LoRA LR fresh",
        ("embedding_lr",),
        needs="row_aware",
        row_aware_embedding_lr=True,
        domain_shift_ratio=4.0,
        fresh_row_learning_rate=2 * StudySettings.learning_rate,
    ),
    _spec(
        "default",
        "cpt-plugin's defaults with replay: row-aware + shifted rows, lm_head off 4 old directions, step back 0.975",
        ("embedding_lr",),
        needs="row_aware",
        **REPLAY_DEFAULTS_OF_THE_LIBRARY,
    ),
    _spec("plain-lora-r128", "plain LoRA r128", ("lora",), use_rslora=False),
    _spec("rslora-r256", "rsLoRA r256", ("lora",), lora_r=256),
    _spec("plain-lora-r256", "plain LoRA r256", ("lora",), lora_r=256, use_rslora=False),
    _spec("replay-0", "replay 0%", ("replay",), replay_ratio=0.0),
    _spec("replay-5", "replay 5%", ("replay",), replay_ratio=0.05),
    _spec("infinite-cosine", "infinite_cosine", ("schedule",), schedule="infinite_cosine"),
    _spec("infinite-inv-sqrt", "infinite_inv_sqrt", ("schedule",), schedule="infinite_inv_sqrt"),
)
# Probes around the domain-shifted rows (docs/RECIPE.md, "Probes that did not close the gap"): run with
# --only, never part of the default grid, its table or its plots.
PROBES: tuple[RunSpec, ...] = tuple(
    _spec(name, label, ("embedding_lr",), needs="row_aware", **{"row_aware_embedding_lr": True, **changes})
    for name, label, changes in (
        ("shift-known-0.03", "domain-shifted rows at 2x, other known rows x0.03",
         dict(domain_shift_ratio=4.0, embedding_lr_ratio=0.03, fresh_row_learning_rate=2 * StudySettings.learning_rate)),
        ("shift-known-0.03-f3", "domain-shifted rows at 3x, other known rows x0.03",
         dict(domain_shift_ratio=4.0, embedding_lr_ratio=0.03, fresh_row_learning_rate=3 * StudySettings.learning_rate)),
        ("shift-2", "domain-shifted rows (>= 2x more frequent in the code) at 2x, known x0.1",
         dict(domain_shift_ratio=2.0, fresh_row_learning_rate=2 * StudySettings.learning_rate)),
        ("fresh-rows-only", "only the never-seen rows train (embedding_rows: fresh), the known rows frozen",
         dict(embedding_rows="fresh")),
        ("default-no-step-back", "cpt-plugin's defaults with replay, without the final step back (for the "
         "interpolation probe)", {**REPLAY_DEFAULTS_OF_THE_LIBRARY, "final_step_back": 1.0}),
    )
)  # fmt: skip
# How each axis reads, left to right (the baseline sits where its value falls).
AXIS_ORDER: dict[str, tuple[str, ...]] = {
    "embedding_lr": (
        "baseline",
        "emb-lr-0.3",
        "emb-lr-1.0",
        "row-aware",
        "row-aware-0.3",
        "row-aware-shift",
        "default",
    ),
    "lora": ("baseline", "plain-lora-r128", "rslora-r256", "plain-lora-r256"),
    "replay": ("replay-0", "replay-5", "baseline"),
    "schedule": ("baseline", "infinite-cosine", "infinite-inv-sqrt"),
}
SHORT_LABELS: dict[str, str] = {
    "baseline": "baseline",
    "emb-lr-0.3": "x0.3",
    "emb-lr-1.0": "x1.0",
    "row-aware": "row-aware",
    "row-aware-0.3": "row-aware 0.3",
    "row-aware-shift": "row-aware + shifted",
    "default": "default (replay)",
    "plain-lora-r128": "plain r128",
    "rslora-r256": "rs r256",
    "plain-lora-r256": "plain r256",
    "replay-0": "0%",
    "replay-5": "5%",
    "infinite-cosine": "inf. cosine",
    "infinite-inv-sqrt": "inf. inv-sqrt",
}


# Where a point's label sits (points from the point) where the default (above right) overprints a
# neighbour in the study's plot; a far label gets a thin leader line.
LABEL_OFFSETS: dict[str, tuple[int, int]] = {
    "baseline": (10, -32),
    "row-aware": (-12, 26),
    "infinite-cosine": (14, 30),
    "infinite-inv-sqrt": (22, -18),
    "emb-lr-0.3": (8, 8),
    "row-aware-0.3": (-8, -16),
    "row-aware-shift": (10, -22),
    "plain-lora-r128": (-8, 10),
    "plain-lora-r256": (6, -14),
}


def select(names: Sequence[str] | None) -> list[RunSpec]:
    """The grid's specs named in ``names`` (all for None; the probes only by name); an unknown name is an
    error with a hint."""
    if not names:
        return list(GRID)
    from cpt_plugin.config import did_you_mean

    specs = (*GRID, *PROBES)
    known = [spec.name for spec in specs]
    for name in names:
        if name not in known:
            hint = did_you_mean(name, known, f"Configurations: {', '.join(known)}.")
            raise SystemExit(f"recipe_study: unknown configuration '{name}' in --only. {hint}")
    return [spec for spec in specs if spec.name in names]


# --- capabilities that a configuration needs ----------------------------------------------------------
def row_aware_missing() -> str | None:
    """None when cpt-plugin trains fresh embedding rows at their own rate, else why not.

    Checked by behaviour, not by the config key: one optimizer step of a tiny untied model through
    CPTCallback with two rows marked fresh; Adam's first step moves every lm_head element by about the LR
    of its row, so fresh rows must move ~10x more than known ones (embedding LR = LoRA LR / 10).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from cpt_plugin.config import CPTConfig, CPTConfigError
    from cpt_plugin.vocabulary.fresh_rows import mark_fresh_rows

    try:
        config = CPTConfig(
            lora_r=2,
            embedding_lr_ratio=0.1,
            row_aware_embedding_lr=True,
            heal_untrained_tokens=False,
            memory_report=False,
            guard=False,
            output_dir_lock=False,
            schedule="constant",
            warmup_steps=0,
        )
    except (CPTConfigError, TypeError) as error:
        return f"CPTConfig does not take row_aware_embedding_lr ({error})"
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=False,
        )
    )
    fresh = [30, 31]
    mark_fresh_rows(model, fresh)
    ids = list(range(1, 17))
    blocks = [{"input_ids": ids, "labels": ids, "position_ids": list(range(16))}] * 2
    with tempfile.TemporaryDirectory() as out:
        trainer = _trainer(model, blocks, config, out, learning_rate=1e-2, max_steps=1, seed=0)
        before = trainer.model.get_output_embeddings().weight.detach().clone()
        trainer.train()
        moved = (trainer.model.get_output_embeddings().weight.detach() - before).abs().mean(dim=1)
    known = moved[[i for i in range(32) if i not in fresh]].mean()
    ratio = float(moved[fresh].mean() / known.clamp_min(1e-12))
    if ratio < 3.0:
        return (
            f"cpt-plugin's optimizer moved fresh embedding rows {ratio:.1f}x as far as known ones "
            "(row-aware would be ~10x): row_aware_embedding_lr has no effect in this version"
        )
    return None


CAPABILITIES = {"row_aware": row_aware_missing}


def _trainer(
    model: Any, dataset: Any, config: Any, out: str | Path, *, learning_rate: float, max_steps: int, seed: int
) -> Any:
    """A stock Trainer with CPTCallback, quiet (the capability check; runs go through the pipeline)."""
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from cpt_plugin.data import collate_packed
    from cpt_plugin.integrations.hf import CPTCallback

    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=2,
        learning_rate=learning_rate,
        max_steps=max_steps,
        save_strategy="no",
        report_to=[],
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        logging_strategy="no",
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collate_packed,
        callbacks=[CPTCallback(config)],
    )
    trainer.remove_callback(PrinterCallback)  # no train-summary line for a check
    return trainer


def _fit(model: Any, dataset: Any, args: Any, callbacks: list[Any]) -> Any:
    """Trains a stock Trainer quietly (no per-log dict lines: the study prints one line per run)."""
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from cpt_plugin.data import collate_packed

    trainer = Trainer(
        model=model, args=args, train_dataset=dataset, data_collator=collate_packed, callbacks=callbacks
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.train()
    return trainer


# --- the base, built once ----------------------------------------------------------------------------
def _run_config(settings: StudySettings, cpt: Mapping[str, Any], seed: int, model: dict[str, Any]) -> Any:
    """A pipeline RunConfig (what _load_model, _dataset and _training_args read) for one stage."""
    from cpt_plugin.cli.pipeline import RunConfig
    from cpt_plugin.config import CPTConfig

    config = CPTConfig.from_dict(
        {
            "lora_alpha": settings.lora_alpha,
            "max_seq_length": settings.seq_length,
            "warmup_ratio": settings.warmup_ratio,
            "min_lr_ratio": 0.1,
            "eval_every_steps": 0,
            "memory_report": False,
            # the study heals the exact never-seen ids itself (train_run): the detector finds none here
            "heal_untrained_tokens": False,
            **cpt,
            "seed": seed,
        }
    )
    training = {
        "max_steps": settings.cpt_steps,
        "per_device_train_batch_size": settings.batch_size,
        "learning_rate": settings.learning_rate,
        "seed": seed,
        "data_seed": seed,
        "logging_steps": 10,
        "save_strategy": "no",
        "report_to": [],
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }
    return RunConfig(model=model, data={}, cpt=config, training=training)


def _texts(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle if line.strip()]


def _unseen_share(tokenizer: Any, path: Path, unseen: torch.Tensor) -> float:
    """Share of the tokens of ``path`` (the new domain) whose ids are in ``unseen``."""
    mask = torch.zeros(len(tokenizer), dtype=torch.bool)
    mask[unseen] = True
    total = hits = 0
    for text in _texts(path):
        ids = torch.as_tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        total += ids.numel()
        hits += int(mask[ids].sum())
    return hits / max(total, 1)


@dataclasses.dataclass
class Study:
    """What every run shares: the cached base, its tokenizer, the corpora and the held-out blocks."""

    out: Path
    settings: StudySettings
    base_dir: Path
    corpora: dict[str, Path]
    tokenizer: Any
    eval_blocks: dict[str, list[dict[str, list[int]]]]
    base: dict[str, Any]  # the base's held-out losses and vocabulary facts (DIR/base/study.json)
    never_seen: list[int]  # token ids that never occur in the base's training text (DIR/base/never_seen.json)


def _eval_blocks(study_settings: StudySettings, corpora: dict[str, Path], tokenizer: Any) -> dict[str, list]:
    from cpt_plugin.cli.pipeline import _dataset

    run = _run_config(study_settings, {}, 0, {})
    return {
        domain: list(_dataset(corpora[f"{domain}_heldout"], tokenizer, run).iter_blocks())[
            : study_settings.eval_blocks
        ]
        for domain in ("new", "old")
    }


def _corpora(folder: Path, settings: StudySettings) -> dict[str, Path]:
    """The corpora of a cached base (deterministic for one Python install): written again only if gone."""
    from cpt_plugin.cli.corpora import write_default_corpora

    paths = {key: folder / f"{key}.jsonl" for key in ("old_train", "old_heldout", "new_train", "new_heldout")}
    if all(path.is_file() for path in paths.values()):
        return paths
    return write_default_corpora(folder, max_mb=settings.corpora_max_mb)


def prepare_study(out: Path, settings: StudySettings) -> Study:
    """Corpora, tokenizer and the base pretrained on the old domain, built once and cached in out/base."""
    from transformers import AutoTokenizer

    from cpt_plugin.cli.corpora import train_tokenizer, write_default_corpora
    from cpt_plugin.cli.pipeline import (
        _dataset,
        _load_model,
        _save_tiny_base,
        _training_args,
        heldout_loss,
    )
    from cpt_plugin.vocabulary.healing import find_untrained_rows, ids_never_seen

    base_dir = out / "base"
    record_path = base_dir / "study.json"
    wanted = settings.base_fields()
    if record_path.is_file():
        record = json.loads(record_path.read_text(encoding="utf-8"))
        built = {k: record.get("settings", {}).get(k) for k in BASE_FIELDS}
        if built != wanted:
            changed = ", ".join(
                f"{k} {built[k]!r} -> {wanted[k]!r}" for k in BASE_FIELDS if built[k] != wanted[k]
            )
            raise SystemExit(
                f"recipe_study: {base_dir} holds a base built with other settings ({changed}). "
                "Give another --out, or delete that folder to rebuild the base."
            )
        corpora = _corpora(out / "corpora", settings)
        tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
        logger.info("base: reusing %s (pretrained in %.0f s)", base_dir, record["seconds"])
        study = Study(
            out,
            settings,
            base_dir,
            corpora,
            tokenizer,
            _eval_blocks(settings, corpora, tokenizer),
            record,
            [],
        )
        return _with_never_seen(study)

    started = time.perf_counter()
    corpora = write_default_corpora(out / "corpora", max_mb=settings.corpora_max_mb)  # fresh with the base
    tokenizer = train_tokenizer([corpora["old_train"], corpora["new_train"]], vocab_size=settings.vocab_size)
    tiny = {
        "hidden_size": settings.hidden_size,
        "intermediate_size": settings.intermediate_size,
        "num_hidden_layers": settings.num_hidden_layers,
        "num_attention_heads": settings.num_attention_heads,
        "num_key_value_heads": settings.num_key_value_heads,
        "max_position_embeddings": max(512, settings.seq_length),
        "tie_word_embeddings": settings.tie_word_embeddings,
    }
    run = _run_config(settings, {}, 0, {"tiny_llama": tiny})
    model = _load_model(run, tokenizer)
    args = _training_args(
        run,
        out / "base-training",
        {
            "max_steps": settings.base_steps,
            "learning_rate": settings.base_learning_rate,
            "warmup_steps": max(1, settings.base_steps // 20),
            "lr_scheduler_type": "cosine",
        },
    )
    dataset = _dataset(corpora["old_train"], tokenizer, run, shuffle_buffer=settings.shuffle_buffer)
    logger.info(
        "base: pretraining on the %s, %d steps (%s tokens)",
        DOMAIN_NAMES["old"], settings.base_steps, f"{settings.base_steps * settings.batch_size * settings.seq_length:,}",
    )  # fmt: skip
    _fit(model, dataset, args, [])
    shutil.rmtree(out / "base-training", ignore_errors=True)
    eval_blocks = _eval_blocks(settings, corpora, tokenizer)
    losses = {domain: heldout_loss(model, blocks) for domain, blocks in eval_blocks.items()}
    unseen = ids_never_seen(tokenizer, _texts(corpora["old_train"]))
    found = find_untrained_rows(model)
    record = {
        "settings": wanted,
        "loss": losses,
        "vocabulary": len(tokenizer),
        "parameters": sum(p.numel() for p in model.parameters()),
        "never_seen_by_base": int(unseen.numel()),
        "never_seen_share_of_new_domain_tokens": round(
            _unseen_share(tokenizer, corpora["new_train"], unseen), 4
        ),
        "healing_finds": int(found.numel()),
        "healing_finds_never_seen": int(torch.isin(found, unseen).sum()),
        "seconds": round(time.perf_counter() - started, 1),
    }
    _save_tiny_base(model, tokenizer, base_dir)
    record_path.write_text(json.dumps(record, indent=2), encoding="utf-8")
    (base_dir / "never_seen.json").write_text(json.dumps(unseen.tolist()), encoding="utf-8")
    logger.info(
        "base: %s parameters, held-out loss %s %.3f, %s %.3f; %d of %d tokens never occur in the prose "
        "(%.1f%% of the code's tokens); healing finds %d rows (%d of them never seen); %.0f s",
        f"{record['parameters']:,}",
        DOMAIN_NAMES["new"],
        losses["new"],
        DOMAIN_NAMES["old"],
        losses["old"],
        record["never_seen_by_base"],
        record["vocabulary"],
        100 * record["never_seen_share_of_new_domain_tokens"],
        record["healing_finds"],
        record["healing_finds_never_seen"],
        record["seconds"],
    )
    return _with_never_seen(Study(out, settings, base_dir, corpora, tokenizer, eval_blocks, record, []))


def _with_never_seen(study: Study) -> Study:
    """The never-seen ids (cached) and the healed base's held-out losses (measured once, kept in the record).

    Every run starts from the base with exactly these rows healed and marked fresh (train_run)."""
    from cpt_plugin.cli.pipeline import _load_model, heldout_loss
    from cpt_plugin.vocabulary.healing import heal_untrained_rows, ids_never_seen

    path = study.base_dir / "never_seen.json"
    if not path.is_file():
        ids = ids_never_seen(study.tokenizer, _texts(study.corpora["old_train"])).tolist()
        path.write_text(json.dumps(ids), encoding="utf-8")
    study.never_seen = json.loads(path.read_text(encoding="utf-8"))
    if "healed_loss" not in study.base:
        run = _run_config(study.settings, {}, 0, {"name_or_path": str(study.base_dir)})
        model = _load_model(run, study.tokenizer)
        heal_untrained_rows(model, ids=study.never_seen)
        study.base["healed_loss"] = {d: heldout_loss(model, b) for d, b in study.eval_blocks.items()}
        (study.base_dir / "study.json").write_text(json.dumps(study.base, indent=2), encoding="utf-8")
    logger.info(
        "base: %d never-seen token rows healed (mean of the trained rows) and marked fresh in every run; "
        "healed base held-out loss: new %.3f, old %.3f",
        len(study.never_seen), study.base["healed_loss"]["new"], study.base["healed_loss"]["old"],
    )  # fmt: skip
    return study


# --- one run -----------------------------------------------------------------------------------------
def run_path(study: Study, spec: RunSpec, seed: int) -> Path:
    return study.out / "runs" / f"{spec.name}-seed{seed}.json"


def _full_config(study: Study, spec: RunSpec, seed: int) -> dict[str, Any]:
    """Every CPTConfig key of the run (the shared keys included), JSON-shaped: the cache's fingerprint."""
    return json.loads(json.dumps(_run_config(study.settings, spec.cpt, seed, {}).cpt.to_dict()))


def _cached(study: Study, spec: RunSpec, seed: int) -> dict[str, Any] | None:
    """The run's cached result, or None when it is missing or was made with other settings."""
    path = run_path(study, spec, seed)
    if not path.is_file():
        return None
    result = json.loads(path.read_text(encoding="utf-8"))
    if result.get("config") != _full_config(study, spec, seed) or result.get(
        "settings"
    ) != dataclasses.asdict(study.settings):
        logger.info("%s seed %d: cached result is stale (settings changed); training again", spec.name, seed)
        return None
    return result


def train_run(study: Study, spec: RunSpec, seed: int) -> dict[str, Any]:
    """One CPT run from the cached base: CPTCallback on a stock Trainer, held-out loss of both domains."""
    from cpt_plugin.cli.pipeline import _dataset, _load_model, _training_args, heldout_loss
    from cpt_plugin.integrations.hf import CPTCallback
    from cpt_plugin.vocabulary.healing import heal_untrained_rows

    started = time.perf_counter()
    run = _run_config(study.settings, spec.cpt, seed, {"name_or_path": str(study.base_dir)})
    model = _load_model(run, study.tokenizer)
    if study.never_seen:  # exact ids: the detector finds none of them on this base (DIR/base/study.json)
        heal_untrained_rows(model, ids=study.never_seen)
    replay = run.cpt.replay_ratio
    dataset = _dataset(
        study.corpora["new_train"],
        study.tokenizer,
        run,
        replay_source=study.corpora["old_train"] if replay else None,
        replay_ratio=replay,
        shuffle_buffer=study.settings.shuffle_buffer,
    )
    with tempfile.TemporaryDirectory(prefix=f"{spec.name}-", dir=study.out) as scratch:
        args = _training_args(run, Path(scratch))
        trainer = _fit(model, dataset, args, [CPTCallback(run.cpt)])
        losses = {domain: heldout_loss(trainer.model, blocks) for domain, blocks in study.eval_blocks.items()}
        train_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "name": spec.name,
        "seed": seed,
        "cpt": dict(spec.cpt),
        "config": _full_config(study, spec, seed),
        "settings": dataclasses.asdict(study.settings),
        "new": losses["new"],
        "old": losses["old"],
        "forgetting": losses["old"] - study.base["loss"]["old"],
        "final_train_loss": train_losses[-1] if train_losses else None,
        "tokens": study.settings.cpt_tokens,
        "seconds": round(time.perf_counter() - started, 1),
    }


# --- summaries ---------------------------------------------------------------------------------------
def mean_spread(values: Sequence[float]) -> dict[str, float]:
    """Mean and spread (half the range: with two seeds, each seed lies at mean +- spread)."""
    return {"mean": sum(values) / len(values), "spread": (max(values) - min(values)) / 2}


def pareto_front(points: Mapping[str, tuple[float, float]]) -> list[str]:
    """Names of the points no other point dominates (lower is better on both coordinates), by x.

    A point dominates another when it is at least as good on both and strictly better on one.
    """
    front = []
    for name, (x, y) in points.items():
        dominated = any(
            ox <= x and oy <= y and (ox < x or oy < y) for other, (ox, oy) in points.items() if other != name
        )
        if not dominated:
            front.append(name)
    return sorted(front, key=lambda name: points[name])


def paired_difference(config: Mapping[str, Any], reference: Mapping[str, Any]) -> dict[str, Any]:
    """Per-seed differences of ``config`` minus ``reference`` (same CPT seed: same data order and replay
    positions, so most of the seed noise cancels), mean and spread, over the seeds both have."""
    seeds = sorted(set(config["seeds"]) & set(reference["seeds"]), key=int)
    return {
        key: mean_spread([config["seeds"][s][key] - reference["seeds"][s][key] for s in seeds])
        for key in ("new", "forgetting")
    } | {"seeds": len(seeds)}


def summarize(
    study: Study, specs: Sequence[RunSpec], runs: Mapping[str, Any], skipped: Mapping[str, str]
) -> dict:
    """results.json: per configuration every seed, mean and spread; the Pareto front; the base."""
    configs: dict[str, Any] = {}
    for spec in specs:
        entry: dict[str, Any] = {"label": spec.label, "axes": list(spec.axes), "cpt": dict(spec.cpt)}
        if spec.name in skipped:
            entry["skipped"] = skipped[spec.name]
        else:
            seeds = runs[spec.name]
            entry["seeds"] = {
                str(r["seed"]): {k: r[k] for k in ("new", "old", "forgetting", "seconds")} for r in seeds
            }
            for key in ("new", "old", "forgetting"):
                entry[key] = mean_spread([r[key] for r in seeds])
        configs[spec.name] = entry
    for name, entry in configs.items():
        if "seeds" in entry and name != "baseline" and "seeds" in configs.get("baseline", {}):
            entry["vs_baseline"] = paired_difference(entry, configs["baseline"])
    measured = {
        name: (c["new"]["mean"], c["forgetting"]["mean"]) for name, c in configs.items() if "new" in c
    }
    return {
        "settings": dataclasses.asdict(study.settings),
        "tokens_per_run": study.settings.cpt_tokens,
        "base": {**study.base, "settings": study.settings.base_fields()},  # what the base depends on
        "domains": DOMAIN_NAMES,
        "configs": configs,
        "pareto_front": pareto_front(measured),
        "axes": {axis: [n for n in AXIS_ORDER[axis] if n in configs] for axis in AXES},
    }


def _pm(stat: Mapping[str, float], signed: bool = False) -> str:
    return f"{stat['mean']:{'+' if signed else ''}.3f} ± {stat['spread']:.3f}"


def format_table(results: Mapping[str, Any]) -> str:
    """The markdown table: one row per configuration, mean ± spread over seeds."""
    base = results["base"]["loss"]
    lines = [
        "| configuration | new-domain loss | forgetting (old-domain loss − base) | Δ new vs baseline, paired "
        "| Δ forgetting vs baseline, paired | seeds | Pareto |",
        "|---|---|---|---|---|---|---|",
        f"| base (before CPT) | {base['new']:.3f} | — ({base['old']:.3f}) | | | — | |",
    ]
    front = set(results["pareto_front"])
    for name, config in results["configs"].items():
        if "skipped" in config:
            lines.append(f"| {config['label']} | skipped: {config['skipped']} | | | | | |")
            continue
        paired = config.get("vs_baseline")
        deltas = (
            f"{_pm(paired['new'], signed=True)} | {_pm(paired['forgetting'], signed=True)}"
            if paired
            else "— | —"
        )
        lines.append(
            f"| {config['label']} | {_pm(config['new'])} | {_pm(config['forgetting'], signed=True)} | {deltas} "
            f"| {len(config['seeds'])} | {'yes' if name in front else ''} |"
        )
    return "\n".join(lines) + "\n"


# --- pictures ----------------------------------------------------------------------------------------
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pareto(results: Mapping[str, Any], path: Path) -> Path:
    """New-domain loss (x) against forgetting (y), one point per configuration, seed spread as error bars,
    the Pareto front drawn through the non-dominated points."""
    plt = _pyplot()
    configs = {n: c for n, c in results["configs"].items() if "new" in c}
    front = results["pareto_front"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    colors = {
        "embedding_lr": "tab:blue",
        "lora": "tab:green",
        "replay": "tab:orange",
        "schedule": "tab:purple",
    }
    for name, config in configs.items():
        axis = "baseline" if name == "baseline" else config["axes"][0]
        ax.errorbar(
            config["new"]["mean"],
            config["forgetting"]["mean"],
            xerr=config["new"]["spread"],
            yerr=config["forgetting"]["spread"],
            fmt="o",
            color=colors.get(axis, "black"),
            markersize=7 if name in front else 5,
            capsize=3,
            label=AXES.get(axis, "baseline"),
        )
    for name, config in configs.items():
        point = (config["new"]["mean"], config["forgetting"]["mean"])
        offset = LABEL_OFFSETS.get(name, (5, 6))
        far = abs(offset[0]) + abs(offset[1]) > 20
        ax.annotate(
            SHORT_LABELS.get(name, name),
            point,
            textcoords="offset points",
            xytext=offset,
            ha="right" if offset[0] < 0 else "left",
            fontsize=8,
            arrowprops={"arrowstyle": "-", "color": "grey", "linewidth": 0.6} if far else None,
        )
    if front:
        xs = [configs[n]["new"]["mean"] for n in front]
        ys = [configs[n]["forgetting"]["mean"] for n in front]
        ax.plot(xs, ys, "--", color="grey", linewidth=1, label="Pareto front", zorder=0)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize="small", loc="best")
    ax.set_xlabel(f"held-out loss, {DOMAIN_NAMES['new']} (lower is better)")
    ax.set_ylabel(f"forgetting: held-out loss change, {DOMAIN_NAMES['old']}")
    seeds = max((len(c["seeds"]) for c in configs.values()), default=0)
    ax.set_title(f"Recipe study: adaptation vs forgetting (mean of {seeds} seeds, bars: spread)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_axes(results: Mapping[str, Any], path: Path) -> Path:
    """Per axis, bars of new-domain loss (top row) and forgetting (bottom row), seed spread as error bars."""
    plt = _pyplot()
    axes = [a for a, names in results["axes"].items() if names]
    fig, grid = plt.subplots(2, len(axes), figsize=(3.4 * len(axes), 6), squeeze=False)
    for column, axis in enumerate(axes):
        names = [n for n in results["axes"][axis] if "new" in results["configs"][n]]
        for row, key in enumerate(("new", "forgetting")):
            ax = grid[row][column]
            means = [results["configs"][n][key]["mean"] for n in names]
            spreads = [results["configs"][n][key]["spread"] for n in names]
            colors = ["tab:grey" if n == "baseline" else "tab:blue" for n in names]
            ax.bar(range(len(names)), means, yerr=spreads, capsize=3, color=colors)
            ax.set_xticks(range(len(names)), [SHORT_LABELS.get(n, n) for n in names], fontsize=8, rotation=20)
            if key == "new" and means:
                low, high = min(m - s for m, s in zip(means, spreads, strict=True)), max(means)
                pad = max(0.05, 0.5 * (high - low))
                ax.set_ylim(low - pad, high + pad)
            ax.axhline(0, color="black", linewidth=0.6) if key == "forgetting" else None
            ax.grid(axis="y", alpha=0.3)
            if row == 0:
                ax.set_title(AXES[axis], fontsize=10)
            if column == 0:
                ax.set_ylabel("new-domain loss" if key == "new" else "forgetting (old-domain loss change)")
    fig.suptitle("Recipe study per axis (grey: the shared baseline; bars: seed spread)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- the command -------------------------------------------------------------------------------------
def run_study(
    out: Path, settings: StudySettings, specs: Sequence[RunSpec], seeds: Sequence[int]
) -> dict[str, Any]:
    """Every (configuration, seed) not cached yet is trained; then results.json, results.md and the PNGs."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "runs").mkdir(exist_ok=True)
    study = prepare_study(out, settings)
    skipped: dict[str, str] = {}
    for need in sorted({spec.needs for spec in specs if spec.needs}):
        reason = CAPABILITIES[need]()
        for spec in specs:
            if spec.needs == need and reason:
                skipped[spec.name] = reason
                logger.warning("%s: skipped, %s (no result is written for it)", spec.name, reason)
    todo = [(spec, seed) for spec in specs if spec.name not in skipped for seed in seeds]
    runs: dict[str, list[dict[str, Any]]] = {spec.name: [] for spec in specs}
    cached = {(spec.name, seed): _cached(study, spec, seed) for spec, seed in todo}
    missing = [(spec, seed) for spec, seed in todo if cached[spec.name, seed] is None]
    logger.info(
        "%d runs (%d configurations x %d seeds), %d cached, %d to train; %s tokens each",
        len(todo), len(specs) - len(skipped), len(seeds), len(todo) - len(missing), len(missing),
        f"{settings.cpt_tokens:,}",
    )  # fmt: skip
    done = 0
    for spec, seed in todo:
        result = cached[spec.name, seed]
        if result is None:
            done += 1
            header = f"[{done}/{len(missing)}] {spec.name} seed {seed}"
            logger.info("%s: training", header)
            result = train_run(study, spec, seed)
            run_path(study, spec, seed).write_text(json.dumps(result, indent=2), encoding="utf-8")
            logger.info(
                "%s: new-domain loss %.3f, forgetting %+.3f (%.0f s)",
                header, result["new"], result["forgetting"], result["seconds"],
            )  # fmt: skip
        runs[spec.name].append(result)
    results = summarize(study, specs, runs, skipped)
    (out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    (out / "results.md").write_text(format_table(results), encoding="utf-8")
    plot_pareto(results, out / "pareto.png")
    plot_axes(results, out / "axes.png")
    logger.info("\n%s\nresults: %s (table: results.md, plots: pareto.png, axes.png)",
                format_table(results), out / "results.json")  # fmt: skip
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.recipe_study",
        description="The recipe study: CPT settings compared on an offline analogue (docs/RECIPE.md).",
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/recipe-study"), help="study folder (cache)")
    parser.add_argument("--seeds", type=int, default=2, help="CPT seeds per configuration (default 2)")
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help=f"configurations: {', '.join(s.name for s in GRID)}"
    )
    parser.add_argument("--quick", action="store_true", help="a tiny model and a few steps (the test)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: tiny matmuls on a shared CPU run faster on one)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    specs = select(args.only)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    from transformers.utils import logging as hf_logging

    library = logging.getLogger("cpt_plugin")
    saved = (logger.level, library.level, torch.get_num_threads(), hf_logging.is_progress_bar_enabled())
    logger.setLevel(logging.INFO)
    library.setLevel(logging.WARNING)  # one set-up summary per run says nothing new
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()  # "Loading weights" bars of the cached base, once per run
    started = time.perf_counter()
    try:
        run_study(args.out, QUICK if args.quick else FULL, specs, list(range(args.seeds)))
        logger.info("took %.0f s", time.perf_counter() - started)
    finally:  # a caller in the same process (a test) gets its settings back
        logger.setLevel(saved[0])
        library.setLevel(saved[1])
        torch.set_num_threads(saved[2])
        if saved[3]:
            hf_logging.enable_progress_bar()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
