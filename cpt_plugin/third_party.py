"""Third-party notices that cpt-plugin's own calls cause and that a user cannot act on, quieted at their source.

Each one is matched by its logger (or warning category and module) and its exact text, never by muting a
whole library or every warning:

* bitsandbytes (imported by ``import peft``, which transformers' Trainer imports) logs "Failed to load CPU
  gemm_4bit_forward from kernels-community ..." on CPUs with AVX512-BF16 when the optional ``kernels``
  package is missing. bitsandbytes then uses its own CPU path, which is correct; the line reads like an error.
* PEFT's ``PeftModel.__init__`` reads ``model.is_gradient_checkpointing``, which transformers >= 5.24
  deprecates with a FutureWarning; :func:`peft_deprecations_quiet` is used around our ``get_peft_model``
  and around the export's ``PeftModel.from_pretrained``.
* huggingface_hub's ``save_torch_state_dict`` logs "Model weights successfully saved to DIR!" at INFO, DIR
  being the export's temporary folder (renamed when the export is complete), through a logger named by
  its file path (so a level on ``huggingface_hub`` does not reach it): :func:`quiet_hub_save_notice`.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNELS_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"
HUB_SAVE_NOTICE = "Model weights successfully saved to"


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_known_notices() -> None:
    """Idempotent; works before bitsandbytes is imported (the logger object is shared by name)."""
    bnb_logger = logging.getLogger(BNB_CPU_LOGGER)
    if not any(isinstance(f, _DropMessage) for f in bnb_logger.filters):
        bnb_logger.addFilter(_DropMessage(BNB_KERNELS_NOTICE))


@contextlib.contextmanager
def peft_deprecations_quiet() -> Iterator[None]:
    """PEFT's read of the deprecated ``is_gradient_checkpointing`` property, silenced for this call only."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        yield


def quiet_hub_save_notice() -> None:
    """Idempotent; called by the exporter before it saves (the notice names a temporary folder)."""
    try:
        from huggingface_hub.serialization import _torch
    except ImportError:  # pragma: no cover - a huggingface_hub without the module logs nothing of the kind
        return
    hub_logger = getattr(_torch, "logger", None)
    if isinstance(hub_logger, logging.Logger) and not any(
        isinstance(f, _DropMessage) and f.prefix == HUB_SAVE_NOTICE for f in hub_logger.filters
    ):
        hub_logger.addFilter(_DropMessage(HUB_SAVE_NOTICE))
