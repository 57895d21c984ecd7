"""lm_head updates kept off the old domain's main hidden directions (``output_row_projection``).

Why (docs/RECIPE.md, the recipe study): the extra forgetting of a higher embedding LR sits in the output
rows. Raising a token's output row along a direction that the old domain's final hidden states share
raises that token's logit in old-domain contexts too. So after each optimizer step the update of every
lm_head row is projected off the K leading directions of those states: their mean, then their leading
principal directions. With the domain-shifted rows and the final step back this reached the new-domain
loss of an embedding LR at the LoRA LR while forgetting less than the usual 1/10 ratio.

How: the directions come from the first ``OLD_TEXTS`` documents of the replay data: at train begin from
the model with its adapters off (the base, the start of CPT), then before every
``output_row_projection_refresh``-th step from the model as it is then (the study measured it so: the
directions the old domain uses drift as CPT trains). The current directions are saved beside each
checkpoint (``STATE_FILE``) and a resumed run starts from them, so resume stays exact. No copy of the
matrix is kept: before the step the rows' coordinates along the directions (vocab x K) are saved, after
it their change is taken back out. bf16 rows get the correction with stochastic rounding (a small
correction would otherwise round away).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from cpt_plugin.model_parts import input_device, output_embeddings
from cpt_plugin.stochastic_rounding import rounding_seed, stochastic_round_to_bf16

logger = logging.getLogger(__name__)

OLD_TEXTS = 64  # replay documents whose final hidden states give the directions
TOKENS_PER_TEXT = 128  # their first tokens
MIN_TOKENS = 16  # shorter documents are skipped
ROWS_PER_CHUNK = 8192  # rows corrected at a time (bounds the fp32 temporary)
STATE_FILE = "cpt_output_rows.safetensors"  # the current directions, in each checkpoint folder


def replay_sequences(pieces: Iterable[tuple[Sequence[int], bool]]) -> list[list[int]]:
    """The first ``TOKENS_PER_TEXT`` ids of the first ``OLD_TEXTS`` replay pieces long enough to count."""
    sequences = []
    for ids, _end in pieces:
        if len(ids) >= MIN_TOKENS:
            sequences.append(list(ids[:TOKENS_PER_TEXT]))
            if len(sequences) == OLD_TEXTS:
                break
    return sequences


def principal_directions(hidden: torch.Tensor, count: int) -> torch.Tensor:
    """(count x hidden) orthonormal rows: the mean of ``hidden`` (tokens x hidden), then its leading
    principal directions."""
    hidden = hidden.float()
    mean = hidden.mean(0)
    columns = [mean[:, None]]
    if count > 1:
        columns.append(torch.linalg.svd(hidden - mean, full_matrices=False)[2][: count - 1].t())
    q, _ = torch.linalg.qr(torch.cat(columns, 1))
    return q.t().contiguous()


def final_hidden_states(model: nn.Module, sequences: list[list[int]], base: bool = True) -> torch.Tensor:
    """(tokens x hidden) inputs of the lm_head for ``sequences``; ``base``: with PEFT's adapters off."""
    head = output_embeddings(model)
    if head is None:
        raise ValueError("the model has no output embeddings")
    states: list[torch.Tensor] = []

    def keep(_module: nn.Module, args: tuple[Any, ...]) -> None:
        states.append(args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu())

    handle = head.register_forward_pre_hook(keep)
    disable = getattr(model, "disable_adapter", None) if base else None
    was_training = model.training
    device = input_device(model)
    model.eval()
    try:
        with torch.no_grad(), disable() if callable(disable) else contextlib.nullcontext():
            for ids in sequences:
                model(input_ids=torch.tensor([ids], device=device))
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(states)


def trained_output_weight(model: nn.Module) -> nn.Parameter | None:
    """The lm_head weight the optimizer trains (PEFT's copy), or None."""
    head = output_embeddings(model)
    if head is None:
        return None
    trained = [p for p in head.parameters() if p.requires_grad and p.dim() == 2]
    return trained[0] if len(trained) == 1 else None


class OutputRowProjection:
    """Registered on an optimizer: the update of ``weight``'s rows loses its part along ``directions``."""

    def __init__(
        self, weight: nn.Parameter, directions: torch.Tensor, seed: int, step_of: Callable[[], int],
        refresh: int = 0, directions_of: Callable[[], torch.Tensor] | None = None,
    ) -> None:  # fmt: skip
        self.weight = weight
        self.directions = directions.to(weight.device, torch.float32)
        self.seed = seed
        self.step_of = step_of  # the Trainer's global step: the same rounding on a resumed run
        self.refresh = refresh  # before every refresh-th step, the directions of the model as it is now
        self.directions_of = directions_of
        # step() calls in progress: an optimizer whose step() calls its parent class's fires the hooks again
        # inside (torch patches a class's step() with them once any instance of it exists)
        self._depth = 0
        self._before: torch.Tensor | None = None
        self._handles: list[Any] = []

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper has no step hooks
        self._handles = [
            inner.register_step_pre_hook(lambda *_: self.before_step()),
            inner.register_step_post_hook(lambda *_: self.after_step()),
        ]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _coordinates(self) -> torch.Tensor:
        """(vocab x K) the rows' coordinates along the directions, in fp32 chunks."""
        weight = self.weight.detach()
        return torch.cat([
            weight[start : start + ROWS_PER_CHUNK].float() @ self.directions.t()
            for start in range(0, weight.shape[0], ROWS_PER_CHUNK)
        ])  # fmt: skip

    def before_step(self) -> None:
        self._depth += 1
        if self._depth > 1:
            return  # the inner step() of the same update
        step = self.step_of() + 1  # the Trainer counts the step after it
        if self.refresh and self.directions_of is not None and step % self.refresh == 0:
            self.directions = self.directions_of().to(self.weight.device, torch.float32)
        self._before = self._coordinates()

    def save(self, folder: str) -> None:
        """The directions beside a checkpoint: a resumed run continues with them (exact resume)."""
        from safetensors.torch import save_file

        save_file({"directions": self.directions.cpu().contiguous()}, os.path.join(folder, STATE_FILE))

    def after_step(self) -> None:
        self._depth = max(self._depth - 1, 0)
        if self._depth > 0:
            return  # the outer step() is still updating
        before, self._before = self._before, None
        if before is None:
            return
        change = self._coordinates() - before  # (vocab x K): the update's part along the directions
        weight = self.weight.data
        generator = None
        if weight.dtype == torch.bfloat16:
            generator = torch.Generator(device=weight.device)
            generator.manual_seed(rounding_seed(self.seed, 0x0B, self.step_of()))
        with torch.no_grad():
            for start in range(0, weight.shape[0], ROWS_PER_CHUNK):
                rows = weight[start : start + ROWS_PER_CHUNK]
                corrected = rows.float() - change[start : start + ROWS_PER_CHUNK] @ self.directions
                rows.copy_(
                    stochastic_round_to_bf16(corrected, generator) if generator is not None else corrected
                )


def install_output_row_projection(
    model: nn.Module, optimizer: torch.optim.Optimizer, pieces: Iterable[tuple[Sequence[int], bool]],
    count: int, seed: int, step_of: Callable[[], int], refresh: int = 0, resumed_from: str | None = None,
) -> OutputRowProjection | None:  # fmt: skip
    """Computes the directions from the replay ``pieces`` and attaches the projection; None (with one
    notice) where it cannot apply: no trained lm_head, a tied one, or too little replay text."""
    from cpt_plugin.model_parts import embeddings_tied

    weight = trained_output_weight(model)
    if weight is None:
        logger.warning("cpt-plugin: output_row_projection needs a trained lm_head; it is off for this run.")
        return None
    if embeddings_tied(model):
        logger.warning(
            "cpt-plugin: output_row_projection is off for this run: the lm_head is tied to the input "
            "embeddings, and the projection was measured on untied ones only (docs/RECIPE.md)."
        )
        return None
    inner = getattr(optimizer, "optimizer", optimizer)
    sharded = type(weight).__name__ == "DTensor" or hasattr(weight, "ds_id")
    if sharded or not hasattr(inner, "register_step_pre_hook"):
        why = "the lm_head is sharded" if sharded else f"the optimizer is a {type(inner).__name__}"
        logger.warning(
            "cpt-plugin: output_row_projection is off for this run: it needs a torch optimizer over the whole "
            "lm_head (%s).", why,
        )  # fmt: skip
        return None
    sequences = replay_sequences(pieces)
    if len(sequences) < count:
        logger.warning(
            "cpt-plugin: output_row_projection is off for this run: the replay data has %d documents of %d "
            "tokens or more, fewer than the %d directions asked for.", len(sequences), MIN_TOKENS, count,
        )  # fmt: skip
        return None
    directions = _starting_directions(model, sequences, count, resumed_from)
    projection = OutputRowProjection(
        weight, directions, seed, step_of, refresh,
        lambda: principal_directions(final_hidden_states(model, sequences, base=False), count),
    )  # fmt: skip
    projection.attach(optimizer)
    logger.info(
        "cpt-plugin: lm_head updates are kept off %d directions of the old domain's final hidden states "
        "(from %d replay documents; output_row_projection)", count, len(sequences),
    )  # fmt: skip
    return projection


def _starting_directions(
    model: nn.Module, sequences: list[list[int]], count: int, resumed_from: str | None
) -> torch.Tensor:
    """The base's directions at the start of CPT; on a resumed run the ones saved with its checkpoint."""
    if resumed_from is not None:
        path = os.path.join(resumed_from, STATE_FILE)
        if os.path.isfile(path):
            from safetensors.torch import load_file

            return load_file(path)["directions"]
        logger.warning(
            "cpt-plugin: %s has no %s (written by an older cpt-plugin, or without output_row_projection): the "
            "lm_head projection starts again from the base's directions, so this resume is not bit-exact.",
            resumed_from, STATE_FILE,
        )  # fmt: skip
    return principal_directions(final_hidden_states(model, sequences), count)
