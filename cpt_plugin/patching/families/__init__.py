"""The builtin model families, registered as one pluggy plugin (entry point ``builtin``)."""

from __future__ import annotations

from typing import Any

from cpt_plugin.patching.base import hookimpl
from cpt_plugin.patching.families.gemma import GEMMA2, GEMMA3
from cpt_plugin.patching.families.llama import LLAMA
from cpt_plugin.patching.families.mistral import MISTRAL
from cpt_plugin.patching.families.qwen2 import QWEN2
from cpt_plugin.patching.families.qwen3 import QWEN3

BUILTIN_FAMILIES = (LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA2, GEMMA3)

__all__ = [
    "BUILTIN_FAMILIES",
    "GEMMA2",
    "GEMMA3",
    "LLAMA",
    "MISTRAL",
    "QWEN2",
    "QWEN3",
    "cpt_plugin_register_patchers",
]


@hookimpl
def cpt_plugin_register_patchers(registry: Any) -> None:
    """Registers every builtin family with the ``registry.Registry`` handed in."""
    for spec in BUILTIN_FAMILIES:
        for model_type in spec.model_types:
            registry.register(model_type, spec)
