"""prepare_model: turns a base causal LM into the trainable CPT model through PEFT.

The recipe: rank-stabilized LoRA (scale alpha/sqrt(r)) on every attention and MLP projection, and the
input embeddings and lm_head fully trained as PEFT ``modules_to_save`` copies (their learning rate is
set by the optimizer groups, see optim.py). Tied input/output embeddings stay tied: PEFT's
``ensure_weight_tying`` makes both wrappers share one trainable copy, so merging keeps them tied too.
On 16-bit models the trained copies are kept in fp32 (``trained_embeddings_dtype``, see
embedding_precision.py) so that updates at the small embedding learning rate are not rounded away.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from cpt_plugin.config import CPTConfig, CPTConfigError
from cpt_plugin.model_parts import (
    EMBEDDING_NAMES,
    embedding_names,
    embedding_parameter_ids,
    embeddings_tied,
    is_conv1d,
    is_linear,
    leaf_name,
)

logger = logging.getLogger(__name__)


def _targets_conv1d(model: nn.Module, targets: list[str]) -> bool:
    """True when every targeted layer is a Conv1D: PEFT then needs ``fan_in_fan_out=True``.

    Mixed models are left to PEFT, which flips the flag per layer (with a warning).
    """
    leafs = set(targets)
    kinds = {
        is_conv1d(module)
        for name, module in model.named_modules()
        if name and (leaf_name(name) in leafs or name in leafs) and is_linear(module)
    }
    return kinds == {True}


def resolve_target_modules(
    model: nn.Module, requested: list[str] | str | None
) -> tuple[list[str], list[str]]:
    """Returns (LoRA targets, names moved to full training).

    Default: the leaf names of every linear layer except the embeddings and lm_head (for Llama-style
    models: q/k/v/o_proj and gate/up/down_proj; for GPT-2's Conv1D layers: c_attn, c_proj, c_fc).
    Embedding names that a user lists as LoRA targets
    (a habit from other tools' notebooks) are moved to full training.
    """
    input_name, output_name = embedding_names(model)
    embedding_leafs = {leaf_name(n) for n in (input_name, output_name) if n} | EMBEDDING_NAMES
    if requested is None or requested == "all-linear":
        names = sorted(
            {
                leaf_name(name)
                for name, module in model.named_modules()
                if is_linear(module) and name and name != output_name
            }
            - embedding_leafs
        )
        if not names:
            raise CPTConfigError(
                "cpt-plugin: found no linear layers to put LoRA on. Set 'target_modules' explicitly."
            )
        return names, []
    requested_list = [requested] if isinstance(requested, str) else list(requested)
    moved = [name for name in requested_list if leaf_name(name) in embedding_leafs]
    targets = [name for name in requested_list if name not in moved]
    if not targets:
        raise CPTConfigError(
            "cpt-plugin config 'target_modules': only embeddings were listed. Add the projections "
            "(e.g. q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj) or leave it unset."
        )
    return targets, moved


def _count(params: Any) -> int:
    seen: set[int] = set()
    total = 0
    for param in params:
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    return total


def trainable_summary(model: nn.Module) -> str:
    """One line: trainable parameters by group (LoRA, embeddings) and of the whole model."""
    embedding_ids = embedding_parameter_ids(model)
    all_params = list(model.parameters())
    trainable = [p for p in all_params if p.requires_grad]
    embedding = [p for p in trainable if id(p) in embedding_ids]
    lora = [p for p in trainable if id(p) not in embedding_ids]
    total, n_train = _count(all_params), _count(trainable)
    tied = " (tied: one shared copy)" if embeddings_tied(getattr(model, "base_model", model)) else ""
    return (
        f"cpt-plugin: trainable {n_train / 1e6:.2f}M of {total / 1e6:.2f}M parameters "
        f"({100.0 * n_train / max(total, 1):.2f}%): LoRA {_count(lora) / 1e6:.2f}M, "
        f"embeddings {_count(embedding) / 1e6:.2f}M{tied}"
    )


def build_lora_config(model: nn.Module, config: CPTConfig) -> Any:
    """The PEFT LoraConfig of the CPT recipe for this model."""
    from peft import LoraConfig

    targets, moved = resolve_target_modules(model, config.target_modules)
    input_name, output_name = embedding_names(model)
    tied = embeddings_tied(model)
    modules_to_save: list[str] = []
    if config.train_embeddings or moved:
        if moved and not config.train_embeddings:
            logger.warning(
                "cpt-plugin: %s listed in target_modules are trained fully (modules_to_save), not as LoRA "
                "factors: a fused loss reads lm_head.weight directly and would leave LoRA factors untrained.",
                ", ".join(moved),
            )
        elif moved:
            logger.warning(
                "cpt-plugin: %s removed from LoRA targets; embeddings and lm_head are trained fully "
                "(train_embeddings=True).",
                ", ".join(moved),
            )
        # Both names, tied or not: PEFT recognises a tied pair only by the names embed_tokens/lm_head in
        # modules_to_save, so listing the input name alone (GPT-2's ``wte``) left lm_head on the frozen
        # original. With ensure_weight_tying PEFT then keeps one shared copy; _tie_trained_copies covers
        # the names PEFT does not know.
        for name in (input_name, output_name):
            if name and name.split(".")[-1] not in modules_to_save:
                modules_to_save.append(name.split(".")[-1])
    token_indices = None
    if config.train_embeddings and config.embedding_rows == "fresh":
        token_indices = _fresh_token_indices(model, input_name, output_name, tied)
        modules_to_save = []
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        use_rslora=config.use_rslora,
        target_modules=targets,
        fan_in_fan_out=_targets_conv1d(model, targets),
        modules_to_save=modules_to_save or None,
        trainable_token_indices=token_indices,
        ensure_weight_tying=bool(tied and modules_to_save),  # PEFT ties trainable tokens by itself
        bias="none",
        task_type="CAUSAL_LM",
    )


def _fresh_token_indices(
    model: nn.Module, input_name: str | None, output_name: str | None, tied: bool
) -> dict[str, list[int]]:
    """``embedding_rows: fresh``: PEFT's trainable tokens on the new or untrained rows only.

    Why: full trained copies of embed_tokens and lm_head cost vocab x hidden each (plus gradients and
    optimizer states); when only the rows of new tokens are meant to learn, PEFT keeps just those rows as
    deltas. Tied embeddings: PEFT wraps lm_head with the same rows. The rows are those marked before PEFT
    wraps the model (vocabulary extension, untrained-token healing)."""
    from cpt_plugin.vocabulary.fresh_rows import fresh_rows

    rows = fresh_rows(model)
    if rows is None or input_name is None:
        raise CPTConfigError(
            "cpt-plugin config 'embedding_rows' is 'fresh', which trains only new or untrained embedding rows, "
            "but none are marked. Add tokens first (cpt_plugin.add_new_tokens / new_tokens / extend_vocabulary), "
            "let heal_untrained_tokens find untrained rows, or set embedding_rows: all."
        )
    ids = [int(i) for i in rows]
    indices = {input_name.split(".")[-1]: ids}
    if output_name and not tied:
        indices[output_name.split(".")[-1]] = ids
    logger.info(
        "cpt-plugin: embeddings: %d new or untrained rows train (PEFT trainable tokens%s); the others stay "
        "frozen (embedding_rows: fresh)",
        len(ids),
        "; lm_head tied to them" if tied else ", in embed_tokens and lm_head",
    )
    return indices


def _trained_copy(module: Any) -> Any:
    """The active trainable copy inside a PEFT ModulesToSaveWrapper (None for any other module)."""
    copies = getattr(module, "modules_to_save", None)
    adapter = getattr(module, "active_adapter", None)
    if isinstance(adapter, (list, tuple)):
        adapter = adapter[0] if adapter else None
    if copies is None or adapter not in copies:
        return None
    return copies[adapter]


def _tie_trained_copies(peft_model: Any) -> None:
    """Makes the trained input-embedding copy and lm_head copy one parameter, as they were in the base.

    PEFT does this itself for the usual names; for other names it would leave two copies that drift
    apart from the first step (and a merge would then break the model's tying).
    """
    embed, head = peft_model.get_input_embeddings(), peft_model.get_output_embeddings()
    embed_copy, head_copy = _trained_copy(embed), _trained_copy(head)
    if embed_copy is None:
        return  # embeddings not trained: base weights stay tied and frozen
    if head_copy is None:
        raise CPTConfigError(
            "cpt-plugin: the base model ties its input embeddings and lm_head, but PEFT wrapped only the "
            f"input embeddings ({type(embed).__name__}) and not lm_head ({type(head).__name__}); training would "
            "untie them. Set train_embeddings=False, or report this model type to cpt-plugin."
        )
    if head_copy.weight is not embed_copy.weight:
        head_copy.weight = embed_copy.weight


def prepare_model(model: nn.Module, config: CPTConfig | dict | None = None, **overrides: Any) -> Any:
    """Wraps ``model`` as a PEFT model with the CPT recipe and returns it.

    Kernels are not applied here (see ``cpt_plugin.patch``); this only decides what is trained.
    """
    from peft import PeftModel, get_peft_model

    config = CPTConfig.coerce(config, **overrides)
    if isinstance(model, PeftModel) or hasattr(model, "peft_config"):
        raise CPTConfigError(
            "cpt-plugin: prepare_model got a model that is already a PEFT model. Pass the base model "
            "(before get_peft_model), or unload the adapter first with model.merge_and_unload() / "
            "model.get_base_model(); cpt-plugin sets up LoRA and the embeddings itself."
        )
    from cpt_plugin.preflight import check_causal_lm

    check_causal_lm(model)
    if config.train_embeddings and config.heal_untrained_tokens:
        from cpt_plugin.vocabulary.healing import heal_untrained_rows

        heal_untrained_rows(model)  # before PEFT copies the rows: the trained copies start healed
    tied = embeddings_tied(model)
    lora_config = build_lora_config(model, config)
    from cpt_plugin.third_party import peft_deprecations_quiet

    with peft_deprecations_quiet():  # PEFT reads transformers' deprecated is_gradient_checkpointing
        peft_model = get_peft_model(model, lora_config)
    if tied:
        _tie_trained_copies(peft_model)
    peft_model.cpt_config = config
    if config.train_embeddings:
        from cpt_plugin.embedding_precision import apply_trained_embeddings_dtype

        apply_trained_embeddings_dtype(peft_model, config.trained_embeddings_dtype)
    logger.info(trainable_summary(peft_model))
    return peft_model
