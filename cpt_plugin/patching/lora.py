"""Where the fused LoRA compute (kernels/lora.py) plugs into PEFT's LoRA layers.

Only the computation changes: PEFT's module tree, parameter names, adapter files, ``merge_and_unload``,
``disable_adapter`` and saving stay exactly as they are. How:

* ``peft.tuners.lora.Linear.forward`` (and bitsandbytes' ``Linear4bit``) are replaced at class level by a
  forward that takes our path only for layers marked by :func:`enable_fused_lora` and only while the call
  is plain: one active adapter, not merged, adapters enabled, no extra arguments. Everything else (other
  PEFT models in the process, ``disable_adapter()``, mixed-adapter batches) runs PEFT's own forward.
* Layers whose set-up the fused path does not compute (``lora_dropout > 0``, DoRA and other PEFT variants,
  ``lora_bias``, ``fan_in_fan_out`` / Conv1D bases, 8-bit bases, trainable base weights) are left on
  PEFT's path, with one notice per reason: never a silent wrong answer.
* A decoder MLP whose gate, up and down projections are all marked runs as one fused function from the
  family's patched MLP forward (see family.py), with the SwiGLU/GeGLU kernel inside.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from typing import Any

import torch
from torch import nn

from cpt_plugin.kernels.lora import LoraProjection, lora_gated_mlp, lora_grouped_linear, lora_linear
from cpt_plugin.model_parts import is_8bit_linear, is_conv1d
from cpt_plugin.patching.base import Ledger

logger = logging.getLogger(__name__)

_FUSED = "_cpt_fused_lora"
_GROUP = "_cpt_lora_group"
_PROJECTION = "_cpt_lora_projection"  # the LoraProjection last built for the layer (see projection_of)
_LEDGER = Ledger()
# Sibling projections that read the same input, computed together when the first one is called.
GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"),)


class ProjectionGroup:
    """Projections of one module called one after the other on the same input tensor (q, k, v).

    The first call computes all of them in one fused function and keeps the others' outputs until they
    are asked for with that same input object; any other call (another input, a projection not plain
    now) computes on its own, so the group can only save work, never change a result.
    """

    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers = layers
        self._input: torch.Tensor | None = None
        self._pending: list[torch.Tensor | None] = []

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        if index == 0:
            self._input, self._pending = None, []
            projections = [projection_of(layer) for layer in self.layers]
            if any(p is None for p in projections):
                return None
            first, *others = lora_grouped_linear(x, projections)
            self._input, self._pending = x, [None, *others]
            return first
        if self._input is not x or index >= len(self._pending) or self._pending[index] is None:
            return None
        out, self._pending[index] = self._pending[index], None
        if all(t is None for t in self._pending):
            self._input, self._pending = None, []
        return out


def _peft_lora_classes() -> list[type]:
    """PEFT's dense LoRA layer and its bitsandbytes 4-bit variant (when bitsandbytes imports)."""
    from peft.tuners.lora.layer import Linear

    classes: list[type] = [Linear]
    try:
        from peft.tuners.lora import bnb as peft_bnb

        four_bit = getattr(peft_bnb, "Linear4bit", None)
        if isinstance(four_bit, type):
            classes.append(four_bit)
    except Exception:  # noqa: BLE001 - bitsandbytes missing or broken: dense layers only
        pass
    return classes


def _is_4bit(base: nn.Module) -> bool:
    weight = getattr(base, "weight", None)
    return type(weight).__name__ == "Params4bit" and getattr(weight, "quant_state", None) is not None


def unsupported_reason(layer: nn.Module) -> str | None:
    """Why ``layer`` (a PEFT LoRA layer) must keep PEFT's own computation, or None when ours is exact."""
    base = getattr(layer, "base_layer", None)
    if getattr(layer, "fan_in_fan_out", False) or is_conv1d(base):
        return "the base layer stores its weight transposed (fan_in_fan_out / Conv1D)"
    if getattr(layer, "lora_variant", None):
        return "a PEFT LoRA variant (DoRA or another) is set"
    if len(getattr(layer, "lora_A", {})) != 1:
        return "more than one adapter is loaded"
    (name,) = layer.lora_A.keys()
    dropout = layer.lora_dropout[name] if name in layer.lora_dropout else None
    if dropout is not None and not isinstance(dropout, nn.Identity):
        return "lora_dropout > 0 (the fused path computes without dropout)"
    if layer.lora_B[name].bias is not None or layer.lora_A[name].bias is not None:
        return "lora_bias is set"
    if _is_4bit(base):
        return None
    if not isinstance(base, nn.Linear) or is_8bit_linear(base):
        return f"the base layer is {type(base).__name__} (fused path: nn.Linear and 4-bit bitsandbytes)"
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return "the base weight is trained"
    return None


def _dequantizer(base: nn.Module) -> Any:
    """A callable returning a 4-bit base's weight in the requested dtype (once per pass)."""
    from cpt_plugin.quantized import dequantize_4bit  # reads bitsandbytes' CPU-repacked layout too

    weight = base.weight

    def dequantize(dtype: torch.dtype) -> torch.Tensor:
        return dequantize_4bit(weight, dtype)  # straight into dtype: no second pass to cast

    return dequantize


def is_marked_fused(layer: Any) -> bool:
    """Whether ``layer`` is a LoRA layer that :func:`enable_fused_lora` marked for the fused path."""
    return isinstance(layer, nn.Module) and bool(layer.__dict__.get(_FUSED))


def projection_of(layer: nn.Module) -> LoraProjection | None:
    """The tensors of a marked layer for a plain call now, or None when PEFT's forward must run.

    Called for every projection of every forward, so it reads PEFT's state straight from the layer's
    dicts and reuses the projection it built last time while the same tensors and scale are there
    (PEFT's properties and a fresh dataclass cost more host time than the GEMM launch they precede).
    A PEFT without those attributes takes the slow path, which uses only the public properties."""
    state = layer.__dict__
    if not state.get(_FUSED):
        return None
    try:
        if state["_disable_adapters"] or state["merged_adapters"]:
            return None
        active = state["_active_adapter"]
        modules = state["_modules"]
        name = active if isinstance(active, str) else (active[0] if len(active) == 1 else None)
        lora_a_module = modules["lora_A"]._modules.get(name)
        if lora_a_module is None:
            return None
        lora_a = lora_a_module._parameters["weight"]
        lora_b = modules["lora_B"]._modules[name]._parameters["weight"]
        base_params = modules["base_layer"]._parameters
        weight, bias = base_params["weight"], base_params.get("bias")
        scale = state["scaling"][name]
    except (KeyError, TypeError, AttributeError):
        return _projection_from_properties(layer)
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return None  # a base unfrozen after set-up: PEFT's forward gives it its gradient
    cached = state.get(_PROJECTION)
    if (
        cached is not None
        and cached.lora_a is lora_a
        and cached.lora_b is lora_b
        and cached.weight is weight
        and cached.bias is bias
        and cached.scale == scale
    ):
        return cached
    projection = _build_projection(modules["base_layer"], lora_a, lora_b, scale)
    state[_PROJECTION] = projection
    return projection


def _build_projection(base: nn.Module, lora_a: Any, lora_b: Any, scale: float) -> LoraProjection:
    return LoraProjection(
        weight=base.weight,
        bias=base.bias,
        lora_a=lora_a,
        lora_b=lora_b,
        scale=float(scale),
        dequantize=_dequantizer(base) if _is_4bit(base) else None,
    )


def _projection_from_properties(layer: nn.Module) -> LoraProjection | None:
    """projection_of through PEFT's public properties only (no cache)."""
    if layer.disable_adapters or layer.merged:
        return None
    active = layer.active_adapters
    if len(active) != 1 or active[0] not in layer.lora_A:
        return None
    name = active[0]
    base = layer.base_layer
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return None
    return _build_projection(
        layer.base_layer, layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name]
    )


def _make_forward(original: Any) -> Any:
    @functools.wraps(original)
    def forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs:
            return original(self, x, *args, **kwargs)
        grouped = self.__dict__.get(_GROUP)
        if grouped is not None:
            out = grouped[0].output(grouped[1], x)
            if out is not None:
                return out
        projection = projection_of(self)
        if projection is None:
            return original(self, x, *args, **kwargs)
        return lora_linear(x, projection)

    forward.__cpt_patched__ = True  # type: ignore[attr-defined]
    return forward


def _install_class_forwards() -> None:
    for cls in _peft_lora_classes():
        current = cls.__dict__.get("forward")
        if not getattr(current, "__cpt_patched__", False):
            _LEDGER.replace(cls, "forward", _make_forward(current))


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora.layer import LoraLayer

    return [
        (name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer) and hasattr(m, "lora_A")
    ]


def enable_fused_lora(model: nn.Module) -> int:
    """Marks every LoRA layer of ``model`` that the fused path computes exactly; returns how many.

    The others keep PEFT's computation; each distinct reason is logged once, with the layer count.
    """
    _install_class_forwards()
    from peft.tuners.lora.layer import Linear as LoraLinear

    fused, reasons = 0, Counter()
    for _, layer in _lora_layers(model):
        if not isinstance(layer, tuple(_peft_lora_classes())) and not isinstance(layer, LoraLinear):
            reasons[f"{type(layer).__name__} layers have no fused path"] += 1
            continue
        reason = unsupported_reason(layer)
        if reason is None:
            layer.__dict__[_FUSED] = True
            fused += 1
        else:
            layer.__dict__.pop(_FUSED, None)
            reasons[reason] += 1
    _group_siblings(model)
    for reason, count in reasons.items():
        logger.warning("cpt-plugin: %d LoRA layer(s) run PEFT's own (slower) computation: %s.", count, reason)
    if fused:
        logger.info("cpt-plugin: fused LoRA compute on %d layers", fused)
    return fused


def _group_siblings(model: nn.Module) -> int:
    """Links marked q/k/v projections of each attention module into one ProjectionGroup."""
    count = 0
    for module in model.modules():
        for names in GROUPS:
            layers = [module._modules.get(name) for name in names]
            if all(isinstance(layer, nn.Module) and layer.__dict__.get(_FUSED) for layer in layers):
                group = ProjectionGroup(layers)
                for index, layer in enumerate(layers):
                    layer.__dict__[_GROUP] = (group, index)
                count += 1
    return count


def disable_fused_lora(model: nn.Module) -> int:
    """Unmarks every LoRA layer of ``model`` (they run PEFT's forward again); returns how many were marked."""
    count = 0
    for _, layer in _lora_layers(model):
        layer.__dict__.pop(_GROUP, None)
        layer.__dict__.pop(_PROJECTION, None)
        if layer.__dict__.pop(_FUSED, None):
            count += 1
    return count


def unpatch_fused_lora() -> None:
    """Restores PEFT's class-level forwards (layers still marked then simply run PEFT's path)."""
    _LEDGER.restore()


def fused_gated_mlp(
    mlp: nn.Module, x: torch.Tensor, activation: str, *, residual_only: bool = False
) -> torch.Tensor | None:
    """The whole MLP as one fused function when gate, up and down are all marked; else None.

    ``residual_only`` (the family's ``FamilySpec.residual_mlp``): the MLP output only feeds the residual
    add, so a checkpoint recompute may skip the down projection's base matmul.
    """
    projections = []
    for name in ("gate_proj", "up_proj", "down_proj"):
        layer = getattr(mlp, name, None)
        projection = (
            projection_of(layer) if isinstance(layer, nn.Module) and _FUSED in layer.__dict__ else None
        )
        if projection is None:
            return None
        projections.append(projection)
    from cpt_plugin.offload.checkpointing import in_recompute, keeps_mlp_products

    recomputing = in_recompute()
    skip = residual_only and recomputing
    keep = not recomputing and torch.is_grad_enabled() and keeps_mlp_products()
    return lora_gated_mlp(x, *projections, activation=activation, skip_output=skip, keep_product=keep)
