"""A model family declared as data (FamilySpec) and the one generic patcher that applies it.

Where each kernel plugs in, and why it is safe:

* RMSNorm: the module-level class is replaced by a subclass whose ``forward`` calls our kernel, so
  new models build it (``isinstance``, ``_init_weights`` and state-dict keys stay the same); built
  models get the instances' ``__class__`` swapped, which keeps their weight and eps.
* MLP: ``XMLP.forward`` is replaced at class level (so built models follow); the new forward calls
  the submodules, so PEFT LoRA layers on gate/up/down keep working, and it falls back to the
  original forward when the config's activation has no kernel.
* RoPE: the module-level ``apply_rotary_pos_emb``; attention looks the name up at call time (also
  when the ``kernels`` package has turned the original into a hub-kernel module object).
* Causal-LM head: ``XForCausalLM.forward`` (see causal_lm.py).

Decoder layers are never touched: transformers 5.24 wraps ``GradientCheckpointingLayer.forward``
when the class is defined, so replacing it would silently turn gradient checkpointing off.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from torch import nn

from cpt_plugin.patching.base import Ledger, PatchReport

logger = logging.getLogger(__name__)

ROPE_PARAMETERS = ("q", "k", "cos", "sin", "unsqueeze_dim")
SWIGLU_ACTIVATIONS: Mapping[str, str] = {"silu": "swiglu", "swish": "swiglu"}
GEGLU_ACTIVATIONS: Mapping[str, str] = {"gelu_pytorch_tanh": "geglu", "gelu_tanh": "geglu"}


@dataclass(frozen=True)
class FamilySpec:
    """Where our kernels plug into one transformers modeling module."""

    name: str
    model_types: tuple[str, ...]
    module: str  # e.g. "transformers.models.llama.modeling_llama"
    rms_norm_class: str | None = None
    rms_norm_cast: str = "llama"  # "llama" | "gemma" (see kernels/rms_norm.py)
    rms_norm_offset: float = 0.0  # Gemma: weight is stored as (scale - 1)
    rms_norm_eps_attr: str = "variance_epsilon"
    mlp_class: str | None = None
    activation_attrs: tuple[str, ...] = ("hidden_act",)  # the MLP config attribute(s) naming the activation
    activation_kernels: Mapping[str, str] = field(default_factory=lambda: dict(SWIGLU_ACTIVATIONS))
    rope_function: str | None = "apply_rotary_pos_emb"
    causal_lm_classes: tuple[str, ...] = ()
    logit_softcap_attr: str | None = None  # config attribute of a final tanh logit soft-cap
    decoder_layer_class: str | None = None  # e.g. "LlamaDecoderLayer"
    # The decoder layer adds the MLP output to the residual and nothing else reads it (no norm after the
    # MLP, unlike Gemma 2/3): a checkpoint recompute may skip what produces it (tiled MLP, fused LoRA MLP).
    residual_mlp: bool = False

    def load_module(self) -> ModuleType:
        return importlib.import_module(self.module)


# ------------------------------------------------------------------------------------------------
# Replacement builders. Each replacement carries ``__cpt_patched__`` so that patching is idempotent.


def make_rms_norm_class(original: type, spec: FamilySpec) -> type:
    """A subclass of the HF RMSNorm whose forward runs our kernel with the family's casting rules."""
    eps_attr, offset, cast_mode = spec.rms_norm_eps_attr, spec.rms_norm_offset, spec.rms_norm_cast

    def forward(self: nn.Module, hidden_states: Any) -> Any:
        from cpt_plugin.kernels.rms_norm import rms_norm

        return rms_norm(
            hidden_states, self.weight, getattr(self, eps_attr), offset=offset, cast_mode=cast_mode
        )

    return type(
        f"CPT{original.__name__}",
        (original,),
        {
            "forward": forward,
            "__module__": __name__,
            "__doc__": f"{original.__name__} running cpt-plugin's RMSNorm kernel ({cast_mode} casting).",
            "__cpt_patched__": True,
            "__cpt_original__": original,
        },
    )


def make_mlp_forward(original_forward: Any, spec: FamilySpec) -> Any:
    """``down(act(gate(x)) * up(x))`` with the fused gated-activation kernel for the config's activation."""
    attrs, kernels = spec.activation_attrs, dict(spec.activation_kernels)

    @functools.wraps(original_forward)
    def forward(self: nn.Module, x: Any, *args: Any, **kwargs: Any) -> Any:
        config = getattr(self, "config", None)
        activation = next((getattr(config, a) for a in attrs if getattr(config, a, None) is not None), None)
        kernel = kernels.get(activation) if isinstance(activation, str) else None
        if kernel is None or args or kwargs:
            return original_forward(self, x, *args, **kwargs)
        from cpt_plugin.patching.lora import fused_gated_mlp

        # LoRA on gate, up and down: one fused function
        fused = fused_gated_mlp(self, x, kernel, residual_only=spec.residual_mlp)
        if fused is not None:
            return fused
        from cpt_plugin.kernels import swiglu as swiglu_module

        gated = getattr(swiglu_module, kernel)(self.gate_proj(x), self.up_proj(x))
        return self.down_proj(gated)

    forward.__cpt_patched__ = True  # type: ignore[attr-defined]
    return forward


def make_rope_function(original: Any) -> Any:
    def apply_rotary_pos_emb(q: Any, k: Any, cos: Any, sin: Any, unsqueeze_dim: int = 1) -> Any:
        """cpt-plugin's RoPE kernel with HF ``apply_rotary_pos_emb`` semantics."""
        from cpt_plugin.kernels.rope import apply_rope

        return apply_rope(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)

    apply_rotary_pos_emb.__cpt_patched__ = True  # type: ignore[attr-defined]
    apply_rotary_pos_emb.__cpt_original__ = original  # type: ignore[attr-defined]
    return apply_rotary_pos_emb


def rope_signature_matches(function: Any) -> bool:
    """True when ``function`` takes (q, k, cos, sin, unsqueeze_dim=1) — not the 4.x position_ids form.

    With the ``kernels`` package installed (transformers 5.16+) the function may be an ``nn.Module``
    made by the hub-kernel decorator: look through ``__wrapped__`` / ``forward`` to the original.
    """
    seen = 0
    while seen < 5:
        seen += 1
        inner = getattr(function, "__wrapped__", None)
        if inner is None and isinstance(function, nn.Module):
            inner = getattr(type(function), "forward", None)
        if inner is None or inner is function:
            break
        function = inner
    try:
        names = [
            p.name
            for p in inspect.signature(function).parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self"
        ]
    except (TypeError, ValueError):
        return False
    return tuple(names) == ROPE_PARAMETERS or (not names and callable(function))


def is_patched(obj: Any) -> bool:
    return bool(getattr(obj, "__cpt_patched__", False))


# ------------------------------------------------------------------------------------------------


class FamilyPatcher:
    """Applies a FamilySpec to its modeling module (and to a built model's modules)."""

    def __init__(self, spec: FamilySpec) -> None:
        self.spec = spec
        self.ledger = Ledger()
        self._rms_norm_class: type | None = None

    def __repr__(self) -> str:
        return f"FamilyPatcher({self.spec.name!r}, module={self.spec.module!r})"

    # -- public protocol ------------------------------------------------------------------------
    def patch(self, model: nn.Module | None, kernels: frozenset[str]) -> PatchReport:
        report = PatchReport(model_type=self.spec.name)
        try:
            module = self.spec.load_module()
        except ImportError as error:  # transformers too old for this family
            for kernel in kernels:
                report.skip(kernel, f"cannot import {self.spec.module}: {error}")
            return report
        if "rms_norm" in kernels:
            self._patch_rms_norm(module, model, report)
        if "swiglu" in kernels:
            self._patch_mlp(module, model, report)
        if "rope" in kernels:
            self._patch_rope(module, report)
        if "fused_linear_cross_entropy" in kernels:
            self._patch_causal_lm(module, model, report)
        return report

    def unpatch(self, model: nn.Module | None = None) -> None:
        """Restores every original of this family (module level and swapped instances)."""
        self.ledger.restore()
        self._rms_norm_class = None

    # -- kernels -----------------------------------------------------------------------------
    def _patch_rms_norm(self, module: ModuleType, model: nn.Module | None, report: PatchReport) -> None:
        name = self.spec.rms_norm_class
        if name is None or not hasattr(module, name):
            report.skip("rms_norm", f"{self.spec.module} has no {name}")
            return
        original = self.ledger.original(module, name)
        if is_patched(original):  # patched by someone else's ledger earlier: use its original
            original = original.__cpt_original__
        if self._rms_norm_class is None:
            self._rms_norm_class = make_rms_norm_class(original, self.spec)
        self.ledger.replace(module, name, self._rms_norm_class)
        report.add("rms_norm", f"{module.__name__}.{name}")
        if model is not None:
            swapped = 0
            for sub in model.modules():
                if type(sub) is original:
                    self.ledger.swap_class(sub, self._rms_norm_class)
                    swapped += 1
            if swapped:
                report.add("rms_norm", f"{swapped} {name} instances")

    def _patch_mlp(self, module: ModuleType, model: nn.Module | None, report: PatchReport) -> None:
        name = self.spec.mlp_class
        cls = getattr(module, name, None) if name else None
        if cls is None:
            report.skip("swiglu", f"{self.spec.module} has no {name}")
            return
        if model is not None:
            activation = self._activation(model)
            if activation not in self.spec.activation_kernels:
                report.skip("swiglu", f"activation {activation!r} has no fused kernel; MLP left alone")
                return
        current = cls.__dict__.get("forward")
        if not is_patched(current):
            self.ledger.replace(cls, "forward", make_mlp_forward(cls.forward, self.spec))
        report.add("swiglu", f"{name}.forward")

    def _patch_rope(self, module: ModuleType, report: PatchReport) -> None:
        name = self.spec.rope_function
        current = getattr(module, name, None) if name else None
        if current is None:
            report.skip("rope", f"{self.spec.module} has no {name}")
            return
        if not is_patched(current):
            if not rope_signature_matches(current):
                report.skip("rope", f"{name} has an unexpected signature; left alone")
                return
            self.ledger.replace(module, name, make_rope_function(current))
        report.add("rope", f"{module.__name__}.{name}")

    def _patch_causal_lm(self, module: ModuleType, model: nn.Module | None, report: PatchReport) -> None:
        from cpt_plugin.patching.causal_lm import make_causal_lm_forward

        for name in self.spec.causal_lm_classes:
            cls = getattr(module, name, None)
            if cls is None:
                continue
            current = cls.__dict__.get("forward")
            if not is_patched(current):
                self.ledger.replace(
                    cls, "forward", make_causal_lm_forward(cls.forward, self.spec.logit_softcap_attr)
                )
            report.add("fused_linear_cross_entropy", f"{name}.forward")
        if "fused_linear_cross_entropy" not in report.applied:
            report.skip("fused_linear_cross_entropy", f"no causal-LM class of {self.spec.name} found")
        elif model is not None and not any(
            isinstance(model, getattr(module, n, ())) for n in self.spec.causal_lm_classes
        ):
            report.skip(
                "fused_linear_cross_entropy", f"{type(model).__name__} is not a patched causal-LM class"
            )

    def _activation(self, model: nn.Module) -> str | None:
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "get_text_config"):
            config = config.get_text_config()
        return next(
            (getattr(config, a) for a in self.spec.activation_attrs if getattr(config, a, None)), None
        )
