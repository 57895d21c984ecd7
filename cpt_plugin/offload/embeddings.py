"""PEFT's frozen embedding originals kept off the GPU while the trained copies are in use.

Why: training input embeddings and lm_head through ``modules_to_save`` makes PEFT keep the frozen
original next to the trainable copy (``ModulesToSaveWrapper.original_module``). With adapters active the
original is never used, yet it costs ``vocab x hidden`` of GPU memory per module (about 0.5 GiB at
Llama-1B size, 2+ GiB for 256K-vocab models). We move its weights to (pinned) CPU memory and bring them
back on demand:

* ``with model.disable_adapter():`` -- the wrapper calls the original; a pre-hook on it restores the weights
  to the device of its input first. The next forward with adapters active moves them off again.
* ``merge_and_unload()`` / ``unload()`` -- the wrapper's unload method is wrapped to restore first.
* saving -- adapter checkpoints do not contain the originals; a full ``state_dict`` simply has them on CPU.
* a later ``model.to(device)`` (e.g. by the Trainer) moves them back; the next forward moves them off again.

Tied embeddings (embed_tokens and lm_head sharing one weight) are moved once, and stay shared: we move a
parameter by swapping its ``.data``, so every module that holds the Parameter sees the move.
Nothing is pickled or written to disk.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

_WANTED = "_cpt_offload_wanted"
_HOOKED = "_cpt_offload_hooks"
_HOME = "_cpt_home_device"
_HOST_PTR = "_cpt_host_ptr"
_SIBLINGS = "_cpt_offload_siblings"  # kept in __dict__, so the wrappers are not registered as submodules


def _wrappers(model: nn.Module) -> list[nn.Module]:
    from peft.utils.other import ModulesToSaveWrapper

    return [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]


def _frozen_params(wrapper: nn.Module) -> list[nn.Parameter]:
    original = wrapper.original_module
    return [p for p in original.parameters() if not p.requires_grad] if original is not None else []


def _is_offloaded(param: nn.Parameter) -> bool:
    return getattr(param, _HOST_PTR, None) == param.data_ptr()


def _offload_param(param: nn.Parameter, storage: torch.device) -> int:
    if _is_offloaded(param):
        return 0
    setattr(param, _HOME, param.device)
    host = param.data.to(storage, copy=True)
    if param.is_cuda and storage.type == "cpu":
        host = host.pin_memory()  # restoring is then a fast copy
    param.data = host
    setattr(param, _HOST_PTR, param.data_ptr())
    return param.numel() * param.element_size()


def _restore_param(param: nn.Parameter, device: torch.device | None = None) -> int:
    if not _is_offloaded(param):
        return 0
    target = device if device is not None else getattr(param, _HOME)
    param.data = param.data.to(target, copy=True)
    setattr(param, _HOST_PTR, None)
    return param.numel() * param.element_size()


def _adapters_active(wrapper: nn.Module) -> bool:
    if wrapper.disable_adapters or not wrapper.active_adapters:
        return False
    return all(name in wrapper.modules_to_save for name in wrapper.active_adapters)


def _before_original(module: nn.Module, args: tuple[Any, ...]) -> None:
    """Pre-hook on the frozen original: it is about to be used, so its weights must be on the device."""
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    for param in module.parameters():
        if _is_offloaded(param):
            _restore_param(param, device)


def _before_wrapper(wrapper: nn.Module, args: tuple[Any, ...]) -> None:
    """Pre-hook on a wrapper: with adapters active the originals are idle, so keep them off the device;
    with adapters disabled bring them to the input's device.

    It looks after every wrapper of the model (its siblings), not only itself: a fused loss reads the
    lm_head's weight without calling the lm_head wrapper, but the input-embedding wrapper runs every step.
    """
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    for sibling in wrapper.__dict__.get(_SIBLINGS, [wrapper]):
        storage = sibling.__dict__.get(_WANTED)
        if storage is None:
            continue
        for param in _frozen_params(sibling):
            if _adapters_active(sibling):
                _offload_param(param, storage)
            elif device is not None:
                _restore_param(param, device)


def _unload_restoring(self: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
    for param in _frozen_params(self):
        _restore_param(param)
    self.__dict__.pop(_WANTED, None)
    return type(self).unload_and_optionally_merge_module(self, *args, **kwargs)


def _original_last(wrapper: nn.Module) -> None:
    """Registers the original after the trained copies. ``PreTrainedModel.device`` is the first
    parameter's device, and transformers moves generation inputs there (as do scripts with
    ``.to(model.device)``): with the input embeddings' original first and in host memory, that was the CPU,
    and ``generate()`` failed on a GPU model. The trained parameters' order is unchanged (the original is
    frozen), so optimizer states and checkpoints line up as before."""
    modules = wrapper._modules
    if "original_module" in modules and len(modules) > 1:
        modules["original_module"] = modules.pop("original_module")


def _install_hooks(wrapper: nn.Module) -> None:
    if wrapper.__dict__.get(_HOOKED):
        return
    handles = [
        wrapper.original_module.register_forward_pre_hook(_before_original),
        wrapper.register_forward_pre_hook(_before_wrapper),
    ]
    wrapper.__dict__["unload_and_optionally_merge_module"] = types.MethodType(_unload_restoring, wrapper)
    wrapper.__dict__[_HOOKED] = handles


def offload_frozen_embeddings(peft_model: nn.Module, storage_device: str | torch.device = "cpu") -> int:
    """Moves the frozen originals of PEFT's ``modules_to_save`` wrappers to ``storage_device``.

    Returns the bytes moved (tied weights counted once). Safe to call again; a no-op without wrappers.
    """
    storage = torch.device(storage_device)
    moved = 0
    wrappers = [w for w in _wrappers(peft_model) if w.original_module is not None]
    for wrapper in wrappers:
        _install_hooks(wrapper)
        _original_last(wrapper)
        wrapper.__dict__[_SIBLINGS] = wrappers
        wrapper.__dict__[_WANTED] = storage
        if _adapters_active(wrapper):
            for param in _frozen_params(wrapper):
                moved += _offload_param(param, storage)
    return moved


def restore_frozen_embeddings(peft_model: nn.Module, device: str | torch.device | None = None) -> int:
    """Brings the frozen originals back (to where they were, or ``device``) and stops offloading them."""
    target = torch.device(device) if device is not None else None
    restored = 0
    for wrapper in _wrappers(peft_model):
        wrapper.__dict__.pop(_WANTED, None)
        wrapper.__dict__.pop(_SIBLINGS, None)
        for handle in wrapper.__dict__.pop(_HOOKED, None) or []:
            handle.remove()
        wrapper.__dict__.pop("unload_and_optionally_merge_module", None)
        for param in _frozen_params(wrapper):
            restored += _restore_param(param, target)
    return restored


def offloaded_bytes(peft_model: nn.Module) -> int:
    """Bytes of frozen originals currently held off the device (tied weights counted once)."""
    seen: dict[int, int] = {}
    for wrapper in _wrappers(peft_model):
        for param in _frozen_params(wrapper):
            if _is_offloaded(param):
                seen[id(param)] = param.numel() * param.element_size()
    return sum(seen.values())
