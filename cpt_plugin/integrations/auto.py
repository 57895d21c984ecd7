"""Auto-activation: with ``CPT_PLUGIN=1`` set, an unmodified Trainer script gets the CPT set-up.

The installed package ships ``cpt_plugin_autoactivate.pth``; Python runs its one line at start-up. When the
switch is off it does nothing else (no imports). When on, it calls :func:`activate_from_env`, which waits
for ``transformers.trainer`` to be imported (an import hook, so start-up stays cheap) and then installs the
Trainer hooks; every Trainer built without a CPTCallback then goes through :func:`auto_callback`.

It must never break a program it was not meant for: a Trainer it cannot serve (a model that is not a causal
LM, a model that already has a PEFT adapter, a preference/RL trainer, ...) is left untouched, with one
notice per reason. Nothing is read at import time: the config file is read when a Trainer is built, and a
bad one is an error there, naming the file, the line and the key.

Switches (the only environment variables that change behaviour, documented in the README):
- ``CPT_PLUGIN=1`` turns it on;
- ``CPT_PLUGIN_CONFIG=path.yaml`` gives the CPTConfig keys (default: CPTConfig()).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger(__name__)

SWITCH = "CPT_PLUGIN"
CONFIG_VARIABLE = "CPT_PLUGIN_CONFIG"
_TARGET = "transformers.trainer"


def switch_on(environ: dict[str, str] | None = None) -> bool:
    value = (environ if environ is not None else os.environ).get(SWITCH, "")
    return value.strip().lower() in ("1", "true", "yes", "on")


def config_from_env() -> Any:
    """The CPTConfig that ``CPT_PLUGIN_CONFIG`` names (defaults without it); read at Trainer construction."""
    from cpt_plugin.config import CPTConfig

    path = os.environ.get(CONFIG_VARIABLE, "").strip()
    return load_config_file(path) if path else CPTConfig()


def _other_file_hint(joint: str = " Or") -> str:
    return (
        f"{joint} point {CONFIG_VARIABLE} to another file, or unset {CONFIG_VARIABLE} to train with the "
        f"defaults (unset {SWITCH} to turn cpt-plugin off)."
    )


def load_config_file(path: str) -> Any:
    """CPTConfig from the YAML file ``path``; every failure is a CPTConfigError naming the file and the fix."""
    from cpt_plugin.config import CPT_KEYS_EXAMPLE, CPTConfig, CPTConfigError, load_yaml_mapping

    where = f"cpt-plugin auto-activation: {CONFIG_VARIABLE}={path}"
    try:
        loaded = load_yaml_mapping(path, expected=CPT_KEYS_EXAMPLE, where=where)
    except CPTConfigError as error:
        raise CPTConfigError(f"{error}{_other_file_hint()}") from error
    try:
        return CPTConfig.from_dict(loaded.data)
    except (ValueError, TypeError) as error:  # CPTConfigError is a ValueError
        raise CPTConfigError(
            f"{where}{loaded.line_of(str(error))}: {error} Fix the file{_other_file_hint(',')}"
        ) from error


# --- which Trainers auto-activation serves ------------------------------------------------------------
_NOTIFIED: set[str] = set()


def _trl_trainer_problem(trainer: Any) -> str | None:
    """TRL's preference/RL trainers are not continued pretraining; its SFTTrainer is served."""
    trl_classes = [cls for cls in type(trainer).__mro__ if cls.__module__.split(".")[0] == "trl"]
    if not trl_classes or any(cls.__name__ == "SFTTrainer" for cls in trl_classes):
        return None
    return (
        f"{type(trainer).__name__} is not a continued-pretraining trainer (auto-activation serves "
        "transformers.Trainer and TRL's SFTTrainer)"
    )


def unservable_reason(trainer: Any, arguments: Mapping[str, Any]) -> str | None:
    """Why auto-activation must leave this Trainer alone (a phrase for the notice), or None to serve it."""
    from cpt_plugin.preflight import causal_lm_problem

    model = arguments.get("model")
    if model is None:
        return "its model is built by model_init (auto-activation prepares a model given as model=...)"
    problem = _trl_trainer_problem(trainer)
    if problem is not None:
        return problem
    if arguments.get("peft_config") is not None:
        return "it was given its own peft_config"
    if getattr(model, "cpt_config", None) is not None:
        return None  # prepared by cpt-plugin already (a second Trainer over the same model)
    if hasattr(model, "peft_config"):
        return f"the model ({type(model).__name__}) already carries a PEFT adapter"
    problem = causal_lm_problem(model)
    if problem is not None:
        return f"{problem}; cpt-plugin trains causal language models"
    return None


def _notice(reason: str) -> None:
    if reason in _NOTIFIED:
        return
    _NOTIFIED.add(reason)
    logger.warning(
        "cpt-plugin: auto-activation (%s=1) leaves this Trainer untouched: %s. Unset %s to silence this notice.",
        SWITCH,
        reason,
        SWITCH,
    )


def auto_callback(trainer: Any, arguments: Mapping[str, Any], config: Any) -> Any:
    """The CPTCallback to add to a Trainer built without one, or None to leave it untouched.

    ``config`` is a CPTConfig or a function returning one (:func:`config_from_env`); it is only read for
    a Trainer that is served, so a bad file never breaks a script auto-activation does not touch.
    """
    reason = unservable_reason(trainer, arguments)
    if reason is not None:
        _notice(reason)
        return None
    from cpt_plugin.integrations.hf import CPTCallback

    return CPTCallback(config() if callable(config) else config)


def install() -> None:
    """Installs the Trainer hooks; the config is read from the environment when a Trainer is built."""
    from cpt_plugin.integrations.hf import install_trainer_hooks, set_auto_callback

    install_trainer_hooks()
    set_auto_callback(lambda trainer, arguments: auto_callback(trainer, arguments, config_from_env))


def _install_quietly() -> None:
    """install() for the import hook: a failure turns auto-activation off, never the user's import."""
    try:
        install()
    except Exception as error:  # noqa: BLE001 - `from transformers import Trainer` must not break
        sys.stderr.write(f"cpt-plugin: auto-activation failed and is off: {error}\n")


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
                    _install_quietly()

                spec.loader.exec_module = exec_module  # type: ignore[method-assign]
                return spec
        return None


def activate_from_env() -> None:
    """Called by the .pth line at interpreter start-up; idempotent; never raises into the user's program."""
    if not switch_on() or any(isinstance(f, _AfterTrainerImport) for f in sys.meta_path):
        return
    if _TARGET in sys.modules:
        _install_quietly()
    else:
        sys.meta_path.insert(0, _AfterTrainerImport())
