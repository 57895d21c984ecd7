"""cpt-plugin: fast, memory-lean continued pretraining for Hugging Face Trainer, TRL and Axolotl.

Public API only; heavy modules are imported on first use so that ``import cpt_plugin`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cpt_plugin._lazy import lazy_getattr
from cpt_plugin.config import CPTConfig, CPTConfigError
from cpt_plugin.logs import install_default_handler
from cpt_plugin.third_party import quiet_known_notices

install_default_handler()  # cpt-plugin's notices are seen even where the program sets up no logging
quiet_known_notices()  # before peft/bitsandbytes are imported: third-party notices our calls cause

__all__ = [
    "CPTConfig",
    "CPTConfigError",
    "CPTCallback",
    "prepare_model",
    "setup_model",
    "patch",
    "unpatch",
    "add_new_tokens",
    "learn_new_tokens",
    "heal_untrained_rows",
    "ids_never_seen",
]
__version__ = "0.1.0"

_LAZY = {
    "CPTCallback": "cpt_plugin.integrations.hf",
    "prepare_model": "cpt_plugin.recipe",
    "setup_model": "cpt_plugin.core",
    "patch": "cpt_plugin.patching.registry",
    "unpatch": "cpt_plugin.patching.registry",
    "add_new_tokens": "cpt_plugin.vocabulary.extension",
    "learn_new_tokens": "cpt_plugin.vocabulary.extension",
    "heal_untrained_rows": "cpt_plugin.vocabulary.healing",
    "ids_never_seen": "cpt_plugin.vocabulary.healing",
}

if TYPE_CHECKING:  # pragma: no cover
    from cpt_plugin.core import setup_model
    from cpt_plugin.integrations.hf import CPTCallback
    from cpt_plugin.patching.registry import patch, unpatch
    from cpt_plugin.recipe import prepare_model
    from cpt_plugin.vocabulary.extension import add_new_tokens, learn_new_tokens
    from cpt_plugin.vocabulary.healing import heal_untrained_rows, ids_never_seen


__getattr__ = lazy_getattr(__name__, _LAZY)
