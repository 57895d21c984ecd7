"""Per-family GGUF conventions (llama.cpp's ``convert_hf_to_gguf.py``), as data.

What differs between the families cpt-plugin exports:
- the GGUF architecture name (Mistral is written as ``llama``, as llama.cpp does);
- q/k weights permuted for llama-style RoPE: llama.cpp rotates adjacent pairs, transformers rotates
  halves (``rotate_half``); qwen2/qwen3/gemma use llama.cpp's NEOX RoPE, which rotates halves too;
- Gemma's norms stored as ``1 + weight`` (its RMSNorm multiplies by ``1 + weight``);
- whether the architecture has a separate output tensor at all (Gemma 2 has none: always tied);
- the hyperparameter keys each family's runtime reads.
Tensor names come from the ``gguf`` package's own HF-to-GGUF name map.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cpt_plugin import CPTConfigError

logger = logging.getLogger(__name__)


def rope_parameters(config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """The RoPE settings of a config (transformers 5's ``rope_parameters``, older ``rope_theta``)."""
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params = {**params, "rope_theta": config.rope_theta}
    legacy = getattr(config, "rope_scaling", None)
    if legacy and "rope_type" not in params:
        params = {**legacy, **params}
    return dict(params)


def head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _common(writer: Any, config: Any) -> None:
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_vocab_size(config.vocab_size)


def _rope(writer: Any, config: Any, layer_type: str | None = None) -> None:
    params = rope_parameters(config, layer_type)
    if params.get("rope_theta") is not None:
        writer.add_rope_freq_base(float(params["rope_theta"]))
    kind = params.get("rope_type", "default")
    if kind == "linear":
        from gguf import RopeScalingType

        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
    elif kind == "yarn":
        from gguf import RopeScalingType

        writer.add_rope_scaling_type(RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(params["factor"]))
        original = params.get("original_max_position_embeddings") or config.max_position_embeddings
        writer.add_rope_scaling_orig_ctx_len(int(original))
    elif kind not in ("default", "llama3"):  # llama3 is written as the rope_freqs tensor
        raise CPTConfigError(
            f"cpt-plugin export: RoPE type {kind!r} ({type(config).__name__}.rope_parameters) has no GGUF "
            "form in cpt-plugin's exporter (default, linear, yarn and llama3 do). Export the merged model "
            "and convert it with llama.cpp's convert_hf_to_gguf.py."
        )


def llama3_rope_factors(config: Any) -> list[float] | None:
    """Llama 3's frequency-dependent RoPE scaling, which llama.cpp reads from a ``rope_freqs`` tensor."""
    params = rope_parameters(config)
    if params.get("rope_type") != "llama3":
        return None
    dim, base = head_dim(config), float(params["rope_theta"])
    factor = float(params.get("factor", 8.0))
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    old_context = float(params.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return factors


def _llama(writer: Any, config: Any) -> None:
    _common(writer, config)
    writer.add_rope_dimension_count(head_dim(config))
    _rope(writer, config)


def _qwen(writer: Any, config: Any) -> None:
    _common(writer, config)
    _rope(writer, config)


def _warn_attention_scale(config: Any) -> None:
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if scalar is not None and scalar not in (
        head_dim(config),
        config.hidden_size // config.num_attention_heads,
    ):
        logger.warning(
            "cpt-plugin export: %s has query_pre_attn_scalar=%s, but llama.cpp scales attention by head_dim "
            "(%d) or hidden_size/heads: llama.cpp may compute different attention from transformers.",
            config.model_type,
            scalar,
            head_dim(config),
        )


def _gemma2(writer: Any, config: Any) -> None:
    _warn_attention_scale(config)
    _common(writer, config)
    _rope(writer, config)
    if config.attn_logit_softcapping is not None:
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
    if config.final_logit_softcapping is not None:
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    writer.add_sliding_window(int(config.sliding_window))


def _gemma3(writer: Any, config: Any) -> None:
    _warn_attention_scale(config)
    _common(writer, config)
    _rope(writer, config, "full_attention")  # the global layers' base; llama.cpp fixes the local one
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(int(config.sliding_window))


@dataclass(frozen=True)
class GGUFFamily:
    """How one transformers model type is written as GGUF."""

    arch: str  # GGUF general.architecture (a gguf.MODEL_ARCH name)
    write_hparams: Callable[[Any, Any], None]
    permute_qk: bool = False  # llama-style RoPE: llama.cpp rotates adjacent pairs
    norm_offset: float = 0.0  # Gemma: norms stored as 1 + weight
    has_output: bool = True  # the architecture has an output tensor (untied lm_head)
    notes: tuple[str, ...] = field(default=())


GGUF_FAMILIES: dict[str, GGUFFamily] = {
    "llama": GGUFFamily("llama", _llama, permute_qk=True),
    "mistral": GGUFFamily("llama", _llama, permute_qk=True, notes=("written as llama, as llama.cpp does",)),
    "qwen2": GGUFFamily("qwen2", _qwen),
    "qwen3": GGUFFamily("qwen3", _qwen),
    "gemma2": GGUFFamily("gemma2", _gemma2, norm_offset=1.0, has_output=False),
    "gemma3_text": GGUFFamily("gemma3", _gemma3, norm_offset=1.0),
}


def family_for(config: Any) -> GGUFFamily:
    model_type = getattr(config, "model_type", None)
    if model_type not in GGUF_FAMILIES:
        hint = (
            " (a multimodal Gemma 3: export its text model, Gemma3ForCausalLM)"
            if model_type == "gemma3"
            else ""
        )
        raise CPTConfigError(
            f"cpt-plugin export: no GGUF mapping for model type {model_type!r}{hint}. cpt-plugin writes GGUF for "
            f"{', '.join(sorted(GGUF_FAMILIES))}. For other families, export the merged model (--to merged) "
            "and convert it with llama.cpp's convert_hf_to_gguf.py."
        )
    return GGUF_FAMILIES[model_type]


def permute_qk(weight: Any, n_head: int) -> Any:
    """llama.cpp's q/k row order for llama-style RoPE (pairs interleaved instead of halves)."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )
