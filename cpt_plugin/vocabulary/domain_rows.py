"""Domain-shifted rows: tokens far more frequent in the new domain than in the old one, marked fresh.

Why: the recipe study (docs/RECIPE.md) found the embedding LR of *known* rows to be a trade-off: at the
LoRA LR (ratio 1.0) the new domain is learned 0.40 nats better than at 0.1, but the old one is forgotten
0.30 nats more. Most of that gain sits in a minority of rows: tokens the new domain uses far more than the
old (in the study, tokens at least 4x more frequent in the code than in the prose: 1,499 rows, 38% of the
code's tokens). Giving only those rows the fresh-row LR, and leaving the rows the old domain relies on at
the embedding LR, reached the 1.0 ratio's new-domain loss with a seventh of its forgetting.

The old domain's frequencies come from the replay corpus (the closest thing to the base's data a CPT run
has), the new domain's from the training corpus, both as the dataset tokenizes them, from a prefix of at
most ``max_tokens`` tokens each. Set with ``domain_shift_ratio`` (0: off); CPTCallback marks the rows after
the model is set up, so healing (which leaves fresh rows alone) still resets never-seen rows first.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from cpt_plugin.config import CPTConfigError
from cpt_plugin.vocabulary.fresh_rows import mark_fresh_rows

logger = logging.getLogger(__name__)

MIN_COUNT = 5  # a token seen fewer times in the new domain says too little about its frequency
MAX_TOKENS = 5_000_000  # tokens counted per corpus (a prefix: counting is tokenization, at set-up)


def token_counts(pieces: Iterable[tuple[Sequence[int], bool]], max_tokens: int = MAX_TOKENS) -> Counter[int]:
    """Token-id counts of ``(ids, ends_document)`` pieces, up to ``max_tokens`` tokens."""
    counts: Counter[int] = Counter()
    total = 0
    for ids, _end in pieces:
        counts.update(ids)
        total += len(ids)
        if total >= max_tokens:
            break
    return counts


def domain_shifted_ids(
    new_counts: Counter[int], old_counts: Counter[int], ratio: float, min_count: int = MIN_COUNT
) -> torch.Tensor:
    """Ids (sorted int64) whose share of the new domain's tokens is at least ``ratio`` times their share of
    the old domain's (an unseen old token counts as half an occurrence), seen ``min_count`` times or more."""
    new_total, old_total = max(sum(new_counts.values()), 1), max(sum(old_counts.values()), 1)
    ids = [
        token
        for token, n in new_counts.items()
        if n >= min_count and n / new_total >= ratio * (old_counts.get(token, 0) + 0.5) / old_total
    ]
    return torch.as_tensor(sorted(ids), dtype=torch.long)


def mark_domain_shifted_rows(model: Any, dataset: Any, ratio: float, max_tokens: int = MAX_TOKENS) -> int:
    """Marks the domain-shifted rows of ``dataset`` (a CPTDataset with a replay source) fresh on ``model``;
    returns how many. The error names the key when the dataset cannot tell the two domains apart."""
    pieces = getattr(dataset, "token_pieces", None)
    if not callable(pieces) or getattr(dataset, "replay_source", None) is None:
        raise CPTConfigError(
            f"cpt-plugin config 'domain_shift_ratio' is {ratio}, which compares the training data with the "
            "replay data, but the train_dataset is not a cpt_plugin.data.CPTDataset with a replay_source. "
            "Build it as CPTDataset(new_texts, tokenizer, max_seq_length, replay_source=old_texts, "
            "replay_ratio=...), or set domain_shift_ratio: 0."
        )
    new_counts = token_counts(pieces(replay=False), max_tokens)
    old_counts = token_counts(pieces(replay=True), max_tokens)
    ids = domain_shifted_ids(new_counts, old_counts, ratio)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = ids[ids < vocab]
    if ids.numel():
        mark_fresh_rows(model, ids.tolist())
    share = sum(new_counts[int(i)] for i in ids) / max(sum(new_counts.values()), 1)
    logger.info(
        "cpt-plugin: %d embedding rows are at least %gx more frequent in the training data than in the replay "
        "data (%.0f%% of its tokens): they learn at the fresh-row LR (domain_shift_ratio)",
        ids.numel(), ratio, 100 * share,
    )  # fmt: skip
    return int(ids.numel())
