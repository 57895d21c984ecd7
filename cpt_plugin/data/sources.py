"""Reading documents: every kind of source -> raw-text documents, streamed as (piece, ends_document) pairs.

A long document is cut into pieces at points where tokenizers start a new pre-token (see the package doc).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from cpt_plugin.data.checks import (
    DATASET_MARKERS,
    SPLITS,
    DataSourceError,
    is_jsonl,
    iter_decoded,
    iter_jsonl_lines,
    jsonl_row_text,
    missing_path_error,
    row_text,
)

logger = logging.getLogger(__name__)

CHUNK_CHARS = 1 << 16  # characters per document piece (a long document is cut into pieces of about this)
_MAX_SPAN = 8  # a piece without a clean cut may grow to this many chunks before it is cut anyway
# Extensions that are never text; anything else in a folder is sniffed (NUL bytes, UTF-8 decoding).
_BINARY_SUFFIXES = {
    ".arrow", ".bin", ".bz2", ".db", ".dll", ".exe", ".gif", ".gz", ".ico", ".jpeg", ".jpg", ".npy",
    ".npz", ".parquet", ".pdf", ".pkl", ".png", ".pt", ".pth", ".pyc", ".safetensors", ".so", ".tar",
    ".webp", ".whl", ".xz", ".zip", ".zst",
}  # fmt: skip
_DATASET_MARKERS = DATASET_MARKERS
_CLEAN_CUT = re.compile(r"(?<=\S) ")
_LINE_CUT = re.compile(r"(?<=\n)(?=\w)")


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
            f"The data source {describe_source(source)} has no documents (no non-empty text). "
            "Point it at a file, folder or dataset that holds text."
        )


def describe_source(source: Any) -> str:
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
        for text in _iter_hf_dataset(source, text_field, describe_source(source)):
            yield text, True
        return
    if callable(source):
        yield from _iter_raw(source(), text_field, split, chunk_chars)
        return
    if isinstance(source, bytes) or not isinstance(source, Iterable):
        raise DataSourceError(
            f"Unsupported data source {describe_source(source)}. Give a path, a datasets.Dataset or an iterable of strings."
        )
    for index, item in enumerate(source):
        if isinstance(item, str):
            yield item, True
        elif isinstance(item, dict):
            yield row_text(item, text_field, f"{describe_source(source)} item {index}"), True
        else:
            raise DataSourceError(
                f"The data source {describe_source(source)} yielded a {type(item).__name__} at item {index}; "
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
