"""Kept decoder layers replayed as CUDA graphs: the same kernels, without the host's time per launch.

Why: at Llama-1B shapes the forward of a CPT step is bound by the host, not the GPU. Measured on an H200
(``benchmarks/host_breakdown.py``, docs/BENCHMARKS.md): 43.8 ms of host time per forward even at 1 x 64
tokens (2.5 ms per decoder layer: Python, PEFT's module calls, about 40 launches at 20-65 µs each),
against about 25 ms of GPU time for the layers at 4 x 2048; the device idles for the difference. A graph
replays a layer's whole forward (and, in backward, its whole backward) in one launch.

How: a kept layer (``keep`` in the per-layer plan, see checkpointing.py) is run eagerly for its first
``WARMUP_CALLS`` grad-enabled calls with one input signature (shapes, dtypes, the keywords transformers
binds), so lazy initialisation (cuBLAS handles, Triton compilation, our one-time GEMM probes) happens
outside any capture. At the next call the layer runs once more eagerly on the capture stream, then its
forward is captured on static copies of its inputs and, right after, its backward (``torch.autograd.grad``
of the output w.r.t. the input and the layer's trainable parameters, on a static output gradient), in
``torch.cuda.make_graphed_callables``' order; from then on the forward graph replays in forward and the
backward graph in backward. (A first version captured the backward later, inside the training step's own
backward: on the H200 that capture was invalidated, while this order captured and replayed the same layer;
``benchmarks/graph_capture_check.py``, docs/BENCHMARKS.md.) All graphs share one memory pool; each layer's
capture-time autograd graph is kept alive, so the activations its backward graph reads are never handed
to a later capture. Differences from ``make_graphed_callables``, each for a run that must not go silently
wrong:

* the parameters' gradients are returned as fresh tensors (one multi-tensor copy), never as the graph's
  static buffers, which ``AccumulateGrad`` would otherwise adopt as ``.grad`` and the next replay would
  overwrite (wrong sums under gradient accumulation);
* a second forward of a layer before the first one's backward (two losses from one model, say) runs
  eagerly: replaying would overwrite the activations the first backward still needs;
* any other signature, no-grad or eval calls, a layer with dropout, and a failed capture run eagerly (a
  failed capture turns graphs off for the model, with one notice naming the error);
* a change of the plan (the memory planner stepping down after an OOM, say) frees every graph; they are
  captured again after the warm-up;
* a layer whose parameters were replaced, moved or had ``requires_grad`` changed, or whose PEFT adapters
  were disabled, merged or switched, drops its graphs (a replay reads the captured storage and computes
  the captured adapter set-up); a failed capture ends the allocator's routing into the graphs' pool.

Memory: the activations a kept layer saves live in the graphs' pool between steps instead of being freed
after backward (the same bytes at the peak; not available to evaluation or the optimizer step between
steps; the planner counts them as activations, not as static memory, through ``held_bytes``). Only the
first signature a layer captured is replayed: batches of other lengths run eagerly. Only for one process
on one GPU, without bitsandbytes 4-bit layers (their kernels are not known to be capturable): elsewhere
nothing changes.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch

from cpt_plugin.offload.checkpointing import _needs_grad, _uses_rng, layer_of
from cpt_plugin.offload.graph_capture import (
    LayerState,
    call_signature,
    capture_graph,
    copy_into,
    parameters_swapped,
    static_copy,
)

logger = logging.getLogger(__name__)

WARMUP_CALLS = 2  # eager grad-enabled calls per layer and signature before its capture


def kept_graph_extra_bytes(
    layers: int, tokens: int, hidden: int, act_bytes: int, trainable_bytes_per_layer: float
) -> float:
    """Device memory kept layers' graphs hold beyond the same layers run eagerly (the activations are the
    same bytes): per layer a static output-gradient and the input gradient (tokens x hidden each), the
    LoRA gradients' static buffers and their fresh copies handed to autograd; the first layer's static
    input (the others read the layer before's static output: ``static_input_for``). An estimate: on an
    H200 at Llama-1B 4 x 2048 the graphed default's prediction was 0.8 GiB above the measured peak
    (2026-12-04) while this counted two more tokens x hidden buffers per layer."""
    buffers = 2 * layers + 1
    return float(buffers * tokens * hidden * act_bytes + 2 * layers * trainable_bytes_per_layer)


def _autocast_now(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class _LayerGraph:
    """One layer's forward and backward graphs for one input signature, with their static tensors."""

    def __init__(self, signature: Any, owner: LayerGraphs) -> None:
        self.signature = signature
        self.owner = owner
        self.warm_calls = 0
        self.forward_graph: torch.cuda.CUDAGraph | None = None
        self.backward_graph: torch.cuda.CUDAGraph | None = None
        self.static_x: torch.Tensor | None = None
        self.static_kwargs: dict[str, Any] = {}
        self.static_out: torch.Tensor | None = None  # detached; its autograd graph is held in _alive
        self.static_grad_out: torch.Tensor | None = None
        self.static_grads: tuple[torch.Tensor | None, ...] = ()
        self.params: tuple[torch.Tensor, ...] = ()
        self.pending: weakref.ref | None = None  # the autograd node of a forward whose backward is due
        self._alive: Any = None  # the captured forward's output with its autograd graph (see capture)

    def capture(
        self, function: Callable, x: torch.Tensor, params: tuple[torch.Tensor, ...], pool: Any,
        stream: torch.cuda.Stream, slots: tuple[tuple[dict, str, torch.nn.Parameter], ...],
    ) -> None:  # fmt: skip
        """Captures the forward, then at once the backward, into ``pool`` on ``stream``.

        The order is ``torch.cuda.make_graphed_callables``' (the H200 check in
        benchmarks/graph_capture_check.py captured the layer this way; a backward captured later, inside
        the training step's own backward, was invalidated). The capture-time autograd graph is kept alive
        (``retain_graph``): the activations the backward graph reads stay allocated in the pool, so the
        next layer's capture cannot be given their memory."""
        self.params = params
        self.static_x = self.owner.static_input_for(x)
        keywords = dict(getattr(function, "keywords", None) or {})
        self.static_kwargs = static_copy(keywords)
        call = functools.partial(function.func, *function.args, **self.static_kwargs)
        # Each trained parameter is swapped for a fresh leaf on the same storage while the layer is run
        # and captured: a replay then reads the live parameter, and the backward capture ends at the
        # leaves' own gradient accumulators, created on the capture stream. The parameters' accumulators
        # were created on the training stream, and an older autograd graph (a ``loss`` the caller still
        # holds) keeps them alive; a capture that reached them was invalidated on the H200.
        aliases = [p.detach().requires_grad_(True) for p in params]
        inputs = ([self.static_x] if self.static_x.requires_grad else []) + aliases
        enabled, dtype = _autocast_now("cuda")
        with (
            parameters_swapped(slots, dict(zip(map(id, params), aliases, strict=True))),
            torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False),
        ):
            # one eager pass on the capture stream first (cuBLAS workspaces, autograd streams)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                out = call(self.static_x)
                if not isinstance(out, torch.Tensor) or not out.requires_grad:
                    raise TypeError(
                        f"the layer returned {type(out).__name__}, not one tensor that requires grad"
                    )
                torch.autograd.grad(out, inputs, torch.zeros_like(out), allow_unused=True)
                del out
            torch.cuda.current_stream().wait_stream(stream)
            forward_graph = torch.cuda.CUDAGraph()
            with capture_graph(forward_graph, pool, stream):
                out = call(self.static_x)
        self.static_grad_out = torch.zeros_like(out)
        self._aliases = aliases
        backward_graph = torch.cuda.CUDAGraph()
        with capture_graph(backward_graph, pool, stream):
            grads = list(
                torch.autograd.grad(out, inputs, self.static_grad_out, allow_unused=True, retain_graph=True)
            )
        grad_x = grads.pop(0) if self.static_x.requires_grad else None
        self.static_grads = (grad_x, *grads)
        self._alive = out
        self.static_out = out.detach()
        self.forward_graph, self.backward_graph = forward_graph, backward_graph

    def replay_forward(self, x: torch.Tensor, keywords: dict[str, Any]) -> torch.Tensor:
        assert self.static_x is not None and self.static_out is not None and self.forward_graph is not None
        copy_into(self.static_x, x)
        copy_into(self.static_kwargs, keywords)
        self.forward_graph.replay()
        return self.static_out.detach()  # a fresh alias: autograd sets the returned tensor's grad_fn


class _GraphedLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, graph: _LayerGraph, keywords: dict, x: torch.Tensor, *params):
        ctx.graph = graph
        # the input's gradient is handed on as the graph's static buffer (its next replay overwrites it),
        # which the layer before (or the embedding's backward) reads at once; a leaf input or one that
        # retains its gradient would keep it as ``.grad``: a copy then
        ctx.copy_grad_x = x.grad_fn is None or x.retains_grad
        graph.pending = weakref.ref(ctx)
        return graph.replay_forward(x, keywords)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        graph: _LayerGraph = ctx.graph
        graph.pending = None
        assert graph.static_grad_out is not None and graph.backward_graph is not None
        copy_into(graph.static_grad_out, grad_out)
        graph.backward_graph.replay()
        grad_x, *param_grads = graph.static_grads
        present = [g for g in param_grads if g is not None]
        fresh = iter(torch._foreach_mul(present, 1.0) if present else [])  # never hand out static buffers
        grads = [next(fresh) if g is not None else None for g in param_grads]
        if grad_x is not None:
            grad_x = grad_x.clone() if ctx.copy_grad_x else grad_x.detach()
        return (None, None, grad_x, *grads)


class LayerGraphs:
    """The CUDA graphs of one model's kept layers (see the module doc); held by the layers' PlanHolder."""

    def __init__(self, managed: bool = False) -> None:
        # managed (``cuda_graphs`` unset): the graphs run only while granted, by the memory planner when its
        # plan keeps every layer and the budget holds their extra memory, or without checkpointing when the
        # device had room at the loss (patching/causal_lm.py); ``cuda_graphs: true``: always
        self.managed = managed
        self.granted = not managed
        self.pool: Any = None
        self.stream: torch.cuda.Stream | None = None
        self.graphs: dict[int, _LayerGraph] = {}
        self.states: dict[int, LayerState] = {}
        self.plan_seen: Any = None
        self.off_reason: str | None = None
        self.captured = 0
        self.held_bytes = 0  # device memory the graphs keep between steps (their activations, buffers)

    @staticmethod
    def extra_bytes(
        layers: int, tokens: int, hidden: int, act_bytes: int, trainable_per_layer: float
    ) -> float:
        """``kept_graph_extra_bytes``, for callers that hold the graphs but do not import this module."""
        return kept_graph_extra_bytes(layers, tokens, hidden, act_bytes, trainable_per_layer)

    def static_input_for(self, x: torch.Tensor) -> torch.Tensor:
        """A capture's static input: the static output of the layer before when ``x`` is it (that layer
        replayed just now), so a replay reads the output where the layer before wrote it, without a copy;
        otherwise a copy of ``x``. Safe: the layer before replays again only after its own backward, which
        comes after this layer's (a second forward before the backward runs eagerly)."""
        for graph in self.graphs.values():
            out = graph.static_out
            if (
                out is not None
                and out.data_ptr() == x.data_ptr()
                and call_signature(out) == call_signature(x.detach())
            ):
                return x.detach().requires_grad_(x.requires_grad)
        return x.detach().clone().requires_grad_(x.requires_grad)

    def grant(self, granted: bool) -> None:
        """Lets the graphs run (captured after their warm-up), or frees them and runs the layers eagerly."""
        if self.granted and not granted:
            self.reset()
        self.granted = granted

    def reset(self) -> None:
        """Frees every graph (they are captured again after the warm-up)."""
        self.graphs, self.states = {}, {}
        self.pool = None
        self.held_bytes = 0

    def run(self, index: int, function: Callable, args: tuple) -> torch.Tensor | None:
        """The layer's output through its graph, or None when the caller must run it eagerly."""
        if not self.granted or self.off_reason is not None:
            return None
        if len(args) != 1 or not isinstance(args[0], torch.Tensor):
            return None
        x = args[0]
        keywords = getattr(function, "keywords", None)
        layer = layer_of(function)
        if not x.is_cuda or keywords is None or layer is None or _needs_grad(keywords):
            return None

        if _uses_rng(layer):
            return None
        state = self.states.get(index)
        if state is not None and not state.unchanged(layer):
            # parameters replaced or moved, adapters switched: this layer's graphs are stale
            self.graphs.pop(index, None)
            state = None
        if state is None:
            state = self.states[index] = LayerState(layer)
        if state.hooks:
            return None  # a replay would skip the hooks' Python
        signature = (call_signature(x), call_signature(keywords), _autocast_now("cuda"), layer.training)
        graph = self.graphs.get(index)
        if graph is None or graph.signature != signature:
            if graph is not None and graph.forward_graph is not None:
                return None  # another signature than the captured one: eager
            graph = self.graphs[index] = _LayerGraph(signature, self)
        if graph.pending is not None and graph.pending() is not None:
            return None  # its last forward still waits for its backward
        params = state.trainable
        if graph.forward_graph is None:
            graph.warm_calls += 1
            if graph.warm_calls <= WARMUP_CALLS:
                return None
            before = torch.cuda.memory_allocated(x.device)
            try:
                if self.pool is None:
                    self.pool = torch.cuda.graph_pool_handle()
                if self.stream is None:
                    self.stream = torch.cuda.Stream(x.device)
                graph.capture(function, x, params, self.pool, self.stream, state.slots)
            except Exception as error:  # noqa: BLE001 - any failure: this model trains without graphs
                self.turn_off(f"{type(error).__name__}: {error}")
                return None
            self.held_bytes += max(torch.cuda.memory_allocated(x.device) - before, 0)
            self.captured += 1
            if self.captured == 1:
                logger.info("cpt-plugin: kept decoder layers run as CUDA graphs from this step on")
        return _GraphedLayer.apply(graph, keywords, x, *params)

    def turn_off(self, reason: str) -> None:
        self.off_reason = reason
        self.reset()
        logger.warning(
            "cpt-plugin: CUDA graphs for the kept decoder layers are off for this run (%s); the layers run "
            "eagerly, with the same results. Set cuda_graphs: false to skip the attempt.",
            reason[:300],
        )
