"""``cpt-plugin export RUN_OR_ADAPTER --to merged|gguf``: the command-line face of the exporters.

``add_export_parser(subparsers)`` adds the sub-command to the main parser; ``run_export(args)`` runs it and
returns the exit status (2 with one readable line on stderr for bad input, as the other sub-commands).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from cpt_plugin import CPTConfigError


def add_export_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export",
        help="write the trained model as a merged 16-bit checkpoint or a GGUF file",
        description=(
            "Merge a cpt-plugin adapter into its base model (safetensors, the model dtype, tied embeddings "
            "kept tied), or write it as one GGUF file checked by loading it back with transformers."
        ),
    )
    parser.add_argument(
        "source",
        metavar="RUN_OR_ADAPTER",
        help="a run directory (its adapter/ or latest checkpoint-N), an adapter directory, or (for --to gguf) "
        "a merged model directory",
    )
    parser.add_argument("--to", choices=("merged", "gguf"), required=True, help="what to write")
    parser.add_argument("--outtype", choices=("f16", "bf16", "q8_0"), default="f16", help="GGUF tensor type")
    parser.add_argument("--base", help="local directory of the base model (default: the adapter's config)")
    parser.add_argument(
        "--dtype", choices=("bfloat16", "float16", "float32"), help="merged dtype (default: the model's)"
    )
    parser.add_argument(
        "--out", help="output directory (merged) or .gguf file (default: next to the adapter's run directory)"
    )
    parser.add_argument("--no-check", action="store_true", help="GGUF: skip the read-back with transformers")
    parser.add_argument(
        "--base-4bit",
        action="store_true",
        help="the adapter was trained on a 4-bit base (QLoRA: NF4, double quantization, as model.load_in_4bit): "
        "merge into that base, dequantized, which is the model that was trained",
    )
    return parser


def _run_dir(adapter_dir: Path) -> Path:
    """The run directory an adapter belongs to (its parent for adapter/ and checkpoint-N)."""
    if adapter_dir.name == "adapter" or adapter_dir.name.startswith("checkpoint-"):
        return adapter_dir.parent
    return adapter_dir


def _is_merged(path: Path) -> bool:
    has_weights = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    return (path / "config.json").is_file() and has_weights and not (path / "adapter_config.json").exists()


def _export(args: argparse.Namespace) -> Path:
    from cpt_plugin.export.gguf_writer import to_gguf
    from cpt_plugin.export.merging import merge
    from cpt_plugin.export.paths import check_new_output, find_adapter_dir

    source = Path(args.source).expanduser()
    if args.to == "gguf" and _is_merged(source):
        out = Path(args.out) if args.out else source.parent / f"{source.name}-{args.outtype}.gguf"
        return to_gguf(source, out, args.outtype, check=not args.no_check)
    adapter_dir = find_adapter_dir(source)
    run_dir = _run_dir(adapter_dir)
    if args.to == "merged":
        out = Path(args.out) if args.out else run_dir / "merged"
        return merge(adapter_dir, out, args.dtype, base=args.base, base_4bit=args.base_4bit)
    out = check_new_output(Path(args.out) if args.out else run_dir / f"model-{args.outtype}.gguf", "GGUF")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.stem}.merging-", dir=out.parent))
    try:
        merged = merge(adapter_dir, staging / "merged", args.dtype, base=args.base, base_4bit=args.base_4bit)
        return to_gguf(merged, out, args.outtype, check=not args.no_check)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def run_export(args: argparse.Namespace) -> int:
    """Runs ``cpt-plugin export``; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Not transformers.modeling_utils: transformers 5.24 checks the tensor-parallel plan (and warns that
    # "layers were not sharded" on one CPU) exactly when that logger's own level is WARNING or higher.
    for chatty in ("huggingface_hub", "gguf"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        out = _export(args)
    except (CPTConfigError, FileNotFoundError) as error:
        print(f"cpt-plugin: error: {error}", file=sys.stderr)
        return 2
    print(f"cpt-plugin: exported {out}")
    return 0
