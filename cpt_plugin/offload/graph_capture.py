"""What the CUDA graphs of decoder layers share: where they can run, what makes two calls the same
graph, static copies of a call's inputs, the capture itself (safe after a failure), and the state of a
layer that a replay depends on. Used by ``layer_graphs`` (kept layers) and ``recompute_graphs``
(checkpointed layers' backward)."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch


def graphs_available(model: torch.nn.Module) -> str | None:
    """Why CUDA graphs cannot be used for ``model`` here, or None when they can."""
    from cpt_plugin.offload.planner import distributed_world

    if not torch.cuda.is_available():
        return "no CUDA device"
    if distributed_world() > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "more than one process (DDP/FSDP/DeepSpeed own the gradients' timing)"
    if any(
        os.environ.get(f"ACCELERATE_USE_{name}", "").lower() in ("1", "true")
        for name in ("FSDP", "DEEPSPEED")
    ):
        return "FSDP or DeepSpeed is on"
    if any(type(p).__name__ == "Params4bit" for p in model.parameters()):
        return "the model has bitsandbytes 4-bit layers"
    return None


def call_signature(value: Any) -> Any:
    """What must be equal between calls for a captured graph to compute the same thing."""
    if isinstance(value, torch.Tensor):
        return (
            "tensor",
            tuple(value.shape),
            tuple(value.stride()),
            value.dtype,
            value.device,
            value.requires_grad,
        )
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(call_signature(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, call_signature(v)) for k, v in sorted(value.items())))
    if value is None or isinstance(value, (bool, int, float, str)):
        return ("value", value)
    return ("object", id(value))  # a cache object or the like: graphs only while it is the same one


def static_copy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(static_copy(v) for v in value)
    if isinstance(value, dict):
        return {k: static_copy(v) for k, v in value.items()}
    return value


def copy_into(static: Any, value: Any) -> None:
    """New inputs into a graph's static tensors. Through ``.data``: the capture-time autograd graph saved
    these tensors, and an in-place copy on them would bump their version and fail its backward capture."""
    if isinstance(static, torch.Tensor):
        if static.data_ptr() != value.data_ptr():
            static.data.copy_(value)
    elif isinstance(static, (tuple, list)):
        for s, v in zip(static, value, strict=True):
            copy_into(s, v)
    elif isinstance(static, dict):
        for key, s in static.items():
            copy_into(s, value[key])


@contextlib.contextmanager
def parameters_swapped(
    slots: tuple[tuple[dict, str, torch.nn.Parameter], ...], replacements: dict[int, torch.Tensor]
) -> Any:
    """The layer's parameters with ``id`` in ``replacements`` replaced in their modules, restored after."""
    swapped = [(params, name, param) for params, name, param in slots if id(param) in replacements]
    for params, name, param in swapped:
        params[name] = replacements[id(param)]
    try:
        yield
    finally:
        for params, name, param in swapped:
            params[name] = param


@contextlib.contextmanager
def capture_graph(graph: torch.cuda.CUDAGraph, pool: Any, stream: torch.cuda.Stream) -> Any:
    """``torch.cuda.graph`` in thread-local error mode, which cleans up after a failed capture: torch
    then leaves the allocator routing this thread's allocations into the dead graph's pool and the CUDA
    generator in capture mode (``cudaStreamEndCapture`` raises before either is undone), and every later
    allocation or random op of the run would be wrong."""
    try:
        with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            yield
    except BaseException:
        recover_from_failed_capture(pool)
        raise


def recover_from_failed_capture(pool: Any) -> None:
    end = getattr(torch._C, "_cuda_endAllocateToPool", None)
    if end is not None and pool is not None:
        try:
            end(torch.cuda.current_device(), pool)
        except Exception:  # noqa: BLE001 - already ended: nothing to undo
            pass
    try:  # a trivial capture that ends normally takes the generator through its capture epilogue
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            torch.empty(1, device="cuda").uniform_()
        del graph
    except Exception:  # noqa: BLE001 - best effort; the caller turns graphs off either way
        pass


def parameter_slots(layer: torch.nn.Module) -> tuple[tuple[dict, str, torch.nn.Parameter], ...]:
    return tuple(
        (module._parameters, name, param)
        for module in layer.modules()
        for name, param in module._parameters.items()
        if param is not None
    )


def adapter_state(layer: torch.nn.Module) -> tuple[Any, ...]:
    """What PEFT's forward reads besides tensors (adapters disabled or merged, the active adapter)."""
    state = []
    for module in layer.modules():
        d = module.__dict__
        if "lora_A" in d.get("_modules", {}):
            state.append(
                (
                    d.get("_disable_adapters"),
                    tuple(d.get("merged_adapters", ())),
                    str(d.get("_active_adapter")),
                )
            )
    return tuple(state)


def module_hooks(layer: torch.nn.Module) -> int:
    """How many forward and backward hooks the layer's modules have: a replay would skip their Python."""
    return sum(
        len(m._forward_hooks)
        + len(m._forward_pre_hooks)
        + len(m._backward_hooks)
        + len(m._backward_pre_hooks)
        for m in layer.modules()
    )


class LayerState:
    """A decoder layer's parameters as captured: a replay reads their storage, so it is valid only while
    the same parameter objects, with the same storage and ``requires_grad``, are in the same places."""

    def __init__(self, layer: torch.nn.Module) -> None:
        self.slots = parameter_slots(layer)
        self.flags = tuple(p.requires_grad for _, _, p in self.slots)
        self.pointers = tuple(p.data_ptr() for _, _, p in self.slots)
        self.trainable = tuple(p for _, _, p in self.slots if p.requires_grad)
        self.adapters = adapter_state(layer)
        self.hooks = module_hooks(layer)

    def unchanged(self, layer: torch.nn.Module) -> bool:
        for (params, name, param), flag, pointer in zip(self.slots, self.flags, self.pointers, strict=True):
            if params.get(name) is not param or param.requires_grad != flag or param.data_ptr() != pointer:
                return False
        return adapter_state(layer) == self.adapters and module_hooks(layer) == self.hooks
