"""Read-back check of a GGUF file: transformers' own GGUF loader must give the merged model's logits.

The check loads the file with ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` (which reverses
llama.cpp's q/k permutation and Gemma's norm offset itself) and compares its logits on fixed token ids
with the merged checkpoint's, both in fp32. The error is the relative L2 norm ``|a - b| / |b|``:

- f16 / bf16: at most ``2e-3`` (the merged weights are 16-bit already; bf16 is exact, f16 measures ~1e-7);
- q8_0: at most ``1e-1`` (8-bit values with one scale per 32 weights; tiny random models of every family
  measure 2-3e-2). A wrong tensor layout (an unpermuted q/k, a missing norm offset) gives errors near 1.

transformers' loader does not read every setting llama.cpp writes (e.g. Gemma's logit soft-capping,
Llama 3's RoPE scaling, Qwen 3's head_dim): settings it reads must match the merged config exactly, and
the ones it does not read are taken from the merged config for the comparison (and named in the log),
so the check is about the tensors and the settings transformers can see.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from cpt_plugin import CPTConfigError

logger = logging.getLogger(__name__)

TOLERANCE = {"f16": 2e-3, "bf16": 2e-3, "q8_0": 1e-1}

# Settings that change what the model computes.
_SETTINGS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "tie_word_embeddings",
    "rope_parameters",
    "final_logit_softcapping",
    "attn_logit_softcapping",
    "query_pre_attn_scalar",
    "sliding_window",
    "layer_types",
    "attention_bias",
    "hidden_act",
    "hidden_activation",
)
_ALWAYS_READ = {"vocab_size", "tie_word_embeddings", "num_hidden_layers"}


def _read_settings(arch: str) -> set[str]:
    """Config keys transformers' GGUF loader sets from this architecture's metadata."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    return {value for value in GGUF_CONFIG_MAPPING.get(arch, {}).values() if isinstance(value, str)}


def check_supported(arch: str) -> None:
    import transformers
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise CPTConfigError(
            f"cpt-plugin export: transformers {transformers.__version__} cannot load GGUF architecture "
            f"{arch!r}, so the read-back check cannot run. Upgrade transformers, or pass check=False "
            "(CLI: --no-check) to write the file unchecked."
        )


def _theta(config: Any) -> float | None:
    from cpt_plugin.export.gguf_families import rope_parameters

    layer = (
        "full_attention"
        if isinstance(getattr(config, "rope_parameters", {}).get("full_attention"), dict)
        else None
    )
    return rope_parameters(config, layer).get("rope_theta")


def _same(a: Any, b: Any) -> bool:
    """Equal, with floats compared at float32 precision (GGUF stores hyperparameters as float32)."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _aligned_config(loaded: Any, merged: Any, arch: str) -> Any:
    """``loaded`` with the settings transformers does not read from GGUF taken from ``merged``."""
    read = _read_settings(arch) | _ALWAYS_READ
    taken, wrong = [], []
    for key in _SETTINGS:
        if not hasattr(merged, key) or _same(getattr(loaded, key, None), getattr(merged, key)):
            continue
        if key in read:
            wrong.append(
                f"{key}: file gives {getattr(loaded, key, None)!r}, merged has {getattr(merged, key)!r}"
            )
            continue
        if key == "rope_parameters" and not _same(_theta(loaded), _theta(merged)):
            wrong.append(f"rope_theta: file gives {_theta(loaded)!r}, merged has {_theta(merged)!r}")
            continue
        setattr(loaded, key, getattr(merged, key))
        taken.append(key)
    if wrong:
        raise CPTConfigError(
            "cpt-plugin export: read-back failed: transformers reads settings from the GGUF that differ from the "
            f"merged model ({'; '.join(wrong)}). The file was not kept. Please report this to cpt-plugin."
        )
    if taken:
        logger.info(
            "cpt-plugin: transformers' GGUF loader does not read %s from a GGUF file; the read-back check takes "
            "them from the merged config",
            ", ".join(taken),
        )
    return loaded


def _sample_ids(config: Any, tokenizer: Any) -> torch.Tensor:
    high = min(config.vocab_size, len(tokenizer)) if tokenizer is not None else config.vocab_size
    length = min(16, getattr(config, "max_position_embeddings", 16) or 16)
    return torch.randint(0, high, (2, length), generator=torch.Generator().manual_seed(0))


def read_back(gguf_path: Path, merged_dir: Path, outtype: str, tokenizer: Any | None) -> float:
    """Relative logits error of the GGUF file against the merged model; raises above the bound."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # two loads of the same model: their bars say nothing to a user
    try:
        return _read_back(gguf_path, merged_dir, outtype, tokenizer)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


@torch.no_grad()
def _read_back(gguf_path: Path, merged_dir: Path, outtype: str, tokenizer: Any | None) -> float:
    from transformers import AutoConfig, AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32)
    loaded_config = AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=str(gguf_path))
    from gguf import GGUFReader

    arch = bytes(GGUFReader(str(gguf_path)).fields["general.architecture"].parts[-1]).decode()
    config = _aligned_config(loaded_config, merged.config, arch)
    config._attn_implementation = merged.config._attn_implementation
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=str(gguf_path), config=config, dtype=torch.float32
    )
    ids = _sample_ids(merged.config, tokenizer)
    want = merged.eval()(input_ids=ids).logits.float()
    got = model.eval()(input_ids=ids).logits.float()
    error = float((got - want).norm() / want.norm().clamp_min(1e-12))
    bound = TOLERANCE[outtype]
    if not error <= bound:
        raise CPTConfigError(
            f"cpt-plugin export: read-back failed: transformers loads the {outtype} GGUF with logits "
            f"{error:.2e} away from the merged model's (relative L2; the bound is {bound:.0e}). The file was not "
            "kept. Please report this to cpt-plugin with the model type; pass check=False (--no-check) to "
            "write it unchecked."
        )
    return error
