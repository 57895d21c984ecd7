"""CPTPlugin: cpt-plugin inside a stock Axolotl run, through Axolotl's own plugin hooks.

YAML::

    plugins:
      - cpt_plugin.integrations.axolotl.CPTPlugin
    adapter: cpt            # optional: lora or unset are switched to cpt, with a message
    cpt:                    # any CPTConfig key; validated with the rest of the config
      lora_r: 128
      schedule: wsd

What runs where (Axolotl 0.19 order):

- config validation: ``CPTArgs`` (merged into Axolotl's schema) builds the CPTConfig from ``cpt:`` and
  applies the precedence rules of ``axolotl_settings.py`` (messages for every overridden Axolotl key);
- ``pre_model_load``: ``cpt_plugin.patch(model_type, config)`` when kernels are on;
- ``load_adapter`` (for ``adapter: cpt``): ``cpt_plugin.core.setup_model`` — the same kernels + PEFT recipe +
  checkpointing sequence as every other entry point; Axolotl treats the result as its PEFT model;
- ``add_callbacks_pre_trainer``: a ``CPTCallback`` in the Trainer's callbacks, so the Trainer hooks build the
  CPT optimizer groups and log our metrics;
- ``post_trainer_create``: the trainer's ``create_optimizer`` is pinned to ``transformers.Trainer``'s
  (hooked) one, because Axolotl's optimizer mixin builds its own optimizer for several settings
  (custom optimizers, embedding_lr...) instead of calling it. Axolotl's ``create_optimizer`` plugin
  hook is declared but never called by its trainer, so it is not used;
- ``create_lr_scheduler`` (called by Axolotl's scheduler mixin): the CPT schedule, through the same hook.
"""

from __future__ import annotations

import logging
from typing import Any

from cpt_plugin.config import CPTConfig, CPTConfigError
from cpt_plugin.integrations.axolotl_settings import (
    ADAPTER_NAME,
    CONFIG_KEY,
    PLUGIN_NAME,
    check_config,
    check_plugin_listed,
    config_from_block,
    names_plugin,
    resolve_settings,
)

try:  # the settings schema and plugin need pydantic/Axolotl; importing this module must not
    from pydantic import BaseModel, Field, model_validator
except ImportError:  # pragma: no cover - pydantic ships with Axolotl
    BaseModel = object  # type: ignore[assignment,misc]

try:
    from axolotl.integrations.base import BasePlugin
except ImportError:  # Axolotl not installed: the class still imports (docs, checks)
    BasePlugin = object  # type: ignore[assignment,misc]

try:
    from axolotl.integrations.base import AdapterCapabilities
except ImportError:
    AdapterCapabilities = None  # type: ignore[assignment,misc]

logger = logging.getLogger(__name__)

__all__ = ["CPTPlugin", "CPTArgs", "check_config", "cpt_config_from_cfg", "PLUGIN_NAME"]


def cpt_config_from_cfg(cfg: Any) -> CPTConfig:
    """The CPTConfig of a validated Axolotl cfg (its ``cpt:`` block, already resolved by CPTArgs)."""
    return config_from_block(cfg.get(CONFIG_KEY) if hasattr(cfg, "get") else getattr(cfg, CONFIG_KEY, None))


if BaseModel is not object:

    class CPTArgs(BaseModel):
        """cpt-plugin's part of the Axolotl schema: one ``cpt:`` mapping of CPTConfig keys."""

        cpt: dict[str, Any] | None = Field(
            default=None,
            json_schema_extra={
                "description": "cpt-plugin settings (CPTConfig keys: lora_r, schedule, embedding_lr_ratio, "
                "gradient_checkpointing, kernels, ...). Needs plugins: [" + PLUGIN_NAME + "]."
            },
        )

        @model_validator(mode="before")
        @classmethod
        def _cpt_plugin_settings(cls, data: Any) -> Any:
            """Builds the CPTConfig (errors surface here) and applies the precedence rules."""
            if not isinstance(data, dict):
                return data
            if not names_plugin(data):  # the schema mixin outlives its config in Axolotl's singleton
                check_plugin_listed(data)
                return data
            resolved, _, notes = resolve_settings(data)
            for message in notes:
                logger.warning("cpt-plugin: %s", message)
            return resolved


def _trainer_has_cpt_callback(trainer: Any) -> bool:
    from cpt_plugin.integrations.hf import trainer_cpt_callback

    return trainer_cpt_callback(trainer) is not None


class CPTPlugin(BasePlugin):  # type: ignore[misc,valid-type]
    """Axolotl plugin: the CPT recipe, kernels, schedules and offloaded checkpointing of cpt-plugin."""

    def get_input_args(self) -> str:
        return "cpt_plugin.integrations.axolotl.CPTArgs"

    def get_adapter_capabilities(self) -> list[Any]:
        # lora_like: a saved cpt adapter is a plain PEFT LoRA adapter, so Axolotl's own loader can load it
        # (inference, merge, lora_model_dir) when load_adapter below declines.
        if AdapterCapabilities is None:
            return []
        return [AdapterCapabilities(name=ADAPTER_NAME, lora_like=True)]

    # --- model ---------------------------------------------------------------------------------------
    def pre_model_load(self, cfg: Any) -> None:
        config = cpt_config_from_cfg(cfg)
        model_type = cfg.get("model_config_type")
        if config.enabled_kernels() and model_type:
            from cpt_plugin.patching.registry import patch

            patch(model_type, config)

    def load_adapter(
        self, model: Any, cfg: Any, inference: bool = False, config_only: bool = False
    ) -> tuple[Any, Any] | None:
        if cfg.get("adapter") != ADAPTER_NAME:
            return None
        if cfg.get("lora_model_dir") or inference:
            return None  # a saved adapter: Axolotl's LoRA loader reads it (lora_like)
        config = cpt_config_from_cfg(cfg)
        if config_only:
            from cpt_plugin.recipe import build_lora_config

            return None, build_lora_config(model, config)
        from cpt_plugin.core import setup_model
        from cpt_plugin.trainer_settings import TrainerSettings, resolve

        trainer = TrainerSettings(gradient_checkpointing=bool(cfg.get("gradient_checkpointing")))
        peft_model = setup_model(model, config, checkpointing=resolve(config, trainer).checkpointing)
        return peft_model, peft_model.peft_config["default"]

    def post_model_load(self, cfg: Any, model: Any) -> None:
        if cfg.get("adapter") == ADAPTER_NAME and getattr(model, "cpt_config", None) is None:
            if hasattr(model, "peft_config"):  # a saved adapter loaded by Axolotl: keep it as is
                model.cpt_config = cpt_config_from_cfg(cfg)

    # --- trainer -------------------------------------------------------------------------------------
    def add_callbacks_pre_trainer(self, cfg: Any, model: Any) -> list[Any]:
        from cpt_plugin.integrations.hf import CPTCallback

        if getattr(model, "cpt_config", None) is None:
            raise CPTConfigError(
                "cpt-plugin: the model reached the Trainer without the CPT set-up (adapter: "
                f"{cfg.get('adapter')}). Keep adapter: {ADAPTER_NAME} with {PLUGIN_NAME}."
            )
        return [CPTCallback(cpt_config_from_cfg(cfg))]

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        """Routes the trainer's optimizer creation through transformers.Trainer's (hooked) method."""
        if not _trainer_has_cpt_callback(trainer):
            return
        from transformers import Trainer

        def create_optimizer(*args: Any, **kwargs: Any) -> Any:
            return Trainer.create_optimizer(trainer, *args, **kwargs)

        trainer.create_optimizer = create_optimizer

    def create_lr_scheduler(self, cfg: Any, trainer: Any, optimizer: Any, num_training_steps: int) -> Any:
        config = cpt_config_from_cfg(cfg)
        if config.schedule == "none" or not _trainer_has_cpt_callback(trainer):
            return None  # Axolotl's own scheduler
        from transformers import Trainer

        return Trainer.create_scheduler(trainer, num_training_steps, optimizer)


def main(argv: list[str] | None = None) -> int:
    """``python -m cpt_plugin.integrations.axolotl CONFIG.yaml``: the plugin's checks, before a run."""
    import sys

    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print("usage: python -m cpt_plugin.integrations.axolotl AXOLOTL_CONFIG.yaml ...", file=sys.stderr)
        return 2
    status = 0
    for path in paths:
        try:
            messages = check_config(path)
        except (CPTConfigError, OSError) as error:
            print(f"{path}: {error}", file=sys.stderr)
            status = 1
            continue
        for message in messages:
            print(f"{path}: cpt-plugin: {message}")
        print(f"{path}: ok")
    return status


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
