"""Offline corpora and a tokenizer for the CLI's embedded default run (no network, no hub).

The default run tells the CPT story "a base model trained on an old domain gets continued pretraining
on a new domain with replay; held-out loss on both domains before and after":

- OLD domain: English prose every Python install carries: the ``pydoc_data`` topic texts, module,
  class and function docstrings of the standard library (read with ``ast``), and its LICENSE text;
- NEW domain: Python source code of the standard library (tests and huge files skipped).

Documents are split into train / held-out by a hash of their name, and the split is shared by the two
domains per module, so a held-out module's docstrings (old domain) never appear inside a training
document of the new domain (its source). Same Python install, same files: the output is deterministic.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

HELDOUT_PERCENT = 10  # share of documents (by name hash) kept for held-out evaluation
MAX_SOURCE_BYTES = 200_000  # stdlib files above this are generated tables or giant modules
_SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


def _digest(name: str) -> str:
    return hashlib.sha1(name.encode("utf-8")).hexdigest()


def _is_heldout(name: str) -> bool:
    return int(_digest(name)[:8], 16) % 100 < HELDOUT_PERCENT


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_modules(stdlib: Path | None = None) -> list[Path]:
    """Standard-library ``.py`` files, tests and huge files left out, in a fixed, name-hashed order.

    Hash order (not alphabetical) makes any prefix of the list a varied sample of the library.
    """
    root = stdlib or _stdlib_dir()
    files = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if _SKIP_PARTS.intersection(relative.parts[:-1]) or relative.name.startswith("test_"):
            continue
        try:
            if path.stat().st_size > MAX_SOURCE_BYTES or path.stat().st_size < 200:
                continue
        except OSError:
            continue
        files.append(path)
    return sorted(files, key=lambda p: _digest(p.relative_to(root).as_posix()))


def _docstrings(source: str, module: str) -> str:
    """Module, class and function docstrings of one module as one prose document."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    parts = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        text = ast.get_docstring(node, clean=True)
        if not text or len(text) < 40:
            continue
        title = module if isinstance(node, ast.Module) else f"{module}.{node.name}"
        parts.append(f"{title}\n\n{text}")
    return "\n\n".join(parts)


def _prose_documents(stdlib: Path, modules: list[tuple[str, str]]) -> Iterator[tuple[str, str]]:
    """(name, text) prose documents: pydoc topics, LICENSE, docstrings of the given modules."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    for name in sorted(topics):
        yield f"pydoc:{name}", topics[name]
    license_path = stdlib / "LICENSE.txt"
    if license_path.is_file():
        yield "LICENSE.txt", license_path.read_text(encoding="utf-8", errors="replace")
    for name, source in modules:
        text = _docstrings(source, name)
        if text:
            yield name, text


def _write_jsonl(path: Path, docs: Iterable[tuple[str, str]]) -> int:
    count = 0
    with open(path, "w", encoding="utf-8") as handle:
        for name, text in docs:
            handle.write(json.dumps({"text": text, "name": name}, ensure_ascii=False) + "\n")
            count += 1
    return count


def _split(docs: Iterable[tuple[str, str]], budget: int) -> tuple[list, list]:
    """Splits (name, text) documents into train / held-out by name hash until ``budget`` bytes are used."""
    train, heldout, used = [], [], 0
    for name, text in docs:
        if used >= budget:
            break
        (heldout if _is_heldout(name.removeprefix("pydoc:")) else train).append((name, text))
        used += len(text.encode("utf-8"))
    return train, heldout


def write_default_corpora(out_dir: str | os.PathLike, max_mb: float = 1.5) -> dict[str, Path]:
    """Writes the old-domain (prose) and new-domain (code) corpora as JSONL files into ``out_dir``.

    Each domain uses at most about ``max_mb`` MB (train and held-out together). Returns the paths under
    the keys ``old_train``, ``old_heldout``, ``new_train``, ``new_heldout``. Every row is
    ``{"text": ..., "name": ...}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stdlib = _stdlib_dir()
    budget = int(max_mb * 1_000_000)
    modules: list[tuple[str, str]] = []
    used = 0
    for path in stdlib_modules(stdlib):
        if used >= budget:
            break
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        modules.append((path.relative_to(stdlib).as_posix(), source))
        used += len(source.encode("utf-8"))
    if not modules:
        raise RuntimeError(
            f"No standard-library sources found under {stdlib}; cannot build the default corpora."
        )
    new_train, new_heldout = _split(modules, budget)
    # Name-hash order mixes topics, LICENSE and docstrings, so any budget gives a varied sample.
    prose = sorted(_prose_documents(stdlib, modules), key=lambda doc: _digest(doc[0]))
    old_train, old_heldout = _split(prose, budget)
    paths = {
        "old_train": out / "old_train.jsonl",
        "old_heldout": out / "old_heldout.jsonl",
        "new_train": out / "new_train.jsonl",
        "new_heldout": out / "new_heldout.jsonl",
    }
    for key, docs in (
        ("old_train", old_train),
        ("old_heldout", old_heldout),
        ("new_train", new_train),
        ("new_heldout", new_heldout),
    ):
        _write_jsonl(paths[key], docs)
    return paths


def train_tokenizer(
    paths: Iterable[str | os.PathLike] | str | os.PathLike,
    vocab_size: int = 2048,
    out_dir: str | os.PathLike | None = None,
    text_field: str = "text",
) -> Any:
    """Trains a byte-level BPE tokenizer on the documents of ``paths`` (any source ``iter_documents`` reads).

    Returns a ``transformers.PreTrainedTokenizerFast`` with ``<s>``/``</s>``/``<pad>``/``<unk>`` set
    (no BOS/EOS added by itself: :class:`~cpt_plugin.data.CPTDataset` appends EOS). Byte-level means
    every text encodes and decodes losslessly. With ``out_dir`` it is saved with ``save_pretrained`` and
    reloads offline with ``AutoTokenizer.from_pretrained(out_dir)``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from cpt_plugin.data import iter_document_pieces

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)

    def texts() -> Iterator[str]:
        # Pieces, not whole documents: a long document stays bounded in memory, and pieces are cut where
        # the byte-level pre-tokenizer splits anyway, so the word counts (and the vocabulary) are the same.
        for path in paths:
            for piece, _ in iter_document_pieces(path, text_field=text_field):
                yield piece

    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)
    fast.model_max_length = 1_000_000
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast
