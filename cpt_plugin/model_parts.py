"""Where the parts of a transformers model are, found the same way everywhere.

The embeddings and the LM head are found through the model's own accessors (``get_input_embeddings`` /
``get_output_embeddings``), never by name, so any architecture and PEFT's wrappers around it work; the
linear layers are recognised by type (``nn.Linear``, transformers' ``Conv1D``, quantized linears).
Per-family facts (which decoder layers feed their MLP output only to the residual add, ...) are not
here: they are FamilySpec fields in ``patching/``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Names that are not LoRA targets whatever the architecture: they are trained fully instead.
EMBEDDING_NAMES = frozenset({"embed_tokens", "lm_head", "wte", "word_embeddings", "embed_out", "output"})
# Quantized linear layers that are not nn.Linear subclasses name themselves so (bitsandbytes' do subclass).
_QUANTIZED_LINEARS = frozenset({"Linear4bit", "Linear8bitLt", "QuantLinear"})


def input_embeddings(model: Any) -> Any:
    """The input embedding module, or None when the model has no accessor for it."""
    try:
        return model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None


def output_embeddings(model: Any) -> Any:
    """The LM head (output embeddings), or None when the model has none (not a causal LM)."""
    try:
        return model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None


def input_device(model: Any) -> torch.device:
    """Where a batch's input ids go: the first accelerator the model's parameters are on, else CPU.

    Not simply the first parameter's device: with ``offload_embeddings`` the frozen embedding originals
    (often the first parameters) sit in host memory while the trained copies and every layer are on the
    GPU, and under ``disable_adapter()`` the originals follow their input's device."""
    fallback = None
    for param in model.parameters():
        kind = param.device.type
        if kind not in ("cpu", "meta"):
            return param.device
        if fallback is None and kind == "cpu":
            fallback = param.device
    return fallback if fallback is not None else torch.device("cpu")


def embedding_roles(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """("input" | "output", module) for the model's input embeddings and lm_head (PEFT wrappers included)."""
    found = (("input", input_embeddings(model)), ("output", output_embeddings(model)))
    return [(role, module) for role, module in found if isinstance(module, nn.Module)]


def embedding_modules(model: nn.Module) -> list[nn.Module]:
    """The input embeddings and lm_head modules that exist."""
    return [module for _, module in embedding_roles(model)]


def embedding_parameter_ids(model: nn.Module) -> set[int]:
    """ids of every trainable parameter inside the embeddings or lm_head (PEFT copies included)."""
    return {id(p) for module in embedding_modules(model) for p in module.parameters() if p.requires_grad}


def embeddings_tied(model: nn.Module) -> bool:
    """True when the input embeddings and lm_head share one weight tensor."""
    head = output_embeddings(model)
    if head is None:
        return False
    return model.get_input_embeddings().weight is head.weight


def causal_lm_heads(model: nn.Module) -> list[nn.Module]:
    """The causal-LM models inside ``model`` (a PeftModel wraps one): where the fused loss runs and reads
    its per-model settings (``cpt_loss_chunk_bytes`` and the like)."""
    from transformers import PreTrainedModel

    return [m for m in model.modules() if isinstance(m, PreTrainedModel) and hasattr(m, "lm_head")]


def module_name(model: nn.Module, target: nn.Module | None) -> str | None:
    """The qualified name of ``target`` inside ``model`` (None when absent)."""
    if target is None:
        return None
    return next((name for name, module in model.named_modules() if module is target), None)


def embedding_names(model: nn.Module) -> tuple[str | None, str | None]:
    """Qualified names of the input embeddings and of the lm_head."""
    return module_name(model, input_embeddings(model)), module_name(model, output_embeddings(model))


def is_conv1d(module: nn.Module | None) -> bool:
    """transformers' Conv1D (GPT-2 family): a linear layer whose weight is stored (in, out)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def is_8bit_linear(module: nn.Module | None) -> bool:
    """bitsandbytes' LLM.int8() linear layer."""
    return type(module).__name__ == "Linear8bitLt"


def is_linear(module: nn.Module) -> bool:
    """A linear layer LoRA can wrap: nn.Linear (bitsandbytes' included), Conv1D, or a quantized linear."""
    return isinstance(module, nn.Linear) or is_conv1d(module) or type(module).__name__ in _QUANTIZED_LINEARS


def leaf_name(name: str) -> str:
    """The last part of a qualified module name ("model.layers.0.self_attn.q_proj" -> "q_proj")."""
    return name.split(".")[-1]
