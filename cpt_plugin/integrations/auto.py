"""Auto-activation: with ``CPT_PLUGIN=1`` set, an unmodified Trainer script gets the CPT set-up.

The installed package ships ``cpt_plugin_autoactivate.pth``; Python runs its one line at start-up. When the
switch is off it does nothing else (no imports). When on, it calls :func:`activate_from_env`, which waits
for ``transformers.trainer`` to be imported (an import hook, so start-up stays cheap) and then installs the
Trainer hooks with a default CPTCallback added to every Trainer that has none.

Switches (the only environment variables that change behaviour, documented in the README):
- ``CPT_PLUGIN=1`` turns it on;
- ``CPT_PLUGIN_CONFIG=path.yaml`` gives the CPTConfig keys (default: CPTConfig()).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from typing import Any

SWITCH = "CPT_PLUGIN"
CONFIG_VARIABLE = "CPT_PLUGIN_CONFIG"
_TARGET = "transformers.trainer"


def switch_on(environ: dict[str, str] | None = None) -> bool:
    value = (environ if environ is not None else os.environ).get(SWITCH, "")
    return value.strip().lower() in ("1", "true", "yes", "on")


def config_from_env() -> Any:
    from cpt_plugin.config import CPTConfig

    path = os.environ.get(CONFIG_VARIABLE)
    return CPTConfig.from_yaml(path) if path else CPTConfig()


def install() -> None:
    """Installs the Trainer hooks with the environment's CPTConfig as the default callback."""
    from cpt_plugin.integrations.trainer_hooks import install_trainer_hooks, set_auto_config

    install_trainer_hooks()
    set_auto_config(config_from_env())


class _AfterTrainerImport(importlib.abc.MetaPathFinder):
    """Runs :func:`install` right after ``transformers.trainer`` has been executed."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                original_exec = spec.loader.exec_module

                def exec_module(module: Any, _original: Any = original_exec) -> None:
                    _original(module)
                    install()

                spec.loader.exec_module = exec_module  # type: ignore[method-assign]
                return spec
        return None


def activate_from_env() -> None:
    """Called by the .pth line at interpreter start-up; idempotent; never raises into the user's program."""
    if not switch_on() or any(isinstance(f, _AfterTrainerImport) for f in sys.meta_path):
        return
    try:
        if _TARGET in sys.modules:
            install()
        else:
            sys.meta_path.insert(0, _AfterTrainerImport())
    except Exception as error:  # noqa: BLE001 - start-up must not break the user's program
        sys.stderr.write(f"cpt-plugin: auto-activation failed and is off: {error}\n")
