"""setup_model: the one sequence every entry point runs on a built model.

config → pre-flight model checks → RoPE scaling → kernels patched into the model → PEFT recipe →
checkpointing mode → memory options.
The CLI, CPTCallback, the Axolotl plugin and auto-activation all call this; none carries its own copy.
"""

from __future__ import annotations

import logging
from typing import Any

from cpt_plugin.config import CPTConfig

logger = logging.getLogger(__name__)


def warn_if_context_too_long(model: Any, config: CPTConfig) -> None:
    """max_seq_length beyond the trained context needs RoPE scaling (config.rope_scaling, applied by
    setup_model to the loaded model, or apply_rope_scaling before loading)."""
    from cpt_plugin.long_context import has_rotary_embedding

    model_config = getattr(model, "config", None)
    trained = getattr(model_config, "max_position_embeddings", None)
    if not trained or config.max_seq_length <= trained or config.rope_scaling is not None:
        return
    if not has_rotary_embedding(model):  # learned positions (GPT-2): nothing to rescale
        logger.warning(
            "cpt-plugin: max_seq_length=%d is beyond the model's %d learned positions, and %s has no RoPE to "
            "rescale: sequences longer than %d tokens fail. Set max_seq_length <= %d.",
            config.max_seq_length,
            trained,
            type(model).__name__,
            trained,
            trained,
        )
    else:
        logger.warning(
            "cpt-plugin: max_seq_length=%d is beyond the model's trained context (%d positions). Set "
            "rope_scaling in the cpt-plugin config, e.g. CPTCallback(rope_scaling={'rope_type': 'yarn', "
            "'factor': %.1f}): cpt-plugin then rescales the model's RoPE before training. Or lower "
            "max_seq_length.",
            config.max_seq_length,
            trained,
            config.max_seq_length / trained,
        )


def offload_embeddings_wanted(config: CPTConfig, mode: str) -> bool:
    """``offload_embeddings: null`` (the default) is on for checkpointed runs of one process on a GPU.

    Why: there the frozen embedding originals PEFT keeps next to the trained copies are a large part of a
    small peak (0.5 GiB of 6.6 at Llama-1B shapes) and are never read while the adapters are active;
    measured no slower on an H200. Off across processes and under accelerate's FSDP or DeepSpeed (even on
    one GPU): they own every parameter's placement (DDP broadcasts frozen parameters too)."""
    if config.offload_embeddings is not None:
        return bool(config.offload_embeddings)
    import os

    import torch

    from cpt_plugin.offload.planner import distributed_world

    one_process = distributed_world() == 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1
    sharded = any(
        os.environ.get(f"ACCELERATE_USE_{name}", "").lower() in ("1", "true")
        for name in ("FSDP", "DEEPSPEED")
    )
    return (
        mode in ("recompute", "offload", "auto") and one_process and not sharded and torch.cuda.is_available()
    )


def setup_model(model: Any, config: CPTConfig | dict | None = None, checkpointing: str | None = None) -> Any:
    """Returns the trainable CPT model (a PeftModel) built from ``model``.

    ``checkpointing`` overrides ``config.gradient_checkpointing`` ("off", "recompute", "offload", "auto").
    "auto" installs the memory planner (``offload/planner.py``: per layer keep, recompute or offload,
    chosen at the first step for ``config.memory_budget_gib``); CPTCallback passes "off" instead when the
    Trainer does not checkpoint.
    """
    from cpt_plugin.patching.registry import patch, warn_if_no_patcher
    from cpt_plugin.preflight import check_causal_lm
    from cpt_plugin.recipe import prepare_model

    config = CPTConfig.coerce(config)
    check_causal_lm(model)  # before anything changes the model: PEFT would fail deep inside
    if config.rope_scaling is not None:
        from cpt_plugin.long_context import apply_rope_scaling_to_model

        apply_rope_scaling_to_model(model, config.max_seq_length, config.rope_scaling)
    if config.enabled_kernels():
        patch(model, config)
    else:
        warn_if_no_patcher(model)  # the same one warning as patch() gives on a GPU
    warn_if_context_too_long(model, config)
    peft_model = prepare_model(model, config)
    from cpt_plugin.vocabulary.extension import keep_adapter_saves_lean

    keep_adapter_saves_lean(peft_model)  # an extended vocabulary: no second copy of every embedding
    if "fused_lora" in config.enabled_kernels():
        from cpt_plugin.patching.lora import enable_fused_lora

        enable_fused_lora(peft_model)
    mode = checkpointing or config.gradient_checkpointing
    install_long_context_attention(peft_model, config, mode)
    if mode in ("recompute", "offload"):
        from cpt_plugin.offload.checkpointing import enable_checkpointing

        enable_checkpointing(peft_model, mode)
    elif mode == "auto":
        from cpt_plugin.offload.planner import install_planner

        install_planner(
            peft_model,
            budget_gib=config.memory_budget_gib,
            tiled_mlp=config.tiled_mlp,
            chunk_tokens=config.tiled_mlp_chunk_tokens,
            fused_loss="fused_linear_cross_entropy" in config.enabled_kernels(),
        )
    elif mode == "off":
        mark_loss_chunk_from_free_memory(peft_model)
    if config.tiled_mlp and mode != "auto":
        from cpt_plugin.offload.tiled_mlp import enable_tiled_mlp

        enable_tiled_mlp(peft_model, config.tiled_mlp_chunk_tokens)
    if offload_embeddings_wanted(config, mode):
        from cpt_plugin.offload.embeddings import offload_frozen_embeddings

        offload_frozen_embeddings(peft_model)
    install_layer_graphs(peft_model, config, mode)
    return peft_model


def install_long_context_attention(model: Any, config: CPTConfig, mode: str) -> None:
    """Attention inside our checkpointing at long context: over groups of heads (one group's backward
    workspace at a time), and (``attention_replay``: None or true) not run again in offloaded layers'
    recompute where it is a large share of a layer's work."""
    from cpt_plugin.offload.head_groups import enable_head_groups

    marked = enable_head_groups(model, replay=config.attention_replay is not False)
    if config.attention_replay and (mode not in ("offload", "auto") or not marked):  # asked for: say so
        why = (
            f"gradient_checkpointing is {mode}"
            if mode not in ("offload", "auto")
            else "the model does not run transformers' sdpa attention"
        )
        logger.warning(
            "cpt-plugin: attention_replay: true applies to offloaded layers of a model with sdpa attention "
            "(gradient_checkpointing: offload, or auto when it offloads); here %s, so it does nothing.",
            why,
        )


def mark_loss_chunk_from_free_memory(model: Any) -> None:
    """Checkpointing off: the user spends memory for speed, so the fused loss may take a larger logits chunk
    when the device has room at the end of the forward (patching/causal_lm.py: ``_loss_chunk_bytes``)."""
    from cpt_plugin.model_parts import causal_lm_heads

    for module in causal_lm_heads(model):
        module.cpt_loss_chunk_from_free_memory = True


def no_cache_in_training(model: Any) -> None:
    """A training forward (grad enabled, ``use_cache`` not passed) of the causal LM runs with
    ``use_cache=False``. Why: without checkpointing, kept layers that may replay CUDA graphs run through
    the per-layer function, which transformers takes for gradient checkpointing; from the config's
    ``use_cache=True`` it would then turn the cache off itself with a warning about checkpointing that
    the user did not turn on. A training step has no use for the cache (nothing generates from it)."""
    from cpt_plugin.model_parts import causal_lm_heads

    for module in causal_lm_heads(model):
        module.register_forward_pre_hook(_no_cache_in_training, with_kwargs=True)


def _no_cache_in_training(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    import torch

    if not (module.training and torch.is_grad_enabled()) or kwargs.get("use_cache") is not None:
        return None
    if len(args) > 1:  # positional arguments past input_ids: use_cache might be among them
        return None
    return args, {**kwargs, "use_cache": False}


def install_layer_graphs(model: Any, config: CPTConfig, mode: str) -> None:
    """Decoder layers replayed as CUDA graphs. Checkpointed layers (recompute, offload) replay their
    forward and their backward: the recompute and the backprop through it (offload/recompute_graphs.py).
    Kept layers (checkpointing off, or kept by the planner) replay their forward and backward
    (offload/layer_graphs.py).

    ``cuda_graphs`` unset (None, the default): checkpointed layers with ``recompute`` or ``offload``, for
    micro-batches of up to ``recompute_graphs.DEFAULT_MAX_TOKENS`` tokens. There the host is the bound: on
    the H200 at Llama-1B 4 x 2048 an offloaded step went from 1.11x to 1.25x Unsloth's speed for 0.14 GiB
    more allocated (docs/BENCHMARKS.md). Not longer batches (the pool grows with the length, the host's
    share shrinks). Kept layers (``auto`` and ``off``) once their extra memory is granted: by the planner
    when its plan keeps every layer and the budget holds it, without checkpointing when the device had
    room at the loss. Not ``auto``'s checkpointed layers: with an 8 GiB budget the planner, counting the
    pool, kept one layer fewer and the step was no faster than the eager plan (60.7K against 61.1K
    tokens/s, H200, 2026-12-02). ``true``: all of them, any length, ``auto`` included (its planner counts
    the checkpointed layers' pool, planner.py). Where graphs cannot run (several processes, no GPU, 4-bit
    layers) ``true`` says why, once; the default trains without them quietly."""
    if config.cuda_graphs is False:
        return
    asked = config.cuda_graphs is True
    if not asked and mode not in ("recompute", "offload", "auto", "off"):
        return
    from cpt_plugin.offload.checkpointing import checkpoint_function, enable_layer_plan, layer_plan_holder
    from cpt_plugin.offload.graph_capture import graphs_available
    from cpt_plugin.offload.layer_graphs import LayerGraphs
    from cpt_plugin.offload.recompute_graphs import DEFAULT_MAX_TOKENS, RecomputeGraphs

    reason = graphs_available(model)
    if reason is not None:
        if asked:
            logger.warning("cpt-plugin: cuda_graphs: true, but CUDA graphs cannot run here: %s.", reason)
        else:
            logger.debug("cpt-plugin: checkpointed layers run without CUDA graphs: %s.", reason)
        return
    if mode in ("recompute", "offload"):
        function = checkpoint_function(model)
        if function is not None:
            function.graphs = RecomputeGraphs(max_tokens=None if asked else DEFAULT_MAX_TOKENS)
        return
    holder = layer_plan_holder(model)
    if holder is None:  # checkpointing off: every layer kept, through the per-layer function
        holder = enable_layer_plan(model)
        no_cache_in_training(model)
    # unset: granted by the planner when it keeps every layer with room for them, or without checkpointing
    # when the device had room at the loss (patching/causal_lm.py)
    holder.graphs = LayerGraphs(managed=not asked)
    if mode == "auto" and asked:
        holder.recompute_graphs = RecomputeGraphs(max_tokens=None)
