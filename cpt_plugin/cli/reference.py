"""The README's run-config reference, generated from the config classes so it cannot drift.

``python -m cpt_plugin.cli.reference`` prints the table; ``--write README.md`` replaces the block between
the ``config-reference`` markers. ``tests/test_cli.py`` checks that the README's block is up to date and
that every key of every section has a description here.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from cpt_plugin.cli.pipeline import SECTION_KEYS
from cpt_plugin.config import CPTConfig

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"

DESCRIPTIONS: dict[str, str] = {
    "model.name_or_path": "hub id or local directory of the model (or set `tiny_llama`)",
    "model.tiny_llama": "a random Llama built from these `LlamaConfig` keys (the offline demo); its base is "
    "saved in `OUTPUT/base-model`",
    "model.attn_implementation": "attention kernel (default `sdpa`)",
    "model.dtype": "`auto` (default), `float32`, `bfloat16` or `float16`",
    "model.load_in_4bit": "QLoRA: the base quantized to 4-bit NF4 by bitsandbytes",
    "model.load_in_8bit": "the base quantized to 8-bit by bitsandbytes",
    "tokenizer.name_or_path": "tokenizer to load (default: the model's)",
    "tokenizer.train_vocab_size": "without a tokenizer to load: a byte-level BPE of this size is trained on "
    "the corpora (default 2048)",
    "data.train": "new-domain text: a file, folder, JSONL or saved dataset",
    "data.replay": "old-domain text replayed at `cpt.replay_ratio` (and the corpus of `base_pretraining`)",
    "data.eval_new": "held-out new-domain text: the evaluator's adaptation curve",
    "data.eval_old": "held-out old-domain text: the evaluator's forgetting curve",
    "data.text_field": "the text column of JSONL rows and datasets (default `text`)",
    "data.split": "how a text file splits into documents: `file` (one per file, default), `blank_lines`, `line`",
    "data.default_corpora": "write the demo's stdlib prose (old) and code (new) corpora under `OUTPUT/corpora`",
    "data.corpora_max_mb": "size of each default corpus in MB (default 1.0)",
    "data.eval_max_blocks": "held-out blocks read per domain (default 64; `cpt.eval_tokens` caps them too)",
    "training": "any `transformers.TrainingArguments` key; `max_steps` is required (the corpus is streamed) "
    "and counts the CPT phases only",
    "base_pretraining": "`TrainingArguments` keys of a first phase on `data.replay` that makes the demo's base "
    "model (its own `max_steps`)",
    "compare_without_replay": "also run CPT without replay from the same base (a third phase)",
    "export_merged": "also write `OUTPUT/merged`, the trained model merged into one plain 16-bit checkpoint "
    "(default false: about 2 bytes per parameter of disk; the embedded default sets it)",
}


def _cpt_comments() -> dict[str, str]:
    """The trailing comment of each CPTConfig field in config.py (what the field means)."""
    import inspect

    import cpt_plugin.config as module

    comments: dict[str, str] = {}
    for line in inspect.getsource(module.CPTConfig).splitlines():
        name, sep, rest = line.strip().partition(":")
        if sep and name.isidentifier() and "#" in rest:
            comments[name] = rest.split("#", 1)[1].strip()
    return comments


def _default(field: dataclasses.Field) -> str:
    value = field.default if field.default is not dataclasses.MISSING else None
    return "none" if value is None else f"`{value!r}`".replace("'", "")


def reference_markdown() -> str:
    """The table: every run-config key (model, tokenizer, data, top level) and every `cpt` key."""
    rows = ["| key | meaning |", "|---|---|"]
    for section, keys in SECTION_KEYS.items():
        for key in keys:
            rows.append(f"| `{section}.{key}` | {DESCRIPTIONS[f'{section}.{key}']} |")
    for key in ("training", "base_pretraining", "compare_without_replay", "export_merged"):
        rows.append(f"| `{key}` | {DESCRIPTIONS[key]} |")
    comments = _cpt_comments()
    rows += [
        "",
        "| `cpt.` key | default | note (from `CPTConfig`; meanings in the table below) |",
        "|---|---|---|",
    ]
    for field in dataclasses.fields(CPTConfig):
        rows.append(f"| `{field.name}` | {_default(field)} | {comments.get(field.name, '')} |")
    return "\n".join(rows)


def update(readme: Path) -> bool:
    """Rewrites the block between the markers; True when it changed."""
    text = readme.read_text(encoding="utf-8")
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    new = f"{head}{START}\n{reference_markdown()}\n{END}{tail}"
    readme.write_text(new, encoding="utf-8")
    return new != text


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"]:
        update(Path(sys.argv[2]))
    else:
        print(reference_markdown())
