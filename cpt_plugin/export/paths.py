"""Where exports go and where they come from: output checks, atomic writes, adapter directories.

Every export is written under a temporary name beside its destination and renamed at the end, so an
interrupted or failed export never leaves a half-written model where a user (or llama.cpp) would load it.
All checks here run before anything is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from cpt_plugin import CPTConfigError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def check_new_output(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a Path after checking it does not exist and that its directory can be written.

    Missing parent directories are fine when the nearest existing one is writable (they are created
    when the export is written).
    """
    out = Path(path).expanduser().absolute()
    if out.exists() or out.is_symlink():
        raise CPTConfigError(
            f"cpt-plugin export: the {what} output path {out} already exists. Choose a new path, or remove "
            f"the old one first (cpt-plugin never overwrites an export)."
        )
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise CPTConfigError(
            f"cpt-plugin export: cannot write the {what} to {out}: {parent} is not a writable directory. "
            "Choose an output path in a directory you can write to."
        )
    return out


def _temporary_sibling(out: Path) -> Path:
    return out.parent / f".{out.stem}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}{out.suffix}"


def _finish(tmp: Path, out: Path) -> None:
    if out.exists():  # appeared while we were writing: never replace someone else's files
        raise CPTConfigError(
            f"cpt-plugin export: {out} appeared while the export was being written. Choose a new path."
        )
    os.replace(tmp, out)


@contextlib.contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """Yields a temporary directory beside ``out``; renamed to ``out`` on success, removed on error."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(out)
    tmp.mkdir()
    try:
        yield tmp
        _finish(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(out: Path) -> Iterator[Path]:
    """Yields a temporary file path beside ``out``; renamed to ``out`` on success, removed on error."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(out)
    try:
        yield tmp
        _finish(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def _checkpoint_step(path: Path) -> int:
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(match.group(1)) if match else -1


def find_adapter_dir(run_or_adapter: str | os.PathLike) -> Path:
    """The adapter directory of a run or of an adapter path.

    Accepts an adapter directory itself (``adapter_config.json`` + ``adapter_model.safetensors``: a final
    save or a Trainer checkpoint), or a cpt-plugin run directory (its ``adapter/``, else its latest
    ``checkpoint-N``).
    """
    path = Path(run_or_adapter).expanduser()
    if not path.is_dir():
        raise CPTConfigError(
            f"cpt-plugin export: {path} is not a directory. Give an adapter directory (with {ADAPTER_CONFIG}) "
            "or a cpt-plugin run directory (with adapter/ or checkpoint-N/)."
        )
    candidates = [path, path / "adapter"]
    candidates += sorted(path.glob("checkpoint-*"), key=_checkpoint_step, reverse=True)
    for candidate in candidates:
        if (candidate / ADAPTER_CONFIG).is_file():
            if not (candidate / ADAPTER_WEIGHTS).is_file():
                raise CPTConfigError(
                    f"cpt-plugin export: {candidate} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS} (only "
                    "safetensors adapters are read). Save the adapter with save_pretrained(..., "
                    "safe_serialization=True)."
                )
            return candidate
    raise CPTConfigError(
        f"cpt-plugin export: found no adapter in {path}: neither it, {path / 'adapter'} nor a checkpoint-N "
        f"directory holds {ADAPTER_CONFIG}. Point to the adapter directory the run saved."
    )


def read_adapter_config(adapter_dir: Path) -> dict:
    with open(adapter_dir / ADAPTER_CONFIG, encoding="utf-8") as handle:
        return json.load(handle)


def find_base_dir(adapter_dir: Path, adapter_config: dict, base: str | os.PathLike | None) -> Path:
    """The local directory of the adapter's base model: ``base`` when given, else the adapter config's
    ``base_model_name_or_path``. Only local directories are read (exports never download)."""
    named = base if base is not None else adapter_config.get("base_model_name_or_path")
    source = (
        "--base / base=" if base is not None else f"{adapter_dir / ADAPTER_CONFIG} base_model_name_or_path"
    )
    if not named:
        raise CPTConfigError(
            f"cpt-plugin export: the adapter in {adapter_dir} does not name its base model "
            f"({ADAPTER_CONFIG} has no base_model_name_or_path, e.g. a model built from a config). Pass the "
            "base model's local directory with base=PATH (CLI: --base PATH)."
        )
    path = Path(str(named)).expanduser()
    if not (path / "config.json").is_file():
        raise CPTConfigError(
            f"cpt-plugin export: the base model {str(named)!r} (from {source}) is not a local model directory "
            f"(no {path / 'config.json'}); exports read local files only. Pass the base model's local "
            "directory with base=PATH (CLI: --base PATH), e.g. a snapshot from `huggingface-cli download`."
        )
    return path


def find_tokenizer_dir(*dirs: Path | None) -> Path | None:
    """The first of ``dirs`` that holds a saved tokenizer."""
    for directory in dirs:
        if directory is not None and any((directory / name).is_file() for name in _TOKENIZER_FILES):
            return directory
    return None
