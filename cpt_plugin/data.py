"""Raw text -> tokenized documents -> packed fixed-length blocks, with token-level replay mixing.

Everything streams, with memory bounded whatever the length of a document: text files are read and
decoded in blocks, documents travel as pieces of about ``chunk_chars`` characters (:func:`iter_document_pieces`),
pieces are tokenized in batches of bounded size and packed as they come. A corpus larger than RAM, or one
document of several GB, trains without being materialized. Iteration is deterministic for a given source
and seed, which the HF Trainer relies on when it resumes from a checkpoint (it re-iterates and skips the
batches it has already seen).

Chunk joins: a document is cut only before a space that follows a non-space character, a point where
byte-level BPE (GPT-2, Llama 3, Qwen) and SentencePiece (Llama 2, Mistral, Gemma) tokenizers always
start a new pre-token; each later piece is tokenized behind the last word of the piece before it (an
"anchor", whose tokens are dropped), so prefix-space and "▁" rules apply as inside the whole text. The
tokens equal those of the whole document. A document with no such space in ``8 * chunk_chars`` characters
is cut after a line break followed by a letter or digit, else anywhere (tokens there may differ).

Packing contract (see :func:`pack_documents`):
- every document ends with EOS, so two documents are never joined without one;
- ``position_ids`` restart at 0 at every document start and at every block start, which lets
  transformers' SDPA / flash-attention paths keep documents apart (they detect packed sequences from
  ``position_ids`` when no ``attention_mask`` is given and no KV cache is used);
- the label of every document's first token is -100, so no token is trained to follow a foreign
  document; the label at block position 0 is always -100 as well (HF causal-LM losses shift labels
  left, so that label is never a target anyway, and masking it keeps ``num_items_in_batch`` exact);
- the final partial block is dropped by default (``drop_last=False`` pads it instead).

Special tokens: documents are tokenized with ``add_special_tokens=False``; EOS is appended to every
document, and BOS is prepended only when the tokenizer adds one by itself (Llama, Gemma: the model was
pretrained with it; Qwen adds none), so each packed document looks like a document the model has seen.

Sources are checked before training by :func:`cpt_plugin.data_checks.validate_source` (``CPTDataset``
calls it); the readers here raise the same errors, with file, line and byte, for what lies past the check.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from cpt_plugin.data_checks import (
    DATASET_MARKERS,
    SPLITS,
    DataSourceError,
    is_jsonl,
    iter_decoded,
    iter_jsonl_lines,
    jsonl_row_text,
    missing_path_error,
    row_text,
    validate_source,
)

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
CHUNK_CHARS = 1 << 16  # characters per document piece (a long document is cut into pieces of about this)
_MAX_SPAN = 8  # a piece without a clean cut may grow to this many chunks before it is cut anyway
_BATCH_CHARS = 1 << 20  # characters per tokenizer call: bounds the tokenizer's per-token overhead
_ANCHOR_CHARS = 32
# Extensions that are never text; anything else in a folder is sniffed (NUL bytes, UTF-8 decoding).
_BINARY_SUFFIXES = {
    ".arrow", ".bin", ".bz2", ".db", ".dll", ".exe", ".gif", ".gz", ".ico", ".jpeg", ".jpg", ".npy",
    ".npz", ".parquet", ".pdf", ".pkl", ".png", ".pt", ".pth", ".pyc", ".safetensors", ".so", ".tar",
    ".webp", ".whl", ".xz", ".zip", ".zst",
}  # fmt: skip
_DATASET_MARKERS = DATASET_MARKERS
_CLEAN_CUT = re.compile(r"(?<=\S) ")
_LINE_CUT = re.compile(r"(?<=\n)(?=\w)")

__all__ = [
    "IGNORE_INDEX", "SPLITS", "CHUNK_CHARS", "DataSourceError", "CPTDataset", "build_train_dataset",
    "collate_packed", "count_tokens", "estimate_steps", "iter_document_pieces", "iter_documents",
    "materialize", "mix_replay", "pack_documents", "tokenize_documents", "validate_source",
]  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Reading documents
# ------------------------------------------------------------------------------------------------
def iter_documents(source: Any, text_field: str = "text", split: str = "file") -> Iterator[str]:
    """Yields the raw-text documents of ``source`` lazily, each as one string.

    ``source`` may be a text file (one document per file, or per paragraph with
    ``split="blank_lines"``, or per line with ``split="line"``), a folder (recursive, sorted, text files
    and ``.jsonl``/``.jsonl.gz`` files; binary or non-UTF-8 files are skipped and counted in the log), a
    ``.jsonl``/``.jsonl.gz`` file (field ``text_field`` of every row), a folder written by
    ``datasets``' ``save_to_disk`` (a ``DatasetDict`` gives its ``"train"`` split), an in-memory
    ``datasets.Dataset``/``IterableDataset``/``DatasetDict``, a zero-argument callable returning an
    iterable, or any iterable of strings. Empty and whitespace-only documents are skipped.
    Raises :class:`DataSourceError` for a missing path, a source without documents, or rows without
    ``text_field``. A long document is held whole here; :func:`iter_document_pieces` streams it.
    """
    parts: list[str] = []
    for piece, end in iter_document_pieces(source, text_field, split):
        parts.append(piece)
        if end:
            yield "".join(parts)
            parts = []


def iter_document_pieces(
    source: Any, text_field: str = "text", split: str = "file", *, chunk_chars: int = CHUNK_CHARS
) -> Iterator[tuple[str, bool]]:
    """The documents of ``source`` (as :func:`iter_documents`) as ``(piece, ends_document)`` pairs.

    A document longer than ``chunk_chars`` characters comes in pieces cut before a space that follows a
    non-space (see the module doc), so memory stays bounded whatever its length; joined, a document's
    pieces are exactly the string :func:`iter_documents` gives.
    """
    if split not in SPLITS:
        raise DataSourceError(f"split={split!r} is not supported. Use one of {', '.join(SPLITS)}.")
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be >= 1, got {chunk_chars}.")
    count = 0
    for piece, end in _cut_documents(_iter_raw(source, text_field, split, chunk_chars), chunk_chars):
        count += end
        yield piece, end
    if count == 0:
        raise DataSourceError(
            f"The data source {_describe(source)} has no documents (no non-empty text). "
            "Point it at a file, folder or dataset that holds text."
        )


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"'{os.fspath(source)}'"
    return f"<{type(source).__name__}>"


# --- cutting documents into pieces ----------------------------------------------------------------
def _cut_documents(segments: Iterable[tuple[str, bool]], chunk_chars: int) -> Iterator[tuple[str, bool]]:
    """Regroups raw ``(text, ends_document)`` segments into pieces of about ``chunk_chars`` characters.

    Drops empty and whitespace-only documents (one whose leading whitespace exceeds the span limit is
    kept: deciding would need it whole).
    """
    max_span = _MAX_SPAN * chunk_chars
    parts: list[str] = []
    size = 0
    has_text = False
    for text, end in segments:
        if text:
            parts.append(text)
            size += len(text)
            has_text = has_text or not text.isspace()
        if end:
            if has_text or size > max_span:
                pieces, rest = _cut("".join(parts), chunk_chars, final=True)
                for piece in pieces:
                    yield piece, False
                yield rest, True
            parts, size, has_text = [], 0, False
        elif size > chunk_chars and (has_text or size > max_span):
            pieces, rest = _cut("".join(parts), chunk_chars, final=False)
            for piece in pieces:
                yield piece, False
            parts, size = [rest], len(rest)


def _cut(text: str, chunk_chars: int, *, final: bool) -> tuple[list[str], str]:
    """Cuts ``text`` into pieces of about ``chunk_chars`` at clean cuts; returns them and the rest."""
    max_span = _MAX_SPAN * chunk_chars
    pieces: list[str] = []
    start = 0
    while len(text) - start > chunk_chars:
        limit = start + chunk_chars
        cut = _last_clean_cut(text, start, limit)
        if cut < 0:
            match = _CLEAN_CUT.search(text, limit, start + max_span)
            if match:
                cut = match.start()
            elif len(text) - start > max_span:
                cut = _fallback_cut(text, start, limit)
            else:
                break  # short enough to stay whole, or (not final) a clean cut may still come
        pieces.append(text[start:cut])
        start = cut
    return pieces, text[start:]


def _last_clean_cut(text: str, start: int, limit: int) -> int:
    """The last index in (start, limit] holding a space after a non-space, or -1."""
    index = text.rfind(" ", start + 1, limit + 1)
    while index > start:
        if not text[index - 1].isspace():
            return index
        index = text.rfind(" ", start + 1, index)
    return -1


def _fallback_cut(text: str, start: int, limit: int) -> int:
    """A cut in a stretch without spaces: after the last line break followed by a word character, else ``limit``."""
    best = -1
    for match in _LINE_CUT.finditer(text, start + 1, limit + 1):
        best = match.start()
    return best if best > start else limit


# --- raw segments of each kind of source ----------------------------------------------------------
def _iter_raw(source: Any, text_field: str, split: str, chunk_chars: int) -> Iterator[tuple[str, bool]]:
    if isinstance(source, (str, os.PathLike)):
        yield from _iter_path(Path(source), text_field, split, chunk_chars)
        return
    if _is_hf_dataset(source):
        for text in _iter_hf_dataset(source, text_field, _describe(source)):
            yield text, True
        return
    if callable(source):
        yield from _iter_raw(source(), text_field, split, chunk_chars)
        return
    if isinstance(source, bytes) or not isinstance(source, Iterable):
        raise DataSourceError(
            f"Unsupported data source {_describe(source)}. Give a path, a datasets.Dataset or an iterable of strings."
        )
    for index, item in enumerate(source):
        if isinstance(item, str):
            yield item, True
        elif isinstance(item, dict):
            yield row_text(item, text_field, f"{_describe(source)} item {index}"), True
        else:
            raise DataSourceError(
                f"The data source {_describe(source)} yielded a {type(item).__name__} at item {index}; "
                "an iterable source must yield strings (or dicts with the text field)."
            )


def _iter_path(path: Path, text_field: str, split: str, chunk_chars: int) -> Iterator[tuple[str, bool]]:
    if not path.exists():
        raise missing_path_error(path)
    if path.is_dir():
        if any((path / marker).is_file() for marker in _DATASET_MARKERS):
            for text in _iter_saved_dataset(path, text_field):
                yield text, True
        else:
            yield from _iter_folder(path, text_field, split, chunk_chars)
    elif is_jsonl(path):
        for text in _iter_jsonl(path, text_field):
            yield text, True
    else:
        yield from _iter_text_file(path, split, chunk_chars)


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    for number, offset, raw in iter_jsonl_lines(path):
        text = jsonl_row_text(raw, path, number, offset, text_field)
        if text is not None:
            yield text


def _looks_binary(path: Path) -> bool:
    if path.suffix.lower() in _BINARY_SUFFIXES:
        return True
    with open(path, "rb") as handle:
        return b"\0" in handle.read(8192)


def _iter_text_file(path: Path, split: str, chunk_chars: int) -> Iterator[tuple[str, bool]]:
    """Segments of a UTF-8 text file, read in blocks of about ``chunk_chars`` bytes.

    ``split="file"`` keeps the text as it is; the line splits read with universal newlines (``\\r\\n`` and
    ``\\r`` become ``\\n``), as Python's text files do.
    """
    chunks = iter_decoded(path, block_bytes=max(chunk_chars, 4096))
    if split == "file":
        for text in chunks:
            yield text, False
        yield "", True
        return
    lines = _iter_lines(_universal_newlines(chunks))
    if split == "line":
        yield from lines
        return
    yield from _iter_paragraphs(lines)


def _universal_newlines(chunks: Iterable[str]) -> Iterator[str]:
    held = ""
    for text in chunks:
        text = held + text
        held = ""
        if text.endswith("\r"):
            text, held = text[:-1], "\r"
        yield text.replace("\r\n", "\n").replace("\r", "\n")
    if held:
        yield "\n"


def _iter_lines(chunks: Iterable[str]) -> Iterator[tuple[str, bool]]:
    """``(text, ends_line)`` segments; a line's ``\\n`` is left out."""
    open_line = False
    for text in chunks:
        *complete, rest = text.split("\n")
        for line in complete:
            yield line, True
        if rest:
            yield rest, False
        open_line = bool(rest) or (open_line and not complete)
    if open_line:
        yield "", True


def _iter_paragraphs(lines: Iterable[tuple[str, bool]]) -> Iterator[tuple[str, bool]]:
    """Runs of non-blank lines joined by ``\\n``; a blank (whitespace-only) line ends a paragraph."""
    in_paragraph = False
    held: list[str] = []  # the current line while it is only whitespace (it may be a blank line)
    held_size = 0
    blank = True
    for text, ends_line in lines:
        if blank:
            held.append(text)
            held_size += len(text)
            if (text and not text.isspace()) or held_size > _MAX_SPAN * CHUNK_CHARS:
                blank = False
                if in_paragraph:
                    yield "\n", False
                for part in held:
                    yield part, False
                in_paragraph = True
        else:
            yield text, False
        if ends_line:
            if blank and in_paragraph:
                yield "", True
                in_paragraph = False
            held, held_size, blank = [], 0, True
    if in_paragraph:
        yield "", True


def _iter_folder(folder: Path, text_field: str, split: str, chunk_chars: int) -> Iterator[tuple[str, bool]]:
    skipped: list[str] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root) / name
            if name.startswith(".") or not path.is_file():
                continue
            if is_jsonl(path):
                for text in _iter_jsonl(path, text_field):
                    yield text, True
                continue
            # A bad file is skipped as a whole, so it is decoded once before anything of it is yielded.
            if _looks_binary(path) or not _is_utf8(path):
                skipped.append(str(path))
                continue
            yield from _iter_text_file(path, split, chunk_chars)
    if skipped:
        logger.warning(
            "cpt-plugin: skipped %d binary or non-UTF-8 file(s) in '%s' (first: %s).",
            len(skipped),
            folder,
            skipped[0],
        )


def _is_utf8(path: Path) -> bool:
    try:
        for _ in iter_decoded(path):
            pass
    except DataSourceError:
        return False
    return True


def _is_hf_dataset(source: Any) -> bool:
    module = type(source).__module__ or ""
    return module.startswith("datasets.") and hasattr(source, "column_names")


def _iter_saved_dataset(path: Path, text_field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError as error:  # pragma: no cover - datasets is an optional extra
        raise DataSourceError(
            f"'{path}' is a saved datasets dataset, but the 'datasets' package is not installed. "
            "Install it with: pip install 'cpt-plugin[data]'."
        ) from error
    yield from _iter_hf_dataset(datasets.load_from_disk(str(path)), text_field, f"'{path}'")


def _iter_hf_dataset(dataset: Any, text_field: str, where: str) -> Iterator[str]:
    import datasets

    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if "train" not in dataset:
            raise DataSourceError(
                f"The dataset {where} has no 'train' split (splits: {', '.join(dataset)}). "
                "Pass the split you want, e.g. dataset['validation']."
            )
        dataset = dataset["train"]
    columns = dataset.column_names
    if columns is not None and text_field not in columns:
        raise DataSourceError(
            f"The dataset {where} has no field '{text_field}' (fields: {', '.join(columns)}). "
            f"Pass text_field='<one of those>' to say which field holds the text."
        )
    if isinstance(dataset, datasets.Dataset):
        for batch in dataset.select_columns([text_field]).iter(batch_size=1000):
            for value in batch[text_field]:
                yield value or ""
        return
    for index, row in enumerate(dataset):
        yield row_text(row, text_field, f"dataset {where} row {index}")


# ------------------------------------------------------------------------------------------------
# Tokenizing
# ------------------------------------------------------------------------------------------------
def _wants_bos(tokenizer: Any) -> bool:
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
        add_bos = _wants_bos(tokenizer)
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
    Path sources are checked at construction (:func:`~cpt_plugin.data_checks.validate_source`: exists,
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
        self.add_bos = _wants_bos(tokenizer) if add_bos is None else add_bos
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
                f"The data source {_describe(self.source)} gives fewer tokens than one block of "
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


def build_train_dataset(source: Any, tokenizer: Any, max_seq_length: int, **kwargs: Any) -> CPTDataset:
    """Same as ``CPTDataset(...)``; the functional spelling used by the CLI and integrations."""
    return CPTDataset(source, tokenizer, max_seq_length, **kwargs)


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
