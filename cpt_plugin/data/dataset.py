"""CPTDataset: the training dataset (sources -> pieces -> tokens -> packed blocks, replay mixed in),
sharded by rank, shuffled in a buffer; and helpers to collate, materialize and count.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from cpt_plugin.data.checks import (
    DataSourceError,
    validate_source,
)
from cpt_plugin.data.packing import IGNORE_INDEX, mix_replay_pieces, pack_pieces, tokenize_pieces, wants_bos
from cpt_plugin.data.sources import CHUNK_CHARS, describe_source, iter_document_pieces

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# The training dataset
# ------------------------------------------------------------------------------------------------
def _shard_info(shard_by_rank: bool) -> tuple[int, int]:
    """(index, count) of this reader among DataLoader workers (and distributed ranks when asked)."""
    info = torch.utils.data.get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    rank, world = 0, 1
    if shard_by_rank and torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return rank * workers + worker, world * workers


def _shard_pieces(pieces: Iterable[tuple[str, bool]], shard: int, shards: int) -> Iterator[tuple[str, bool]]:
    """The pieces of documents ``shard``, ``shard + shards``, ... (round-robin by document)."""
    index = 0
    for piece, end in pieces:
        if index % shards == shard:
            yield piece, end
        index += end


class CPTDataset(torch.utils.data.IterableDataset):
    """Packed continued-pretraining blocks from raw text, with optional token-level replay.

    Streams ``source`` (anything :func:`iter_documents` reads) through the tokenizer into blocks of
    ``max_seq_length`` tokens (see the module doc for the packing contract), in pieces of about
    ``chunk_chars`` characters, so memory does not grow with the length of a document. Re-iterating
    gives the same blocks in the same order, for the same number of DataLoader workers. With workers,
    documents are dealt round-robin (document ``i`` goes to worker ``i % num_workers``), each worker packs
    its own, so every block comes out exactly once. ``shard_by_rank=True`` also splits by distributed
    rank: leave it off under HF Trainer / accelerate, which read an iterable dataset on rank 0 and
    dispatch batches. ``shuffle_buffer > 0`` shuffles blocks through a seeded buffer of that many blocks.
    The source must be re-iterable (a path, a list, a datasets object, or a function returning a fresh
    iterator); a one-shot generator is refused because it could not be re-read on resume.
    Path sources are checked at construction (:func:`~cpt_plugin.data.checks.validate_source`: exists,
    UTF-8, JSONL rows with the text field; the first 64 MiB of each), so a bad line fails before step 1.
    """

    def __init__(
        self,
        source: Any,
        tokenizer: Any,
        max_seq_length: int,
        replay_source: Any = None,
        replay_ratio: float = 0.0,
        seed: int = 42,
        text_field: str = "text",
        *,
        split: str = "file",
        add_bos: bool | None = None,
        drop_last: bool = True,
        shuffle_buffer: int = 0,
        shard_by_rank: bool = False,
        tokenize_batch_size: int = 256,
        chunk_chars: int = CHUNK_CHARS,
    ) -> None:
        super().__init__()
        if getattr(tokenizer, "eos_token_id", None) is None:
            raise ValueError(
                "The tokenizer has no eos_token_id, which packing needs between documents. "
                "Set one, e.g. tokenizer.eos_token = '</s>' (or the model's end-of-text token)."
            )
        if max_seq_length < 2:
            raise ValueError(f"max_seq_length must be >= 2, got {max_seq_length}.")
        if not 0 <= replay_ratio < 1:
            raise ValueError(f"replay_ratio must be in [0, 1), got {replay_ratio!r}.")
        if replay_ratio > 0 and replay_source is None:
            raise ValueError(
                f"replay_ratio={replay_ratio} needs a replay_source (the previous-domain corpus)."
            )
        if chunk_chars < 1:
            raise ValueError(f"chunk_chars must be >= 1, got {chunk_chars}.")
        for name, value in (("source", source), ("replay_source", replay_source)):
            if _is_one_shot(value):
                raise DataSourceError(
                    f"The {name} is a one-shot iterator ({type(value).__name__}); CPTDataset re-reads its "
                    "source on every epoch and on resume. Pass a list, a path, a datasets object, or a "
                    "function that returns a fresh iterator."
                )
        validate_source(source, text_field, split)
        if replay_ratio > 0:
            validate_source(replay_source, text_field, split)
        self.source = source
        self.tokenizer = tokenizer
        self.max_seq_length = int(max_seq_length)
        self.replay_source = replay_source
        self.replay_ratio = float(replay_ratio)
        self.seed = int(seed)
        self.text_field = text_field
        self.split = split
        self.add_bos = wants_bos(tokenizer) if add_bos is None else add_bos
        self.drop_last = drop_last
        self.shuffle_buffer = int(shuffle_buffer)
        self.shard_by_rank = shard_by_rank
        self.tokenize_batch_size = tokenize_batch_size
        self.chunk_chars = int(chunk_chars)

    # --------------------------------------------------------------------------------------------
    def _pieces(self, source: Any, shard: int, shards: int) -> Iterator[tuple[list[int], bool]]:
        texts = iter_document_pieces(source, self.text_field, self.split, chunk_chars=self.chunk_chars)
        if shards > 1:
            texts = _shard_pieces(texts, shard, shards)
        return tokenize_pieces(
            texts, self.tokenizer, add_bos=self.add_bos, batch_size=self.tokenize_batch_size
        )

    def token_pieces(self, replay: bool = False) -> Iterator[tuple[list[int], bool]]:
        """The training (or replay) corpus as the blocks see it, tokenized: ``(ids, ends_document)`` pieces."""
        source = self.replay_source if replay else self.source
        if source is None:
            raise ValueError("This CPTDataset has no replay_source.")
        return self._pieces(source, 0, 1)

    def iter_blocks(self, shard: int = 0, shards: int = 1) -> Iterator[dict[str, list[int]]]:
        """The blocks of one shard (the whole corpus for ``shards=1``), as lists."""
        pieces: Iterable[tuple[list[int], bool]] = self._pieces(self.source, shard, shards)
        if self.replay_ratio > 0:
            mixed = mix_replay_pieces(
                pieces,
                lambda: self._pieces(self.replay_source, shard, shards),
                self.replay_ratio,
                seed=self.seed + shard,
            )
            pieces = ((ids, end) for ids, end, _ in mixed)
        blocks = pack_pieces(
            pieces, self.max_seq_length, self.tokenizer.eos_token_id, drop_last=self.drop_last
        )
        if self.shuffle_buffer > 0:
            blocks = _buffer_shuffle(
                blocks, self.shuffle_buffer, random.Random(self.seed * 1_000_003 + shard)
            )
        count = 0
        for block in blocks:
            count += 1
            yield block
        if count == 0:
            message = (
                f"The data source {describe_source(self.source)} gives fewer tokens than one block of "
                f"max_seq_length={self.max_seq_length}. Lower max_seq_length or add text."
            )
            if shards == 1:
                raise DataSourceError(message)
            logger.warning("cpt-plugin: shard %d of %d is empty. %s", shard, shards, message)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        shard, shards = _shard_info(self.shard_by_rank)
        for block in self.iter_blocks(shard, shards):
            yield {key: torch.tensor(value, dtype=torch.long) for key, value in block.items()}


def _is_one_shot(value: Any) -> bool:
    return value is not None and isinstance(value, Iterator)


def _buffer_shuffle(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        index = rng.randrange(size)
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def _iter_lists(dataset: Any) -> Iterator[dict[str, list[int]]]:
    if isinstance(dataset, CPTDataset):
        yield from dataset.iter_blocks()
        return
    for block in dataset:
        yield {key: value.tolist() if torch.is_tensor(value) else list(value) for key, value in block.items()}


def materialize(dataset: Any, max_blocks: int | None = None) -> Any:
    """Collects the blocks of ``dataset`` into a map-style ``datasets.Dataset`` (with a length).

    Meant for small corpora (it holds every block in memory), e.g. a held-out set for evaluation or a
    Trainer run that wants ``num_train_epochs`` instead of ``max_steps``.
    """
    import datasets

    columns: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
    for block in itertools.islice(_iter_lists(dataset), max_blocks):
        for key in columns:
            columns[key].append(block[key])
    features = datasets.Features({key: datasets.Sequence(datasets.Value("int64")) for key in columns})
    return datasets.Dataset.from_dict(columns, features=features)


def collate_packed(examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stacks packed blocks into ``input_ids``/``labels``/``position_ids`` tensors of shape (batch, length).

    No ``attention_mask`` on purpose: transformers (>= 4.53, incl. 5.x) builds per-document causal masks
    from restarting ``position_ids`` only when ``attention_mask`` is None and no KV cache is used
    (``use_cache=False``, which the Trainer sets); with a mask of ones documents would attend to each other.
    """
    if not examples:
        raise ValueError("collate_packed got an empty batch.")
    batch = {}
    for key in ("input_ids", "labels", "position_ids"):
        values = [torch.as_tensor(example[key], dtype=torch.long) for example in examples]
        lengths = {value.shape[-1] for value in values}
        if len(lengths) != 1:
            raise ValueError(f"collate_packed needs blocks of one length, got {sorted(lengths)} for '{key}'.")
        batch[key] = torch.stack(values)
    return batch


def count_tokens(dataset: Any, max_blocks: int | None = None) -> dict[str, int]:
    """Counts blocks, tokens, trained tokens (labels != -100) and segments (document pieces) of blocks."""
    blocks = tokens = trained = segments = 0
    for block in itertools.islice(_iter_lists(dataset), max_blocks):
        blocks += 1
        tokens += len(block["input_ids"])
        trained += sum(label != IGNORE_INDEX for label in block["labels"])
        segments += sum(1 for position in block["position_ids"] if position == 0)
    return {"blocks": blocks, "tokens": tokens, "trained_tokens": trained, "segments": segments}


def estimate_steps(num_tokens: int, max_seq_length: int, batch_size: int, grad_accum: int = 1) -> int:
    """Optimizer steps for one pass over ``num_tokens`` tokens (helps set ``max_steps`` for a stream)."""
    return max(1, math.floor(num_tokens / max_seq_length / max(1, batch_size * grad_accum)))
