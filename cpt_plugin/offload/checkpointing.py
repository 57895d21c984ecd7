"""Gradient checkpointing that can keep each decoder layer's input in pinned host memory.

Why: with checkpointing, what stays on the GPU between forward and backward is one hidden state per
decoder layer (``layers x tokens x hidden``), which dominates at long context. In "offload" mode that
input is copied to pinned CPU memory on a side CUDA stream while the layer computes, the GPU copy is
freed as soon as the transfer is done, and in backward the input of layer ``i - 1`` is copied back while
layer ``i`` is recomputed, so the copies hide behind compute. An input of ``LATE_FETCH_BYTES`` or more
(long context) is copied back only once layer ``i``'s backward peak has passed (``peak_passed``, or the
end of that backward): its copy is then a small part of a layer's time, and that peak does not hold it
(one hidden state per token less).

How it plugs in: transformers routes every way of enabling checkpointing (``gradient_checkpointing_enable``,
``activation_checkpointing_enable``, the Trainer, PEFT) through ``PreTrainedModel._set_gradient_checkpointing``
(5.17 and 5.24). We wrap that method on the model instances so that our checkpoint function is the one
installed on every checkpointed layer, now and whenever checkpointing is enabled again later.

The recompute: in a single process, :class:`_LayerCheckpoint` runs the layer's forward without an autograd
graph and, in backward, recomputes it once (autocast and, for layers with dropout, the RNG state restored)
and backpropagates through it; a zero-size leaf that requires grad lets a layer whose input needs no
gradient (frozen embeddings) still reach its parameters. Under torch.distributed, or when another tensor
bound to the call needs a gradient, it is ``torch.utils.checkpoint`` (non-reentrant), as before; there the
offloaded input is handed over through a small handle instead of as a tensor argument, so that
checkpoint's closure does not keep it on the GPU.

Per-layer modes (what the memory planner, ``planner.py``, drives): each decoder layer can instead get its
own mode, read at every call from a shared :class:`LayerPlan`:

- ``keep``: no checkpoint, the layer's plain forward; autograd keeps its activations (fastest).
- ``recompute``: the layer input is kept, the layer is run again in backward (+1 forward of the layer).
- ``offload``: as recompute, but the input waits in host memory (the copies hide behind compute).

A :class:`PlannedLayerFunction` is installed on every decoder layer (``enable_layer_plan``); it knows
only its layer's index and the plan object, so changing the plan between steps is an assignment, not a
re-installation. Nothing is assumed about what runs inside a layer (kernels, fused LoRA functions): a
kept layer runs exactly what the model runs without checkpointing, and the checkpointed ones go through
the same ``CheckpointFunction`` path as the uniform modes, so gradients do not depend on the plan. An
optional observer (the planner) is told when a layer starts and ends, which is how it learns the shape
and measures per-layer memory; the uniform modes ``recompute`` and ``offload`` do not use any of this.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import threading
import types
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.utils.checkpoint import checkpoint

from cpt_plugin.model_parts import input_embeddings

logger = logging.getLogger(__name__)

MODES = ("off", "recompute", "offload")
LATE_FETCH_BYTES = 256 * 2**20  # 32,768 tokens of a 4096-wide bf16 hidden state, 65,536 of a 2048-wide
LAYER_MODES = ("keep", "recompute", "offload")  # per decoder layer, in the planner's order of cost
_WARNED_NO_CUDA = False


# ----------------------------------------------------------------------------------------------
# Host buffer pool
# ----------------------------------------------------------------------------------------------
class HostBufferPool:
    """Reuses (pinned) host buffers across steps so that host memory stays flat.

    Buffers are flat byte tensors, keyed by device (a buffer is only reused on the stream that last used
    it, so stream order alone protects it). A request takes the smallest free buffer that fits; when none
    fits, free buffers that are too small (left over from other shapes) are dropped before a new one is
    allocated, so the pool holds roughly the peak number of buffers in flight.
    """

    def __init__(self) -> None:
        self._free: dict[Any, list[torch.Tensor]] = {}
        self._lock = threading.Lock()
        self.count = 0  # buffers owned by the pool (free or lent out)
        self.bytes = 0
        self.allocations = 0  # total allocations so far (grows only when the pool grows)

    def get(self, nbytes: int, key: Any, pin: bool) -> torch.Tensor:
        with self._lock:
            free = self._free.setdefault(key, [])
            best = -1
            for i, buf in enumerate(free):
                if buf.numel() >= nbytes and (best < 0 or buf.numel() < free[best].numel()):
                    best = i
            if best >= 0:
                return free.pop(best)
            for buf in [b for b in free if b.numel() < nbytes]:
                free.remove(buf)
                self.count -= 1
                self.bytes -= buf.numel()
            self.count += 1
            self.bytes += nbytes
            self.allocations += 1
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)

    def put(self, buf: torch.Tensor, key: Any) -> None:
        with self._lock:
            self._free.setdefault(key, []).append(buf)

    def clear(self) -> None:
        """Frees every buffer not lent out."""
        with self._lock:
            for free in self._free.values():
                for buf in free:
                    self.count -= 1
                    self.bytes -= buf.numel()
            self._free.clear()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"count": self.count, "bytes": self.bytes, "allocations": self.allocations}

    def has_free(self, nbytes: int, key: Any) -> bool:
        """A free buffer of at least ``nbytes`` is there for ``key`` (a request would not allocate)."""
        with self._lock:
            return any(buf.numel() >= nbytes for buf in self._free.get(key, ()))


POOL = HostBufferPool()
# Host memory that optional parking (attention_replay) leaves free for the OS, data loading and checkpoints.
HOST_RESERVE_BYTES = 4 * 2**30


def host_memory_available() -> float | None:
    """Bytes of host memory the kernel reports available (Linux ``MemAvailable``), or None elsewhere."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def offload_pool_stats() -> dict[str, int]:
    """Buffers and bytes held by the host buffer pool (for tests and memory logging)."""
    return POOL.stats()


# ----------------------------------------------------------------------------------------------
# Offloading one layer input
# ----------------------------------------------------------------------------------------------
class _Engine:
    """Per-process state: one side stream per CUDA device and the link to the last offloaded input."""

    def __init__(self) -> None:
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._anchors: dict[torch.device, torch.Tensor] = {}
        self.last: weakref.ref[_OffloadedInput] | None = None
        # a large input of the layer below, to fetch once the running layer's backward peak has passed
        # (weak: an input whose graph is gone, after an error in backward, is never fetched)
        self.waiting: weakref.ref[_OffloadedInput] | None = None

    def fetch_waiting(self) -> None:
        ref, self.waiting = self.waiting, None
        waiting = ref() if ref is not None else None
        if waiting is not None and not waiting._taken:
            waiting.start_fetch()

    def stream(self, device: torch.device) -> torch.cuda.Stream:
        index = device.index if device.index is not None else torch.cuda.current_device()
        stream = self._streams.get(index)
        if stream is None:
            stream = self._streams[index] = torch.cuda.Stream(device=index)
        return stream

    def anchor(self, device: torch.device) -> torch.Tensor:
        """An empty tensor on the layer's device: lets checkpoint see the device whose RNG it must keep."""
        tensor = self._anchors.get(device)
        if tensor is None:
            tensor = self._anchors[device] = torch.empty(0, device=device)
        return tensor


_ENGINE = _Engine()


class _OffloadedInput:
    """A layer input parked in host memory between the layer's forward and its recompute."""

    __slots__ = (
        "_x",
        "_host",
        "_buf",
        "_key",
        "_gpu",
        "_ready",
        "_prev",
        "_simulate",
        "shape",
        "dtype",
        "device",
        "fetches",
        "_taken",
        "_requires_grad",
        "extras",
        "__weakref__",
    )

    def __init__(self, x: torch.Tensor, simulate: bool, link: bool = True) -> None:
        self._x: torch.Tensor | None = x
        self._simulate = simulate
        self.shape, self.dtype, self.device = x.shape, x.dtype, x.device
        self._requires_grad = x.requires_grad  # the recompute must save what the forward saved
        self._gpu: torch.Tensor | None = None
        self._ready: torch.cuda.Event | None = None
        self.fetches = 0
        self._taken = False
        self.extras: list[_OffloadedInput] = []  # parked with this input, fetched with it (LayerStash)
        nbytes = x.numel() * x.element_size()
        self._key = ("host", None) if simulate else ("cuda", x.device.index)
        self._buf = POOL.get(nbytes, self._key, pin=not simulate)
        self._host = self._buf[:nbytes].view(x.dtype).view(x.shape)
        source = x.detach()  # a copy, not a graph edge: the host buffer must not join the autograd graph
        if simulate:
            self._host.copy_(source)
        else:
            compute = torch.cuda.current_stream(x.device)
            side = _ENGINE.stream(x.device)
            side.wait_stream(compute)  # x is complete in stream order; the copy overlaps the layer
            with torch.cuda.stream(side):
                self._host.copy_(source, non_blocking=True)
            x.record_stream(side)  # its memory is reused only after the copy, not before
        self._prev = None
        if link:  # a layer input: the chain along which inputs are prefetched in backward
            last = _ENGINE.last() if _ENGINE.last is not None else None
            self._prev = weakref.ref(last) if last is not None else None
            _ENGINE.last = weakref.ref(self)

    def __del__(self) -> None:
        buf = getattr(self, "_buf", None)
        if buf is not None:
            self._buf = None
            POOL.put(buf, self._key)

    def forward_done(self) -> None:
        self._x = None

    def get(self) -> torch.Tensor:
        if self._x is not None:  # the forward itself
            return self._x
        return self._take()

    def start_fetch(self) -> None:
        """Starts copying the input back to the device (no-op when already fetched), and its extras."""
        for extra in self.extras:
            extra.start_fetch()
        if self._gpu is not None or self._buf is None:
            return
        self.fetches += 1
        if self._simulate:
            self._gpu = self._host.clone()
            return
        compute = torch.cuda.current_stream(self.device)
        side = _ENGINE.stream(self.device)
        gpu = torch.empty(self.shape, dtype=self.dtype, device=self.device)  # a compute-stream block
        side.wait_stream(compute)  # the block may still be in use by queued compute work
        with torch.cuda.stream(side):
            gpu.copy_(self._host, non_blocking=True)
            self._ready = side.record_event()
        self._gpu = gpu

    def _take(self) -> torch.Tensor:
        self.start_fetch()
        prev = self._prev() if self._prev is not None else None
        if prev is not None and not prev._taken and prev._x is None:
            if prev._host.numel() * prev._host.element_size() < LATE_FETCH_BYTES:
                prev.start_fetch()  # layer i - 1's input travels while layer i recomputes
            else:
                _ENGINE.waiting = weakref.ref(prev)  # travels once layer i's backward peak has passed
        if self._ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self._ready)
        gpu, self._gpu, self._ready = self._gpu, None, None
        self._taken = True
        return gpu.requires_grad_(self._requires_grad)


# ----------------------------------------------------------------------------------------------
# Knowing whether a layer runs for the first time or is being recomputed
# ----------------------------------------------------------------------------------------------
_STATE = threading.local()


def peak_passed() -> None:
    """Called by a part of a decoder layer whose backward holds the layer's largest working set (the
    grouped or replayed attention: ``head_groups.py``, ``attention_replay.py``) when that backward is
    done: a large input of the layer below, which waits so as not to add to that peak, starts travelling
    now and hides behind the rest of the layer's backward. Without such a call it travels when the
    layer's backward ends."""
    _ENGINE.fetch_waiting()


def in_recompute() -> bool:
    """True while a layer checkpointed by our function is being recomputed during backward.

    Lets parts of the layer skip work whose result the recompute throws away (see ``tiled_mlp``).
    Thread-local: the recompute runs on the autograd engine's thread, inside this module's call.
    """
    return getattr(_STATE, "recomputing", False)


class LayerStash:
    """What parts of an offloaded layer keep from its forward for its recompute (``attention_replay``):
    ``items`` in call order, and tensors parked in host memory beside the layer input, which travel back
    with it. ``replaying`` is False in the forward (items are added), True in the recompute (taken)."""

    def __init__(self, layer_input: _OffloadedInput) -> None:
        self.items: list[Any] = []
        self.replaying = False
        self._input = layer_input
        self._next = 0
        self._when_forward_done: list[Callable[[], Any]] = []

    def on_forward_done(self, callback: Callable[[], Any]) -> None:
        """``callback()`` once the layer's forward has returned (to free what only the forward used)."""
        self._when_forward_done.append(callback)

    def forward_done(self) -> None:
        callbacks, self._when_forward_done = self._when_forward_done, []
        for callback in callbacks:
            callback()

    def has_room(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more can be parked without crowding the host: a free pooled buffer fits
        them, or the host has that much available beyond ``HOST_RESERVE_BYTES``. Parking is optional
        (what is not parked is recomputed), so a full host never ends the run."""
        if POOL.has_free(nbytes, self._input._key):
            return True
        available = host_memory_available()
        return available is None or available >= nbytes + HOST_RESERVE_BYTES

    def park(self, tensor: torch.Tensor) -> _OffloadedInput:
        """``tensor`` copied to host memory now; back on the device when the layer input is fetched."""
        handle = _OffloadedInput(tensor, simulate=self._input._simulate, link=False)
        handle.forward_done()
        self._input.extras.append(handle)
        return handle

    def take(self) -> Any:
        """The next item kept by the forward, or None when the recompute has asked for more."""
        if self._next >= len(self.items):
            return None
        item, self.items[self._next] = self.items[self._next], None
        self._next += 1
        return item


def current_stash() -> LayerStash | None:
    """The stash of the offloaded layer call that is running (its forward or its lean recompute)."""
    return getattr(_STATE, "stash", None)


@contextlib.contextmanager
def _thread_state(name: str, value: Any) -> Iterator[None]:
    """Sets this thread's ``_STATE.<name>`` for the block (the layer call running on this thread)."""
    previous = getattr(_STATE, name, None)
    setattr(_STATE, name, value)
    try:
        yield
    finally:
        setattr(_STATE, name, previous)


def keeps_mlp_products() -> bool:
    """True while a layer runs whose fused MLP may keep ``act(gate) * up`` from its forward for its backward
    (kernels/lora.py ``keep_product``): a kept layer of a plan with room for it (planner.py), or a model
    without checkpointing on a device with room (patching/causal_lm.py). Thread-local, like the rest."""
    return bool(getattr(_STATE, "mlp_products", False))


@contextlib.contextmanager
def keeping_mlp_products(keep: bool) -> Iterator[None]:
    """The layers called in this block on this thread keep (or do not keep) their fused MLP products."""
    with _thread_state("mlp_products", keep):
        yield


def in_lean_recompute() -> bool:
    """True while :class:`_LayerCheckpoint` recomputes a layer (not torch's checkpoint, whose recompute
    must save the same tensors as the forward did: a part that changes what it saves checks this)."""
    return bool(getattr(_STATE, "lean", False)) and in_recompute()


@contextlib.contextmanager
def as_lean_recompute() -> Iterator[None]:
    """This thread inside a lean recompute with no stash, for a capture of one (recompute_graphs.py): the
    layer computes what an eager recompute computes (the same skips), and attention is computed, not
    replayed."""
    with _thread_state("recomputing", True), _thread_state("lean", True), _thread_state("stash", None):
        yield


@contextlib.contextmanager
def as_checkpointed_forward() -> Iterator[None]:
    """This thread inside a checkpointed layer's first forward with no stash, for a capture of one
    (recompute_graphs.py): the layer computes what its eager forward computes and parks nothing."""
    with _thread_state("recomputing", False), _thread_state("lean", False), _thread_state("stash", None):
        yield


class _Region:
    """One checkpointed call: its first run is the forward, every later run a recompute."""

    __slots__ = ("runs",)

    def __init__(self) -> None:
        self.runs = 0


def _run_region(region: _Region, function: Callable, *args: Any) -> Any:
    previous = in_recompute()
    _STATE.recomputing = region.runs > 0
    region.runs += 1
    try:
        return function(*args)
    finally:
        _STATE.recomputing = previous


def _run_with_handle(
    region: _Region, function: Callable, handle: _OffloadedInput, _anchor: torch.Tensor, *args: Any
) -> Any:
    return _run_region(region, function, handle.get(), *args)


# ----------------------------------------------------------------------------------------------
# The layer checkpoint: forward without a graph, backward recomputes and backpropagates through it
# ----------------------------------------------------------------------------------------------
def layer_of(function: Callable) -> torch.nn.Module | None:
    """The decoder layer behind the partial transformers checkpoints: ``partial(super().__call__,
    **kwargs)`` (transformers 5.17) or ``partial(forward, self, **kwargs)`` (5.24), if it is one."""
    owner = getattr(getattr(function, "func", function), "__self__", None)
    if isinstance(owner, torch.nn.Module):
        return owner
    args = getattr(function, "args", ())
    return args[0] if args and isinstance(args[0], torch.nn.Module) else None


def _needs_grad(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.requires_grad
    if isinstance(value, (tuple, list)):
        return any(_needs_grad(v) for v in value)
    if isinstance(value, dict):
        return any(_needs_grad(v) for v in value.values())
    return False


def _closure_needs_grad(function: Callable, rest: tuple) -> bool:
    """Whether a tensor other than the layer input (a keyword bound by transformers, or a later positional
    argument) needs a gradient: the lean checkpoint gives one only to the input and the parameters."""
    return (
        _needs_grad(rest)
        or _needs_grad(getattr(function, "args", ()))
        or _needs_grad(getattr(function, "keywords", None) or {})
    )


_RNG_ATTRS = ("attention_dropout", "dropout", "hidden_dropout", "dropout_rate")


def _uses_rng(layer: torch.nn.Module | None) -> bool:
    """Whether the layer can draw random numbers in training (a dropout with p > 0); unknown layers do.

    Cached on the layer, keyed by its training flag (dropout is off in eval)."""
    if layer is None:
        return True
    cached = layer.__dict__.get("_cpt_uses_rng")
    if cached is not None and cached[0] == layer.training:
        return cached[1]
    uses = False
    for module in layer.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0 and module.training:
            uses = True
        for attr in _RNG_ATTRS:
            value = module.__dict__.get(attr)
            if (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and value > 0
                and layer.training
            ):
                uses = True
    layer.__dict__["_cpt_uses_rng"] = (layer.training, uses)
    return uses


def _has_trainable(layer: torch.nn.Module | None) -> bool:
    return layer is None or any(p.requires_grad for p in layer.parameters())


_GRAD_ANCHORS: dict[torch.device, torch.Tensor] = {}


def _grad_anchor(device: torch.device) -> torch.Tensor:
    """A zero-size leaf that requires grad: makes a layer's output require grad when its input does not
    (layer 0 with frozen embeddings), so that backward reaches the layer's trainable parameters."""
    tensor = _GRAD_ANCHORS.get(device)
    if tensor is None:
        tensor = _GRAD_ANCHORS[device] = torch.empty(0, device=device, requires_grad=True)
    return tensor


def _autocast_state(device_type: str) -> list[tuple[str, torch.dtype, bool]]:
    """(device type, dtype, cache) of every autocast that is on, to re-enter them in the recompute."""
    state = []
    for kind in dict.fromkeys((device_type, "cpu")):
        if torch.is_autocast_enabled(kind):
            state.append((kind, torch.get_autocast_dtype(kind), torch.is_autocast_cache_enabled()))
    return state


def _measurable(x: torch.Tensor) -> bool:
    return x.is_cuda  # device memory is counted by torch's allocator on CUDA only


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device)


# ----------------------------------------------------------------------------------------------
# One tokens x hidden buffer fewer at a checkpointed layer's backward peak
# ----------------------------------------------------------------------------------------------
_STORAGE_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)


def _python_refs(items: list, index: int) -> int:
    return sys.getrefcount(items[index])


def _storage_refs(tensor: torch.Tensor) -> int:
    """Tensors on ``tensor``'s memory, plus one (the storage object made here)."""
    return _STORAGE_USE_COUNT(tensor.untyped_storage()._cdata)


# Python references a tensor held only by a list has, seen from _python_refs (interpreter-dependent).
_LIST_ONLY_REFS = _python_refs([torch.empty(0)], 0)


def _release_recomputed_outputs(roots: list) -> None:
    """Frees the memory of recomputed layer outputs before their backward runs (one tokens x hidden
    buffer at the layer's backward peak). Nothing reads them: the recompute's output is thrown away and
    backward needs only its shape. Freed only when that is certain: the residual add made it (its
    backward saves no tensor) and nothing else (a forward hook that kept it, a view) refers to it."""
    if _STORAGE_USE_COUNT is None:
        return
    for index in range(len(roots)):
        output = roots[index]
        exclusive = _python_refs(roots, index) <= _LIST_ONLY_REFS + 1  # + the name ``output``
        if exclusive and type(output.grad_fn).__name__ == "AddBackward0" and _storage_refs(output) <= 2:
            output.untyped_storage().resize_(0)
        del output


class _LayerCheckpoint(torch.autograd.Function):
    """Checkpoints one decoder layer call: forward without an autograd graph, keeping (or parking in host
    memory) only the layer input; backward recomputes the layer with a graph and backpropagates through it.

    Why not ``torch.utils.checkpoint``'s non-reentrant mode: it runs a pack hook for every tensor the layer
    saves (about 45 per decoder layer) in forward, an unpack hook and a second pack hook per tensor in the
    recompute, plus a metadata check, all in Python. On an H200 a Llama-1B CPT step with offloading waited
    on the host, not the GPU, in backward (131 ms host of 132 ms wall); this function has no per-tensor work.
    The price is the reentrant contract: the gradient reaches the input and the layer's parameters (the
    caller checks that nothing else bound to the call needs one) and ``torch.autograd.grad`` is refused.
    """

    @staticmethod
    def forward(ctx, function, offload, simulate, preserve_rng, on_recompute, graphs, anchor, x, *rest):
        ctx.function, ctx.rest, ctx.region, ctx.rest_count = function, rest, _Region(), len(rest)
        ctx.on_recompute = on_recompute
        ctx.x_requires_grad = x.requires_grad
        ctx.autocast = _autocast_state(x.device.type)
        ctx.rng = None
        if preserve_rng:
            devices = [x.device] if x.is_cuda else []
            ctx.rng = (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices], devices)
        ctx.parked = ctx.stash = None
        if offload:
            ctx.parked = _OffloadedInput(x, simulate=simulate)
            ctx.stash = LayerStash(ctx.parked)
        else:
            ctx.save_for_backward(x)
        # recompute_graphs.py: the forward replayed from the layer's graph, with how its backward runs
        replayed = (
            graphs.replay_forward(layer_of(function), function, x, rest, ctx.autocast, ctx.rng is not None)
            if graphs is not None
            else None
        )
        try:
            if replayed is not None:
                ctx.region.runs += 1  # the forward ran: the next run is the recompute
                out, ctx.graphed = replayed
            else:
                with _thread_state("stash", ctx.stash):
                    out = _run_region(ctx.region, function, x, *rest)
        finally:
            if ctx.parked is not None:
                ctx.parked.forward_done()
                ctx.stash.forward_done()
        if replayed is None:
            ctx.graphed = None
            if graphs is not None:  # how this call's backward runs; its graphs captured when due
                parked = len(ctx.stash.items) if ctx.stash is not None else 0
                ctx.graphed = graphs.prepare(
                    layer_of(function), function, x, rest, out, ctx.autocast, parked, ctx.rng is not None
                )
        return out

    @staticmethod
    def backward(ctx, *grads):
        check = getattr(torch.autograd, "_is_checkpoint_valid", None)
        if check is not None and not check():
            raise RuntimeError(
                "cpt-plugin's checkpointing supports loss.backward(), not torch.autograd.grad() or "
                "backward(inputs=...); use gradient_checkpointing: off for that."
            )
        parked, ctx.parked = ctx.parked, None
        if parked is not None:
            x = parked.get()
        else:
            (x,) = ctx.saved_tensors
        graphed, ctx.graphed = ctx.graphed, None
        if graphed is not None and graphed.replays and len(grads) == 1 and grads[0] is not None:
            grad_x = graphed.run(x, grads[0])
            del x, graphed
            _ENGINE.fetch_waiting()
            ctx.function = ctx.rest = ctx.on_recompute = ctx.stash = None
            return (None, None, None, None, None, None, None, grad_x if ctx.x_requires_grad else None)
        x = x.detach().requires_grad_(ctx.x_requires_grad)
        measure = ctx.on_recompute is not None and _measurable(x)
        before = _allocated(x.device) if measure else 0
        with contextlib.ExitStack() as stack:
            if ctx.rng is not None:
                cpu_state, device_states, devices = ctx.rng
                stack.enter_context(torch.random.fork_rng(devices=devices, enabled=True))
                torch.set_rng_state(cpu_state)
                for device, state in zip(devices, device_states, strict=True):
                    torch.cuda.set_rng_state(state, device)
            for kind, dtype, cache in ctx.autocast:
                stack.enter_context(torch.autocast(kind, dtype=dtype, cache_enabled=cache))
            stash, ctx.stash = ctx.stash, None
            if stash is not None:
                stash.replaying = True
            with torch.enable_grad(), _thread_state("lean", True), _thread_state("stash", stash):
                out = _run_region(ctx.region, ctx.function, x, *ctx.rest)
            del stash  # what the recompute did not take goes now
        if measure:  # what the layer holds for its backward: the planner's estimate of keeping it
            ctx.on_recompute(_allocated(x.device) - before)
        outs = out if isinstance(out, tuple) else (out,)
        del out
        chosen = [
            i
            for i, (o, g) in enumerate(zip(outs, grads, strict=False))
            if isinstance(o, torch.Tensor) and o.requires_grad and g is not None
        ]
        roots, seeds = [outs[i] for i in chosen], [grads[i] for i in chosen]
        del outs  # from here on ``roots`` holds this frame's only references to the outputs
        _release_recomputed_outputs(roots)
        if roots:
            torch.autograd.backward(roots, seeds)
        del roots, seeds
        _ENGINE.fetch_waiting()  # if nothing in the layer said so earlier
        ctx.function = ctx.rest = ctx.on_recompute = None
        if graphed is not None and not graphed.replays:
            graphed.eager_done()  # one more eager backward of this signature before the capture
        grad_x = x.grad if ctx.x_requires_grad else None
        return (None, None, None, None, None, None, None, grad_x, *([None] * ctx.rest_count))


def _distributed() -> bool:
    """DDP's reducer marks a parameter ready twice when its gradient arrives inside a nested backward
    (tested with 2 gloo ranks), so distributed runs keep torch's non-reentrant checkpoint."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _checkpointed(
    function: Callable,
    args: tuple,
    kwargs: dict[str, Any],
    offload: bool,
    simulate_offload: bool,
    on_recompute: Callable[[int], Any] | None = None,
    graphs: Any = None,
) -> Any:
    """``function(*args)`` checkpointed, the first argument offloaded if asked.

    The lean :class:`_LayerCheckpoint` when the call fits its contract (the first argument is the only
    input that needs a gradient, no extra checkpoint options, one process); ``torch.utils.checkpoint``'s
    non-reentrant mode otherwise."""
    if not torch.is_grad_enabled():  # nothing to save without backward
        return function(*args)
    kwargs.pop("use_reentrant", None)
    preserve = kwargs.pop("preserve_rng_state", True)
    x = args[0] if args else None
    offload = (
        offload and isinstance(x, torch.Tensor) and x.is_floating_point() and (x.is_cuda or simulate_offload)
    )
    lean = isinstance(x, torch.Tensor) and not kwargs and not _distributed()
    if lean and not _closure_needs_grad(function, args[1:]):
        layer = layer_of(function)
        if x.requires_grad or _has_trainable(layer):
            anchor = _grad_anchor(x.device)
            rng = preserve and _uses_rng(layer)
            return _LayerCheckpoint.apply(
                function, offload, not x.is_cuda, rng, on_recompute, graphs, anchor, x, *args[1:]
            )
    kwargs["preserve_rng_state"] = preserve
    if not offload:
        return checkpoint(_run_region, _Region(), function, *args, use_reentrant=False, **kwargs)
    handle = _OffloadedInput(x, simulate=not x.is_cuda)
    try:
        return checkpoint(
            _run_with_handle,
            _Region(),
            function,
            handle,
            _ENGINE.anchor(x.device),
            *args[1:],
            use_reentrant=False,
            **kwargs,
        )
    finally:
        handle.forward_done()


class CheckpointFunction:
    """The function installed as ``_gradient_checkpointing_func`` on checkpointed layers.

    Small and free of device state (the streams and the pool are per process), so models carrying it
    can still be deep-copied or pickled.
    """

    def __init__(self, offload: bool, simulate_offload: bool = False) -> None:
        self.offload = offload
        self.simulate_offload = simulate_offload  # tests: "offload" into plain host memory on CPU
        self.graphs: Any = None  # recompute_graphs.RecomputeGraphs: the layers' backward as CUDA graphs

    def __call__(self, function: Callable, *args: Any, **kwargs: Any) -> Any:
        return _checkpointed(function, args, kwargs, self.offload, self.simulate_offload, graphs=self.graphs)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "graphs": None}  # a copy captures its own graphs (or none)

    def __repr__(self) -> str:
        return f"CheckpointFunction(offload={self.offload})"


# ----------------------------------------------------------------------------------------------
# Per-layer modes
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerPlan:
    """One mode per decoder layer (``LAYER_MODES``) and whether its MLP runs tiled."""

    modes: tuple[str, ...]
    tiled: tuple[bool, ...]

    def __post_init__(self) -> None:
        if len(self.modes) != len(self.tiled):
            raise ValueError(f"LayerPlan: {len(self.modes)} modes but {len(self.tiled)} tiling flags")
        for mode in self.modes:
            if mode not in LAYER_MODES:
                raise ValueError(f"LayerPlan: layer mode must be one of {LAYER_MODES}, got {mode!r}")

    @classmethod
    def uniform(cls, layers: int, mode: str, tiled: bool = False) -> LayerPlan:
        return cls((mode,) * layers, (tiled,) * layers)

    def counts(self) -> dict[str, int]:
        """Layers per mode, and how many run their MLP tiled."""
        out = {mode: self.modes.count(mode) for mode in LAYER_MODES}
        out["tiled"] = sum(self.tiled)
        return out

    def describe(self) -> str:
        c = self.counts()
        return f"keep {c['keep']}, recompute {c['recompute']}, offload {c['offload']}, tiled MLP {c['tiled']}"


class LayerObserver(Protocol):
    """Told when a planned layer starts and ends its (grad-enabled) forward; may change the plan at index 0."""

    def layer_start(self, index: int, x: Any) -> None: ...

    def layer_end(self, index: int) -> None: ...

    # Optional: ``layer_recomputed(index, nbytes)``, the device memory a checkpointed layer's recompute
    # left allocated (what keeping that layer would hold), told during backward on CUDA.


class PlanHolder:
    """The plan shared by every layer's function, plus who observes the layers (the planner, or nobody)."""

    def __init__(
        self, plan: LayerPlan, observer: LayerObserver | None = None, simulate_offload: bool = False
    ) -> None:
        self.plan = plan
        self.observer = observer
        self.simulate_offload = simulate_offload  # tests: "offload" into plain host memory on CPU
        self.graphs: Any = None  # layer_graphs.LayerGraphs: kept layers replayed as CUDA graphs
        self.recompute_graphs: Any = None  # recompute_graphs.RecomputeGraphs: checkpointed layers' backward
        # kept layers' fused MLPs keep act(gate) * up for backward (the planner's choice); None: as the
        # caller's thread says (``keeps_mlp_products``), for a holder without a planner
        self.mlp_products: bool | None = None


class PlannedLayerFunction:
    """``_gradient_checkpointing_func`` of decoder layer ``index``: runs it in the plan's mode for it."""

    def __init__(self, holder: PlanHolder, index: int) -> None:
        self.holder = holder
        self.index = index

    def __call__(self, function: Callable, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return function(*args)
        holder = self.holder
        observer = holder.observer
        if observer is not None:
            observer.layer_start(self.index, args[0] if args else None)  # may change holder.plan
        mode = holder.plan.modes[self.index]
        if mode == "keep":
            products = holder.mlp_products
            if products is None:
                products = keeps_mlp_products()
            graphs = holder.graphs
            with _thread_state("mlp_products", products and not holder.plan.tiled[self.index]):
                out = None
                if graphs is not None:
                    if graphs.plan_seen is not holder.plan:  # a new plan: graphs of the old one are freed
                        graphs.reset()
                        graphs.plan_seen = holder.plan
                    out = graphs.run(self.index, function, args)
                if out is None:
                    out = function(*args)
        else:
            on_recompute = getattr(observer, "layer_recomputed", None)
            if on_recompute is not None:
                on_recompute = functools.partial(on_recompute, self.index)
            graphs = holder.recompute_graphs
            if graphs is not None and graphs.plan_seen is not holder.plan:
                # a new plan: a layer's mode or MLP tiling may have changed under its graphs
                graphs.reset()
                graphs.plan_seen = holder.plan
            out = _checkpointed(
                function,
                args,
                kwargs,
                mode == "offload",
                holder.simulate_offload,
                on_recompute,
                graphs,
            )
        if observer is not None:
            observer.layer_end(self.index)
        return out

    def __repr__(self) -> str:
        return f"PlannedLayerFunction(layer {self.index}: {self.holder.plan.modes[self.index]})"


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated, checkpointable blocks of ``model`` in order (transformers' GradientCheckpointingLayer)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


class _LayerPlanInstaller:
    """Stored as ``_cpt_checkpoint_func`` in planned mode: (re)installs one function per decoder layer."""

    def __init__(self, holder: PlanHolder) -> None:
        self.holder = holder

    def install(self, model: torch.nn.Module) -> None:
        for index, layer in enumerate(decoder_layers(model)):
            layer._gradient_checkpointing_func = PlannedLayerFunction(self.holder, index)
            layer.gradient_checkpointing = True  # every layer: the plan says which ones really checkpoint


# ----------------------------------------------------------------------------------------------
# Installation on a model
# ----------------------------------------------------------------------------------------------
def _set_gradient_checkpointing_wrapper(
    self: torch.nn.Module,
    enable: bool = True,
    gradient_checkpointing_func: Callable | None = None,
    **kwargs: Any,
) -> Any:
    """Instance replacement of ``_set_gradient_checkpointing``: enabling installs our function instead."""
    ours = self.__dict__.get("_cpt_checkpoint_func")
    planned = enable and isinstance(ours, _LayerPlanInstaller)
    if enable and ours is not None:
        gradient_checkpointing_func = checkpoint if planned else ours
    if gradient_checkpointing_func is None:
        gradient_checkpointing_func = checkpoint
    original = type(self)._set_gradient_checkpointing.__get__(self)
    result = original(enable=enable, gradient_checkpointing_func=gradient_checkpointing_func, **kwargs)
    if planned:
        ours.install(self)
    return result


def _enable_input_require_grads_wrapper(self: torch.nn.Module) -> None:
    """Instance replacement of ``enable_input_require_grads`` while our checkpointing is installed.

    transformers (and PEFT) make the input embeddings' output require grad whenever checkpointing is
    enabled, because torch's reentrant checkpointing loses the parameter gradients of a layer whose input
    does not. Ours does not need it (torch's non-reentrant mode, or our layer checkpoint with its grad
    anchor), and the hook costs memory: the embedding output
    becomes an autograd leaf that the graph keeps on the GPU for the whole step (hidden x 2 bytes per
    token, defeating the offload of layer 0's input), plus its gradient at the end of backward.
    """
    _drop_input_require_grads(self)


# The hooks transformers' ``enable_input_require_grads`` (5.17, 5.24) and PEFT's
# ``prepare_model_for_kbit_training`` register on the input embeddings.
_INPUT_GRAD_HOOK_NAMES = frozenset({"make_inputs_require_grads", "make_inputs_require_grad"})


def _drop_input_require_grads(model: torch.nn.Module) -> None:
    """Removes every input-require-grads hook from ``model``'s input embeddings.

    By function name, not by the handles transformers keeps: each ``enable_input_require_grads`` call
    overwrites the handle(s) of the previous one, so after two calls (PEFT's k-bit preparation, then the
    Trainer enabling checkpointing) ``disable_input_require_grads`` would leave a hook behind.
    """
    embeddings = input_embeddings(model)
    if not isinstance(embeddings, torch.nn.Module):
        return
    for hook_id, hook in list(embeddings._forward_hooks.items()):
        if getattr(hook, "__name__", "") in _INPUT_GRAD_HOOK_NAMES:
            del embeddings._forward_hooks[hook_id]
            embeddings._forward_hooks_with_kwargs.pop(hook_id, None)
            embeddings._forward_hooks_always_called.pop(hook_id, None)
    for attr in ("_require_grads_hooks", "_require_grads_hook"):
        model.__dict__.pop(attr, None)


def _pretrained_models(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every transformers model inside ``model`` (a PeftModel holds one; composite models hold several)."""
    from transformers import PreTrainedModel

    return [m for m in model.modules() if isinstance(m, PreTrainedModel)]


def _resolve_mode(mode: str, simulate_offload: bool) -> str:
    global _WARNED_NO_CUDA
    if mode not in MODES:
        raise ValueError(f"gradient checkpointing mode must be one of {MODES}, got {mode!r}")
    if mode == "offload" and not simulate_offload and not torch.cuda.is_available():
        if not _WARNED_NO_CUDA:
            _WARNED_NO_CUDA = True
            logger.warning(
                "cpt-plugin: no CUDA device, so checkpoint offloading falls back to plain recompute."
            )
        return "recompute"
    return mode


def enable_checkpointing(
    model: torch.nn.Module, mode: str = "recompute", *, _simulate_offload: bool = False
) -> str:
    """Turns gradient checkpointing on (``recompute`` / ``offload``) or off for ``model``; returns the mode used.

    Works on a transformers model or a PeftModel around one. The choice survives later calls of
    ``gradient_checkpointing_enable`` / ``activation_checkpointing_enable`` (e.g. by the Trainer), which
    then install our function instead of transformers' default. ``off`` removes our wrapper and turns
    checkpointing off. ``_simulate_offload`` (tests only) runs the offload path on CPU tensors.
    """
    mode = _resolve_mode(mode, _simulate_offload)
    if mode == "off":
        for m in _reset_models(model):
            if getattr(m, "supports_gradient_checkpointing", False):
                m._set_gradient_checkpointing(enable=False)
        return mode
    _install(model, CheckpointFunction(offload=mode == "offload", simulate_offload=_simulate_offload))
    return mode


def enable_layer_plan(
    model: torch.nn.Module,
    plan: LayerPlan | None = None,
    observer: LayerObserver | None = None,
    *,
    _simulate_offload: bool = False,
) -> PlanHolder:
    """Per-layer checkpointing: each decoder layer runs in its own mode of ``plan`` (default: all keep).

    Returns the :class:`PlanHolder` shared by the layers: assign ``holder.plan`` between steps to change
    the modes. Like :func:`enable_checkpointing`, it survives later ``gradient_checkpointing_enable`` calls.
    Without CUDA (and without ``_simulate_offload``) ``offload`` layers run as ``recompute``.
    """
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no decoder layers that support checkpointing.")
    if plan is None:
        plan = LayerPlan.uniform(len(layers), "keep")
    if len(plan.modes) != len(layers):
        raise ValueError(f"the plan covers {len(plan.modes)} layers, the model has {len(layers)}")
    holder = PlanHolder(plan, observer, simulate_offload=_simulate_offload)
    _install(model, _LayerPlanInstaller(holder))
    return holder


def layer_plan_holder(model: torch.nn.Module) -> PlanHolder | None:
    """The PlanHolder installed by :func:`enable_layer_plan` on ``model``, or None."""
    for m in _pretrained_models(model):
        ours = m.__dict__.get("_cpt_checkpoint_func")
        if isinstance(ours, _LayerPlanInstaller):
            return ours.holder
    return None


def checkpoint_function(model: torch.nn.Module) -> CheckpointFunction | None:
    """The CheckpointFunction installed by :func:`enable_checkpointing` on ``model``, or None."""
    for m in _pretrained_models(model):
        ours = m.__dict__.get("_cpt_checkpoint_func")
        if isinstance(ours, CheckpointFunction):
            return ours
    return None


def _reset_models(model: torch.nn.Module) -> list[torch.nn.Module]:
    models = _pretrained_models(model)
    if not models:
        raise ValueError(f"{type(model).__name__} holds no transformers PreTrainedModel to checkpoint.")
    for m in models:
        m.__dict__.pop("_set_gradient_checkpointing", None)
        m.__dict__.pop("enable_input_require_grads", None)
        m.__dict__.pop("_cpt_checkpoint_func", None)
    return models


def _install(model: torch.nn.Module, func: CheckpointFunction | _LayerPlanInstaller) -> None:
    models = _reset_models(model)
    for m in models:
        m.__dict__["_cpt_checkpoint_func"] = func
        m.__dict__["_set_gradient_checkpointing"] = types.MethodType(_set_gradient_checkpointing_wrapper, m)
        m.__dict__["enable_input_require_grads"] = types.MethodType(_enable_input_require_grads_wrapper, m)
        _drop_input_require_grads(m)
    root = models[0]  # modules() yields the outermost first: it reaches every layer
    if not getattr(root, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(root).__name__} does not support gradient checkpointing.")
    root._set_gradient_checkpointing(enable=True)


def checkpointing_mode(model: torch.nn.Module) -> str:
    """The mode our function gives the model's checkpointed layers ("off" when none is installed).

    "planned" when each layer follows a :class:`LayerPlan` (see :func:`enable_layer_plan`).
    """
    for module in model.modules():
        func = module.__dict__.get("_gradient_checkpointing_func")
        if isinstance(func, PlannedLayerFunction) and getattr(module, "gradient_checkpointing", False):
            return "planned"
        if isinstance(func, CheckpointFunction) and getattr(module, "gradient_checkpointing", False):
            return "offload" if func.offload else "recompute"
    return "off"
