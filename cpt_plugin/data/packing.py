"""Tokenizing documents, packing them into fixed-length blocks, and token-level replay mixing.

The packing contract (EOS, position_ids restarts, -100 labels) is in the package doc.
"""

from __future__ import annotations

import logging
import random
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from cpt_plugin.data.checks import (
    DataSourceError,
)

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
_BATCH_CHARS = 1 << 20  # characters per tokenizer call: bounds the tokenizer's per-token overhead
_ANCHOR_CHARS = 32


# ------------------------------------------------------------------------------------------------
# Tokenizing
# ------------------------------------------------------------------------------------------------
def wants_bos(tokenizer: Any) -> bool:
    """True when the tokenizer adds BOS by itself (Llama, Gemma), so each document should start with it."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    try:
        ids = tokenizer("a")["input_ids"]
    except Exception:  # noqa: BLE001 - a tokenizer that can't encode "a" gets no BOS
        return False
    return bool(ids) and ids[0] == bos


def tokenize_documents(
    docs: Iterable[str], tokenizer: Any, *, add_bos: bool | None = None, batch_size: int = 256
) -> Iterator[list[int]]:
    """Tokenizes documents in batches (fast tokenizers parallelize a batch) without special tokens.

    BOS is prepended when ``add_bos`` is True, or (``None``) when the tokenizer adds one by itself;
    EOS is appended later by :func:`pack_documents`. Documents without tokens are left out.
    """
    pieces = ((doc, True) for doc in docs)
    for ids, _ in tokenize_pieces(pieces, tokenizer, add_bos=add_bos, batch_size=batch_size):
        yield ids


def tokenize_pieces(
    pieces: Iterable[tuple[str, bool]],
    tokenizer: Any,
    *,
    add_bos: bool | None = None,
    batch_size: int = 256,
    batch_chars: int = _BATCH_CHARS,
) -> Iterator[tuple[list[int], bool]]:
    """Tokenizes ``(piece, ends_document)`` pairs into ``(token ids, ends_document)`` pairs.

    A piece after a document's first is tokenized behind an anchor (the last word of the piece before
    it) whose tokens are then dropped, so the tokens equal those of the whole document when the cut is
    clean (see the module doc). Batches hold at most ``batch_size`` pieces and about ``batch_chars``
    characters. Documents without tokens are left out; BOS starts a document as in
    :func:`tokenize_documents`; the last pair of every document is non-empty.
    """
    if add_bos is None:
        add_bos = wants_bos(tokenizer)
    prefix = [tokenizer.bos_token_id] if add_bos else []
    iterator = iter(pieces)
    anchor = ""  # the anchor for the next piece; "" at a document start
    started = False  # the current document has yielded tokens
    held: list[int] | None = None  # the document's latest tokens, held to mark the document's end
    while True:
        batch: list[tuple[str, str, bool]] = []
        chars = 0
        for piece, end in iterator:
            batch.append((piece, anchor, end))
            anchor = "" if end else _anchor(piece)
            chars += len(piece)
            if len(batch) >= batch_size or chars >= batch_chars:
                break
        if not batch:
            return
        texts = [a + p for p, a, _ in batch]
        anchors = [a for _, a, _ in batch if a]
        encoded = _encode(tokenizer, texts + anchors)
        anchor_ids = iter(encoded[len(texts) :])
        for (piece, anchor_text, end), ids in zip(batch, encoded, strict=False):
            ids = list(ids)
            if anchor_text:
                drop = next(anchor_ids)
                if ids[: len(drop)] == drop:
                    ids = ids[len(drop) :]
                else:  # the anchor merged into the piece: the cut was not clean
                    ids = list(_encode(tokenizer, [piece])[0])
            if ids:
                if not started:
                    ids = prefix + ids
                    started = True
                if held is not None:
                    yield held, False
                held = ids
            if end:
                if held is not None:
                    yield held, True
                held, started = None, False


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def _anchor(piece: str) -> str:
    """The last word of ``piece`` (at most a few characters), the left context of the next piece."""
    tail = piece[-_ANCHOR_CHARS:]
    start = len(tail)
    while start > 0 and not tail[start - 1].isspace():
        start -= 1
    return tail[start:] or tail


# ------------------------------------------------------------------------------------------------
# Packing
# ------------------------------------------------------------------------------------------------
def pack_documents(
    token_id_docs: Iterable[Sequence[int]],
    block_size: int,
    eos_token_id: int,
    *,
    drop_last: bool = True,
    pad_token_id: int | None = None,
) -> Iterator[dict[str, list[int]]]:
    """Concatenates tokenized documents (each followed by EOS) and cuts them into blocks of ``block_size``.

    Yields ``{"input_ids", "labels", "position_ids"}`` lists of length ``block_size``. A long document's
    remainder continues in the next block (its ``position_ids`` restart at 0 there: the block is a new
    attention window). EOS is appended to every document unless it already ends with EOS. Labels equal
    the inputs except -100 at every document's first token and at block position 0 (see module doc).
    The final partial block is dropped (``drop_last=True``, the default) or padded with
    ``pad_token_id`` (default: EOS), label -100, as a separate position segment.
    """
    pieces = ((doc, True) for doc in token_id_docs if len(doc))
    yield from pack_pieces(pieces, block_size, eos_token_id, drop_last=drop_last, pad_token_id=pad_token_id)


def pack_pieces(
    pieces: Iterable[tuple[Sequence[int], bool]],
    block_size: int,
    eos_token_id: int,
    *,
    drop_last: bool = True,
    pad_token_id: int | None = None,
) -> Iterator[dict[str, list[int]]]:
    """:func:`pack_documents` for documents that come in ``(token ids, ends_document)`` pieces.

    Positions run on across a document's pieces (restarting at block starts), so a document packs the
    same whether it comes whole or in pieces.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}.")
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    position = 0
    at_start = True  # the next piece starts a document
    last: int | None = None  # the document's last token so far
    for piece, end in pieces:
        piece = list(piece)
        if end and (piece[-1] if piece else last) != eos_token_id and (piece or last is not None):
            piece.append(eos_token_id)
        if not piece:
            at_start, last = (True, None) if end else (at_start, last)
            continue
        piece_labels = piece.copy()
        if at_start:
            piece_labels[0] = IGNORE_INDEX
            position = 0
        last = piece[-1]
        offset = 0
        while offset < len(piece):
            if not ids:
                position = 0  # a block start is a new attention window
            take = min(block_size - len(ids), len(piece) - offset)
            ids.extend(piece[offset : offset + take])
            labels.extend(piece_labels[offset : offset + take])
            positions.extend(range(position, position + take))
            position += take
            offset += take
            if len(ids) == block_size:
                labels[0] = IGNORE_INDEX
                yield {"input_ids": ids, "labels": labels, "position_ids": positions}
                ids, labels, positions = [], [], []
        at_start = end
        if end:
            last = None
    if ids and not drop_last:
        missing = block_size - len(ids)
        pad = eos_token_id if pad_token_id is None else pad_token_id
        labels[0] = IGNORE_INDEX
        yield {
            "input_ids": ids + [pad] * missing,
            "labels": labels + [IGNORE_INDEX] * missing,
            "position_ids": positions + list(range(missing)),
        }


# ------------------------------------------------------------------------------------------------
# Replay mixing
# ------------------------------------------------------------------------------------------------
def mix_replay(
    new_docs: Iterable[Sequence[int]],
    replay_docs: Iterable[Sequence[int]] | Callable[[], Iterable[Sequence[int]]],
    replay_ratio: float,
    seed: int,
    *,
    with_source: bool = False,
) -> Iterator[Any]:
    """Interleaves tokenized documents so that about ``replay_ratio`` of the output TOKENS are replayed.

    The next document comes from the replay corpus while the running replay-token share is below the
    target; a seeded jitter of up to one mean document length on that decision varies the order with the
    seed while keeping the share within about two document lengths of the target at any point. The
    output ends when ``new_docs`` ends. The replay corpus is restarted (warned once) when it runs out:
    give a re-iterable (list, path-backed source) or a zero-argument callable. ``replay_ratio=0`` passes
    ``new_docs`` through and never touches ``replay_docs``. With ``with_source=True`` yields
    ``(doc, is_replay)`` pairs.
    """

    def as_pieces(docs: Iterable[Sequence[int]]) -> Iterator[tuple[Sequence[int], bool]]:
        return ((doc, True) for doc in docs if len(doc))

    replay = (lambda: as_pieces(replay_docs())) if callable(replay_docs) else _Pieces(replay_docs)
    new = ((doc, True) for doc in new_docs)
    for doc, _, is_replay in mix_replay_pieces(new, replay, replay_ratio, seed):
        yield (doc, is_replay) if with_source else doc


class _Pieces:
    """A re-iterable view of tokenized documents as one-piece documents."""

    def __init__(self, docs: Iterable[Sequence[int]]) -> None:
        self.docs = docs

    def __iter__(self) -> Iterator[tuple[Sequence[int], bool]]:
        return ((doc, True) for doc in self.docs if len(doc))


def mix_replay_pieces(
    new: Iterable[tuple[Sequence[int], bool]],
    replay: Iterable[tuple[Sequence[int], bool]] | Callable[[], Iterable[tuple[Sequence[int], bool]]],
    replay_ratio: float,
    seed: int,
) -> Iterator[tuple[Sequence[int], bool, bool]]:
    """:func:`mix_replay` over documents in ``(token ids, ends_document)`` pieces; yields ``(ids, end, is_replay)``.

    The source of the next document is chosen at each document start, from the token counts so far, so a
    long document is passed on piece by piece without being held.
    """
    if not 0 <= replay_ratio < 1:
        raise ValueError(f"replay_ratio must be in [0, 1), got {replay_ratio!r}.")
    if replay_ratio == 0:
        for ids, end in new:
            yield ids, end, False
        return
    rng = random.Random(seed)
    replay_iter = _restartable(replay)
    new_iter = iter(new)
    replay_tokens = total_tokens = docs_seen = 0
    while True:
        mean_len = total_tokens / docs_seen if docs_seen else 0.0
        jitter = (rng.random() - 0.5) * mean_len
        take_replay = replay_tokens + jitter < replay_ratio * total_tokens
        source = replay_iter if take_replay else new_iter
        length = 0
        first = True
        while True:
            item = next(source, None)
            if item is None:
                if first:
                    return  # the new corpus ended (the replay one never does)
                break
            ids, end = item
            first = False
            length += len(ids)
            yield ids, end, take_replay
            if end:
                break
        total_tokens += length
        replay_tokens += length if take_replay else 0
        docs_seen += 1


def _restartable(pieces: Any) -> Iterator[Any]:
    """Cycles ``pieces`` forever, re-iterating it when it runs out (warned once)."""
    warned = False
    while True:
        iterable = pieces() if callable(pieces) else pieces
        empty = True
        for item in iterable:
            empty = False
            yield item
        if empty:
            raise DataSourceError(
                "The replay corpus gave no documents"
                + (" on a restart: it is a one-shot iterator." if not warned else ".")
                + " Give a list, a path-backed source or a function that returns a fresh iterator."
            )
        if not warned:
            warnings.warn(
                "cpt-plugin: the replay corpus ran out and is being cycled from its start; "
                "replayed documents now repeat.",
                stacklevel=2,
            )
            warned = True
