"""The generic ``XForCausalLM.forward``: the fused linear cross-entropy in training, the original otherwise.

In training with labels the [tokens, vocab] logits are never built: the last hidden states and the
LM head's weight go straight into ``fused_linear_cross_entropy``. Labels are shifted exactly like
transformers' ``ForCausalLMLoss`` (pad with ignore_index, drop the first), ``num_items_in_batch``
(gradient accumulation) and Gemma's ``final_logit_softcapping`` are honoured. In eval mode or without
labels the original forward runs, so generation and evaluation return logits as before.

The LM head may be an ``nn.Linear`` (tied or not), a PEFT ``ModulesToSaveWrapper`` (its active
trainable copy is used), PEFT's trainable tokens on the head (the weight with its trained rows) or a
PEFT LoRA ``Linear``: then the loss sees ``[x, dropout(x) A^T]`` against
``[W, scaling * B]``, which equals ``x W^T + scaling * B A dropout(x)`` and lets autograd reach A and B
(a fused loss that only reads ``lm_head.weight`` would leave them untrained). Anything else falls back
to the original forward, with one notice per kind of head.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

# (hidden[N, H]) -> (hidden'[N, H'], weight[V, H'], bias[V] | None)
HeadPlan = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


def make_causal_lm_forward(original: Callable[..., Any], softcap_attr: str | None) -> Callable[..., Any]:
    """Wraps ``original`` (keeping its signature, which Trainer and generate() inspect)."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        call = _bind(signature, self, args, kwargs)
        if call is None or not _wants_fused_loss(self, call):
            return original(self, *args, **kwargs)
        _unshard_fsdp(self.lm_head)
        plan = lm_head_plan(self.lm_head)
        if plan is None:
            _notice_unknown_head(self.lm_head)
            return original(self, *args, **kwargs)
        return _fused_forward(self, call, plan, softcap_attr)

    forward.__cpt_patched__ = True  # type: ignore[attr-defined]
    forward.__cpt_original__ = original  # type: ignore[attr-defined]
    return forward


_NOTICED_HEADS: set[str] = set()


def _notice_unknown_head(head: nn.Module) -> None:
    """Once per kind of head: the loss falls back to transformers' own (full logits), and why."""
    kind = type(head).__name__
    if kind in _NOTICED_HEADS:
        return
    _NOTICED_HEADS.add(kind)
    logger.warning(
        "cpt-plugin: the fused linear + cross-entropy does not know an lm_head of type %s, so this model's "
        "loss is computed from the full logits as transformers does: correct, with more memory at long "
        "context.",
        kind,
    )


# ------------------------------------------------------------------------------------------------


class _Call:
    """The original forward's arguments, split into named ones and its ``**kwargs``."""

    def __init__(self, named: dict[str, Any], extra: dict[str, Any], return_dict: bool | None) -> None:
        self.named, self.extra, self.return_dict = named, extra, return_dict


def _bind(signature: inspect.Signature, self: nn.Module, args: tuple, kwargs: dict[str, Any]) -> _Call | None:
    kwargs = dict(kwargs)
    return_dict = kwargs.pop("return_dict", None)
    try:
        bound = signature.bind(self, *args, **kwargs)
    except TypeError:
        return None
    named = dict(bound.arguments)
    extra: dict[str, Any] = {}
    params = list(signature.parameters.values())
    named.pop(params[0].name, None)  # self
    for param in params:
        if param.kind is param.VAR_KEYWORD:
            extra = dict(named.pop(param.name, {}))
        elif param.kind is param.VAR_POSITIONAL and named.pop(param.name, ()):
            return None  # positional extras we cannot route safely
    return _Call(named, extra, return_dict)


def _wants_fused_loss(self: nn.Module, call: _Call) -> bool:
    if call.named.get("labels") is None:
        return False
    if not hasattr(self, "model") or not hasattr(self, "lm_head"):
        return False
    loss_function = getattr(self, "loss_function", None)
    if getattr(loss_function, "__name__", "ForCausalLMLoss") != "ForCausalLMLoss":
        return False  # a custom loss was set on the model: respect it
    flag = getattr(self, "cpt_fused_loss", None)
    if flag is not None:
        return bool(flag)
    return self.training


def _fused_forward(self: nn.Module, call: _Call, plan: HeadPlan, softcap_attr: str | None) -> Any:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from cpt_plugin.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
    from cpt_plugin.offload.checkpointing import keeping_mlp_products

    named = dict(call.named)
    labels = named.pop("labels")
    logits_to_keep = named.pop("logits_to_keep", 0)
    products = _mlp_products_now(self, _input_tokens(named))
    with keeping_mlp_products(products):
        outputs = self.model(**named, **call.extra)

    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    ignore_index = call.extra.get("ignore_index", -100)
    shift_labels = call.extra.get("shift_labels")
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    hidden, shift_labels = _keep(hidden, shift_labels, logits_to_keep)

    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = shift_labels.reshape(-1).to(flat_hidden.device)
    head_hidden, weight, bias = plan(flat_hidden)
    num_items = call.extra.get("num_items_in_batch")
    if torch.is_tensor(num_items):
        num_items = num_items.to(flat_hidden.device)
    softcap = getattr(self.config, softcap_attr, None) if softcap_attr else None
    loss = fused_linear_cross_entropy(
        head_hidden,
        weight,
        flat_labels,
        bias,
        ignore_index=ignore_index,
        reduction="mean",
        num_items_in_batch=num_items,
        softcap=softcap,
        chunk_bytes=_loss_chunk_bytes(self, head_hidden, weight, products_on=products),
    )

    fields = CausalLMOutputWithPast.__dataclass_fields__
    cache_field = "cache" if "cache" in fields else "past_key_values"
    cache = (
        getattr(outputs, "cache", None)
        if hasattr(outputs, "cache")
        else getattr(outputs, "past_key_values", None)
    )
    result = CausalLMOutputWithPast(
        loss=loss,
        logits=None,
        hidden_states=getattr(outputs, "hidden_states", None),
        attentions=getattr(outputs, "attentions", None),
        **{cache_field: cache},
    )
    return_dict = call.return_dict
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    return result if return_dict else result.to_tuple()


FREE_MEMORY_MARGIN_BYTES = 2**30  # a larger loss chunk only leaves this + 5% of the device free
FREE_MEMORY_MARGIN_FRACTION = 0.05


def _loss_chunk_bytes(
    model: nn.Module, hidden: torch.Tensor, weight: torch.Tensor, products_on: bool = False
) -> int | None:
    """The fused loss' logits-chunk budget: the memory planner's (``cpt_loss_chunk_bytes``), or with
    checkpointing off (``cpt_loss_chunk_from_free_memory``, CUDA) a larger chunk when the device has room
    for it now, at the end of the forward, when every kept activation is alive (fewer, larger chunks are
    faster: fused_linear_cross_entropy.GPU_CHUNK_BYTES). None: the default chunk. A forward that ran
    without kept MLP products (``products_on`` False) also grants the room to the kept layers' graphs and
    the products (``_grant_room_at_the_loss``); they take precedence over the larger chunk from then on."""
    chunk = getattr(model, "cpt_loss_chunk_bytes", None)
    if chunk is not None or not getattr(model, "cpt_loss_chunk_from_free_memory", False):
        return chunk
    if hidden.device.type != "cuda":
        return None
    spare = spare_device_bytes(hidden.device)
    if not products_on and getattr(model, "training", False) and torch.is_grad_enabled():
        from cpt_plugin.kernels.fused_linear_cross_entropy import compute_element_size

        _grant_room_at_the_loss(model, hidden.shape[0], spare, compute_element_size(hidden, weight))
    chunk = chunk_for_spare_memory(hidden, weight, spare)
    if chunk != model.__dict__.get("cpt_loss_chunk_chosen"):
        model.__dict__["cpt_loss_chunk_chosen"] = chunk
        logger.info(
            "cpt-plugin: fused loss logits chunk %s (checkpointing off: chosen from the device's free memory)",
            "default" if chunk is None else f"{chunk // 2**20} MiB",
        )
    return chunk


def _grant_room_at_the_loss(model: nn.Module, tokens: int, spare: float, element_size: int) -> None:
    """Checkpointing off, at the loss of a training forward: the device's room goes to the kept layers'
    CUDA graphs first (they are worth more), then to the MLP products from what is left."""
    spare -= _grant_layer_graphs_if_room(model, tokens, spare, element_size)
    _note_room_for_mlp_products(model, tokens, spare, element_size)


_PRODUCTS_TOKENS = "cpt_mlp_products_tokens"  # the longest micro-batch the device had room for them at


def _input_tokens(named: dict[str, Any]) -> int:
    ids, embeds = named.get("input_ids"), named.get("inputs_embeds")
    if isinstance(ids, torch.Tensor):
        return ids.numel()
    if isinstance(embeds, torch.Tensor) and embeds.dim() >= 2:
        return embeds.numel() // embeds.shape[-1]
    return 0


def _text_config(model: nn.Module) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def products_bytes_from_config(model: nn.Module, tokens: int, element_size: int) -> int:
    """What every decoder layer's fused MLP keeping ``act(gate) * up`` (tokens x intermediate) holds, from
    the config (the planner counts the same per plan: ``planner.mlp_products_bytes``); 0 where the config
    does not say (no ``intermediate_size``)."""
    text = _text_config(model)
    layers, intermediate = getattr(text, "num_hidden_layers", None), getattr(text, "intermediate_size", None)
    if not isinstance(layers, int) or not isinstance(intermediate, int):
        return 0
    return layers * tokens * intermediate * element_size


_LAYER_GRAPHS = "_cpt_managed_layer_graphs"  # (LayerGraphs, layers, trainable bytes per layer) or None


def _managed_layer_graphs(model: nn.Module) -> tuple[Any, int, int] | None:
    """The kept layers' CUDA graphs that wait for room (``cuda_graphs`` unset, checkpointing off), with
    the layer count and the trained bytes of one layer; looked up once."""
    if _LAYER_GRAPHS not in model.__dict__:
        from cpt_plugin.offload.checkpointing import decoder_layers, layer_plan_holder

        holder = layer_plan_holder(model)
        graphs = getattr(holder, "graphs", None)
        found = None
        if graphs is not None and getattr(graphs, "managed", False) and holder.observer is None:
            layers = decoder_layers(model)
            trainable = sum(p.numel() * p.element_size() for p in layers[0].parameters() if p.requires_grad)
            found = (graphs, len(layers), trainable)
        model.__dict__[_LAYER_GRAPHS] = found
    return model.__dict__[_LAYER_GRAPHS]


def _grant_layer_graphs_if_room(model: nn.Module, tokens: int, spare: float, element_size: int) -> float:
    """Checkpointing off: kept layers replay CUDA graphs (their forward waits on the host otherwise) once
    the device has room for the graphs' extra memory at the loss. Returns the bytes granted now (0 when
    nothing was: no room, no managed graphs, or granted before, when ``spare`` already saw them), which
    the MLP products' room is then counted without."""
    managed = _managed_layer_graphs(model)
    if managed is None:
        return 0.0
    graphs, layers, trainable = managed
    if graphs.off_reason is not None or graphs.granted:
        return 0.0
    need = graphs.extra_bytes(layers, tokens, _text_config(model).hidden_size, element_size, trainable)
    if need > spare:
        return 0.0
    graphs.grant(True)
    logger.info(
        "cpt-plugin: checkpointing off, and the device has room: the decoder layers run as CUDA graphs "
        "after two more steps (about %.2g GiB more at %d tokens; set cuda_graphs: false to keep them eager).",
        need / 2**30,
        tokens,
    )
    return need


def _checkpointing_off_in_training(model: nn.Module) -> bool:
    return (
        bool(getattr(model, "cpt_loss_chunk_from_free_memory", False))
        and model.training
        and torch.is_grad_enabled()
    )


def _mlp_products_now(model: nn.Module, tokens: int) -> bool:
    """Checkpointing off: whether this training forward's fused MLPs keep ``act(gate) * up`` for backward
    (one kernel fewer per layer there), which an earlier forward of at least as many tokens found room for."""
    return _checkpointing_off_in_training(model) and 0 < tokens <= model.__dict__.get(_PRODUCTS_TOKENS, 0)


def _note_room_for_mlp_products(model: nn.Module, tokens: int, spare: float, element_size: int) -> None:
    """At the loss, every activation of the forward is alive: if the device has room for the MLP products
    of ``tokens`` tokens beyond that (and beyond the margin, ``spare_device_bytes``), later forwards of up
    to that many tokens keep them (logged once)."""
    need = products_bytes_from_config(model, tokens, element_size)
    if need <= 0 or need > spare or tokens <= model.__dict__.get(_PRODUCTS_TOKENS, 0):
        return
    if _PRODUCTS_TOKENS not in model.__dict__:
        logger.info(
            "cpt-plugin: checkpointing off, and the device has room: the MLPs keep act(gate) * up for "
            "backward from the next step (%.2g GiB at %d tokens, one kernel fewer per layer in backward).",
            need / 2**30,
            tokens,
        )
    model.__dict__[_PRODUCTS_TOKENS] = tokens


def spare_device_bytes(device: torch.device) -> float:
    """Device memory free now (the driver's free plus the allocator's cached blocks) beyond a margin of
    1 GiB + 5% of the device (for fragmentation and the backward that follows)."""
    free, total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free + cached - FREE_MEMORY_MARGIN_BYTES - FREE_MEMORY_MARGIN_FRACTION * total


def chunk_for_spare_memory(hidden: torch.Tensor, weight: torch.Tensor, spare: float) -> int | None:
    """The larger logits-chunk budget whose extra bytes fit ``spare``, or None (the default chunk)."""
    from cpt_plugin.kernels.fused_linear_cross_entropy import compute_element_size, larger_chunk_for

    chunk, _ = larger_chunk_for(hidden.shape[0], weight.shape[0], compute_element_size(hidden, weight), spare)
    return chunk


def _keep(
    hidden: torch.Tensor, labels: torch.Tensor, logits_to_keep: int | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keeps the same positions of hidden states and shifted labels, as ``logits_to_keep`` says."""
    if isinstance(logits_to_keep, int):
        if logits_to_keep == 0:
            return hidden, labels
        index: slice | torch.Tensor = slice(-logits_to_keep, None)
    else:
        index = logits_to_keep
    hidden = hidden[:, index, :]
    if labels.shape[-1] != hidden.shape[1]:
        labels = labels[..., index]
    return hidden, labels


def _unshard_fsdp(head: nn.Module) -> None:
    """FSDP2: all-gathers an LM head that is an FSDP unit of its own.

    accelerate puts lm_head (with the input embeddings when tied) into its own FSDP2 unit, whose
    parameters are all-gathered by that unit's forward pre-hook. The fused loss reads the weight without
    calling the head, so without this the weight would still be a shard (a DTensor). FSDP2 reduce-scatters
    the gradient and reshards the unit at the end of backward, as for any unit left unsharded.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return
    for module in head.modules():
        if isinstance(module, FSDPModule):
            module.unshard()


# ------------------------------------------------------------------------------------------------
# The LM head's effective weight.


def lm_head_plan(head: nn.Module) -> HeadPlan | None:
    """How to feed ``head`` to the fused loss, or None when it is a kind we do not understand."""
    peft_types = _peft_types()
    if peft_types is not None:
        modules_to_save_wrapper, lora_linear, trainable_tokens_wrapper = peft_types
        if isinstance(head, modules_to_save_wrapper):
            return lm_head_plan(_active_copy(head))
        if isinstance(head, lora_linear):
            return _lora_plan(head)
        if trainable_tokens_wrapper is not None and isinstance(head, trainable_tokens_wrapper):
            return _trainable_tokens_plan(head.token_adapter)
    if isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward:
        weight, bias = head.weight, head.bias
        return lambda hidden: (hidden, weight, bias)
    return None


def _peft_types() -> tuple[type, type, type | None] | None:
    try:
        from peft.tuners.lora import Linear as LoraLinear
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:
        return None
    try:
        from peft.utils.other import TrainableTokensWrapper
    except ImportError:  # a PEFT without trainable tokens
        TrainableTokensWrapper = None  # noqa: N806
    return ModulesToSaveWrapper, LoraLinear, TrainableTokensWrapper


def _trainable_tokens_plan(layer: nn.Module) -> HeadPlan | None:
    """PEFT's trainable tokens on lm_head (tied to the input rows, or its own): mirrors
    ``TrainableTokensLayer.forward_adapters``.

    With adapters active the head is ``F.linear(x, W)`` with W the base weight whose selected rows are the
    trained deltas (``get_merged_weights``, no bias), so the fused loss takes that W and autograd reaches
    the deltas through its ``index_copy``; a V x H copy of the weight instead of the tokens x V logits."""
    base = layer.base_layer
    if not isinstance(base, nn.Linear) or type(base).forward is not nn.Linear.forward:
        return None
    if not callable(getattr(layer, "get_merged_weights", None)):
        return None  # a PEFT whose layer we have not read: transformers' loss
    active = list(layer.active_adapters)
    if layer.disable_adapters or not active or layer.merged:
        return lm_head_plan(base)

    def plan(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        check = getattr(layer, "_check_overlapping_tokens", None)
        if callable(check):
            check(active)  # as PEFT's forward: two active adapters may not share a token
        return hidden, layer.get_merged_weights(active), None

    return plan


def _active_copy(wrapper: nn.Module) -> nn.Module:
    """The module a ``ModulesToSaveWrapper`` forwards to right now (mirrors its forward)."""
    active = list(wrapper.active_adapters)
    if wrapper.disable_adapters or not active or any(a not in wrapper.modules_to_save for a in active):
        return wrapper.original_module
    return wrapper.modules_to_save[active[0]]


def _lora_plan(layer: nn.Module) -> HeadPlan | None:
    base = lm_head_plan(layer.get_base_layer())
    if base is None:
        return None
    if layer.disable_adapters or layer.merged:
        return base
    adapters = [a for a in layer.active_adapters if a in layer.lora_A]
    if any(a in getattr(layer, "lora_variant", {}) for a in adapters):
        return None  # DoRA and other variants: use the original path
    if getattr(layer, "use_dora", {}) and any(layer.use_dora.get(a, False) for a in adapters):
        return None

    def plan(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        hidden_out, weight, bias = base(hidden)
        hidden_parts, weight_parts = [hidden_out], [weight]
        for adapter in adapters:
            lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
            scaling = layer.scaling[adapter]
            x = layer.lora_dropout[adapter](hidden.to(lora_a.weight.dtype))
            hidden_parts.append(nn.functional.linear(x, lora_a.weight).to(hidden_out.dtype))
            weight_parts.append((lora_b.weight * scaling).to(weight.dtype))
            if lora_b.bias is not None:
                extra_bias = (lora_b.bias * scaling).to(weight.dtype)
                bias = extra_bias if bias is None else bias + extra_bias
        return torch.cat(hidden_parts, dim=-1), torch.cat(weight_parts, dim=-1), bias

    return plan
