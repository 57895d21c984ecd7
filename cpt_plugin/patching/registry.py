"""The patcher registry: model_type -> patcher, pluggy hooks, entry points, and patch()/unpatch().

Builtin families register directly; third-party packages add theirs through the entry-point group
``cpt_plugin.patchers`` with a pluggy hookimpl::

    from cpt_plugin.patching.registry import hookimpl  # defined in patching/base.py

    @hookimpl
    def cpt_plugin_register_patchers(registry):
        registry.register("my_model", FamilySpec(...))   # or any object with patch()/unpatch()

Patching never breaks training: an unknown ``model_type`` warns once and changes nothing, and a
third-party plugin that fails to load is reported and skipped.
"""

from __future__ import annotations

import importlib.metadata
import logging
import warnings
from typing import Any

import pluggy
from torch import nn

from cpt_plugin.config import KERNEL_NAMES
from cpt_plugin.patching.base import PROJECT, Patcher, PatcherHookSpecs, PatchReport, hookimpl, hookspec
from cpt_plugin.patching.family import FamilyPatcher, FamilySpec

__all__ = ["Registry", "get_registry", "hookimpl", "hookspec", "patch", "unpatch", "warn_if_no_patcher"]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "cpt_plugin.patchers"
BUILTIN_PLUGIN = "cpt_plugin.patching.families"


class Registry:
    """Maps ``model_type`` to the patcher that knows its modeling module."""

    def __init__(self) -> None:
        self._patchers: dict[str, Patcher] = {}
        self._by_spec: dict[int, FamilyPatcher] = {}
        self._warned: set[str] = set()
        self._patch_order: list[Patcher] = []  # so that unpatch() undoes nested patches newest first
        self.plugin_manager = pluggy.PluginManager(PROJECT)
        self.plugin_manager.add_hookspecs(PatcherHookSpecs)
        self.plugin_manager.hook.cpt_plugin_register_patchers.call_historic(kwargs={"registry": self})

    # -- registration ----------------------------------------------------------------------------
    def register(self, model_type: str, patcher: Patcher | FamilySpec, *, replace: bool = False) -> None:
        if isinstance(patcher, FamilySpec):
            patcher = self._by_spec.setdefault(id(patcher), FamilyPatcher(patcher))
        if not isinstance(patcher, Patcher):
            raise TypeError(f"a patcher needs patch(model, kernels) and unpatch(model); got {patcher!r}")
        existing = self._patchers.get(model_type)
        if existing is not None and existing is not patcher and not replace:
            warnings.warn(
                f"cpt-plugin: a patcher for model_type {model_type!r} is already registered ({existing!r}); "
                f"keeping it and ignoring {patcher!r}. Pass replace=True to override.",
                stacklevel=2,
            )
            return
        self._patchers[model_type] = patcher

    def add_plugin(self, plugin: Any, name: str | None = None) -> None:
        """Registers a pluggy plugin object; its ``cpt_plugin_register_patchers`` runs at once."""
        if self.plugin_manager.is_registered(plugin):
            return
        self.plugin_manager.register(plugin, name=name)

    def load_entry_points(self) -> None:
        """Loads third-party plugins from the ``cpt_plugin.patchers`` group (the builtin one is skipped)."""
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if (
                entry_point.value == BUILTIN_PLUGIN
                or self.plugin_manager.get_plugin(entry_point.name) is not None
            ):
                continue
            try:
                self.add_plugin(entry_point.load(), name=entry_point.name)
            except Exception as error:  # noqa: BLE001 - a broken plugin must not break training
                warnings.warn(
                    f"cpt-plugin: could not load patcher plugin {entry_point.name!r} ({entry_point.value}): {error}",
                    stacklevel=2,
                )

    # -- lookup ----------------------------------------------------------------------------------
    def get(self, model_type: str) -> Patcher | None:
        return self._patchers.get(model_type)

    def model_types(self) -> tuple[str, ...]:
        return tuple(sorted(self._patchers))

    def __contains__(self, model_type: object) -> bool:
        return model_type in self._patchers

    def patchers(self) -> list[Patcher]:
        unique: list[Patcher] = []
        for patcher in self._patchers.values():
            if all(patcher is not p for p in unique):
                unique.append(patcher)
        return unique

    def note_patched(self, patcher: Patcher) -> None:
        if all(patcher is not p for p in self._patch_order):
            self._patch_order.append(patcher)

    def unpatch_all(self) -> None:
        """Every patcher's unpatch, the most recently first-patched first."""
        patched = list(reversed(self._patch_order))
        for patcher in patched + [p for p in self.patchers() if all(p is not q for q in patched)]:
            patcher.unpatch(None)
        self._patch_order.clear()

    def residual_mlp_layers(self) -> frozenset[str]:
        """Class names of the decoder layers whose family declares ``FamilySpec.residual_mlp``."""
        return frozenset(
            patcher.spec.decoder_layer_class
            for patcher in self.patchers()
            if isinstance(patcher, FamilyPatcher)
            and patcher.spec.residual_mlp
            and patcher.spec.decoder_layer_class
        )

    def warn_unknown(self, model_type: str | None) -> None:
        key = str(model_type)
        if key in self._warned:
            return
        self._warned.add(key)
        warnings.warn(
            f"cpt-plugin: no kernels for this architecture: there is no kernel patcher for model_type "
            f"{model_type!r}, so it trains unpatched (plain PyTorch). Kernels exist for: "
            f"{', '.join(self.model_types())}.",
            UserWarning,
            stacklevel=3,
        )


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, with the builtin families and the entry-point plugins loaded."""
    global _REGISTRY
    if _REGISTRY is None:
        import cpt_plugin.patching.families as builtin

        registry = Registry()
        registry.add_plugin(builtin, name="builtin")
        registry.load_entry_points()
        _REGISTRY = registry
    return _REGISTRY


# ------------------------------------------------------------------------------------------------
# Public API


def patch(target: str | nn.Module, config: Any = None, **kernel_switches: bool) -> PatchReport:
    """Swaps cpt-plugin's kernels into a model family (before ``from_pretrained``) or a built model.

    ``target`` is a ``model_type`` string ("llama", "gemma2", ...) or a built ``PreTrainedModel``
    (a ``PeftModel`` wrapping one works too). ``config`` (a ``CPTConfig``) chooses the kernels through
    ``enabled_kernels()``; without it all are applied. ``kernel_switches`` (``rope=False``...) override.
    Patching twice is a no-op; ``unpatch`` restores the originals.
    """
    # fused_lora is installed on PEFT's layers once they exist (core.setup_model), not into model classes
    kernels = _resolve_kernels(config, kernel_switches) - {"fused_lora"}
    registry = get_registry()
    model = None if isinstance(target, str) else _base_model(target)
    model_type = target if isinstance(target, str) else _model_type(model)
    patcher = registry.get(model_type) if model_type else None
    if patcher is None:
        registry.warn_unknown(model_type)
        report = PatchReport(model_type=model_type)
        for kernel in kernels:
            report.skip(kernel, "unsupported model_type")
        return report
    registry.note_patched(patcher)
    report = patcher.patch(model, kernels)
    logger.info("%s", report)
    return report


def warn_if_no_patcher(target: nn.Module) -> bool:
    """The one "no kernels for this architecture" warning, also where no kernel is switched on (CPU),
    so a user learns it before moving to a GPU. True when the model's type has no patcher."""
    registry = get_registry()
    model_type = _model_type(_base_model(target))
    if model_type and registry.get(model_type) is not None:
        return False
    registry.warn_unknown(model_type)
    return True


def mlp_feeds_residual_only(layer: nn.Module) -> bool:
    """True when ``layer`` is a decoder layer whose MLP output only feeds the residual add (its family's
    ``FamilySpec.residual_mlp``), so a checkpoint recompute may skip computing it."""
    return type(layer).__name__ in get_registry().residual_mlp_layers()


def unpatch(target: str | nn.Module | None = None) -> None:
    """Restores the originals: of every family (no target), of one model_type, or of a model's family."""
    registry = get_registry()
    if target is None:
        registry.unpatch_all()
        from cpt_plugin.patching.lora import unpatch_fused_lora

        unpatch_fused_lora()
        return
    model = None if isinstance(target, str) else _base_model(target)
    model_type = target if isinstance(target, str) else _model_type(model)
    patcher = registry.get(model_type) if model_type else None
    if patcher is not None:
        patcher.unpatch(model)


def _resolve_kernels(config: Any, switches: dict[str, bool]) -> frozenset[str]:
    unknown = set(switches) - set(KERNEL_NAMES)
    if unknown:
        raise TypeError(f"unknown kernel switch(es) {sorted(unknown)}; valid: {', '.join(KERNEL_NAMES)}")
    chosen = set(KERNEL_NAMES if config is None else config.enabled_kernels())
    for name, on in switches.items():
        (chosen.add if on else chosen.discard)(name)
    return frozenset(chosen)


def _base_model(target: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (or the model itself)."""
    get_base = getattr(target, "get_base_model", None)
    if callable(get_base):
        try:
            return get_base()
        except Exception:  # noqa: BLE001 - not a PeftModel after all
            pass
    return target


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)
