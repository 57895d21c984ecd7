"""What every patcher shares: the report it returns, its protocol, the pluggy hook specs and markers
through which plugins register patchers, and the ledger of originals.

The ledger is the single record of what was replaced, so that ``unpatch`` can put back the exact
original objects (functions, classes, instance classes) whatever was patched in between.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import pluggy
from torch import nn

_MISSING = object()

PROJECT = "cpt_plugin"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class PatcherHookSpecs:
    """Hooks a cpt-plugin plugin may implement."""

    @hookspec(historic=True)
    def cpt_plugin_register_patchers(self, registry: Any) -> None:
        """Register patchers with ``registry.register(model_type, spec_or_patcher)`` (a ``registry.Registry``)."""


@dataclass
class PatchReport:
    """Which kernels went where, and why others were left alone."""

    model_type: str | None
    applied: dict[str, list[str]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def add(self, kernel: str, where: str) -> None:
        self.applied.setdefault(kernel, []).append(where)

    def skip(self, kernel: str, why: str) -> None:
        self.skipped[kernel] = why

    @property
    def kernels(self) -> tuple[str, ...]:
        return tuple(self.applied)

    def __str__(self) -> str:
        parts = [f"{kernel}: {', '.join(places)}" for kernel, places in self.applied.items()]
        parts += [f"{kernel} skipped ({why})" for kernel, why in self.skipped.items()]
        return f"cpt-plugin patch[{self.model_type}] " + ("; ".join(parts) or "nothing applied")


@runtime_checkable
class Patcher(Protocol):
    """A third-party patcher: anything with these two methods can be registered for a model_type.

    ``model`` is None when patching a modeling module before the model is built.
    """

    def patch(self, model: nn.Module | None, kernels: frozenset[str]) -> PatchReport: ...

    def unpatch(self, model: nn.Module | None) -> None: ...


class Ledger:
    """Replaces attributes and instance classes, remembering the first original of each."""

    def __init__(self) -> None:
        self._attrs: dict[tuple[int, str], tuple[Any, str, Any]] = {}
        self._instances: list[tuple[weakref.ref[nn.Module], type]] = []

    def replace(self, owner: Any, name: str, value: Any) -> None:
        """Sets ``owner.name = value``; the value seen before the first replacement is kept."""
        key = (id(owner), name)
        if key not in self._attrs:
            self._attrs[key] = (owner, name, vars(owner).get(name, _MISSING))
        setattr(owner, name, value)

    def original(self, owner: Any, name: str) -> Any:
        """The original value of ``owner.name`` (the current one if it was never replaced)."""
        entry = self._attrs.get((id(owner), name))
        if entry is None or entry[2] is _MISSING:
            return getattr(owner, name)
        return entry[2]

    def swap_class(self, module: nn.Module, new_class: type) -> None:
        if type(module) is new_class:
            return
        self._instances.append((weakref.ref(module), type(module)))
        module.__class__ = new_class

    @property
    def empty(self) -> bool:
        return not self._attrs and not self._instances

    def restore(self) -> None:
        """Puts every original back, newest first, and forgets them."""
        for ref, original_class in reversed(self._instances):
            module = ref()
            if module is not None:
                module.__class__ = original_class
        self._instances.clear()
        for owner, name, value in reversed(list(self._attrs.values())):
            if value is _MISSING:
                if name in vars(owner):
                    delattr(owner, name)
            else:
                setattr(owner, name, value)
        self._attrs.clear()
