"""Long-context set-up on the model config, before the model is built.

``apply_rope_scaling`` sets RoPE scaling when the training length exceeds the model's trained context.
Default: **YaRN** with ``factor = max_seq_length / max_position_embeddings``. Why YaRN rather than linear
interpolation: it leaves the high-frequency dimensions (local order) untouched and interpolates only the
low-frequency ones, so short-context quality is kept and it needs less continued training to adapt
(Peng et al. 2023); linear interpolation compresses every dimension. ``dynamic`` is only an inference-time
trick. A model that already scales RoPE (Llama 3's ``llama3``, ``yarn``, ``linear``, ``dynamic``) keeps its
type and gets its factor multiplied by the extension ratio.

transformers 5.x keeps this in ``config.rope_parameters`` (with ``rope_theta`` inside); 4.x configs used
``config.rope_scaling``, which we fall back to.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

logger = logging.getLogger(__name__)

ROPE_TYPES = ("linear", "dynamic", "yarn")
DEFAULT_ROPE_TYPE = "yarn"
_FACTOR_TYPES = ("linear", "dynamic", "yarn", "llama3")  # types whose reach grows with their factor
_KEEP = ("rope_theta", "partial_rotary_factor")


def _rope_dicts(config: Any) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """The attribute holding RoPE settings, its value, and the dicts to change (nested per layer type)."""
    attr = "rope_parameters" if hasattr(config, "rope_parameters") else "rope_scaling"
    params = dict(getattr(config, attr, None) or {})
    nested = [key for key, value in params.items() if isinstance(value, dict)]  # keyed by layer type
    if not nested:
        return attr, params, [params]
    # local (sliding-window) layers never see long distances: only full-attention RoPE is stretched
    chosen = [key for key in nested if key == "full_attention"] or nested
    for key in chosen:
        params[key] = dict(params[key])
    return attr, params, [params[key] for key in chosen]


def _scaled(
    old: dict[str, Any], requested: dict[str, Any] | None, ratio: float, trained: int
) -> dict[str, Any]:
    old_type = old.get("rope_type", old.get("type", "default"))
    kept = {key: old[key] for key in _KEEP if key in old}
    if requested is None and old_type in _FACTOR_TYPES:
        new = dict(old)
        new["rope_type"] = old_type
        new["factor"] = float(old.get("factor", 1.0)) * ratio
        if old_type == "yarn":
            new.setdefault("original_max_position_embeddings", trained)
        return new
    new = {"rope_type": DEFAULT_ROPE_TYPE, "factor": ratio, **kept}
    if requested is not None:
        new.update(requested)
        new["rope_type"] = new.pop("type", new["rope_type"])
    new["factor"] = float(new["factor"])
    if new["rope_type"] == "yarn":
        new.setdefault("original_max_position_embeddings", trained)
    return new


def apply_rope_scaling(
    model_config: Any, max_seq_length: int, rope_scaling: dict[str, Any] | None = None
) -> str | None:
    """Sets RoPE scaling on ``model_config`` for training at ``max_seq_length``; returns what was done.

    Returns None when nothing was changed (the sequence fits the trained context and no scaling was
    asked for). An explicit ``rope_scaling`` (``{"rope_type": "linear"|"dynamic"|"yarn", "factor": ...}``;
    factor defaults to the extension ratio) is applied even within the trained context. Also warns when
    the attention implementation is eager, which forms the full attention matrix.
    """
    check_attention_implementation(model_config, max_seq_length)
    if rope_scaling is not None:
        rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_scaling['rope_type'] must be one of {ROPE_TYPES}, got {rope_type!r}")
    trained = getattr(model_config, "max_position_embeddings", None)
    if not trained:
        if rope_scaling is None:
            return None
        raise ValueError(
            f"{type(model_config).__name__} has no max_position_embeddings; cannot set RoPE scaling."
        )
    if max_seq_length <= trained and rope_scaling is None:
        return None
    ratio = max(max_seq_length / trained, 1.0)
    attr, params, targets = _rope_dicts(model_config)
    unknown = [
        t for t in targets if t.get("rope_type", t.get("type")) not in (None, "default", *_FACTOR_TYPES)
    ]
    if unknown and rope_scaling is None:
        kinds = sorted({str(t.get("rope_type")) for t in unknown})
        message = (
            f"cpt-plugin: max_seq_length {max_seq_length} exceeds the trained context {trained}, but RoPE type "
            f"{kinds} is not rescaled automatically; pass rope_scaling explicitly."
        )
        warnings.warn(message, stacklevel=2)
        return message
    theta = getattr(model_config, "rope_theta", None)
    for target in targets:
        if theta is not None:
            target.setdefault("rope_theta", theta)
        new = _scaled(target, rope_scaling, ratio, trained)
        target.clear()
        target.update(new)
    setattr(model_config, attr, params)
    described = targets[0]
    if described["rope_type"] != "dynamic" and max_seq_length > trained:
        model_config.max_position_embeddings = max_seq_length  # dynamic reads it as the original length
    validate = getattr(model_config, "validate_rope", None)
    if callable(validate):
        validate()
    message = (
        f"cpt-plugin: set RoPE scaling {described['rope_type']} with factor {described['factor']:g} "
        f"(max_seq_length {max_seq_length}, trained context {trained})."
    )
    warnings.warn(message, stacklevel=2)  # once: a logger line as well showed it twice
    return message


def check_attention_implementation(model_config: Any, max_seq_length: int | None = None) -> str | None:
    """Warns when attention is eager: it forms the full (tokens x tokens) matrix, fatal at long context."""
    impl = getattr(model_config, "_attn_implementation", None) or getattr(
        model_config, "attn_implementation", None
    )
    if impl != "eager":
        return None
    length = f" at {max_seq_length} tokens" if max_seq_length else ""
    message = (
        f"cpt-plugin: attention implementation is 'eager', which materialises the full attention matrix{length}. "
        "Load the model with attn_implementation='sdpa' (or a flash-attention implementation)."
    )
    warnings.warn(message, stacklevel=3)
    return message


# --- on a model that is already built -----------------------------------------------------------------
_PRE_LOAD_HINT = (
    "Apply RoPE scaling to the config before loading instead: config = AutoConfig.from_pretrained(NAME); "
    "cpt_plugin.long_context.apply_rope_scaling(config, max_seq_length, rope_scaling); "
    "model = AutoModelForCausalLM.from_pretrained(NAME, config=config); and leave rope_scaling out of the "
    "cpt-plugin config."
)


def _is_rotary(module: Any) -> bool:
    """A rotary-embedding module: it holds RoPE inverse frequencies (``inv_freq``, or per layer type)."""
    return any(
        name == "inv_freq" or name.endswith("_inv_freq") for name, _ in module.named_buffers(recurse=False)
    )


def has_rotary_embedding(model: Any) -> bool:
    """True when the built model holds a rotary-embedding module (False: learned or no positions)."""
    return any(_is_rotary(module) for module in model.modules())


def rope_scaling_in_effect(model_config: Any, max_seq_length: int, rope_scaling: dict[str, Any]) -> bool:
    """True when ``model_config`` already has this scaling (e.g. set before loading, as the CLI does)."""
    wanted = rope_scaling.get("rope_type", rope_scaling.get("type"))
    for target in _rope_dicts(model_config)[2]:
        if target.get("rope_type", target.get("type")) != wanted:
            return False
        if "factor" in rope_scaling and float(target.get("factor", 1.0)) != float(rope_scaling["factor"]):
            return False
    trained = getattr(model_config, "max_position_embeddings", None) or 0
    return wanted == "dynamic" or trained >= max_seq_length


def apply_rope_scaling_to_model(model: Any, max_seq_length: int, rope_scaling: dict[str, Any]) -> str | None:
    """Sets RoPE scaling on a model that is already built; returns what was done (None: already in effect).

    Sound because RoPE scaling changes no weight: transformers' rotary-embedding modules compute their
    inverse frequencies (and YaRN's attention factor) once, from the config, when they are built, and hold
    them as non-persistent buffers. So the config is updated with :func:`apply_rope_scaling` and each
    rotary module is rebuilt from it, which gives the same model as scaling the config before loading.
    A model whose RoPE does not live in such a module raises a CPTConfigError pointing to the pre-load call.
    """
    from cpt_plugin.config import CPTConfigError

    rotary = [(name, module) for name, module in model.named_modules() if _is_rotary(module)]
    where = (
        f"{type(model).__name__} (model_type {getattr(getattr(model, 'config', None), 'model_type', None)!r})"
    )
    if not rotary:
        raise CPTConfigError(
            f"cpt-plugin config 'rope_scaling': {where} has no rotary position embedding module to scale (it "
            "may not use RoPE). Remove rope_scaling, or, if its RoPE is computed elsewhere: " + _PRE_LOAD_HINT
        )
    if any(getattr(module, "config", None) is None for _, module in rotary):
        raise CPTConfigError(
            f"cpt-plugin config 'rope_scaling': the rotary embedding of {where} is not built from its config, "
            "so cpt-plugin cannot rescale it on the loaded model. " + _PRE_LOAD_HINT
        )
    configs = list({id(module.config): module.config for _, module in rotary}.values())
    pending = [c for c in configs if not rope_scaling_in_effect(c, max_seq_length, rope_scaling)]
    if not pending:
        return None
    message = None
    for model_config in pending:
        message = apply_rope_scaling(model_config, max_seq_length, rope_scaling)
    for name, module in rotary:
        device = next((buffer.device for buffer in module.buffers(recurse=False)), None)
        try:
            rebuilt = type(module)(module.config)
        except Exception as error:  # noqa: BLE001 - any failure means: use the pre-load call
            raise CPTConfigError(
                f"cpt-plugin config 'rope_scaling': could not rebuild {type(module).__name__} of {where} from "
                f"the scaled config ({error}). " + _PRE_LOAD_HINT
            ) from error
        rebuilt.to(device)
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, rebuilt)
    logger.info("cpt-plugin: rebuilt %d rotary embedding module(s) of the loaded model.", len(rotary))
    return message
