"""A checkpointed decoder layer's backward (its recompute and the backprop through it) and its forward
(without an autograd graph, as the checkpoint runs it) replayed as CUDA graphs: the same kernels,
without the host's time per launch.

Why: on the H200 at Llama-1B shapes (4 x 2048) an offloaded step is bound by the host, not the GPU
(``benchmarks/profile_step.py``, docs/BENCHMARKS.md, 2026-12-02): 166 ms of host time per step against
125 ms of GPU work, and the backward, which recomputes every layer and then backpropagates through it,
spends 96 ms of host time for 97 ms of wall. The step makes 2,357 kernel launches (about 150 per layer),
each 20-65 µs of Python and dispatch. A graph replays a layer's recompute and backward in one launch.

How: ``_LayerCheckpoint`` (checkpointing.py) asks :meth:`RecomputeGraphs.prepare` in its forward, after
the graph-free forward has run. A layer is run eagerly until ``WARMUP_BACKWARDS`` of its backwards have
run with one input signature (shapes, dtypes, the keywords transformers binds, autocast), so lazy set-up
(cuBLAS handles, Triton compilation and autotuning, one-time GEMM probes) happens outside any capture.
At the next forward, the layer's recompute (in recompute mode: the same skips as the eager one) and
``torch.autograd.grad`` of its output with respect to its input and trainable parameters are captured
together as one graph, after one eager pass on the capture stream. In backward the offloaded input and
the output gradient are copied into the graph's static tensors, the graph replays, and the parameters'
gradients are added to ``.grad`` (or become it, as fresh tensors) as ``AccumulateGrad`` would. Right
after, the layer's forward is captured too (no autograd graph, nothing parked, its output copied into a
static tensor); from the next forward on, the checkpoint's forward copies the input in, replays it and
hands out a copy of the output (:meth:`RecomputeGraphs.replay_forward`). Why the forward too: with only
the backward graphed, the forward still spends about 2.5 ms of host time per layer (Python, PEFT's module
calls, about 40 launches), more than its GPU time at Llama-1B shapes, and the device waits for it.

Memory: every activation of the recompute is made and freed inside the graph, so the graphs of all
layers share one pool whose size is one layer's recompute and backward (what an eager backward holds at
its peak), not sixteen; the static tensors (input, output gradient, input gradient, the parameters'
gradients) are shared by the layers of one signature. The pool stays reserved between steps: the
forward and the loss cannot use it (``peak_reserved`` shows it; ``memory_allocated`` does not). What the
captures add to the reserved memory is kept as ``pool_bytes`` (and per token). With ``auto`` and
``cuda_graphs: true`` the planner counts the pool: its own estimate, raised by this reading where larger
(a capture that reuses cached memory reads 0).

Never a silent wrong answer: a layer with dropout, a forward that parked its attention for a replay
(``attention_replay``), another signature than the captured one, parameters with gradient hooks,
forward or backward hooks on the layer's modules (a replay would skip their Python), and parameters
replaced, moved, unfrozen or adapters switched after the capture run eagerly (the last two drop the
layer's graphs); a failed capture turns graphs off for the model with one notice naming the error.
Only one process on one GPU, without bitsandbytes 4-bit layers (``graph_capture.graphs_available``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from typing import Any

import torch

from cpt_plugin.offload.checkpointing import as_checkpointed_forward, as_lean_recompute
from cpt_plugin.offload.graph_capture import (
    LayerState,
    call_signature,
    capture_graph,
    copy_into,
    parameters_swapped,
    static_copy,
)

logger = logging.getLogger(__name__)

WARMUP_BACKWARDS = 2  # eager backwards per layer and signature before its capture
# ``cuda_graphs`` unset: graphs only for micro-batches up to this many tokens (measured to pay at 8,192 on
# the H200; the pool holds one layer's recompute and backward, which grows with the length)
DEFAULT_MAX_TOKENS = 16384


class _Statics:
    """The static tensors the graphs of one signature read and write (shared by the layers: their
    replays run one after another on one stream)."""

    def __init__(self, x: torch.Tensor, keywords: dict[str, Any], out: torch.Tensor, params: tuple) -> None:
        self.x = x.detach().clone()
        self.keywords = static_copy(keywords)
        self.out = torch.empty_like(out)  # the forward graph's output, cloned out at each replay
        self.grad_out = torch.zeros_like(out)
        self.grad_x = torch.empty_like(x) if x.requires_grad else None
        self.param_grads = [torch.empty_like(p) for p in params]


class _Entry:
    """One layer's state: its eager backwards so far, its graph, and what the graph was captured on."""

    __slots__ = ("signature", "backwards", "graph", "forward_graph", "statics", "used", "state", "eager_only")

    def __init__(self, signature: Any, state: LayerState) -> None:
        self.signature = signature
        self.backwards = 0
        self.graph: Any = None  # recompute and backward: a torch.cuda.CUDAGraph (or what _record returns)
        self.forward_graph: Any = None  # the forward without an autograd graph, as the checkpoint runs it
        self.statics: _Statics | None = None
        self.used: tuple[bool, ...] = ()  # which trainable parameters the layer's backward reaches
        self.state = state
        self.eager_only = False  # a forward of this signature parked a replayed attention


class GraphedBackward:
    """What ``_LayerCheckpoint`` holds from a forward whose backward replays the layer's graph."""

    __slots__ = ("entry", "keywords", "params")
    replays = True

    def __init__(self, entry: _Entry, keywords: dict[str, Any], params: tuple[torch.Tensor, ...]) -> None:
        self.entry = entry
        self.keywords = keywords
        self.params = params

    def run(self, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor | None:
        """Replays the layer's recompute and backward on ``x`` and ``grad_out``: accumulates the
        parameters' gradients, returns the input's gradient (a fresh tensor) or None."""
        entry = self.entry
        statics, graph = entry.statics, entry.graph
        assert statics is not None and graph is not None
        copy_into(statics.x, x)
        copy_into(statics.keywords, self.keywords)
        statics.grad_out.copy_(grad_out)
        graph.replay()
        _accumulate(
            [p for p, used in zip(self.params, entry.used, strict=True) if used],
            [g for g, used in zip(statics.param_grads, entry.used, strict=True) if used],
        )
        return statics.grad_x.clone() if statics.grad_x is not None else None


class EagerBackward:
    """What ``_LayerCheckpoint`` holds from a forward whose backward runs eagerly: counts the warm-up."""

    __slots__ = ("entry",)
    replays = False

    def __init__(self, entry: _Entry) -> None:
        self.entry = entry

    def eager_done(self) -> None:
        self.entry.backwards += 1


def _accumulate(params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """``param.grad += grad`` as AccumulateGrad does it: a fresh tensor where ``.grad`` is None (never the
    graph's static buffer, which the next replay overwrites)."""
    existing = [(p.grad, g) for p, g in zip(params, grads, strict=True) if p.grad is not None]
    if existing:
        torch._foreach_add_([e for e, _ in existing], [g for _, g in existing])
    missing = [(p, g) for p, g in zip(params, grads, strict=True) if p.grad is None]
    if missing:
        fresh = torch._foreach_mul([g for _, g in missing], 1.0)
        for (p, _), grad in zip(missing, fresh, strict=True):
            p.grad = grad


def _capture_scope(
    autocast: list[tuple[str, torch.dtype, bool]], *contexts: Callable[[], Any]
) -> Callable[[], Any]:
    """A capture's context: the call's autocast without its weight cache (a cast cached inside a capture
    would live in the graph's pool), then ``contexts``, entered in order."""

    @contextlib.contextmanager
    def scope() -> Any:
        with contextlib.ExitStack() as stack:
            for kind, dtype, _cache in autocast:
                stack.enter_context(torch.autocast(kind, dtype=dtype, cache_enabled=False))
            for make in contexts:
                stack.enter_context(make())
            yield

    return scope


def _has_grad_hooks(params: tuple[torch.Tensor, ...]) -> bool:
    return any(
        getattr(p, "_backward_hooks", None) or getattr(p, "_post_accumulate_grad_hooks", None) for p in params
    )


class RecomputeGraphs:
    """The CUDA graphs of one model's checkpointed layers (see the module doc)."""

    def __init__(self, max_tokens: int | None = None) -> None:
        self.max_tokens = max_tokens  # longer micro-batches (tokens of the layer input) run eagerly
        self.pool: Any = None
        self.stream: torch.cuda.Stream | None = None
        self.entries: dict[int, _Entry] = {}  # by id() of the decoder layer
        self.statics: dict[Any, _Statics] = {}
        self.off_reason: str | None = None
        self.captured = 0
        self.plan_seen: Any = None  # the planner's LayerPlan the graphs were captured under (auto)
        self.held_eager = False  # the planner's plan does not fit with the pool: every layer runs eagerly
        # the pool's reserved bytes per token of the captured length, measured at the captures (the
        # planner counts it: memory_allocated does not see it between replays); kept across resets
        self.pool_bytes_per_token: float | None = None
        self.pool_bytes = 0.0  # what the current graphs' pool reserved (measured at their captures)

    def reset(self) -> None:
        """Frees every graph and static tensor (captured again after the warm-up)."""
        self.entries, self.statics = {}, {}
        self.pool = None
        self.pool_bytes = 0.0

    def applies_to(self, tokens: int) -> bool:
        """Whether micro-batches of ``tokens`` tokens may replay graphs (not off, not too long)."""
        return self.off_reason is None and (self.max_tokens is None or tokens <= self.max_tokens)

    def prepare(
        self,
        layer: torch.nn.Module | None,
        function: Callable,
        x: torch.Tensor,
        rest: tuple,
        out: Any,
        autocast: list[tuple[str, torch.dtype, bool]],
        parked_items: int,
        uses_rng: bool,
    ) -> GraphedBackward | EagerBackward | None:
        """Called by the checkpoint's forward: how its backward runs (None: eagerly, nothing counted)."""
        keywords = getattr(function, "keywords", None)
        if (
            self.off_reason is not None
            or self.held_eager
            or layer is None
            or rest
            or keywords is None
            or uses_rng
            or not self._can_capture_on(x)
            or not isinstance(out, torch.Tensor)
            or self._too_long(x)
        ):
            return None
        key = id(layer)
        entry = self.entries.get(key)
        if entry is not None and not entry.state.unchanged(layer):
            entry = None  # parameters replaced or moved, adapters switched: the graph is stale
        signature = (
            call_signature(x),
            call_signature(keywords),
            tuple(autocast),
            layer.training,
            call_signature(out),
        )
        if entry is None or (entry.signature != signature and entry.graph is None):
            entry = self.entries[key] = _Entry(signature, LayerState(layer))
        if entry.signature != signature:
            return None  # another signature than the captured one: eager
        if parked_items:
            entry.eager_only = True  # attention replayed from host memory: its own recompute path
        if entry.eager_only:
            return None
        params = entry.state.trainable
        if _has_grad_hooks(params) or entry.state.hooks:
            return None  # a replay would skip the hooks' Python
        if entry.graph is None:
            if entry.backwards < WARMUP_BACKWARDS:
                return EagerBackward(entry)
            try:
                self._capture_layer(entry, function, x, keywords, out, params, autocast)
            except Exception as error:  # noqa: BLE001 - any failure: this model trains without graphs
                self.turn_off(f"{type(error).__name__}: {error}")
                return None
            self.captured += 1
            if self.captured == 1:
                logger.info(
                    "cpt-plugin: checkpointed decoder layers' backward runs as CUDA graphs from here on"
                )
        return GraphedBackward(entry, keywords, params)

    def replay_forward(
        self,
        layer: torch.nn.Module | None,
        function: Callable,
        x: torch.Tensor,
        rest: tuple,
        autocast: list[tuple[str, torch.dtype, bool]],
        uses_rng: bool,
    ) -> tuple[torch.Tensor, GraphedBackward | None] | None:
        """Called by the checkpoint's forward before it runs the layer: the layer's output replayed from
        its forward graph (a fresh tensor) and how its backward runs, or None: the forward runs eagerly.

        Only a layer whose graphs were captured by :meth:`prepare`, called with what it was captured on
        (the signature's output part is the graph's own)."""
        if self.off_reason is not None or self.held_eager or layer is None or rest or uses_rng:
            return None
        entry = self.entries.get(id(layer))
        keywords = getattr(function, "keywords", None)
        if (
            entry is None
            or entry.forward_graph is None
            or entry.eager_only
            or keywords is None
            or entry.state.hooks
        ):
            return None
        called = (call_signature(x), call_signature(keywords), tuple(autocast), layer.training)
        if entry.signature[:4] != called or not entry.state.unchanged(layer):
            return None  # prepare() sees the same after the eager forward and drops a stale graph
        statics = entry.statics
        assert statics is not None
        copy_into(statics.x, x)
        copy_into(statics.keywords, keywords)
        entry.forward_graph.replay()
        out = statics.out.clone()
        params = entry.state.trainable
        return out, (None if _has_grad_hooks(params) else GraphedBackward(entry, keywords, params))

    def _can_capture_on(self, x: torch.Tensor) -> bool:
        return x.is_cuda

    def _too_long(self, x: torch.Tensor) -> bool:
        return (
            self.max_tokens is not None and x.dim() > 0 and x.numel() // max(x.shape[-1], 1) > self.max_tokens
        )

    def _capture_layer(
        self,
        entry: _Entry,
        function: Callable,
        x: torch.Tensor,
        keywords: dict[str, Any],
        out: torch.Tensor,
        params: tuple[torch.Tensor, ...],
        autocast: list[tuple[str, torch.dtype, bool]],
    ) -> None:
        shapes = tuple((tuple(p.shape), p.dtype) for p in params)
        statics = self.statics.get((entry.signature, shapes))
        if statics is None:
            statics = self.statics[(entry.signature, shapes)] = _Statics(x, keywords, out, params)
        copy_into(statics.x, x)
        copy_into(statics.keywords, keywords)
        call = functools.partial(function.func, *function.args, **statics.keywords)
        # Fresh leaves on the parameters' storage while the layer is captured: the backward capture ends
        # at their own gradient accumulators, made on the capture stream (see layer_graphs.capture).
        aliases = [p.detach().requires_grad_(True) for p in params]
        layer_input = statics.x.detach().requires_grad_(x.requires_grad)
        used: list[bool] = []

        def recompute_and_backward() -> None:
            result = call(layer_input)
            if not isinstance(result, torch.Tensor) or not result.requires_grad:
                raise TypeError(
                    f"the layer returned {type(result).__name__}, not one tensor that requires grad"
                )
            inputs = ([layer_input] if layer_input.requires_grad else []) + aliases
            grads = list(torch.autograd.grad(result, inputs, statics.grad_out, allow_unused=True))
            del result
            if layer_input.requires_grad:
                assert statics.grad_x is not None
                statics.grad_x.copy_(grads.pop(0))
            used[:] = [g is not None for g in grads]
            present = [(buf, g) for buf, g in zip(statics.param_grads, grads, strict=True) if g is not None]
            if present:
                torch._foreach_copy_([b for b, _ in present], [g for _, g in present])

        swapped = dict(zip(map(id, params), aliases, strict=True))

        scope = _capture_scope(
            autocast,
            lambda: parameters_swapped(entry.state.slots, swapped),
            torch.enable_grad,
            as_lean_recompute,
        )
        graph = self._record(recompute_and_backward, scope, x.device)
        forward = functools.partial(function.func, *function.args, **statics.keywords)

        def checkpointed_forward() -> None:
            statics.out.copy_(forward(statics.x))

        forward_scope = _capture_scope(autocast, torch.no_grad, as_checkpointed_forward)
        forward_graph = self._record(checkpointed_forward, forward_scope, x.device)
        entry.graph, entry.forward_graph, entry.statics, entry.used = (
            graph,
            forward_graph,
            statics,
            tuple(used),
        )
        tokens = max(x.numel() // max(x.shape[-1], 1), 1)
        self.pool_bytes_per_token = max(self.pool_bytes_per_token or 0.0, self.pool_bytes / tokens)

    def _record(self, body: Callable[[], None], scope: Callable[[], Any], device: torch.device) -> Any:
        """``body`` run once eagerly on the capture stream (cuBLAS workspaces, autograd's streams), then
        captured as a CUDA graph; both inside ``scope()``. Returns what :class:`GraphedBackward` replays."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        if self.stream is None:
            self.stream = torch.cuda.Stream(device)
        stream = self.stream
        with scope():
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                body()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            reserved = torch.cuda.memory_reserved(device)
            with capture_graph(graph, self.pool, stream):
                body()
            torch.cuda.current_stream().wait_stream(stream)
            # every allocation of a capture comes from the graphs' pool: its growth is the pool's
            self.pool_bytes += max(torch.cuda.memory_reserved(device) - reserved, 0)
        return graph

    def turn_off(self, reason: str) -> None:
        self.off_reason = reason
        self.reset()
        logger.warning(
            "cpt-plugin: CUDA graphs for the checkpointed decoder layers are off for this run (%s); the "
            "layers' backward runs eagerly, with the same results. Set cuda_graphs: false to skip the attempt.",
            reason[:300],
        )
