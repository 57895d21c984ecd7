"""Raw text -> tokenized documents -> packed fixed-length blocks, with token-level replay mixing.

Everything streams: documents are read, tokenized (in batches) and packed lazily, so a corpus larger
than RAM trains without being materialized. Iteration is deterministic for a given source and seed,
which the HF Trainer relies on when it resumes from a checkpoint (it re-iterates and skips the batches
it has already seen).

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
"""

from __future__ import annotations

import gzip
import itertools
import json
import logging
import math
import os
import random
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
SPLITS = ("file", "blank_lines", "line")
# Extensions that are never text; anything else in a folder is sniffed (NUL bytes, UTF-8 decoding).
_BINARY_SUFFIXES = {
    ".arrow", ".bin", ".bz2", ".db", ".dll", ".exe", ".gif", ".gz", ".ico", ".jpeg", ".jpg", ".npy",
    ".npz", ".parquet", ".pdf", ".pkl", ".png", ".pt", ".pth", ".pyc", ".safetensors", ".so", ".tar",
    ".webp", ".whl", ".xz", ".zip", ".zst",
}  # fmt: skip
_DATASET_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")


class DataSourceError(ValueError):
    """A data source is missing, empty or malformed; the message names the source and the fix."""


# ------------------------------------------------------------------------------------------------
# Reading documents
# ------------------------------------------------------------------------------------------------
def iter_documents(source: Any, text_field: str = "text", split: str = "file") -> Iterator[str]:
    """Yields the raw-text documents of ``source`` lazily.

    ``source`` may be a text file (one document per file, or per paragraph with
    ``split="blank_lines"``, or per line with ``split="line"``), a folder (recursive, sorted, text files
    and ``.jsonl``/``.jsonl.gz`` files; binary or non-UTF-8 files are skipped and counted in the log), a
    ``.jsonl``/``.jsonl.gz`` file (field ``text_field`` of every row), a folder written by
    ``datasets``' ``save_to_disk`` (a ``DatasetDict`` gives its ``"train"`` split), an in-memory
    ``datasets.Dataset``/``IterableDataset``/``DatasetDict``, a zero-argument callable returning an
    iterable, or any iterable of strings. Empty and whitespace-only documents are skipped.
    Raises :class:`DataSourceError` for a missing path, a source without documents, or rows without
    ``text_field``.
    """
    if split not in SPLITS:
        raise DataSourceError(f"split={split!r} is not supported. Use one of {', '.join(SPLITS)}.")
    count = 0
    for doc in _iter_raw(source, text_field, split):
        if doc and not doc.isspace():
            count += 1
            yield doc
    if count == 0:
        raise DataSourceError(
            f"The data source {_describe(source)} has no documents (no non-empty text). "
            "Point it at a file, folder or dataset that holds text."
        )


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"'{os.fspath(source)}'"
    return f"<{type(source).__name__}>"


def _iter_raw(source: Any, text_field: str, split: str) -> Iterator[str]:
    if isinstance(source, (str, os.PathLike)):
        yield from _iter_path(Path(source), text_field, split)
        return
    if _is_hf_dataset(source):
        yield from _iter_hf_dataset(source, text_field, _describe(source))
        return
    if callable(source):
        yield from _iter_raw(source(), text_field, split)
        return
    if isinstance(source, bytes) or not isinstance(source, Iterable):
        raise DataSourceError(
            f"Unsupported data source {_describe(source)}. Give a path, a datasets.Dataset or an iterable of strings."
        )
    for index, item in enumerate(source):
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            yield _field(item, text_field, f"{_describe(source)} item {index}")
        else:
            raise DataSourceError(
                f"The data source {_describe(source)} yielded a {type(item).__name__} at item {index}; "
                "an iterable source must yield strings (or dicts with the text field)."
            )


def _field(row: dict, text_field: str, where: str) -> str:
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
        raise DataSourceError(f"{where}: field '{text_field}' holds a {type(value).__name__}, expected text.")
    return value


def _iter_path(path: Path, text_field: str, split: str) -> Iterator[str]:
    if not path.exists():
        raise DataSourceError(
            f"The data source '{path}' does not exist. Check the path (relative paths are resolved "
            f"from {os.getcwd()})."
        )
    if path.is_dir():
        if any((path / marker).is_file() for marker in _DATASET_MARKERS):
            yield from _iter_saved_dataset(path, text_field)
        else:
            yield from _iter_folder(path, text_field, split)
    elif _is_jsonl(path):
        yield from _iter_jsonl(path, text_field)
    else:
        try:
            yield from _iter_text_file(path, split)
        except UnicodeDecodeError as error:
            raise DataSourceError(
                f"'{path}' is not UTF-8 text ({error.reason} at byte {error.start}). "
                "Convert it to UTF-8, or point at a folder (undecodable files there are skipped)."
            ) from None


def _is_jsonl(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith((".jsonl", ".jsonl.gz", ".ndjson"))


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataSourceError(f"'{path}' line {number} is not valid JSON ({error.msg}).") from None
            if not isinstance(row, dict):
                raise DataSourceError(f"'{path}' line {number}: expected a JSON object per line.")
            yield _field(row, text_field, f"'{path}' line {number}")


def _looks_binary(path: Path) -> bool:
    if path.suffix.lower() in _BINARY_SUFFIXES:
        return True
    with open(path, "rb") as handle:
        return b"\0" in handle.read(8192)


def _iter_text_file(path: Path, split: str) -> Iterator[str]:
    if split == "file":
        yield path.read_bytes().decode("utf-8-sig")
        return
    with open(path, encoding="utf-8-sig") as handle:
        if split == "line":
            for line in handle:
                yield line.rstrip("\r\n")
            return
        paragraph: list[str] = []
        for line in handle:
            if line.strip():
                paragraph.append(line)
            elif paragraph:
                yield "".join(paragraph).rstrip("\r\n")
                paragraph = []
        if paragraph:
            yield "".join(paragraph).rstrip("\r\n")


def _iter_folder(folder: Path, text_field: str, split: str) -> Iterator[str]:
    skipped: list[str] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root) / name
            if name.startswith(".") or not path.is_file():
                continue
            if _is_jsonl(path):
                yield from _iter_jsonl(path, text_field)
                continue
            if _looks_binary(path):
                skipped.append(str(path))
                continue
            try:
                # Decode fully before yielding anything so that a bad file is skipped as a whole.
                docs = list(_iter_text_file(path, split)) if split != "file" else [_decode(path)]
            except UnicodeDecodeError:
                skipped.append(str(path))
                continue
            yield from docs
    if skipped:
        logger.warning(
            "cpt-plugin: skipped %d binary or non-UTF-8 file(s) in '%s' (first: %s).",
            len(skipped),
            folder,
            skipped[0],
        )


def _decode(path: Path) -> str:
    return path.read_bytes().decode("utf-8-sig")


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
        yield _field(row, text_field, f"dataset {where} row {index}")


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
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}.")
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for doc in token_id_docs:
        doc = list(doc)
        if not doc:
            continue
        if doc[-1] != eos_token_id:
            doc.append(eos_token_id)
        doc_labels = doc.copy()
        doc_labels[0] = IGNORE_INDEX
        offset = 0
        while offset < len(doc):
            take = min(block_size - len(ids), len(doc) - offset)
            ids.extend(doc[offset : offset + take])
            labels.extend(doc_labels[offset : offset + take])
            # A piece starts either at a document start or at a block start: positions restart at 0.
            positions.extend(range(take))
            offset += take
            if len(ids) == block_size:
                labels[0] = IGNORE_INDEX
                yield {"input_ids": ids, "labels": labels, "position_ids": positions}
                ids, labels, positions = [], [], []
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
    if not 0 <= replay_ratio < 1:
        raise ValueError(f"replay_ratio must be in [0, 1), got {replay_ratio!r}.")
    if replay_ratio == 0:
        for doc in new_docs:
            yield (doc, False) if with_source else doc
        return
    rng = random.Random(seed)
    replay_iter = _restartable(replay_docs)
    new_iter = iter(new_docs)
    replay_tokens = total_tokens = docs_seen = 0
    while True:
        mean_len = total_tokens / docs_seen if docs_seen else 0.0
        jitter = (rng.random() - 0.5) * mean_len
        take_replay = replay_tokens + jitter < replay_ratio * total_tokens
        if take_replay:
            doc = next(replay_iter)
        else:
            doc = next(new_iter, None)
            if doc is None:
                return
        length = len(doc)
        total_tokens += length
        replay_tokens += length if take_replay else 0
        docs_seen += 1
        yield (doc, take_replay) if with_source else doc


def _restartable(docs: Any) -> Iterator[Any]:
    """Cycles ``docs`` forever, re-iterating it when it runs out (warned once)."""
    warned = False
    while True:
        iterable = docs() if callable(docs) else docs
        empty = True
        for doc in iterable:
            if len(doc):
                empty = False
                yield doc
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
    EOS is appended later by :func:`pack_documents`.
    """
    if add_bos is None:
        add_bos = _wants_bos(tokenizer)
    prefix = [tokenizer.bos_token_id] if add_bos else []
    iterator = iter(docs)
    while True:
        batch = list(itertools.islice(iterator, batch_size))
        if not batch:
            return
        encoded = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        for ids in encoded:
            if ids:
                yield prefix + list(ids)


def _shard_info(shard_by_rank: bool) -> tuple[int, int]:
    """(index, count) of this reader among DataLoader workers (and distributed ranks when asked)."""
    info = torch.utils.data.get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    rank, world = 0, 1
    if shard_by_rank and torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return rank * workers + worker, world * workers


class CPTDataset(torch.utils.data.IterableDataset):
    """Packed continued-pretraining blocks from raw text, with optional token-level replay.

    Streams ``source`` (anything :func:`iter_documents` reads) through the tokenizer into blocks of
    ``max_seq_length`` tokens (see the module doc for the packing contract). Re-iterating gives the same
    blocks in the same order, for the same number of DataLoader workers. With workers, documents are
    dealt round-robin (document ``i`` goes to worker ``i % num_workers``), each worker packs its own,
    so every block comes out exactly once. ``shard_by_rank=True`` also splits by distributed rank: leave
    it off under HF Trainer / accelerate, which read an iterable dataset on rank 0 and dispatch batches.
    ``shuffle_buffer > 0`` shuffles blocks through a seeded buffer of that many blocks.
    The source must be re-iterable (a path, a list, a datasets object, or a function returning a fresh
    iterator); a one-shot generator is refused because it could not be re-read on resume.
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
        for name, value in (("source", source), ("replay_source", replay_source)):
            if _is_one_shot(value):
                raise DataSourceError(
                    f"The {name} is a one-shot iterator ({type(value).__name__}); CPTDataset re-reads its "
                    "source on every epoch and on resume. Pass a list, a path, a datasets object, or a "
                    "function that returns a fresh iterator."
                )
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

    # --------------------------------------------------------------------------------------------
    def _docs(self, source: Any, shard: int, shards: int) -> Iterator[list[int]]:
        texts = iter_documents(source, self.text_field, self.split)
        if shards > 1:
            texts = itertools.islice(texts, shard, None, shards)
        return tokenize_documents(
            texts, self.tokenizer, add_bos=self.add_bos, batch_size=self.tokenize_batch_size
        )

    def iter_blocks(self, shard: int = 0, shards: int = 1) -> Iterator[dict[str, list[int]]]:
        """The blocks of one shard (the whole corpus for ``shards=1``), as lists."""
        docs: Iterable[list[int]] = self._docs(self.source, shard, shards)
        if self.replay_ratio > 0:
            docs = mix_replay(
                docs,
                lambda: self._docs(self.replay_source, shard, shards),
                self.replay_ratio,
                seed=self.seed + shard,
            )
        blocks = pack_documents(
            docs, self.max_seq_length, self.tokenizer.eos_token_id, drop_last=self.drop_last
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
