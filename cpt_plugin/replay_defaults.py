"""The defaults that need replay data: resolved once the Trainer's train_dataset is known.

Why: the recipe study (docs/RECIPE.md) found one combination that learns the new domain as well as an
embedding LR at the LoRA LR while forgetting less than the usual 1/10 ratio: domain-shifted rows at twice
the LoRA LR (``domain_shift_ratio``), lm_head updates kept off the old domain's main hidden directions
(``output_row_projection``) and a small step back at the end (``final_step_back``). All three read the old
domain from the replay data, so they are on by default exactly where a run has it: a
``cpt_plugin.data.CPTDataset`` with a ``replay_source``. Elsewhere they stay off, quietly; a value the user
set is kept as it is (and errors name it when the data cannot serve it).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from cpt_plugin.config import REPLAY_DEFAULTS, CPTConfig, CPTConfigError

logger = logging.getLogger(__name__)

OFF = {"domain_shift_ratio": 0.0, "output_row_projection": 0, "final_step_back": 1.0}


def has_replay(dataset: Any) -> bool:
    """True for a dataset that can tell the two domains apart (a CPTDataset with a replay source)."""
    return (
        callable(getattr(dataset, "token_pieces", None))
        and getattr(dataset, "replay_source", None) is not None
    )


def resolve_replay_defaults(config: CPTConfig, dataset: Any, tied: bool = False) -> CPTConfig:
    """``config`` with every replay option that is None set: to its measured default where ``dataset``
    has replay data and the option applies, else off. Measured on untied embeddings only (docs/RECIPE.md),
    so a ``tied`` model keeps all three off unless set."""
    replay = has_replay(dataset) and config.train_embeddings and not tied
    applies = {
        "domain_shift_ratio": config.row_aware_embedding_lr and config.embedding_rows == "all",
        "output_row_projection": True,
        "final_step_back": True,
    }
    chosen = {
        key: (REPLAY_DEFAULTS[key] if replay and applies[key] else OFF[key])
        for key in REPLAY_DEFAULTS
        if getattr(config, key) is None
    }
    if not chosen:
        return config
    if replay and any(chosen[key] != OFF[key] for key in chosen):
        logger.info(
            "cpt-plugin: the training data has replay, so %s (docs/RECIPE.md; each is off at 0, or 1 for final_step_back)",
            ", ".join(f"{key}: {value:g}" for key, value in chosen.items() if value != OFF[key]),
        )
    return dataclasses.replace(config, **chosen)


def check_replay_options(config: CPTConfig, dataset: Any, required: bool = False) -> None:
    """Before the first step: an option the user set that reads the replay data, on data without it
    (``dataset`` None: not known yet, unless ``required``)."""
    if config.output_row_projection and (dataset is not None or required) and not has_replay(dataset):
        raise CPTConfigError(
            f"cpt-plugin config 'output_row_projection' is {config.output_row_projection}, which reads the old "
            "domain from the replay data, but the train_dataset is not a cpt_plugin.data.CPTDataset with a "
            "replay_source. Build it as CPTDataset(new_texts, tokenizer, max_seq_length, replay_source="
            "old_texts, replay_ratio=...), or set output_row_projection: 0."
        )
