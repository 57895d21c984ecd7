"""The record of fresh embedding rows: tokens the base model never trained.

Two producers write it, before PEFT wraps the model: vocabulary extension (rows it adds) and untrained-
token healing (rows it finds and resets). One consumer reads it: the optimizer, which gives fresh rows
their own learning rate (they start from an initialisation, not from knowledge worth protecting).

The record is a plain attribute on the base ``PreTrainedModel`` (PeftModel forwards attribute reads to
it), so it travels with the model object and needs no extra file: the user's script, re-run for a
resume, rebuilds the same record from the same base weights and the same ``new_tokens``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

ATTRIBUTE = "cpt_fresh_rows"


def _base(model: Any) -> Any:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def mark_fresh_rows(model: Any, ids: Iterable[int]) -> torch.Tensor:
    """Adds ``ids`` to the model's fresh rows; returns the whole record (sorted, unique, int64, CPU)."""
    base = _base(model)
    new = torch.as_tensor(sorted({int(i) for i in ids}), dtype=torch.long)
    old = getattr(base, ATTRIBUTE, None)
    merged = new if old is None else torch.unique(torch.cat([old, new]))
    setattr(base, ATTRIBUTE, merged)
    return merged


def fresh_rows(model: Any) -> torch.Tensor | None:
    """The fresh rows of ``model`` (a base model or a PeftModel over one), None if none were marked."""
    rows = getattr(_base(model), ATTRIBUTE, None)
    return rows if rows is not None and rows.numel() else None
