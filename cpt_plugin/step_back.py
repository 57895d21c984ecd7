"""The trained weights stepped back a little toward the start of CPT when training ends (``final_step_back``).

Why (docs/RECIPE.md, the recipe study): at the end of a CPT run the new-domain loss is flat along the last
stretch of the update while the old domain's is not, so moving every trained tensor back by a few percent,
start + alpha x (end - start), buys back forgetting for almost no new-domain loss. With alpha 0.975 and the
other replay defaults the study's runs forgot less than the usual 1/10 embedding ratio while learning the
new domain as well as the LoRA-LR embeddings.

What moves: LoRA's B matrices scale by alpha (they start at zero, so the adapter's delta B A scales by
alpha); the trained embedding copies (PEFT's ``modules_to_save``) move toward their frozen originals,
which are the weights at the start of CPT. Anything else that trains is left as it is, and said so.
Checkpoints written during training keep the trained weights (resume continues the run exactly); the
model after ``train()``, and what is saved or exported from it, has the stepped-back weights.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

ROWS_PER_CHUNK = 8192


def _lora_starts_at_zero(model: nn.Module) -> bool:
    configs = getattr(model, "peft_config", None) or {}
    return all(getattr(c, "init_lora_weights", True) is True for c in configs.values())


def _embedding_pairs(model: nn.Module) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """(trained copy, frozen original) of each active ``modules_to_save`` wrapper, shared copies once."""
    from peft.utils.other import ModulesToSaveWrapper

    pairs, seen = [], set()
    for module in model.modules():
        if not isinstance(module, ModulesToSaveWrapper) or module.original_module is None:
            continue
        for adapter in module.active_adapters:
            if adapter not in module.modules_to_save:
                continue
            copies = dict(module.modules_to_save[adapter].named_parameters())
            originals = dict(module.original_module.named_parameters())
            for name, copy in copies.items():
                original = originals.get(name)
                if copy.requires_grad and original is not None and id(copy) not in seen:
                    seen.add(id(copy))
                    pairs.append((copy, original))
    return pairs


def _toward(copy: nn.Parameter, original: torch.Tensor, alpha: float) -> None:
    """copy = original + alpha * (copy - original), in fp32 chunks of rows (the original may be in host memory)."""
    data = copy.data
    rows = data.shape[0] if data.dim() else 1
    flat, start_flat = data.reshape(rows, -1), original.detach().reshape(rows, -1)
    with torch.no_grad():
        for start in range(0, rows, ROWS_PER_CHUNK):
            end = min(start + ROWS_PER_CHUNK, rows)
            first = start_flat[start:end].to(data.device, torch.float32)
            last = flat[start:end].float()
            flat[start:end].copy_(first + alpha * (last - first))


def step_back(model: nn.Module, alpha: float) -> dict[str, Any]:
    """Moves ``model``'s trained weights to start + alpha x (end - start) (module doc); returns counts."""
    if alpha == 1.0:
        return {"lora": 0, "embeddings": 0, "left": []}
    if any(
        type(p).__name__ == "DTensor" or hasattr(p, "ds_id") for p in model.parameters() if p.requires_grad
    ):
        logger.warning(
            "cpt-plugin: final_step_back %g was not applied: the trained weights are sharded (FSDP or DeepSpeed). "
            "Set final_step_back: 1 to silence this, or apply cpt_plugin.step_back.step_back(model, %g) to the "
            "gathered model before saving it.", alpha, alpha,
        )  # fmt: skip
        return {"lora": 0, "embeddings": 0, "left": []}
    moved: set[int] = set()
    lora = 0
    if _lora_starts_at_zero(model):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.requires_grad and (".lora_B." in name or "lora_embedding_B" in name):
                    param.mul_(alpha)
                    moved.add(id(param))
                    lora += 1
    embeddings = 0
    for copy, original in _embedding_pairs(model):
        if copy.shape != original.shape:
            continue  # resized after wrapping: no start to step back to
        _toward(copy, original, alpha)
        moved.add(id(copy))
        embeddings += 1
    left = [
        n for n, p in model.named_parameters() if p.requires_grad and id(p) not in moved and "lora_A" not in n
    ]
    logger.info(
        "cpt-plugin: final_step_back %g: %d LoRA B matrices and %d trained embedding matrices stepped back toward "
        "the start of CPT%s",
        alpha, lora, embeddings,
        f"; {len(left)} other trained tensors left as trained (e.g. {left[0]})" if left else "",
    )  # fmt: skip
    return {"lora": lora, "embeddings": embeddings, "left": left}
