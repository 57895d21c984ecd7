"""cpt-plugin's log lines reach a program that set up no logging, and never twice one that did."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _stderr(code: str, **environ: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "RANK"} | environ
    result = subprocess.run(
        [sys.executable, "-c", "import logging, cpt_plugin\n" + code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
        check=True,
    )
    return result.stderr


def test_info_lines_shown_once_with_or_without_the_programs_logging():
    say = "logging.getLogger('cpt_plugin.recipe').info('cpt-plugin: trainable 1M')"
    assert _stderr(say) == "cpt-plugin: trainable 1M\n"  # a plain Trainer script
    configured = _stderr("logging.basicConfig(level=logging.INFO, format='%(message)s')\n" + say)
    assert configured == "cpt-plugin: trainable 1M\n"  # the CLI: through its handler, not ours too
    quiet = _stderr("logging.getLogger('cpt_plugin').setLevel(logging.WARNING)\n" + say)
    assert quiet == ""


def test_only_rank_zero_shows_info_but_every_rank_warns():
    code = "log = logging.getLogger('cpt_plugin.x')\nlog.info('hello')\nlog.warning('careful')"
    assert _stderr(code, RANK="1") == "careful\n"
    assert _stderr(code, RANK="0") == "hello\ncareful\n"
