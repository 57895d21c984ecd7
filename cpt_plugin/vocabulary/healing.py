"""Untrained-token healing: embedding rows the base never trained, found and reset before CPT.

Why: a base model's vocabulary often holds tokens its pretraining never saw (Llama-3's reserved special
tokens, tokens of a language or script it skipped). Their rows were never trained: some sit at ~zero
(weight decay pulled them there), others at their random initialisation. Such a row is no knowledge
worth protecting, and as it stands it can hurt: a near-zero output row gives its token a logit of ~0 while
trained logits are far below, an init-scale input row feeds noise of the wrong size into the first layer.
Resetting them to the mean of the trained rows (as Unsloth's ``fix_untrained_tokens`` does) gives a
neutral start; marking them fresh (fresh_rows.py) lets the optimizer train them at their own rate.

Detection rule (``find_untrained_rows``), per embedding matrix (the input one, and the output one when
untied; a token is untrained when either of its rows is):

- near zero: the row's L2 norm is below ``zero_ratio`` (1e-3) times the median row norm;
- init-like: the row's norm, or its distance from the mean row, is far BELOW the bulk's: a robust
  z-score on a log scale ((x - median) / (1.4826 * MAD), the MAD floored at 5% so that matrices whose rows
  all look alike flag nothing) under ``-z_threshold`` (-8). Such rows carry far less than trained ones:
  left at a small init (std 0.02 next to trained rows of a larger scale), decayed by AdamW's weight decay
  without a gradient to hold them up, or never moved from a common offset the trained rows left behind.
- never read (untied input embeddings only): a separate cluster of small norms (``low_norm_cluster``: the
  best two-way split of the log norms, taken when its groups are far apart for their spreads). The input
  row of a token the base never read gets no gradient at all and keeps its init scale; on the recipe
  study's base this finds the 1,837 never-seen rows (recall 1.0, precision 0.99) that the z-score missed.
  Not on tied embeddings: the matrix is also the output layer, every row gets gradient through the
  softmax, and a small-norm group there is trained output knowledge (resetting it by exact ids in the
  CLI default hurt: its no-replay run ended above the base on the new domain).

Limits: the rule finds rows that are clearly unlike the bulk of the matrix, on the small side only: a
trained row with a large norm (a BOS token, say) is never taken for an untrained one, and so an untrained
row larger than the trained ones is not found either. A model fresh from random init (every row
untrained) finds nothing, which is what we want there. Untrained rows that look like trained ones (an init
scale equal to the trained row norms; transformers' mean-and-covariance resizing) are not found, nor are
they when most of the vocabulary is untrained (the median then is an untrained row). A short pretraining
leaves rare trained rows about as small as untrained ones: a tiny Llama (vocabulary 512, width 64) after
150 AdamW steps on 70% of its tokens had unseen input rows of norm 0.12-0.20 next to seen ones of
0.18-0.44, and unseen untied lm_head rows pushed together to 0.71-0.81 (seen: 0.16-0.60); the rule found
none of them (robust z-scores within +-2), as it should not call that clear. When the untrained
tokens are known (ids that never occur in the base's training text: ``ids_never_seen``), pass them as
``ids`` and no statistics are used.
The padding row (``padding_idx``) is never counted: it is zero by design. Rows already marked fresh
(vocabulary extension) are left to their own initialisation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from cpt_plugin.config import CPTConfigError
from cpt_plugin.model_parts import embeddings_tied, input_embeddings, output_embeddings
from cpt_plugin.vocabulary.fresh_rows import fresh_rows, mark_fresh_rows

logger = logging.getLogger(__name__)

ZERO_RATIO = 1e-3  # a row below this fraction of the median norm is "near zero"
Z_THRESHOLD = 8.0  # robust z-score (log scale) above which a row stands apart
MIN_SPREAD = 0.05  # floor of the robust spread (log scale): rows within ~5% of each other look alike
# Untied input embeddings: a low-norm cluster this well separated (Ashman's D of the best two-way split of
# the log norms) is the never-read rows. One Gaussian split in two gives D ~ 2.7 (a random-init matrix);
# the recipe study's base (1,837 never-seen of 8,192 rows) gave 7.5.
CLUSTER_D = 5.0
MAX_CLUSTER_SHARE = 0.5  # the untrained cluster is the minority
_MAD_TO_SIGMA = 1.4826


def _matrices(model: Any) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """("input" | "output", module, weight) of the embedding matrices to look at: the output one only when
    untied (a tied pair is one matrix) and when its rows are tokens (same row count as the input)."""
    embed = input_embeddings(model)
    if embed is None or not isinstance(getattr(embed, "weight", None), torch.Tensor):
        raise CPTConfigError(
            f"cpt-plugin: untrained-token healing found no input embedding weight on {type(model).__name__}. "
            "Set heal_untrained_tokens=False for this model."
        )
    found = [("input", embed, embed.weight)]
    head = output_embeddings(model)
    weight = getattr(head, "weight", None)
    if (
        head is not None
        and isinstance(weight, torch.Tensor)
        and not embeddings_tied(model)
        and weight.ndim == 2
        and weight.shape[0] == embed.weight.shape[0]
    ):
        found.append(("output", head, weight))
    return found


def _unhealable(model: Any) -> str | None:
    """Why the embedding matrices cannot be read or written as plain floats (quantized, meta), else None."""
    for _role, module, weight in _matrices(model):
        kind = type(module).__name__ + "/" + type(weight).__name__
        if not weight.is_floating_point() or any(q in kind for q in ("4bit", "8bit", "Int8", "Quant")):
            return f"the {_role} embeddings are quantized ({kind})"
        if weight.is_meta:
            return f"the {_role} embeddings are not loaded yet (meta device)"
        if hasattr(weight, "to_local"):
            return f"the {_role} embeddings are sharded (DTensor); heal before sharding"
    return None


def _robust_z(values: torch.Tensor) -> torch.Tensor:
    """(x - median) / max(1.4826 * MAD, MIN_SPREAD): how far each value stands from the bulk."""
    median = values.median()
    spread = (values - median).abs().median() * _MAD_TO_SIGMA
    return (values - median) / max(float(spread), MIN_SPREAD)


def _chunk_rows(weight: torch.Tensor) -> int:
    return max(1, (1 << 22) // max(weight.shape[1], 1))  # ~16 MiB of fp32 rows at a time


def _mean_row(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The fp32 mean of the rows where ``mask`` (bool, CPU) is set, summed chunk by chunk."""
    total = torch.zeros(weight.shape[1], dtype=torch.float32, device=weight.device)
    mask = mask.to(weight.device)
    step = _chunk_rows(weight)
    for start in range(0, weight.shape[0], step):
        total += weight[start : start + step][mask[start : start + step]].float().sum(dim=0)
    return total / max(int(mask.sum()), 1)


def _row_stats(weight: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row norms, row distances from the mean candidate row), fp32 on the CPU, computed over row chunks
    on the weight's device (no fp32 copy of the whole matrix)."""
    mean = _mean_row(weight, candidates)
    step = _chunk_rows(weight)
    norms, distances = [], []
    for start in range(0, weight.shape[0], step):
        rows = weight[start : start + step].float()
        norms.append(rows.norm(dim=1))
        distances.append((rows - mean).norm(dim=1))
    return torch.cat(norms).cpu(), torch.cat(distances).cpu()


def _outliers(
    weight: torch.Tensor, candidates: torch.Tensor, zero_ratio: float, z_threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(near-zero mask, init-like mask) over all rows; only ``candidates`` (bool mask) can be flagged."""
    norms, distance = _row_stats(weight.detach(), candidates)
    median_norm = norms[candidates].median()
    empty = torch.zeros_like(candidates)
    if not torch.isfinite(median_norm) or float(median_norm) == 0.0:
        return empty, empty  # (nearly) every row is zero: nothing stands apart
    near_zero = candidates & (norms <= zero_ratio * median_norm)
    keep = candidates & ~near_zero
    tiny = torch.finfo(torch.float32).tiny
    z_norm, z_dist = torch.zeros_like(norms), torch.zeros_like(norms)
    z_norm[keep] = _robust_z(norms[keep].clamp_min(tiny).log())
    z_dist[keep] = _robust_z(distance[keep].clamp_min(tiny).log())
    init_like = keep & ((z_norm < -z_threshold) | (z_dist < -z_threshold))
    return near_zero, init_like


def low_norm_cluster(norms: torch.Tensor, candidates: torch.Tensor, min_d: float = CLUSTER_D) -> torch.Tensor:
    """Rows of a separate cluster of small norms (bool mask over all rows), or none.

    The best two-way split of the candidates' log norms (Otsu: the most between-group variance, found
    over the sorted values with cumulative sums) is taken when the groups are far apart for their spreads
    (Ashman's D = sqrt(2) |m1 - m2| / sqrt(v1 + v2) >= ``min_d``) and the low group is the minority. Why for
    untied input embeddings: the row of a token the base never read gets no gradient at all, so it keeps its
    init scale while trained rows grow or shrink together: two groups, not a tail (the recipe study's
    never-seen rows: log norm -1.49 +- 0.06 against -0.60 +- 0.16 for the trained ones).
    """
    found = torch.zeros_like(candidates)
    index = torch.nonzero(candidates).flatten()
    if index.numel() < 8:
        return found
    values = norms[index].clamp_min(torch.finfo(torch.float32).tiny).log().double()
    order = torch.argsort(values)
    x = values[order]
    n = x.numel()
    k = torch.arange(1, n, dtype=torch.float64)  # size of the low group
    s1, s2 = torch.cumsum(x, 0)[:-1], torch.cumsum(x * x, 0)[:-1]
    total1, total2 = x.sum(), (x * x).sum()
    m_low, m_high = s1 / k, (total1 - s1) / (n - k)
    between = k * (n - k) * (m_high - m_low) ** 2
    best = int(torch.argmax(between))
    low = best + 1
    if low > MAX_CLUSTER_SHARE * n:
        return found
    var_low = (s2[best] / low - m_low[best] ** 2).clamp_min(0)
    var_high = ((total2 - s2[best]) / (n - low) - m_high[best] ** 2).clamp_min(0)
    d = (2**0.5) * (m_high[best] - m_low[best]) / (var_low + var_high).clamp_min(1e-30).sqrt()
    if float(d) >= min_d:
        found[index[order[:low]]] = True
    return found


def _padding_rows(model: Any) -> list[int]:
    padding = getattr(input_embeddings(model), "padding_idx", None)
    return [int(padding)] if isinstance(padding, int) and padding >= 0 else []


@torch.no_grad()
def find_untrained_rows(
    model: Any, *, zero_ratio: float = ZERO_RATIO, z_threshold: float = Z_THRESHOLD
) -> torch.Tensor:
    """Row ids (sorted int64) whose embedding statistics stand apart from the trained rows (module doc:
    the rule and its limits). Empty when nothing is clear, e.g. on a model fresh from random init."""
    return _find(model, zero_ratio=zero_ratio, z_threshold=z_threshold)[0]


def _find(model: Any, *, zero_ratio: float, z_threshold: float) -> tuple[torch.Tensor, int, int]:
    """(ids, how many near zero, how many init-like)."""
    matrices = _matrices(model)
    n_rows = matrices[0][2].shape[0]
    candidates = torch.ones(n_rows, dtype=torch.bool)
    skip = _padding_rows(model) + (fresh_rows(model).tolist() if fresh_rows(model) is not None else [])
    candidates[[i for i in skip if 0 <= i < n_rows]] = False
    if int(candidates.sum()) < 3:
        return torch.zeros(0, dtype=torch.long), 0, 0
    zero = torch.zeros(n_rows, dtype=torch.bool)
    init = torch.zeros(n_rows, dtype=torch.bool)
    for role, _module, weight in matrices:
        near_zero, init_like = _outliers(weight, candidates, zero_ratio, z_threshold)
        zero |= near_zero
        init |= init_like
        if role == "input" and len(matrices) == 2:  # untied: input rows of unread tokens got no gradient
            norms = _row_stats(weight.detach(), candidates)[0]
            init |= low_norm_cluster(norms, candidates & ~near_zero)
    init &= ~zero
    ids = torch.nonzero(zero | init).flatten()
    return ids, int(zero.sum()), int(init.sum())


def _ids_tensor(ids: Iterable[int], n_rows: int) -> torch.Tensor:
    values = sorted({int(i) for i in ids})
    bad = [i for i in values if not 0 <= i < n_rows]
    if bad:
        raise CPTConfigError(
            f"cpt-plugin: untrained-token ids {bad[:5]} are outside the embedding's {n_rows} rows. "
            f"Pass token ids in [0, {n_rows})."
        )
    return torch.as_tensor(values, dtype=torch.long)


def _describe(ids: torch.Tensor) -> str:
    shown = ", ".join(str(i) for i in ids[:6].tolist())
    return f"ids {shown}{', ...' if ids.numel() > 6 else ''}"


@torch.no_grad()
def heal_untrained_rows(model: Any, ids: Iterable[int] | None = None) -> int:
    """Resets the untrained rows of ``model``'s embeddings (and of an untied lm_head) to the mean of the
    trained rows, marks them fresh, and returns how many rows were reset.

    ``ids`` None: rows found by ``find_untrained_rows``; else exactly these token ids (e.g. from
    ``ids_never_seen``). Quantized or sharded embeddings are left alone with one notice. Call it on the
    base model before PEFT copies the embeddings (prepare_model does, when heal_untrained_tokens is set).
    """
    problem = _unhealable(model)
    if problem is not None:
        logger.info("cpt-plugin: untrained-token healing skipped: %s.", problem)
        return 0
    matrices = _matrices(model)
    n_rows = matrices[0][2].shape[0]
    if ids is None:
        found, n_zero, n_init = _find(model, zero_ratio=ZERO_RATIO, z_threshold=Z_THRESHOLD)
        why = f"{n_zero} near zero, {n_init} far smaller than the trained rows"
    else:
        found = _ids_tensor(ids, n_rows)
        why = "ids given"
    if found.numel() == 0:
        return 0
    trained = torch.ones(n_rows, dtype=torch.bool)
    trained[found] = False
    already = fresh_rows(model)
    if already is not None:
        trained[already[already < n_rows]] = False
    if not bool(trained.any()):
        raise CPTConfigError(
            "cpt-plugin: every embedding row would count as untrained, so there is no trained row to take "
            "the mean of. Pass fewer ids to heal_untrained_rows, or set heal_untrained_tokens=False."
        )
    for _role, _module, weight in matrices:
        weight[found.to(weight.device)] = _mean_row(weight, trained).to(weight.dtype)
    mark_fresh_rows(model, found.tolist())
    logger.info(
        "cpt-plugin: %d embedding rows looked untrained (%s; %s); reset to the mean of the trained rows",
        found.numel(), why, _describe(found),
    )  # fmt: skip
    return int(found.numel())


def ids_never_seen(tokenizer: Any, texts: Iterable[str]) -> torch.Tensor:
    """Token ids (sorted int64) of ``tokenizer``'s vocabulary that never occur when ``texts`` (the base's
    training text) are tokenized: the exact ``ids`` for heal_untrained_rows. Special tokens are left out
    (they are trained without occurring in plain text)."""
    seen: set[int] = set()
    for text in texts:
        seen.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return torch.as_tensor(
        [i for i in range(len(tokenizer)) if i not in seen and i not in special], dtype=torch.long
    )
