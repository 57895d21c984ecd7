"""Optimizer parameter groups for CPT: embeddings at their own (smaller) learning rate.

Groups are fixed when the optimizer is created, so the scheduler's per-group state and the optimizer
state saved in checkpoints always agree (adding groups later breaks resume).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from cpt_plugin.config import CPTConfig, CPTConfigError

logger = logging.getLogger(__name__)

MAIN_GROUP = "lora"
EMBEDDING_GROUP = "embeddings"


def _embedding_modules(model: nn.Module) -> list[nn.Module]:
    """Input and output embeddings, found through the model's own accessors (never by name)."""
    modules = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            module = None
        if module is not None:
            modules.append(module)
    return modules


def embedding_parameter_ids(model: nn.Module) -> set[int]:
    """ids of every trainable parameter inside the embeddings or lm_head (PEFT copies included)."""
    ids: set[int] = set()
    for module in _embedding_modules(model):
        ids.update(id(p) for p in module.parameters() if p.requires_grad)
    return ids


def _no_decay(name: str, param: nn.Parameter) -> bool:
    lowered = name.lower()
    return param.ndim < 2 or "norm" in lowered or lowered.endswith(".bias")


def build_param_groups(
    model: nn.Module, config: CPTConfig, learning_rate: float, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """LoRA (and any other trainable weight) at ``learning_rate``; embeddings and lm_head at the
    embedding LR; no weight decay on norms and biases. Empty groups are left out."""
    embedding_lr = config.resolved_embedding_lr(learning_rate)
    embedding_ids = embedding_parameter_ids(model)
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue  # tied parameters appear once
        seen.add(id(param))
        group = EMBEDDING_GROUP if id(param) in embedding_ids else MAIN_GROUP
        buckets.setdefault((group, _no_decay(name, param)), []).append(param)
    groups = []
    for group in (MAIN_GROUP, EMBEDDING_GROUP):
        for no_decay in (False, True):
            params = buckets.get((group, no_decay))
            if params:
                groups.append(
                    {
                        "params": params,
                        "lr": embedding_lr if group == EMBEDDING_GROUP else learning_rate,
                        "weight_decay": 0.0 if no_decay else weight_decay,
                        "cpt_group": group + ("_no_decay" if no_decay else ""),
                    }
                )
    if not groups:
        raise CPTConfigError(
            "cpt-plugin: the model has no trainable parameters. Call prepare_model(model, config) first."
        )
    return groups


def _fused_supported(groups: list[dict[str, Any]]) -> bool:
    params = [p for g in groups for p in g["params"]]
    return all(p.is_cuda and p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params)


def optimizer_name_from_trainer(optim: str | None) -> str | None:
    """Maps TrainingArguments.optim to the AdamW kinds we build; None for anything else."""
    optim = str(getattr(optim, "value", optim) or "")
    if "8bit" in optim and "adam" in optim:
        return "adamw_8bit"
    if optim in ("adamw_torch", "adamw_torch_fused"):
        return optim
    return None


def create_optimizer(
    model: nn.Module,
    config: CPTConfig,
    learning_rate: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """AdamW over the CPT parameter groups: torch (fused where the parameters allow) or 8-bit."""
    groups = build_param_groups(model, config, learning_rate, weight_decay)
    name = config.optimizer or "adamw_torch_fused"
    if name == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise CPTConfigError(
                "cpt-plugin config 'optimizer': adamw_8bit needs bitsandbytes. "
                "Install it with `pip install cpt-plugin[bnb]`, or use adamw_torch_fused."
            ) from error
        return bnb.optim.AdamW8bit(groups, lr=learning_rate, betas=betas, eps=eps, weight_decay=weight_decay)
    fused = name == "adamw_torch_fused" and _fused_supported(groups)
    if name == "adamw_torch_fused" and not fused:
        logger.info("cpt-plugin: fused AdamW needs CUDA parameters; using the foreach AdamW instead.")
    return torch.optim.AdamW(
        groups, lr=learning_rate, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused or None
    )
