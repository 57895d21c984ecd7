"""What a valid data source is, checked before the first step and enforced while streaming.

:func:`validate_source` runs before anything trains (``CPTDataset`` calls it at construction, the CLI
before it builds a model): the path exists, text decodes as UTF-8, and every JSONL line is one JSON
object whose text field holds a string. The first :data:`CHECK_BYTES` (64 MiB) of each file are checked
up front — the whole file when it is smaller, which is cheap (about a second for 64 MiB of JSONL); past
that, the readers in :mod:`cpt_plugin.data` raise the same errors while streaming, naming the file, the
line, the byte offset and the fix. Both use the helpers below, so a message reads the same wherever it
is raised.

This module sits below the rest of :mod:`cpt_plugin.data` (which imports it, never the other way), so
that the rules live in one place and validation needs no tokenizer or torch.
"""

from __future__ import annotations

import codecs
import gzip
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SPLITS = ("file", "blank_lines", "line")
# Bytes of each file (all files of a folder together) checked up front; the rest is checked while streaming.
CHECK_BYTES = 64 << 20
READ_BYTES = 1 << 20  # block size of the UTF-8 reader
DATASET_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")
_ICONV = "e.g. `iconv -f latin1 -t utf-8 IN > OUT`"


class DataSourceError(ValueError):
    """A data source is missing, empty or malformed; the message names the source and the fix."""


def is_jsonl(path: Path) -> bool:
    return path.name.lower().endswith((".jsonl", ".jsonl.gz", ".ndjson"))


def _open_binary(path: Path) -> Any:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _byte_word(path: Path) -> str:
    return "uncompressed byte" if path.name.lower().endswith(".gz") else "byte"


def missing_path_error(path: Path) -> DataSourceError:
    return DataSourceError(
        f"The data source '{path}' does not exist. Check the path (relative paths are resolved "
        f"from {os.getcwd()})."
    )


# ------------------------------------------------------------------------------------------------
# UTF-8 text with exact error positions
# ------------------------------------------------------------------------------------------------
def iter_decoded(path: Path, block_bytes: int = READ_BYTES, limit: int | None = None) -> Iterator[str]:
    """Decodes ``path`` as UTF-8 in blocks (a leading BOM dropped), yielding text chunks.

    Unlike a text-mode file, a decoding error names the absolute byte offset and the line, whatever the
    block size. Stops after ``limit`` bytes when given (without flushing a split character).
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes read before the current block
    newlines = 0  # line breaks in the text decoded so far
    first = True
    with _open_binary(path) as handle:
        while True:
            size = block_bytes if limit is None else min(block_bytes, limit - offset)
            block = handle.read(size) if size > 0 else b""
            final = not block
            if final and limit is not None and offset >= limit:
                return
            pending = decoder.getstate()[0]
            try:
                text = decoder.decode(block, final=final)
            except UnicodeDecodeError as error:
                data = pending + block
                line = newlines + data[: error.start].count(b"\n") + 1
                raise DataSourceError(
                    f"'{path}' is not UTF-8 text: {error.reason} at {_byte_word(path)} "
                    f"{offset - len(pending) + error.start} (line {line}). Convert it to UTF-8 ({_ICONV}), "
                    "or point at a folder (undecodable files there are skipped)."
                ) from None
            offset += len(block)
            if first and text:
                text = text.removeprefix("\ufeff")
                first = False
            newlines += text.count("\n")
            if text:
                yield text
            if final:
                return


# ------------------------------------------------------------------------------------------------
# JSONL rows
# ------------------------------------------------------------------------------------------------
def iter_jsonl_lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """``(line number, byte offset of the line, raw line)`` of a JSONL file (``.gz`` decompressed)."""
    offset = 0
    with _open_binary(path) as handle:
        for number, raw in enumerate(handle, start=1):
            yield number, offset, raw
            offset += len(raw)


def jsonl_row_text(raw: bytes, path: Path, number: int, offset: int, text_field: str) -> str | None:
    """The text of one JSONL line (``""`` for null), ``None`` for a blank line; errors say where and how to fix."""
    if not raw.strip():
        return None
    if number == 1 and raw.startswith(codecs.BOM_UTF8):
        raw, offset = raw[3:], offset + 3
    where = f"'{path}' line {number} ({_byte_word(path)} {offset})"
    try:
        line = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as error:
        raise DataSourceError(
            f"{where} is not UTF-8: {error.reason} at {_byte_word(path)} {offset + error.start}. "
            f"Re-encode the file as UTF-8 ({_ICONV}), or fix or delete that line."
        ) from None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataSourceError(
            f"{where} is not valid JSON ({error.msg} at column {error.colno}). Fix or delete that line: "
            f'each line must be one JSON object such as {{"{text_field}": "..."}}.'
        ) from None
    if not isinstance(row, dict):
        raise DataSourceError(
            f"{where}: expected a JSON object per line, got a JSON {type(row).__name__}. "
            f'Write each row as {{"{text_field}": "..."}}.'
        )
    return row_text(row, text_field, where, "Fix or delete that line, or pick another text_field.")


def row_text(row: dict, text_field: str, where: str, fix: str = "") -> str:
    """The text field of one row (JSONL line, dataset row, dict item); ``""`` for null."""
    if text_field not in row:
        fields = ", ".join(map(str, row)) or "(none)"
        raise DataSourceError(
            f"{where} has no field '{text_field}' (fields: {fields}). "
            f"Pass text_field='<one of those>' to say which field holds the text."
        )
    value = row[text_field]
    if value is None:
        return ""
    if not isinstance(value, str):
        message = f"{where}: field '{text_field}' holds a {type(value).__name__}, expected text."
        raise DataSourceError(f"{message} {fix}" if fix else message)
    return value


# ------------------------------------------------------------------------------------------------
# Pre-flight validation
# ------------------------------------------------------------------------------------------------
def validate_source(
    source: Any, text_field: str = "text", split: str = "file", *, check_bytes: int | None = None
) -> None:
    """Checks a data source before training; raises :class:`DataSourceError` naming file, line and fix.

    Paths are checked: existence; for a text file, UTF-8 decoding; for a JSONL file, that each line is a
    JSON object with ``text_field`` holding a string (or null); for a folder, its JSONL files (its
    binary or non-UTF-8 text files are skipped when reading, by design); for a folder saved by
    ``datasets``, that it has ``text_field``. Only the first ``check_bytes`` (default
    :data:`CHECK_BYTES`, 64 MiB; for a folder, all files together) are read; errors further on are
    raised while streaming, with the same messages. In-memory sources (lists, callables, ``datasets``
    objects) are checked as they are read.
    """
    if split not in SPLITS:
        raise DataSourceError(f"split={split!r} is not supported. Use one of {', '.join(SPLITS)}.")
    if not isinstance(source, (str, os.PathLike)):
        return
    path = Path(source)
    budget = CHECK_BYTES if check_bytes is None else int(check_bytes)
    if not path.exists():
        raise missing_path_error(path)
    if path.is_dir():
        if any((path / marker).is_file() for marker in DATASET_MARKERS):
            _check_saved_dataset(path, text_field)
            return
        for file in _jsonl_files(path):
            budget -= _check_jsonl(file, text_field, budget)
            if budget <= 0:
                logger.info("cpt-plugin: checked the first %d MiB of '%s' up front.", CHECK_BYTES >> 20, path)
                return
    elif is_jsonl(path):
        _check_jsonl(path, text_field, budget)
    else:
        for _ in iter_decoded(path, limit=budget):
            pass


def _jsonl_files(folder: Path) -> Iterator[Path]:
    """The JSONL files of ``folder`` in the order the reader visits them (sorted, hidden ones left out)."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root) / name
            if not name.startswith(".") and path.is_file() and is_jsonl(path):
                yield path


def _check_jsonl(path: Path, text_field: str, budget: int) -> int:
    """Checks lines of ``path`` until ``budget`` bytes are read; returns the bytes read."""
    read = 0
    for number, offset, raw in iter_jsonl_lines(path):
        jsonl_row_text(raw, path, number, offset, text_field)
        read = offset + len(raw)
        if read >= budget:
            logger.info(
                "cpt-plugin: checked '%s' up to line %d; later lines are checked while streaming.",
                path,
                number,
            )
            break
    return read


def _check_saved_dataset(path: Path, text_field: str) -> None:
    try:
        import datasets
    except ImportError:  # pragma: no cover - reported when the dataset is read
        return
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise DataSourceError(
                f"The dataset '{path}' has no 'train' split (splits: {', '.join(dataset)}). "
                "Point at the split's own folder, e.g. '<folder>/validation'."
            )
        dataset = dataset["train"]
    if text_field not in dataset.column_names:
        raise DataSourceError(
            f"The dataset '{path}' has no field '{text_field}' (fields: {', '.join(dataset.column_names)}). "
            f"Pass text_field='<one of those>' to say which field holds the text."
        )
