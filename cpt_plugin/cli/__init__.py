"""`cpt-plugin` command line: `train [CONFIG.yaml]` (embedded default without one), `default-config`.

The demo job lives in this package, beside the library: ``pipeline`` (the `train` job), ``corpora``
(offline corpora and a BPE tokenizer), ``plots`` (loss curves), ``defaults/`` (the embedded run config).
"""

from __future__ import annotations

import argparse
import logging
import sys

import yaml


def _parse_value(text: str):
    return yaml.safe_load(text)


def _apply_overrides(raw: dict, assignments: list[str]) -> dict:
    """`--set training.max_steps=50 cpt.lora_r=16`: dotted keys into the YAML mapping."""
    for assignment in assignments:
        if "=" not in assignment:
            raise SystemExit(f"cpt-plugin: --set expects SECTION.KEY=VALUE, got {assignment!r}")
        dotted, value = assignment.split("=", 1)
        node = raw
        *parents, leaf = dotted.split(".")
        for depth, key in enumerate(parents):
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                where = ".".join(parents[: depth + 1])
                raise SystemExit(f"cpt-plugin: --set {assignment!r}: '{where}' holds {node!r}, not a section")
        node[leaf] = _parse_value(value)
    return raw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cpt-plugin", description="Fast, memory-lean continued pretraining."
    )
    from cpt_plugin import __version__

    parser.add_argument("--version", action="version", version=f"cpt-plugin {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run a CPT job (the embedded CPU default when no CONFIG is given)")
    train.add_argument("config", nargs="?", help="run config YAML (see `cpt-plugin default-config`)")
    train.add_argument("--output-dir", help="where the adapter, loss curve and summary go")
    train.add_argument(
        "--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE", help="override config values"
    )
    sub.add_parser("default-config", help="print the embedded default run config")
    from cpt_plugin.export.cli import add_export_parser, run_export

    add_export_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "export":
        return run_export(args)

    from cpt_plugin.cli.pipeline import RunConfig, default_config_text, run
    from cpt_plugin.config import CPTConfigError, load_yaml_mapping

    if args.command == "default-config":
        sys.stdout.write(default_config_text())
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        loaded = load_yaml_mapping(
            args.config,
            expected="run config sections (model, data, training, cpt, ...)",
            where=args.config or "the embedded default config",
            text=None if args.config else default_config_text(),
        )
        run(RunConfig.from_dict(_apply_overrides(loaded.data, args.set)), output_dir=args.output_dir)
    except (CPTConfigError, FileNotFoundError, ValueError) as error:
        print(f"cpt-plugin: error: {error}", file=sys.stderr)
        return 2
    return 0
