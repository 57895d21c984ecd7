"""The planner's analytic memory model against the bytes a patched model really holds, counted on the CPU.

  TRITON_INTERPRET=1 python -m benchmarks.planner_model_check [--tokens 96,160] [--fused-mlp both]

Why: before its first probe the planner plans from ``analytic_costs`` alone, and a one-step run never
calibrates it. At 524,288 tokens on an H200 (ninth session) it predicted 110.7 GiB where 85.3 GiB were
measured. The GPU's allocator peak says *that* the model is off, not *which* term; this counts each term.

How: a ``TorchDispatchMode`` sees every tensor an op creates during one training micro-batch of a patched
model (Llama unless ``--family`` says otherwise; our kernels, under the Triton interpreter so they allocate what they allocate on the GPU; bf16
autocast as in training) and counts its storage until the last tensor on it dies. Read at each decoder
layer's start in the forward, the count gives what each layer keeps for its backward; its maximum over
forward and backward gives the peak. Each quantity is taken at two token counts and divided by their
difference, so what does not grow with the tokens (weights' casts, gradients) drops out: what is left is
bytes per token, the unit of the planner's model. The attention runs through SDPA's flash kernel on the
CPU, which saves what the GPU's flash and cuDNN kernels save (q, k, v, output, log-sum-exp).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

SHAPES = dict(  # Llama-1B's ratios at a size the interpreter runs in seconds: I = 4H, kv heads = heads / 4
    hidden_size=256,
    intermediate_size=1024,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=32,
    vocab_size=512,
)
LORA_RANK = 8
CHUNK_ROWS = 16  # rows of the fused loss' logits chunk, fewer than any batch measured


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created while active that are still alive (``current``) and at most (``peak``).

    A storage counts from the op that created it until its last tensor dies (a finalizer on the storage's
    Python object, which torch keeps for as long as the storage lives). An op's output on the storage of
    one of its inputs (a view, an in-place op) creates none, so storages that existed before (the weights)
    are never counted."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self.paused = 0  # inside a Triton interpreter launch: its host copies of the arguments are not ours
        self._seen: set[int] = set()
        self._live: dict[int, weakref.ref[torch.UntypedStorage]] = {}
        self.phase = "forward"  # the peak per phase: see ``measure``
        self.phase_peaks: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.paused:
            return out
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for leaf in tree_leaves(out):  # a view or an in-place result shares an input's storage
            if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                storage = leaf.untyped_storage()
                if id(storage) not in inputs:
                    self._count(storage)
        return out

    def _count(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key in self._seen or storage.nbytes() == 0:
            return
        self._seen.add(key)
        self._live[key] = weakref.ref(storage)
        self._resum()
        self.peak = max(self.peak, self.current)
        self.phase_peaks[self.phase] = max(self.phase_peaks.get(self.phase, 0), self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self._seen.discard(key)
        self._live.pop(key, None)
        self._resum()

    def _resum(self) -> None:
        """The live bytes now: a storage's size is read each time, so one freed by ``resize_(0)`` while its
        tensor lives (checkpointing releases a recomputed layer output that way) counts as freed."""
        total = 0
        for ref in self._live.values():
            storage = ref()
            if storage is not None:
                total += storage.nbytes()
        self.current = total


@contextlib.contextmanager
def interpreter_copies_uncounted(counter: LiveBytes, run_kernels: bool = True) -> Iterator[None]:
    """The Triton interpreter runs a kernel on host copies of its tensor arguments (allocated and copied
    back inside the launch); a GPU launch allocates nothing. Launches are therefore not counted. A launch
    also leaves its arguments in a reference cycle, which would keep a dead tensor alive until Python's
    next garbage collection: the cycle is collected right after each launch.

    ``run_kernels=False`` skips the launches: what the wrappers allocate around them is all that is
    counted, so the counts barely move (2026-12-04, 48/80 tokens: the tiled-MLP check identical, one
    untiled per-token count 0.06 bytes lower, inside the tests' 1-byte tolerance) in a fraction of the
    time (the interpreter runs every program of a grid in Python)."""
    from triton.runtime.interpreter import GridExecutor

    launch = GridExecutor.__call__

    def uncounted(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not run_kernels:
            gc.collect(0)  # as after a launch: the same objects die at the same points
            return None
        counter.paused += 1
        try:
            return launch(self, *args, **kwargs)
        finally:
            gc.collect(0)
            counter.paused -= 1

    GridExecutor.__call__ = uncounted
    try:
        yield
    finally:
        GridExecutor.__call__ = launch


@contextlib.contextmanager
def host_buffers_uncounted(counter: LiveBytes) -> Iterator[None]:
    """Offload is simulated on the CPU (checkpointing's ``_simulate_offload``: the parked inputs go to plain
    host buffers); on a GPU those are pinned host memory, not device memory, so they are not counted."""
    from cpt_plugin.offload import checkpointing

    get = checkpointing.POOL.get

    def uncounted(*args: Any, **kwargs: Any) -> Any:
        counter.paused += 1
        try:
            return get(*args, **kwargs)
        finally:
            counter.paused -= 1

    checkpointing.POOL.get = uncounted
    try:
        yield
    finally:
        checkpointing.POOL.get = get


class _LayerStarts:
    """A layer observer (the planner's interface) that reads the live bytes at each layer's forward start."""

    def __init__(self, counter: LiveBytes, layers: int) -> None:
        self.counter = counter
        self.layers = layers
        self.starts: list[int] = []
        self.recomputed: list[int] = []
        self.forward_done = False

    def layer_start(self, index: int, x: Any) -> None:
        if not self.forward_done:
            self.starts.append(self.counter.current)

    def layer_end(self, index: int) -> None:
        if index == self.layers - 1 and not self.forward_done:
            self.starts.append(self.counter.current)  # after the last layer: its saved set is in too

    def layer_recomputed(self, index: int, nbytes: int) -> None:
        self.recomputed.append(nbytes)  # what the planner takes as an estimate of keeping the layer


@dataclass
class Measured:
    """One micro-batch of one plan: live bytes (relative to the start) at each layer boundary and the peak."""

    tokens: int
    boundaries: list[int]
    forward_end: int
    peak: int
    recomputed: list[int]  # what each checkpointed layer's recompute left allocated (its backward's input)
    phase_peaks: dict[str, int]  # the peak of the forward and of each checkpointed layer's backward


# Gemma 2 is left out: transformers runs it with eager attention only (no SDPA), which saves the whole
# seq x seq attention probabilities, a term the planner does not model.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")


def build_model(
    layers: int, fused_mlp: bool, seed: int = 0, shapes: dict[str, int] | None = None, family: str = "llama"
) -> Any:
    """A bf16 model of ``family`` and ``shapes`` (default ``SHAPES``), patched by cpt-plugin with the CPT
    recipe (LoRA on every projection, trained embedding copies). Sliding windows are off: with one, SDPA
    gets a seq x seq mask, which the planner does not model (README limits)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from cpt_plugin import setup_model
    from cpt_plugin.patching.lora import disable_fused_lora

    torch.manual_seed(seed)
    extra: dict[str, Any] = {}
    if family == "gemma3_text":  # every layer full attention (the window is then never used)
        extra = dict(
            final_logit_softcapping=None,
            attn_logit_softcapping=None,
            layer_types=["full_attention"] * layers,
            sliding_window=4096,
        )
    elif family in ("mistral", "qwen2", "qwen3"):
        extra = dict(sliding_window=None)
    config = AutoConfig.for_model(
        family,
        **(shapes or SHAPES),
        **extra,
        num_hidden_layers=layers,
        max_position_embeddings=4096,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(torch.bfloat16)
    model.train()
    cfg = {"lora_r": LORA_RANK, "kernels": True, "guard": False, "memory_report": False}
    model = setup_model(model, cfg, checkpointing="off")
    if not fused_mlp:
        disable_fused_lora(model)
    return model


def measure(
    model: Any,
    modes: Sequence[str],
    tokens: int,
    seed: int = 0,
    tiled_chunk: int = 0,
    run_kernels: bool = True,
) -> Measured:
    """Live bytes of one forward + backward of ``tokens`` tokens with each layer in its mode of ``modes``;
    ``tiled_chunk`` > 0: every MLP tiled in chunks of that many tokens; ``run_kernels=False``: the Triton
    launches skipped (``interpreter_copies_uncounted``)."""
    from cpt_plugin.kernels import fused_linear_cross_entropy as flce
    from cpt_plugin.offload import checkpointing
    from cpt_plugin.offload.checkpointing import LayerPlan, decoder_layers, enable_layer_plan
    from cpt_plugin.offload.tiled_mlp import set_tiled_layers

    counter = LiveBytes()
    observer = _LayerStarts(counter, len(modes))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tiled = (bool(tiled_chunk),) * len(modes)
    enable_layer_plan(model, LayerPlan(tuple(modes), tiled), observer, _simulate_offload=True)
    set_tiled_layers(decoder_layers(model), tiled, max(tiled_chunk, 1))
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=generator)
    for param in model.parameters():
        param.grad = None
    # the loss' logits chunk: fixed-size as on the GPU (512 rows there), not the whole short batch
    chunk = mock.patch.object(flce, "CPU_CHUNK_BYTES", CHUNK_ROWS * model.config.vocab_size * 2)
    # the recompute's report to the planner reads this counter instead of the CUDA allocator
    measurable = mock.patch.object(checkpointing, "_measurable", lambda x: True)
    allocated = mock.patch.object(checkpointing, "_allocated", lambda device: counter.current)
    # each checkpointed layer's backward is a phase of its own (see peak_slope)
    layer_backward = checkpointing._LayerCheckpoint.backward
    calls = [0]

    def phased_backward(ctx: Any, *grads: Any) -> Any:
        counter.phase = f"backward {calls[0]}"
        calls[0] += 1
        return layer_backward(ctx, *grads)

    phases = mock.patch.object(checkpointing._LayerCheckpoint, "backward", staticmethod(phased_backward))
    with (
        counter,
        chunk,
        measurable,
        allocated,
        phases,
        interpreter_copies_uncounted(counter, run_kernels),
        host_buffers_uncounted(counter),
        torch.autocast("cpu", dtype=torch.bfloat16),
    ):
        loss = model(input_ids=ids, labels=ids).loss
        observer.forward_done = True
        forward_end = counter.current
        counter.phase = "backward"
        loss.backward()
    del loss
    return Measured(
        tokens, observer.starts, forward_end, counter.peak, observer.recomputed, counter.phase_peaks
    )


def peak_slope(low: Measured, high: Measured) -> float:
    """Bytes per token of the peak, as the planner's model means it: static + tokens x (a per-token max).

    Not the slope of the two peaks: at the few tokens the interpreter runs, the largest count can sit where
    a fixed-size buffer appears (the embedding gradient, at the end) while at real lengths it sits where the
    per-token terms are largest. So the slope is taken per phase (the forward, each checkpointed layer's
    backward), from the first layer's start, and the largest is the one that decides at length."""
    tokens = (low.tokens, high.tokens)
    return max(
        per_token(
            low.phase_peaks[phase] - low.boundaries[0], high.phase_peaks[phase] - high.boundaries[0], tokens
        )
        for phase in low.phase_peaks.keys() & high.phase_peaks.keys()
    )


def per_token(low: float, high: float, tokens: tuple[int, int]) -> float:
    return (high - low) / (tokens[1] - tokens[0])


def check(
    layers: int,
    fused_mlp: bool,
    tokens: tuple[int, int],
    shapes: dict[str, int] | None = None,
    plans: Sequence[str] = ("keep", "recompute", "offload", "mixed"),
    tiled_chunk: int = 0,
    family: str = "llama",
    run_kernels: bool = True,
) -> dict[str, Any]:
    """Measured against analytic bytes per token: what a kept and a recomputed layer hold, and the peak
    of an all-keep, an all-recompute, an all-offload (simulated) and a mixed plan (every MLP tiled in
    chunks of ``tiled_chunk`` tokens when > 0: the chunk's own transient is fixed, so the per-token slope
    leaves it out). ``run_kernels=False`` counts the same bytes without running the Triton kernels."""
    from cpt_plugin.offload.checkpointing import LayerPlan, decoder_layers
    from cpt_plugin.offload.planner import analytic_costs, model_shapes, predict_peak

    model = build_model(layers, fused_mlp, shapes=shapes, family=family)
    dims = model_shapes(model, decoder_layers(model), fused_loss=True)
    costs = analytic_costs(dims, chunk_tokens=1 << 30)
    layouts = {
        "keep": ("keep",) * layers,
        "recompute": ("recompute",) * layers,
        "offload": ("offload",) * layers,
        "mixed": ("recompute",) * (layers - 1) + ("keep",),
    }
    rows: dict[str, Any] = {
        "family": family,
        "shapes": shapes or SHAPES,
        "tokens": list(tokens),
        "fused_mlp": dims.fused_mlp,
    }
    for name in plans:
        modes = layouts[name]
        low, high = (
            measure(model, modes, t, tiled_chunk=tiled_chunk, run_kernels=run_kernels) for t in tokens
        )
        saved = [per_token(a, b, tokens) for a, b in zip(low.boundaries, high.boundaries, strict=True)]
        layer_saved = [b - a for a, b in zip(saved, saved[1:], strict=False)]
        plan = LayerPlan(modes, (bool(tiled_chunk),) * layers)
        predicted = per_token(
            predict_peak(plan, costs, tokens[0], 0.0), predict_peak(plan, costs, tokens[1], 0.0), tokens
        )
        rows[name] = {
            "layer_saved_per_token": layer_saved,
            "peak_beyond_saved_per_token": peak_slope(low, high)
            - per_token(
                low.boundaries[-1] - low.boundaries[0], high.boundaries[-1] - high.boundaries[0], tokens
            ),
            # from the first layer's start, as the planner measures its static part at the forward start
            "peak_per_token": peak_slope(low, high),
            "predicted_peak_per_token": predicted,
            "forward_end_per_token": per_token(low.forward_end, high.forward_end, tokens),
            "recompute_holds_per_token": [
                per_token(a, b, tokens) for a, b in zip(low.recomputed, high.recomputed, strict=True)
            ],
        }
    rows["analytic"] = {
        "keep": costs.keep_tiled if tiled_chunk else costs.keep,
        "recompute": costs.recompute,
        "work": costs.work,
        "loss": costs.loss,
    }
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="96,160", help="two token counts (their difference is used)")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--fused-mlp", choices=("yes", "no", "both"), default="both")
    parser.add_argument("--shape", default="", help="overrides of SHAPES: hidden_size=192,head_dim=32,...")
    parser.add_argument("--tiled-chunk", type=int, default=0, help="tile every MLP in chunks of N tokens")
    parser.add_argument("--family", choices=FAMILIES, default="llama")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        overrides = {k: int(v) for k, v in (kv.split("=") for kv in args.shape.split(",") if kv)}
        low, high = (int(t) for t in args.tokens.split(","))
    except ValueError:
        parser.error("--shape takes NAME=INT,... (e.g. hidden_size=192) and --tokens two integers (96,160)")
    if not 0 < low < high:
        parser.error(f"--tokens needs two increasing positive counts, got {args.tokens}")
    shapes = {**SHAPES, **overrides}
    fused = {"yes": (True,), "no": (False,), "both": (True, False)}[args.fused_mlp]
    results = [
        check(args.layers, f, (low, high), shapes, tiled_chunk=args.tiled_chunk, family=args.family)
        for f in fused
    ]
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    for result in results:
        analytic = result["analytic"]
        print(f"{result['family']}, fused MLP {result['fused_mlp']}: bytes per token (analytic keep {analytic['keep']:.0f}, "
              f"recompute {analytic['recompute']:.0f}, work {analytic['work']:.0f})")  # fmt: skip
        for name in ("keep", "recompute", "offload", "mixed"):
            row = result[name]
            saved = ", ".join(f"{v:.0f}" for v in row["layer_saved_per_token"])
            error = row["predicted_peak_per_token"] / row["peak_per_token"] - 1
            print(f"  {name:9s} saved per layer [{saved}]  beyond {row['peak_beyond_saved_per_token']:.0f}  "
                  f"peak {row['peak_per_token']:.0f}  "
                  f"predicted {row['predicted_peak_per_token']:.0f} ({error:+.1%})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
