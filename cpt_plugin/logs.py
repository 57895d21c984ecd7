"""Where cpt-plugin's log lines go when the program has not set up logging itself.

The library logs through ``logging.getLogger(__name__)`` and never prints. A Trainer script usually
configures no logging (transformers gives its own ``transformers`` logger a handler, not the root), so
Python would show only warnings, and the one-line set-up summary and the other ``cpt-plugin: ...`` notices
would be lost. :func:`install_default_handler` gives the ``cpt_plugin`` logger one stderr handler that
speaks only while the root logger has no handler: a program that configures logging (the CLI's
``basicConfig``, pytest's capture) sees every line once, through its own handlers, and its own format.

Quiet it with ``logging.getLogger("cpt_plugin").setLevel(logging.WARNING)``. On multi-process runs only
rank 0 shows INFO lines (warnings come from every rank: they may be about that rank).
"""

from __future__ import annotations

import logging
import os
import sys

LOGGER_NAME = "cpt_plugin"


class _DefaultHandler(logging.StreamHandler):
    """stderr, message only, while the root logger has no handler (so no line is shown twice)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)  # no fixed stream: sys.stderr as it is at each line (like lastResort)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return  # the program shows it (the record propagates to the root's handlers)
        if record.levelno < logging.WARNING and os.environ.get("RANK", "0") not in ("", "0"):
            return
        super().emit(record)


def install_default_handler() -> None:
    """Idempotent: one default handler on the ``cpt_plugin`` logger, INFO unless the user chose a level."""
    library = logging.getLogger(LOGGER_NAME)
    if any(isinstance(handler, _DefaultHandler) for handler in library.handlers):
        return
    handler = _DefaultHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    library.addHandler(handler)
    if library.level == logging.NOTSET:
        library.setLevel(logging.INFO)
