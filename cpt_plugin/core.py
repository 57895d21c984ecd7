"""setup_model: the one sequence every entry point runs on a built model.

config → kernels patched into the model → PEFT recipe → checkpointing mode → memory options.
The CLI, CPTCallback, the Axolotl plugin and auto-activation all call this; none carries its own copy.
"""

from __future__ import annotations

import logging
from typing import Any

from cpt_plugin.config import CPTConfig

logger = logging.getLogger(__name__)


def warn_if_context_too_long(model: Any, config: CPTConfig) -> None:
    """max_seq_length beyond the trained context needs RoPE scaling, which must be set before loading."""
    model_config = getattr(model, "config", None)
    trained = getattr(model_config, "max_position_embeddings", None)
    if trained and config.max_seq_length > trained and config.rope_scaling is None:
        logger.warning(
            "cpt-plugin: max_seq_length=%d is beyond the model's trained context (%d positions). Set "
            "rope_scaling (e.g. {'rope_type': 'yarn', 'factor': %.1f}) so cpt-plugin scales RoPE when the "
            "model is loaded (the CLI does it), or lower max_seq_length.",
            config.max_seq_length,
            trained,
            config.max_seq_length / trained,
        )


def setup_model(model: Any, config: CPTConfig | dict | None = None, checkpointing: str | None = None) -> Any:
    """Returns the trainable CPT model (a PeftModel) built from ``model``.

    ``checkpointing`` overrides ``config.gradient_checkpointing`` ("off", "recompute", "offload"). "auto"
    changes nothing here: CPTCallback resolves it from TrainingArguments (offload when the Trainer
    checkpoints) before calling this function.
    """
    from cpt_plugin.recipe import prepare_model

    config = CPTConfig.coerce(config)
    if config.enabled_kernels():
        from cpt_plugin.patching.registry import patch

        patch(model, config)
    warn_if_context_too_long(model, config)
    peft_model = prepare_model(model, config)
    if "fused_lora" in config.enabled_kernels():
        from cpt_plugin.patching.lora import enable_fused_lora

        enable_fused_lora(peft_model)
    mode = checkpointing or config.gradient_checkpointing
    if mode in ("recompute", "offload"):
        from cpt_plugin.offload.checkpointing import enable_checkpointing

        enable_checkpointing(peft_model, mode)
    if config.tiled_mlp:
        from cpt_plugin.offload.tiled_mlp import enable_tiled_mlp

        enable_tiled_mlp(peft_model, config.tiled_mlp_chunk_tokens)
    if config.offload_embeddings:
        from cpt_plugin.offload.embeddings import offload_frozen_embeddings

        offload_frozen_embeddings(peft_model)
    return peft_model
