"""Trained embedding copies kept in fp32 on 16-bit models, with the residual stream left in 16 bits.

Why: the CPT recipe trains embed_tokens and lm_head at about 1/10 of the LoRA learning rate. On a model
loaded in bf16 the trainable copies PEFT makes are bf16 too, and an AdamW step of ~lr (5e-6) on weights of
magnitude ~0.02 is far below bf16's resolution (8 significant bits): most updates round away and the
embeddings barely train. Keeping the copies in fp32 (as Unsloth does for its trained embeddings) makes
every update count, and the fp32 weights are what the adapter checkpoint saves, so resume stays exact.

The input embeddings' output is cast back to the dtype the model had, so activations, the residual stream
and offloaded layer inputs stay 16-bit. lm_head runs under autocast as before; without autocast its input
is cast up to fp32. Cost: per trained parameter 2 more bytes of weight, 2 of gradient and 4 of AdamW state.

``bfloat16_sr`` keeps bf16 copies instead and lets the optimizer round their updates stochastically
(stochastic_rounding.py, optim.CPTAdamW): updates survive in expectation at bf16's memory. That rounding is
bf16-specific, so an fp16 model's copies are kept in fp32 under it.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from cpt_plugin.model_parts import embedding_roles

logger = logging.getLogger(__name__)

_SIXTEEN_BIT = (torch.bfloat16, torch.float16)
_HOOKED = "_cpt_fp32_embedding_hook"


def _trained_leaf_modules(module: nn.Module) -> list[nn.Module]:
    """The submodules that directly own trainable parameters (PEFT's trainable copy inside its wrapper)."""
    return [m for m in module.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]


def _cast_output(dtype: torch.dtype):
    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return output.to(dtype) if isinstance(output, torch.Tensor) and output.dtype != dtype else output

    return hook


def _input_to_weight_dtype(module: nn.Module, inputs: tuple) -> tuple | None:
    weight = getattr(module, "weight", None)
    if not inputs or not isinstance(inputs[0], torch.Tensor) or weight is None:
        return None
    x = inputs[0]
    if x.dtype == weight.dtype or torch.is_autocast_enabled(x.device.type):
        return None
    return (x.to(weight.dtype), *inputs[1:])


def keep_trained_embeddings_fp32(model: nn.Module) -> int:
    """Casts the trainable 16-bit parameters of the input embeddings and lm_head to fp32 and hooks the
    modules that own them (see module doc). Returns how many parameter tensors were cast; 0 when the
    model is not 16-bit or trains no embeddings. Call it before the optimizer is built."""
    originals: dict[int, torch.dtype] = {}  # id(param) -> its dtype before the cast (tied copies: once)
    for role, module in embedding_roles(model):
        for owner in _trained_leaf_modules(module):
            original = None
            for param in owner.parameters(recurse=False):
                if param.requires_grad and param.dtype in _SIXTEEN_BIT:
                    originals[id(param)] = param.dtype
                    param.data = param.data.float()
                original = original or originals.get(id(param))
            if original is None or _HOOKED in owner.__dict__:
                continue
            if role == "input":
                owner.__dict__[_HOOKED] = owner.register_forward_hook(_cast_output(original))
            else:
                owner.__dict__[_HOOKED] = owner.register_forward_pre_hook(_input_to_weight_dtype)
    cast = len(originals)
    if cast:
        logger.info("cpt-plugin: %d trained embedding tensors kept in fp32 (the model stays 16-bit)", cast)
    return cast


def apply_trained_embeddings_dtype(model: nn.Module, dtype: str) -> int:
    """Applies CPTConfig.trained_embeddings_dtype to a prepared PEFT model: "float32" casts the copies up,
    "model" leaves them, "bfloat16_sr" leaves bf16 copies (the optimizer rounds their updates) and casts
    fp16 ones up to fp32. Returns how many parameter tensors were cast."""
    if dtype == "float32":
        return keep_trained_embeddings_fp32(model)
    if dtype == "bfloat16_sr":
        trained = [
            p for _role, module in embedding_roles(model) for p in module.parameters() if p.requires_grad
        ]
        if any(p.dtype == torch.float16 for p in trained):
            logger.info(
                "cpt-plugin: bfloat16_sr rounds to bf16; an fp16 model's trained embeddings stay fp32"
            )
            return keep_trained_embeddings_fp32(model)
    return 0
