"""The memory planner: per decoder layer keep / recompute / offload (+ tiled MLP), the fastest plan that fits.

Design
------
**Where it plugs in.** ``core.setup_model`` with checkpointing ``auto`` (what a Trainer with
``gradient_checkpointing=True`` and a CPTCallback gets, and what the benchmarks pass) calls
:func:`install_planner`. That installs per-layer checkpointing (``checkpointing.enable_layer_plan``) with a
:class:`MemoryPlanner` as the layers' observer. Nothing is decided before the first grad-enabled forward
reaches layer 0, because only then is the batch's token count known. Integrations only read the plan's
log (``pop_log``) and wrap the Trainer's ``training_step`` with ``oom_retry``.

**When it plans.** At the start of layer 0's forward (before any layer ran in that forward, so changing the
plan is safe):

1. The first time: the budget is fixed (``memory_budget_gib``, or the device's free memory plus what this
   process' allocator already holds, minus ``1 GiB + 5%`` for fragmentation and memory outside torch's
   allocator), the static memory is measured, and a plan is chosen from the analytical model with an extra
   15% headroom because the model is not calibrated yet.
2. That step is the probe, at the real shape (CUDA only): ``memory_allocated`` at every layer start gives
   what each layer keeps per token in its mode, and ``max_memory_allocated`` (peak statistics reset when
   the probe starts) read when layer 0's parameters receive their gradients gives the peak.
3. At the next forward the probe calibrates the model: the measured per-token bytes replace the modelled
   ones for the modes that ran, and an additive per-token correction makes the prediction for the probed
   plan equal its measured peak (loss transient, backward working set, allocator rounding). The gradients
   not yet made when the peak was read (the embedding's, made after the layers' backward: 0.5 GiB at
   Llama-1B shapes) are left out of later predictions, which the static part would otherwise count on
   top of the measured peak; a floor keeps every gradient plus the end of backward's hidden states, and
   once gradients are seen alive at a forward's start (gradient accumulation) every gradient counts
   again. Then the plan is chosen again with the normal headroom (5%). A probe measures only the modes
   its plan ran: when the new plan keeps or recomputes layers and no probe has measured that mode yet (the first plan offloaded
   every layer, say), the next step is probed too (at most 3 probes per length), and costs measured by an
   earlier probe are kept for modes a later one did not run. A probe that kept no layer still estimates
   ``keep``: each checkpointed layer's recompute reports the memory it left allocated for its backward
   (``layer_recomputed``): what keeping the layer holds, plus ``act(gate) * up`` (Ib) that the fused
   MLP's recompute keeps for its backward, which the estimate takes off (counted on the CPU:
   ``benchmarks/planner_model_check.py``, 9,624 = 7,576 + 2,048 B/token), so a budget between
   all-offload and all-keep gets a mixed plan.
4. Later forwards re-plan when a batch has more tokens than the plan was made for (the plan is always for
   the longest length seen, and calibrated again at it), or when the static memory moved by more than 2%
   of the budget (optimizer states appear after the first optimizer step).
5. ``step_down`` (called by ``oom_retry`` after an out-of-memory error) re-plans for 85% of the failed
   plan's predicted peak, down to every layer offloaded and tiled.

Under torch.distributed every rank calls :func:`agree` at every layer-0 start with the same vector
(tokens, budget, static, calibration), reduced with MAX (MIN for the budget), so every rank plans from the
same numbers and takes the same plan.

**Memory model** (bytes; T tokens in the micro-batch, b bytes per activation element, H hidden, I
intermediate, q = heads x head_dim, kv = kv heads x head_dim, r = sum of LoRA ranks of the layer's
adapted projections)::

    static   = memory_allocated at the forward start - gradients present
               + G (every trainable gradient) + 2G (AdamW states, until the first optimizer step is seen)
    per token, saved until backward by a layer in mode
      keep      attn = b(2H + 2q + 2kv + r_attn) + 4·heads + 8
                mlp  = b(2H + 2I + r_mlp) (our fused MLP), b(2H + 4I + r_mlp) (another)   (tiled: 2Hb)
      recompute Hb (its input)          offload 0 (its input waits in host memory)
    R  (a checkpointed layer's recompute, during its backward) = keep - saved(its mode) + Hb
                                             (+ Hb: the gradient arriving from the layer above)
    W  (one layer's backward working set)  = max(Ib, b(3H + 2q + 2kv) - 2Ib) (our fused MLP)
                                             or b(3H + 2q + 2kv) + 3Ib (another MLP)
                                             (+Hb prefetch when offloading, below LATE_FETCH_BYTES)
                                             tiled MLP: max(0, b(3H + 2q + 2kv) - 2Ib)
    L  (the loss at the end of the forward)                     = 8 (fused loss), + V(b + 8) unfused
    peak = static + T · max( sum_i S_i + Hb + L,  max_j [ sum_{i<=j} S_i + R_j·[j checkpointed] + W_j ] )
           + T · c (calibration) + the tiled MLP's one-chunk transient - A
           (A: gradients a probe found absent at its peak; then at least static + 3·T·Hb)

What a kept layer saves, with our kernels: the normed input and the attention block's residual output
(2H), q, k and v (after RoPE) and SDPA's output (2q + 2kv) with its fp32 log-sum-exp (4 bytes a head),
the MLP's normed input and the layer's output (2H), gate and up (2I; the fused MLP forms act(gate) * up
again in backward, another MLP also saves it and PEFT's fp32 copy of it for lora_A: 4I), every LoRA
product x A^T (r) and the two RMSNorms' fp32 rstd (8). Per family, counted the same way: Qwen3's and
Gemma 3's norms on q and k add b(q + kv) + 4(heads + kv heads); Gemma's four norms per layer add 3Hb + 8
(Gemma 3 at two shapes; Gemma 2 has the same layout, not counted: its sliding-window layers give SDPA a
seq x seq mask, which this model does not cover). The fused MLP's backward forms one tokens x I
buffer; the attention's backward runs after the MLP's saved gate and up are freed, hence the max in W.
``benchmarks/planner_model_check.py`` counts these on the CPU (every storage a patched layer creates,
under the Triton interpreter; offload simulated, its host buffers not counted; the peak's slope taken per
phase, the forward and each checkpointed layer's backward, since at the few tokens counted a fixed-size
buffer can decide where the largest count sits): with the fused MLP every plan (all keep, all recompute,
all offload, mixed; tiled or not) is within 0.3% at three layers, and keep, recompute and W are exact;
with another MLP the peaks are 3-7% high. A checkpointed layer's backward holds its whole saved set (the
recompute's: its own input is in the prefix, or fetched back), the gradient arriving from the layer above,
and no recomputed output (freed before its backward) nor the MLP output its recompute skips (zeros from
one element). Against the H200's measured peaks (2026-12-01, one-GPU Llama-1B
shapes, with the MLP backward of the time: W = 3Ib, and the static part from the trained parameters'
sizes): the 524,288-token step (keep 1, recompute 13, offload 2) 89.2 GiB predicted against 85.3
measured (+4.6%; that static part counts AdamW states the single measured step had not created yet);
131,072 tokens (keep 14, recompute 2) 117.4 against 117.8 (-0.3%); the eleventh session's correction of
the checkpointed layers' backward leaves both as they are (their peaks sit at kept layers). The model
before the tenth session's said 110.7 GiB for the first. Offloaded, tiled plans at long context were
under-predicted on the GPU: at 131,072 tokens about 36 KB per token against 55 measured. The trace
(``benchmarks/memory_trace.py --cpp``) found cuDNN's attention-backward workspace, four hidden states per
token, which the model does not count; since attention runs over groups of heads there
(``head_groups.py``) it is a quarter of that, and the calibrated prediction of that plan was +5.0%.

The backward runs from the top layer down, freeing as it goes, so the plan keeps the top layers,
recomputes the middle and offloads the bottom: the largest prefix then meets no recompute.

**Speed model** (one layer's forward = 1, its backward = 2): keep 3, recompute 4, offload 4.05 (copies
hidden behind compute), a tiled MLP in a kept layer +0.6 (its chunks are run again in backward), in a
checkpointed layer of the families with ``FamilySpec.residual_mlp`` +0.05 (the recompute skips the MLP).
Where offloaded layers replay their attention (``attention_replay.py``), an offload costs 4.05 less the
attention's share of a forward's FLOPs (``attention_replay.attention_share``; 3.23 for Llama-1B at 131K
tokens): an offload is then both faster and smaller than a recompute, so every layer not kept is
offloaded (1.21x the recomputed-attention step measured at 131K, 1.25x by this model). The
search enumerates (tiling: none / checkpointed layers / all) x (layers kept) x (layers offloaded) and takes
the cheapest plan whose predicted peak fits ``budget x (1 - headroom)``.

**CUDA graphs** (``recompute_graphs.py``; ``cuda_graphs: true``): the checkpointed layers of a plan
replay CUDA graphs, whose shared pool (one checkpointed layer's recompute and
backward) stays reserved between steps, where ``memory_allocated`` does not see it. A plan that
checkpoints a layer therefore counts the pool on top of its peak: estimated before the captures as one
untiled layer's R + W per token (``graph_pool_estimate``), or the reserved memory the captures added
per token where that is larger (on the H200 a capture that reused cached memory read 0); a pool that
moved by 2% of the budget re-plans. A graphed checkpointed layer costs
``TIME_GRAPHED_GAIN`` (0.15) less in the speed model. The fastest plan with the pool is weighed against the
fastest without it (which may keep more layers): the faster one that fits wins, and when it is the one
without, the graphs are held back (``held_eager``) and every layer runs eagerly. A new plan frees the
graphs (a layer's mode or tiling may have changed); they are captured again after their warm-up.
The probe runs before the captures, so what the graphs hold beyond this count is not measured: on an
H200 (2026-12-03) ``cuda_graphs: true`` plans peaked 0.3-0.9 GiB above their predictions, over 6.5 and
7 GiB budgets. So with graphs captured, a peak over the budget (read at a forward's start) turns the
graphs off for the run and the plan is re-made eagerly, where the calibrated prediction is what the
step measures (``_overrun``). Counting the excess as static memory instead (the nineteenth session's
guard) made every later plan pay it, graphed or not: at 6.5 GiB the plan fell to all offloaded with
tiled MLPs, 37.5K tokens/s at 7.02 GiB, still over, where the eager plan ran 57.7K at 6.17 GiB.

**Error.** Before calibration the model is a count of the tensors autograd saves in a Llama-style layer
(it ignores allocator rounding, the attention kernel's choice of what to save, and transient buffers other
than those named); the 15% first-step headroom covers that. After calibration the prediction for the
probed plan is the measured peak by construction; for other plans the error is what the per-mode costs
and the correction do not transfer. On an H200 (2026-12-03) nine runs (W1 at 4 x 2048 with five budgets,
at 16K, 32K and 131K tokens, Mistral-7B QLoRA at 8K) were predicted 0.0% to +1.5% above their measured
peaks (before the absent gradients were left out: +5.0% to +8.0% where the budget was tight); the GPU
test checks it within 10%. On the CPU nothing is measured: with an explicit budget the analytical model alone plans; without one, every layer
is kept (no device memory to plan for).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from cpt_plugin.offload.checkpointing import (
    HOST_RESERVE_BYTES,
    LATE_FETCH_BYTES,
    LayerPlan,
    decoder_layers,
    enable_layer_plan,
    host_memory_available,
    layer_plan_holder,
    offload_pool_stats,
)

logger = logging.getLogger(__name__)

GIB = 2**30
HEADROOM = 0.05  # fraction of the budget kept free for the calibrated model's error
FIRST_HEADROOM = 0.15  # before the probe has calibrated the model
DEFAULT_MARGIN_BYTES = GIB  # default budget: free memory - (1 GiB + 5%)
DEFAULT_MARGIN_FRACTION = 0.05
STEP_DOWN = 0.85  # after an OOM: plan for this fraction of the failed plan's predicted peak
STATIC_REPLAN_FRACTION = 0.02  # re-plan when static memory moved by this fraction of the budget
END_OF_BACKWARD_HIDDEN = 3  # hidden states per token alive while the last gradients are made

# Relative step time of one layer (forward 1, backward 2); see the module doc.
TIME_KEEP, TIME_RECOMPUTE, TIME_OFFLOAD = 3.0, 4.0, 4.05
TIME_TILED_KEPT, TIME_TILED_SKIPPED = 0.6, 0.05
# A checkpointed layer replaying its CUDA graphs (recompute_graphs.py, ``cuda_graphs: true`` with auto):
# from the fifteenth session's H200 medians at Llama-1B 4 x 2048 (16 layers kept 111.7 ms, offloaded
# 149.2 ms eagerly and 143.5 ms graphed; several calls), an offload costs 2.33 ms more than a keep eagerly
# (1.05 units) and 1.99 ms graphed: 0.15 units less. A mixed 8 GiB plan measured no gain (BENCHMARKS.md).
TIME_GRAPHED_GAIN = 0.15
TILINGS = ("none", "checkpointed", "all")


# ----------------------------------------------------------------------------------------------
# The model: per-token costs
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShapes:
    """What the memory model needs to know about the model."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    act_bytes: int  # bytes per activation element (2 for bf16)
    lora_rank_attn: int = 0  # sum of LoRA ranks over the attention projections of one layer
    lora_rank_mlp: int = 0
    fused_loss: bool = True
    residual_mlp: bool = True  # the recompute of a tiled MLP can be skipped (FamilySpec.residual_mlp)
    fused_mlp: bool = False  # the MLP runs our fused LoRA function (its backward reuses its buffers)
    qk_norm: bool = False  # an RMSNorm on q and on k per head (Qwen3, Gemma 3)
    sandwich_norms: bool = False  # four norms per layer, around attention and MLP (Gemma 2 and 3)
    attention_replay: bool = False  # offloaded layers' recompute skips attention (attention_replay.py)


@dataclass(frozen=True)
class LayerCosts:
    """Bytes per token; ``*_tiled``: the layer's MLP runs tiled."""

    keep: float
    keep_tiled: float
    recompute: float
    offload: float
    work: float  # W: one layer's backward working set
    loss: float  # L: the loss and final hidden state at the end of the forward
    hidden: float  # one hidden state (Hb)
    tile_transient: float  # bytes (not per token): one chunk's MLP working set
    correction: float = 0.0  # c: calibration, per token
    work_tiled: float | None = None  # W of a layer whose MLP runs tiled (None: ``work``)
    # bytes (not per token) of gradients that a probe found not yet created at its peak (the embedding's,
    # made after the decoder layers' backward): counted by ``static`` (every gradient), not at the peak
    absent_grads: float = 0.0

    def saved(self, mode: str, tiled: bool) -> float:
        if mode == "keep":
            return self.keep_tiled if tiled else self.keep
        return self.recompute if mode == "recompute" else self.offload

    def recompute_transient(self, tiled: bool, mode: str = "recompute") -> float:
        """What a checkpointed layer holds in its backward beyond its saved part (module doc: R)."""
        keep = self.keep_tiled if tiled else self.keep
        return keep - self.saved(mode, tiled) + self.hidden  # + the gradient arriving from the layer above

    def backward_work(self, tiled: bool, mode: str = "recompute") -> float:
        if not tiled or self.work_tiled is None:
            return self.work
        # a kept tiled layer: the gradient arriving from above and the tiled MLP's dX buffer (counted); a
        # checkpointed one has the first in its recompute term and room for the second once it frees its
        # recomputed output
        return self.work_tiled + (2 * self.hidden if mode == "keep" else 0.0)


def analytic_costs(shapes: ModelShapes, chunk_tokens: int) -> LayerCosts:
    """The uncalibrated model (module doc): the tensors a Llama-style layer saves, per token."""
    b = shapes.act_bytes
    h, i = shapes.hidden, shapes.intermediate
    q, kv = shapes.heads * shapes.head_dim, shapes.kv_heads * shapes.head_dim
    attn = b * (2 * h + 2 * q + 2 * kv + shapes.lora_rank_attn) + 4 * shapes.heads + 8
    if shapes.qk_norm:  # each norm saves its input and an fp32 rstd per head
        attn += b * (q + kv) + 4 * (shapes.heads + shapes.kv_heads)
    if shapes.sandwich_norms:  # counted on the CPU for Gemma 3 at two shapes
        attn += 3 * h * b + 8
    # gate and up; another MLP also saves act(gate) * up and PEFT's fp32 copy of it (module doc)
    mlp = b * (2 * h + (2 if shapes.fused_mlp else 4) * i + shapes.lora_rank_mlp)
    # beyond the final hidden state (``hidden``): counted on the CPU, the fused loss adds nothing per token
    # but its losses (its logits chunk is fixed-size); the unfused one keeps the logits and fp32 copies
    loss = 8 + (0 if shapes.fused_loss else shapes.vocab * (b + 8))
    # The MLP's backward buffers: ours forms act(gate) * up again and writes its gradient into it, and d gate,
    # d up over gate, up (I); otherwise act(gate) * up, d gate and d up each have their own (3I).
    mlp_work = b * (i if shapes.fused_mlp else 3 * i)
    attention_work = b * (3 * h + 2 * q + 2 * kv)
    if shapes.fused_mlp:  # the attention's backward runs once the MLP's gate and up are freed
        work = max(mlp_work, attention_work - 2 * b * i)
    else:
        work = attention_work + mlp_work
    # a tiled MLP's backward works one chunk at a time (tile_transient, fixed): only the attention's is
    # per token, counted on the CPU as none beyond the recompute's saved set at I = 4H
    work_tiled = max(0.0, attention_work - 2 * b * i)
    return LayerCosts(
        keep=attn + mlp,
        keep_tiled=attn + 2 * h * b,
        recompute=h * b,
        offload=0.0,
        work=work,
        loss=loss,
        hidden=h * b,
        tile_transient=chunk_tokens * (mlp + mlp_work),  # one chunk: its saved set and backward buffers
        work_tiled=work_tiled,
    )


def predict_peak(
    plan: LayerPlan, costs: LayerCosts, tokens: int, static: float, graph_pool: float | None = None
) -> float:
    """Predicted peak bytes of one training micro-batch under ``plan`` (module doc's formula): allocated,
    plus the CUDA graphs' pool where checkpointed layers replay graphs (``graph_pool``, bytes per token;
    None: no graphs)."""
    prefix = 0.0
    backward = 0.0
    # the input of the layer below travels during an offloaded layer's backward, unless it is large
    # (checkpointing.LATE_FETCH_BYTES: then it travels after that backward)
    early = tokens * costs.hidden < LATE_FETCH_BYTES
    prefetch = costs.hidden if "offload" in plan.modes and early else 0.0
    for mode, tiled in zip(plan.modes, plan.tiled, strict=True):
        prefix += costs.saved(mode, tiled)
        transient = costs.recompute_transient(tiled, mode) if mode != "keep" else 0.0
        backward = max(backward, prefix + transient + costs.backward_work(tiled, mode) + prefetch)
    forward_end = prefix + costs.hidden + costs.loss
    per_token = max(forward_end, backward) + costs.correction
    if graph_pool is not None and any(mode != "keep" for mode in plan.modes):
        per_token += graph_pool
    tile = costs.tile_transient if any(plan.tiled) else 0.0
    activations = static - costs.absent_grads + tokens * per_token + tile
    return max(activations, end_of_backward(costs, tokens, static)) if costs.absent_grads else activations


def end_of_backward(costs: LayerCosts, tokens: int, static: float) -> float:
    """The floor under a prediction that leaves out gradients absent at the activations' peak: once every
    gradient exists (the embedding's backward), the layers' activations are gone but the incoming hidden
    gradient and the embedding backward's fp32 partial sums (up to two hidden states) are not."""
    return static + END_OF_BACKWARD_HIDDEN * tokens * costs.hidden


def graph_pool_estimate(costs: LayerCosts) -> float:
    """Bytes per token of the graphs' pool before a capture measured it: one checkpointed layer's
    recompute and backward (what its eager backward holds beyond the saved prefix), untiled."""
    return costs.recompute_transient(False, "offload") + costs.backward_work(False, "offload")


def offload_time(shapes: ModelShapes, seq: int, lean: bool = True, tokens: int | None = None) -> float:
    """An offloaded layer's relative time: ``TIME_OFFLOAD``, less the attention's share of its recompute
    where the recompute replays the forward's attention (our own checkpoint: ``lean``, one process) at
    sequences of ``seq`` in micro-batches of ``tokens``."""
    from cpt_plugin.offload.attention_replay import attention_share, replays_at

    widths = (shapes.hidden, shapes.intermediate, shapes.heads * shapes.head_dim)
    widths += (shapes.kv_heads * shapes.head_dim,)
    if not (shapes.attention_replay and lean and replays_at(seq, *widths, tokens=tokens)):
        return TIME_OFFLOAD
    return TIME_OFFLOAD - attention_share(seq, *widths)


def plan_time(
    plan: LayerPlan, residual_mlp: bool = True, offload: float = TIME_OFFLOAD, graphed: bool = False
) -> float:
    """Relative step time of ``plan`` (module doc's speed model; ``offload``: an offloaded layer's;
    ``graphed``: checkpointed layers replay CUDA graphs, ``TIME_GRAPHED_GAIN`` faster each)."""
    total = 0.0
    for mode, tiled in zip(plan.modes, plan.tiled, strict=True):
        total += {"keep": TIME_KEEP, "recompute": TIME_RECOMPUTE, "offload": offload}[mode]
        if graphed and mode != "keep":
            total -= TIME_GRAPHED_GAIN
        if tiled:
            total += TIME_TILED_KEPT if mode == "keep" or not residual_mlp else TIME_TILED_SKIPPED
    return total


def canonical_plan(layers: int, keep: int, offload: int, tiling: str) -> LayerPlan:
    """Offload the bottom ``offload`` layers, keep the top ``keep``, recompute between."""
    recompute = layers - keep - offload
    modes = ("offload",) * offload + ("recompute",) * recompute + ("keep",) * keep
    tiled = tuple(tiling == "all" or (tiling == "checkpointed" and m != "keep") for m in modes)
    return LayerPlan(modes, tiled)


def choose_plan(
    layers: int,
    costs: LayerCosts,
    tokens: int,
    static: float,
    budget: float,
    *,
    chunk_tokens: int,
    tiled_mlp: bool = False,
    can_offload: bool = True,
    residual_mlp: bool = True,
    offload: float = TIME_OFFLOAD,
    graph_pool: float | None = None,
) -> tuple[LayerPlan, float, bool]:
    """The fastest canonical plan whose predicted peak is <= ``budget``: (plan, predicted peak, fits).

    ``tiled_mlp`` (the user's switch) tiles every layer; otherwise tiling is considered only when the batch
    is longer than a chunk. ``offload`` is an offloaded layer's time (``offload_time``): when it is below
    a recompute's (attention replayed), every layer not kept is offloaded. ``graph_pool``: the CUDA
    graphs' pool per token, counted for plans with checkpointed layers (``predict_peak``). When nothing
    fits, the smallest plan is returned with ``fits`` False.
    """
    if tiled_mlp:
        tilings: Sequence[str] = ("all",)
    elif tokens > chunk_tokens:
        tilings = TILINGS
    else:
        tilings = ("none",)
    max_off = layers if can_offload else 0
    offload_first = max_off > 0 and offload < TIME_RECOMPUTE
    graphed = graph_pool is not None
    best: tuple[float, float, LayerPlan] | None = None
    smallest: tuple[float, LayerPlan] | None = None
    for tiling in tilings:
        for keep in range(layers, -1, -1):
            fastest = canonical_plan(layers, keep, layers - keep if offload_first else 0, tiling)
            if best is not None and plan_time(fastest, residual_mlp, offload, graphed) > best[0]:
                break  # fewer kept layers only get slower
            # the peak falls as more layers are offloaded: the fewest offloads that fit, by bisection
            # (all of them when an offload is faster than a recompute)
            hi = min(layers - keep, max_off)
            lo = hi if offload_first else 0

            def peak_of(off: int, keep: int = keep, tiling: str = tiling) -> float:
                plan = canonical_plan(layers, keep, off, tiling)
                return predict_peak(plan, costs, tokens, static, graph_pool)

            if peak_of(hi) > budget:
                low_peak = peak_of(hi)
                if smallest is None or low_peak < smallest[0]:
                    smallest = (low_peak, canonical_plan(layers, keep, hi, tiling))
                continue
            while lo < hi:
                mid = (lo + hi) // 2
                if peak_of(mid) <= budget:
                    hi = mid
                else:
                    lo = mid + 1
            plan = canonical_plan(layers, keep, lo, tiling)
            candidate = (plan_time(plan, residual_mlp, offload, graphed), peak_of(lo), plan)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
    if best is not None:
        return best[2], best[1], True
    assert smallest is not None
    return smallest[1], smallest[0], False


def smallest_plan(layers: int, can_offload: bool = True, tiled: bool = True) -> LayerPlan:
    """The plan that holds the least device memory per token: every layer offloaded (recomputed without
    CUDA), every MLP tiled (``tiled``; untiled saves the one-chunk transient at short lengths)."""
    return LayerPlan.uniform(layers, "offload" if can_offload else "recompute", tiled=tiled)


def longest_fitting_tokens(
    layers: int,
    costs: LayerCosts,
    static: float,
    budget: float,
    *,
    can_offload: bool = True,
    host_bytes: float | None = None,
    hidden_bytes: float = 0.0,
) -> int:
    """The most tokens one micro-batch can have under ``budget`` with the smallest plan (0: none fit).

    The predicted peak of a plan is linear in the token count (``predict_peak``), so the bound is solved,
    not searched, for every layer offloaded with and without the tiled MLP (whose one-chunk transient costs
    more than it saves at short lengths). ``host_bytes`` (host memory free for the offloaded layer inputs)
    bounds it too: each offloaded layer keeps ``hidden_bytes`` per token there until its backward."""
    longest = 0
    linear = replace(costs, absent_grads=0.0)  # predict_peak is linear without its end-of-backward floor
    absent = costs.absent_grads
    for tiled in (False, True):
        plan = smallest_plan(layers, can_offload, tiled)
        at_one = predict_peak(plan, linear, 1, static - absent)
        per_token = predict_peak(plan, linear, 2, static - absent) - at_one
        fixed = at_one - per_token
        if per_token > 0 and budget > fixed:
            longest = max(longest, int((budget - fixed) // per_token))
    if absent and budget > static:  # the floor: every gradient with the end of backward's hidden states
        floor_per_token = END_OF_BACKWARD_HIDDEN * costs.hidden
        if floor_per_token > 0:
            longest = min(longest, int((budget - static) // floor_per_token))
    elif absent:
        longest = 0
    if can_offload and host_bytes is not None and hidden_bytes > 0:
        longest = min(longest, int(host_bytes // (layers * hidden_bytes)))
    return max(longest, 0)


def loss_chunk_extra(budget: int | None, tokens: int, shapes: ModelShapes) -> float:
    """Bytes the fused loss' logits chunk under ``budget`` holds beyond its default chunk's."""
    from cpt_plugin.kernels.fused_linear_cross_entropy import extra_memory_bytes

    if budget is None:
        return 0.0
    dtype = {2: torch.bfloat16, 4: torch.float32}.get(shapes.act_bytes, torch.bfloat16)

    def chunk(chunk_bytes: int | None) -> int:
        parts = extra_memory_bytes(
            tokens, shapes.hidden, shapes.vocab, dtype, device="cuda", chunk_bytes=chunk_bytes
        )
        return parts["logits_chunk"]

    return float(chunk(budget) - chunk(None))


def mlp_products_bytes(plan: LayerPlan, tokens: int, shapes: ModelShapes) -> float:
    """Bytes the plan's kept, untiled layers hold when their fused MLPs keep ``act(gate) * up`` from the
    forward for backward (tokens x intermediate each); 0 without our fused MLP."""
    if not shapes.fused_mlp:
        return 0.0
    kept = sum(1 for mode, tiled in zip(plan.modes, plan.tiled, strict=True) if mode == "keep" and not tiled)
    return float(kept * tokens * shapes.intermediate * shapes.act_bytes)


def loss_chunk_for(spare: float, tokens: int, shapes: ModelShapes) -> tuple[int | None, float]:
    """The largest of the fused loss' ``LARGER_CHUNK_CHOICES`` whose extra bytes over the default chunk fit
    ``spare``, and those extra bytes; (None, 0): the default (no room, or the batch fits one default chunk)."""
    from cpt_plugin.kernels.fused_linear_cross_entropy import larger_chunk_for

    chunk, extra = larger_chunk_for(tokens, shapes.vocab, shapes.act_bytes, spare)
    return chunk, float(extra)


# ----------------------------------------------------------------------------------------------
# Agreement between ranks
# ----------------------------------------------------------------------------------------------
def agree(
    values: Sequence[float], minimum: Sequence[bool], reduce_max: Callable | None = None
) -> list[float]:
    """Every rank's ``values`` reduced: MIN where ``minimum[i]``, MAX elsewhere (no-op in one process).

    ``reduce_max`` (tests) takes and returns a float64 tensor; by default torch.distributed's all_reduce
    MAX over the default group (on the current CUDA device for NCCL).
    """
    signed = [-v if m else v for v, m in zip(values, minimum, strict=True)]
    if reduce_max is None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return list(values)
        if torch.distributed.get_world_size() == 1:
            return list(values)
        reduce_max = _all_reduce_max
    reduced = reduce_max(torch.tensor(signed, dtype=torch.float64)).tolist()
    return [-v if m else v for v, m in zip(reduced, minimum, strict=True)]


def _all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    dist = torch.distributed
    if dist.get_backend() == "nccl":
        tensor = tensor.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.cpu()


def distributed_world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# ----------------------------------------------------------------------------------------------
# The planner attached to a model
# ----------------------------------------------------------------------------------------------
_MISSING = -1e30  # "not measured" in the agreed vector (loses every MAX)
_CALIBRATION_SIZE = 6  # what _finish_probe returns; the last (absent gradients) is agreed with MIN
MAX_PROBES_PER_LENGTH = 3  # probes at one length when the plan moves to modes no probe measured
# the LayerCosts field a probe measures for each (mode, tiled) layer kind; offload saves nothing to measure
_MEASURED_FIELD = {("keep", False): "keep", ("keep", True): "keep_tiled", ("recompute", False): "recompute",
                   ("recompute", True): "recompute"}  # fmt: skip


class MemoryPlanner:
    """Chooses and updates the layer plan of one model; the observer of its planned layers."""

    def __init__(
        self,
        layers: Sequence[torch.nn.Module],
        shapes: ModelShapes,
        trainable: Sequence[torch.nn.Parameter],
        *,
        budget_gib: float | None,
        chunk_tokens: int,
        tiled_mlp: bool,
        can_offload: bool,
        set_tiling: Callable[[Sequence[bool]], Any] | None = None,
        static_bytes: Callable[[], float] | None = None,
        host_static_bytes: Callable[[], float] | None = None,
    ) -> None:
        self.layers = list(layers)
        self.shapes = shapes
        self.trainable = list(trainable)
        self.budget_gib = budget_gib
        self.chunk_tokens = chunk_tokens
        self.tiled_mlp = tiled_mlp
        self.can_offload = can_offload
        self._set_tiling = set_tiling
        self._static_bytes = static_bytes  # tests: the static memory (weights, buffers) without measuring
        self._host_static_bytes = host_static_bytes  # off CUDA: the model's parameter and buffer bytes
        self.costs = analytic_costs(shapes, chunk_tokens)
        self.holder: Any = None  # the PlanHolder, set by install_planner
        self.plan = LayerPlan.uniform(len(self.layers), "keep")
        self.tokens = 0
        self.seq = 0  # the longest sequence planned for (the speed of a replayed attention depends on it)
        self.budget: float | None = None
        self.predicted = 0.0
        self.fits = True
        self.calibrated = False
        self.oom_retries = 0
        self._static_planned = 0.0
        self.last_probe: dict[str, Any] | None = None  # the last probe's numbers (see _finish_probe)
        self._pool_planned = 0.0  # the graphs' pool counted in the plan (bytes)
        self._pool_rate_planned: float | None = None  # its bytes per token the plan was chosen with
        self._static_first: float | None = None
        self._optimizer_seen = False
        self._pending_optimizer = 0.0  # the AdamW estimate included in the last static value
        self._calibrated_tokens = 0
        self._probe_wanted = False  # measure the next step again (after an OOM changed the plan)
        self._measured: dict[str, float] = {}  # per-token costs some probe measured, by LayerCosts field
        self._estimated: dict[str, float] = {}  # keep, estimated from checkpointed layers' recomputes
        self._probes_at_length = 0  # probes run for the current calibrated length
        self._budget_cap: float | None = None  # after an OOM: what the device proved it cannot hold
        self._probe: dict[str, Any] | None = None
        self._log: dict[str, float] = {}
        self._grad_bytes = sum(p.numel() * p.element_size() for p in self.trainable)
        self._present_grads = 0.0  # gradient bytes alive at the last forward start
        self._grads_persist = False  # seen alive at a forward start: a peak may hold every gradient
        self.overruns = 0  # peaks over the budget with CUDA graphs captured (_overrun: graphs then off)
        self._overrun_peak = 0.0
        self.device: torch.device | None = None
        self.loss_modules: list[torch.nn.Module] = []  # models whose fused loss takes the chunk budget
        self.loss_chunk_bytes: int | None = None  # None: the loss' default chunk
        self.mlp_products = False  # kept layers' fused MLPs keep act(gate) * up for backward
        self.kept_graphs = False  # kept layers replay CUDA graphs (cuda_graphs unset: granted here)

    # --- observer of the layers --------------------------------------------------------------
    def layer_start(self, index: int, x: Any) -> None:
        if index == 0 and isinstance(x, torch.Tensor) and x.dim() >= 2:
            self._forward_start(x)
        probe = self._probe
        if probe is not None and probe["running"]:
            probe["live"].append(torch.cuda.memory_allocated(self.device))

    def layer_end(self, index: int) -> None:
        probe = self._probe
        if probe is not None and probe["running"] and index == len(self.layers) - 1:
            probe["running"] = False  # the forward is done; the peak is read in backward

    def layer_recomputed(self, index: int, nbytes: int) -> None:
        """A checkpointed layer's recompute left ``nbytes`` allocated: about what keeping it would hold
        (its saved activations and output), so a probe that kept no layer still estimates ``keep``."""
        probe = self._probe
        if probe is None or probe["running"]:
            return
        tiled = probe["plan"].tiled
        if index < len(tiled) and not tiled[index]:  # a tiled MLP's recompute saves less than keeping it
            probe["recomputed"].append(nbytes)

    # --- planning ------------------------------------------------------------------------------
    def _forward_start(self, x: torch.Tensor) -> None:
        self.device = x.device
        tokens = x.numel() // x.shape[-1]
        seq = x.shape[-2] if x.dim() >= 3 else tokens
        measuring = x.is_cuda
        if self.budget is None and self.budget_gib is None and not measuring:
            self.tokens = max(self.tokens, tokens)  # CPU without a budget: nothing to plan for
            return
        calibration = self._finish_probe() if measuring else None
        if calibration is not None:  # later peaks are the calibrated plans' (see _overrun)
            torch.cuda.reset_peak_memory_stats(self.device)
        overrun = measuring and calibration is None and self._overrun()
        static = self._static()
        budget = self._budget(x)
        values = [float(tokens), budget, static, float(seq), self._present_grads]
        values += calibration or [_MISSING] * _CALIBRATION_SIZE
        minimum = [False, True, False, False, False] + [False] * (_CALIBRATION_SIZE - 1) + [True]
        tokens_f, budget, static, seq_f, present, *cal = agree(values, minimum)
        tokens = int(tokens_f)
        replan = False
        if present > 0 and not self._grads_persist:
            # gradients alive at a forward's start (gradient accumulation, or zeroed rather than freed):
            # they are all there at every later peak, so none may be left out of a prediction again
            self._grads_persist = True
            if self.costs.absent_grads:
                self.costs = replace(self.costs, absent_grads=0.0)
                replan = self.holder is not None and self.tokens > 0
        if int(seq_f) > self.seq:
            self.seq = int(seq_f)
            replan = replan or (self.holder is not None and self.tokens > 0)
        self.budget = budget
        replan = replan or (self.holder is not None and self.tokens == 0)
        if cal[3] != _MISSING:  # the correction is there whenever a probe finished
            self._calibrate(cal)
            replan = True
        if tokens > self.tokens:
            replan = True
        if abs(static - self._static_planned) > STATIC_REPLAN_FRACTION * budget:
            replan = True
        if self._graph_pool_moved(budget):
            replan = True
        reason = "first batch" if self.tokens == 0 else None
        if overrun:
            replan = True
            reason = (
                f"the last steps peaked at {self._overrun_peak / GIB:.3g} GiB, over the budget, with CUDA "
                "graphs, whose memory the plan can only estimate: the layers run without graphs from now on"
            )
        if replan:
            self._replan(max(tokens, self.tokens), static, reason)
        wanted = not self.calibrated or tokens > self._calibrated_tokens or self._probe_wanted
        wanted = wanted or self._plan_has_unmeasured_modes()
        if measuring and wanted:
            self._probe_wanted = False
            self._start_probe(tokens, static)

    def _plan_has_unmeasured_modes(self) -> bool:
        """Whether the plan now in use keeps or recomputes layers although no probe measured that mode.

        A probe measures only the modes its plan ran: calibrated on an all-offload probe, a plan that keeps
        layers still prices them analytically, and the correction (fitted to the probed plan) does not
        transfer. So such a plan is probed once more, up to ``MAX_PROBES_PER_LENGTH`` times per length.
        """
        if not self.calibrated or self._probes_at_length >= MAX_PROBES_PER_LENGTH:
            return False
        kinds = set(zip(self.plan.modes, self.plan.tiled, strict=True))
        needed = {_MEASURED_FIELD[kind] for kind in kinds if kind in _MEASURED_FIELD}
        return not needed.issubset(self._measured)

    def _static(self) -> float:
        """Static bytes: measured (minus gradients present) + every gradient + optimizer states to come."""
        present = sum(p.grad.numel() * p.grad.element_size() for p in self.trainable if p.grad is not None)
        self._present_grads = float(present)
        if self._static_bytes is not None:
            base = float(self._static_bytes())
        elif self.device is not None and self.device.type == "cuda":
            # the CUDA graphs of kept layers hold those layers' activations between steps: not static
            graphs = getattr(self.holder, "graphs", None)
            held = graphs.held_bytes if graphs is not None else 0
            base = torch.cuda.memory_allocated(self.device) - present - held
        elif self._host_static_bytes is not None:
            base = float(self._host_static_bytes())
        else:
            base = 0.0
        if self._static_first is None:
            self._static_first = base
        optimizer_estimate = 2 * self._grad_bytes
        if not self._optimizer_seen and base - self._static_first >= 0.2 * optimizer_estimate > 0:
            self._optimizer_seen = True
        self._pending_optimizer = 0.0 if self._optimizer_seen else float(optimizer_estimate)
        return base + self._grad_bytes + self._pending_optimizer

    def _graphs_captured(self) -> bool:
        """Whether some layer replays a CUDA graph now (kept layers' or checkpointed layers')."""
        kept = getattr(self.holder, "graphs", None)
        checkpointed = getattr(self.holder, "recompute_graphs", None)
        if (
            kept is not None
            and kept.captured
            and getattr(kept, "granted", True)
            and getattr(kept, "off_reason", None) is None
        ):
            return True
        return (
            checkpointed is not None
            and checkpointed.captured > 0
            and not checkpointed.held_eager
            and checkpointed.off_reason is None
        )

    def _overrun(self) -> bool:
        """With CUDA graphs captured (their memory is estimated: the probe ran before the captures), a peak
        since the last reading above the budget turns every graph off (``_graphs_off``); True when it did.
        The eager plan chosen next is priced from the probe's measurement. Graphs run in one process
        only, so no other rank has to agree."""
        if self.budget is None or not self.calibrated or not self._graphs_captured():
            return False
        peak = float(torch.cuda.max_memory_allocated(self.device))
        if peak <= self.budget:
            return False
        torch.cuda.reset_peak_memory_stats(self.device)  # the next reading is the eager plan's
        self.overruns += 1
        self._overrun_peak = peak
        self._graphs_off(f"a peak of {peak / GIB:.3g} GiB over the {self.budget / GIB:.3g} GiB budget")
        return True

    def _graphs_off(self, reason: str) -> None:
        """Frees the kept and the checkpointed layers' graphs for the rest of the run (no new captures)."""
        for name in ("graphs", "recompute_graphs"):
            graphs = getattr(self.holder, name, None)
            if graphs is not None and hasattr(graphs, "reset"):
                graphs.off_reason = reason
                graphs.reset()

    def _budget(self, x: torch.Tensor) -> float:
        if self.budget is not None:
            return self.budget
        if self.budget_gib is not None:
            return self.budget_gib * GIB
        free, _total = torch.cuda.mem_get_info(x.device)
        available = free + torch.cuda.memory_reserved(x.device)
        return max(available - DEFAULT_MARGIN_BYTES - DEFAULT_MARGIN_FRACTION * available, 0.0)

    def _target(self) -> float:
        assert self.budget is not None
        headroom = HEADROOM if self.calibrated else FIRST_HEADROOM
        target = self.budget * (1 - headroom)
        if self._budget_cap is not None:
            target = min(target, self._budget_cap)
        return target

    def _replan(self, tokens: int, static: float, reason: str | None = None) -> bool:
        """Chooses the plan for ``tokens``; returns whether it changed."""
        pool = self._graph_pool(tokens)
        plan, predicted, fits = self._choose(tokens, static, pool)
        graphed = pool is not None
        if graphed:  # without the graphs' pool a plan may fit that keeps more layers
            eager = self._choose(tokens, static, None)
            if self._prefer_eager(tokens, (plan, predicted, fits), eager):
                (plan, predicted, fits), graphed = eager, False
        self._use_graphs(graphed)
        self._pool_rate_planned = pool
        self._pool_planned = self._graph_pool_bytes(tokens, plan) if graphed else 0.0
        kept_graphs, graphs_extra = self._kept_graphs(plan, tokens, predicted, fits)
        predicted += graphs_extra
        # graphs first (they are worth more), then the MLP products from what is left
        products, products_extra = self._mlp_products(plan, tokens, predicted, fits)
        predicted += products_extra
        chunk, extra = self._loss_chunk(tokens, predicted, fits)
        changed = plan != self.plan or tokens != self.tokens or chunk != self.loss_chunk_bytes
        changed = changed or products != self.mlp_products or kept_graphs != self.kept_graphs
        predicted += extra
        self.tokens, self._static_planned, self.predicted, self.fits = tokens, static, predicted, fits
        if plan != self.plan or reason == "first batch":
            self._apply(plan)
        self._set_kept_graphs(kept_graphs)
        self._set_mlp_products(products)
        self._set_loss_chunk(chunk)
        if changed or reason:
            self._report(reason)
        return changed

    def _choose(self, tokens: int, static: float, pool: float | None) -> tuple[LayerPlan, float, bool]:
        return choose_plan(
            len(self.layers),
            self.costs,
            tokens,
            static,
            self._target(),
            chunk_tokens=self.chunk_tokens,
            tiled_mlp=self.tiled_mlp,
            can_offload=self.can_offload,
            residual_mlp=self.shapes.residual_mlp,
            offload=self._offload_time(tokens),
            graph_pool=pool,
        )

    def _prefer_eager(
        self, tokens: int, graphed: tuple[LayerPlan, float, bool], eager: tuple[LayerPlan, float, bool]
    ) -> bool:
        """Between the fastest plan with the graphs' pool and the fastest without: the one that fits, then
        the faster (``plan_time`` with the graphs' gain), or when neither fits the smaller."""
        if graphed[2] != eager[2]:
            return eager[2]
        if not eager[2]:
            return eager[1] < graphed[1]
        residual, offload = self.shapes.residual_mlp, self._offload_time(tokens)
        return plan_time(eager[0], residual, offload) < plan_time(graphed[0], residual, offload, graphed=True)

    def _use_graphs(self, use: bool) -> None:
        """Lets the checkpointed layers replay their graphs, or holds them eager (their pool does not fit)."""
        graphs = getattr(self.holder, "recompute_graphs", None)
        if graphs is not None and graphs.held_eager != (not use):
            graphs.held_eager = not use
            graphs.reset()

    def _graph_pool(self, tokens: int) -> float | None:
        """Bytes per token of the CUDA graphs' pool the checkpointed layers replay from at ``tokens``
        (recompute_graphs.py): the estimate, or the captures' measurement where larger; None where no graphs
        run."""
        graphs = getattr(self.holder, "recompute_graphs", None)
        if graphs is None or not graphs.applies_to(tokens):
            return None
        # the captures' reserved growth can read low (H200: 0 where a capture reused cached memory), so
        # it only ever raises the estimate
        return max(graph_pool_estimate(self.costs), graphs.pool_bytes_per_token or 0.0)

    @property
    def static_planned_bytes(self) -> float:
        """The static memory (weights, buffers, optimizer states, every gradient) the plan was made with."""
        return self._static_planned

    @property
    def graph_pool_bytes(self) -> float:
        """The CUDA graphs' pool the current plan counts (0: no graphs, or every layer kept)."""
        return self._pool_planned

    def _graph_pool_moved(self, budget: float) -> bool:
        """Whether the graphs' pool per token (measured at the captures, or graphs turned off) moved
        since the plan was chosen by more than ``STATIC_REPLAN_FRACTION`` of the budget."""
        now, planned = self._graph_pool(self.tokens), self._pool_rate_planned
        if (now is None) != (planned is None):
            return True
        return (
            now is not None
            and planned is not None
            and abs(now - planned) * self.tokens > (STATIC_REPLAN_FRACTION * budget)
        )

    def _graph_pool_bytes(self, tokens: int, plan: LayerPlan) -> float:
        pool = self._graph_pool(tokens)
        return 0.0 if pool is None or all(m == "keep" for m in plan.modes) else pool * tokens

    def _offload_time(self, tokens: int) -> float:
        """An offloaded layer's relative time at the longest sequence planned for (``offload_time``). A
        replayed offload counts only when the host can hold every layer's parked bytes: the plan then
        offloads every layer it does not keep, and a host that cannot hold them gets the fewest offloads."""
        fast = offload_time(self.shapes, self.seq, lean=distributed_world() <= 1, tokens=tokens)
        if fast >= TIME_OFFLOAD or not self.can_offload:
            return fast
        host = self._host_bytes_for_offload()
        needed = len(self.layers) * tokens * self._host_bytes_per_token()
        return fast if host is None or needed + HOST_RESERVE_BYTES <= host else TIME_OFFLOAD

    def _loss_chunk(self, tokens: int, predicted: float, fits: bool) -> tuple[int | None, float]:
        """Memory the fastest plan leaves under the target goes to the fused loss' logits chunk (fewer,
        larger chunks are faster). Only once calibrated (the first plan's headroom is for the model's
        error) and on CUDA (the chunk sizes were measured there)."""
        on_cuda = self.device is not None and self.device.type == "cuda"
        if not (fits and self.calibrated and on_cuda and self.shapes.fused_loss and self.loss_modules):
            return None, 0.0
        return loss_chunk_for(self._target() - predicted, tokens, self.shapes)

    def _mlp_products(self, plan: LayerPlan, tokens: int, predicted: float, fits: bool) -> tuple[bool, float]:
        """Memory the fastest plan leaves under the target lets its kept layers keep their fused MLP's
        ``act(gate) * up`` for backward, which would otherwise form it again (one kernel per layer; on an
        H200 at Llama-1B 4 x 2048, 1.5 ms of a 110 ms step for 2 GiB): (whether, its bytes). It comes
        before the loss chunk, which takes what is left. Only once calibrated and on CUDA, as the chunk."""
        on_cuda = self.device is not None and self.device.type == "cuda"
        if not (fits and self.calibrated and on_cuda):
            return False, 0.0
        extra = mlp_products_bytes(plan, tokens, self.shapes)
        if extra <= 0 or predicted + extra > self._target():
            return False, 0.0
        return True, extra

    def _managed_kept_graphs(self) -> Any:
        """The kept layers' graphs this planner grants (``cuda_graphs`` unset), or None."""
        graphs = getattr(self.holder, "graphs", None)
        if graphs is None or not getattr(graphs, "managed", False) or graphs.off_reason is not None:
            return None
        return graphs

    def _kept_graphs(self, plan: LayerPlan, tokens: int, predicted: float, fits: bool) -> tuple[bool, float]:
        """A plan that keeps every layer, untiled, with room under the target for the graphs' extra memory
        (``layer_graphs.kept_graph_extra_bytes``, asked of the graphs: this module does not import theirs) runs its layers as CUDA graphs: (whether, those bytes).

        Why: the kept layers' forward waits on the host (on an H200 at Llama-1B 4 x 2048: eager steps of
        103-124 ms, graphed ones 95-97). Only every layer kept: under a budget that checkpoints some,
        graphs took memory a kept layer would use and were no faster (docs/BENCHMARKS.md, 2026-12-03).
        Only once calibrated and on CUDA, as the loss chunk."""
        on_cuda = self.device is not None and self.device.type == "cuda"
        graphs = self._managed_kept_graphs()
        if graphs is None or not (fits and self.calibrated and on_cuda):
            return False, 0.0
        if any(mode != "keep" for mode in plan.modes) or any(plan.tiled):
            return False, 0.0
        trainable = sum(p.numel() * p.element_size() for p in self.layers[0].parameters() if p.requires_grad)
        shapes = self.shapes
        extra = graphs.extra_bytes(len(self.layers), tokens, shapes.hidden, shapes.act_bytes, trainable)
        if predicted + extra > self._target():
            return False, 0.0
        return True, extra

    def _set_kept_graphs(self, on: bool) -> None:
        graphs = self._managed_kept_graphs()
        if graphs is not None:
            graphs.grant(on)
        self.kept_graphs = on and graphs is not None

    def _set_mlp_products(self, keep: bool) -> None:
        if keep != self.mlp_products:
            graphs = getattr(self.holder, "graphs", None)
            if graphs is not None and hasattr(graphs, "reset"):  # captured with the other behaviour
                graphs.reset()
        self.mlp_products = keep
        if self.holder is not None:
            self.holder.mlp_products = keep

    def _set_loss_chunk(self, chunk: int | None) -> None:
        self.loss_chunk_bytes = chunk
        for module in self.loss_modules:
            module.cpt_loss_chunk_bytes = chunk

    def _apply(self, plan: LayerPlan) -> None:
        self.plan = plan
        if self.holder is not None:
            self.holder.plan = plan
        if self._set_tiling is not None:
            self._set_tiling(plan.tiled)

    def _report(self, reason: str | None) -> None:
        assert self.budget is not None
        counts = self.plan.counts()
        longest = self.longest_tokens()
        self._log = {
            "memory_plan_keep": counts["keep"],
            "memory_plan_recompute": counts["recompute"],
            "memory_plan_offload": counts["offload"],
            "memory_plan_tiled": counts["tiled"],
            "memory_plan_tokens": self.tokens,
            "memory_plan_predicted_peak_gib": round(self.predicted / GIB, 3),
            "memory_plan_budget_gib": round(self.budget / GIB, 3),
            "memory_plan_oom_retries": self.oom_retries,
            "memory_plan_overruns": self.overruns,
            "memory_plan_longest_tokens": longest,
            "memory_plan_graph_pool_gib": round(self._pool_planned / GIB, 3),
        }
        if self.loss_chunk_bytes is not None:
            self._log["memory_plan_loss_chunk_mib"] = self.loss_chunk_bytes // 2**20
        self._log["memory_plan_mlp_products"] = int(self.mlp_products)
        self._log["memory_plan_kept_graphs"] = int(self.kept_graphs)
        why = f" ({reason})" if reason else ""
        state = "calibrated" if self.calibrated else "uncalibrated"
        replayed = counts["offload"] and self._offload_time(self.tokens) < TIME_OFFLOAD
        self._log["memory_plan_attention_replayed"] = int(bool(replayed))
        message = (
            "cpt-plugin memory plan for %d tokens%s: %s%s%s; predicted peak %.3g GiB (%s) of a %.3g GiB "
            "budget; the longest micro-batch it predicts to fit: %d tokens (every layer %s, MLP tiled)."
        )
        pool = self._pool_planned
        args = (
            self.tokens,
            why,
            self.plan.describe(),
            " (offloaded layers replay their attention)" if replayed else "",
            (f" (checkpointed layers as CUDA graphs, their pool {pool / GIB:.2g} GiB)" if pool else "")
            + (" (kept layers as CUDA graphs)" if self.kept_graphs else "")
            + (" (MLP products kept for backward)" if self.mlp_products else ""),
            self.predicted / GIB,
            state,
            self.budget / GIB,
            longest,
            "offloaded" if self.can_offload else "recomputed",
        )
        if self.fits or self.oom_retries:  # after an OOM the budget is a guess; oom_retry warns already
            logger.info(message, *args)
        else:
            logger.warning(
                message + " Even this smallest plan does not fit: training continues and may run out of "
                "memory; lower the tokens per micro-batch or raise memory_budget_gib.",
                *args,
            )

    def longest_tokens(self) -> int:
        """The most tokens per micro-batch the budget holds with the smallest plan, by the current model
        (calibrated after the first probe) and static memory; host memory bounds the offloaded inputs."""
        if self.budget is None:
            return 0
        return longest_fitting_tokens(
            len(self.layers),
            self.costs,
            self._static_planned,
            self._target(),
            can_offload=self.can_offload,
            host_bytes=self._host_bytes_for_offload() if self.can_offload else None,
            hidden_bytes=self._host_bytes_per_token(),
        )

    def _host_bytes_per_token(self) -> float:
        """Host memory one offloaded layer holds per token: its input, and where the attention is replayed
        (at the long lengths this bound is about) the attention's output and log-sum-exp (fp32 per head)."""
        shapes = self.shapes
        if not (shapes.attention_replay and distributed_world() <= 1):
            return self.costs.hidden
        return self.costs.hidden + shapes.heads * (shapes.head_dim * shapes.act_bytes + 4)

    @staticmethod
    def _host_bytes_for_offload() -> float | None:
        """Host memory the offloaded inputs can use: what is available plus what the offload's buffer
        pool already holds (it reuses its pinned buffers)."""
        available = host_memory_available()
        if available is None:
            return None
        return available + offload_pool_stats()["bytes"]

    # --- probe and calibration (CUDA) ----------------------------------------------------------
    def _start_probe(self, tokens: int, static: float) -> None:
        # the probe measures with the loss' default chunk and without kept MLP products: what the plan adds
        # to them is counted exactly
        self._set_loss_chunk(None)
        self._set_mlp_products(False)
        self._set_kept_graphs(False)  # the graphs' static copies would count as the kept layers' bytes
        self._probes_at_length = self._probes_at_length + 1 if tokens == self._calibrated_tokens else 1
        torch.cuda.reset_peak_memory_stats(self.device)
        probe: dict[str, Any] = {
            "running": True,
            "live": [],
            "tokens": tokens,
            "plan": self.plan,
            "base": torch.cuda.memory_allocated(self.device),
            "static": static - self._grad_bytes - self._pending_optimizer,  # weights, buffers, states
            "peak": None,
            "grads": None,
            "hooks": [],
            "recomputed": [],
        }
        layer0 = [p for p in self.layers[0].parameters() if p.requires_grad]

        def read_peak(_param: torch.Tensor) -> None:
            peak = torch.cuda.max_memory_allocated(self.device)
            if probe["peak"] is None or peak > probe["peak"]:
                probe["peak"] = peak
                probe["grads"] = sum(
                    p.grad.numel() * p.grad.element_size() for p in self.trainable if p.grad is not None
                )

        for p in layer0:
            probe["hooks"].append(p.register_post_accumulate_grad_hook(read_peak))
        self._probe = probe

    def _discard_probe(self) -> None:
        probe, self._probe = self._probe, None
        for handle in probe["hooks"] if probe is not None else ():
            handle.remove()

    def _finish_probe(self) -> list[float] | None:
        """The probe's per-token costs [keep, keep_tiled, recompute, correction, keep estimated from the
        recomputes] and the gradient bytes not yet made when its peak was read, or None without one."""
        probe, self._probe = self._probe, None
        if probe is None:
            return None
        for handle in probe["hooks"]:
            handle.remove()
        tokens = probe["tokens"]
        plan: LayerPlan = probe["plan"]
        live = probe["live"]
        if len(live) < len(plan.modes) or tokens <= 0:
            return None
        by_kind: dict[tuple[str, bool], list[float]] = {}
        for i in range(len(plan.modes) - 1):  # the last layer's retained bytes are not measured
            by_kind.setdefault((plan.modes[i], plan.tiled[i]), []).append((live[i + 1] - live[i]) / tokens)

        def mean(kind: tuple[str, bool]) -> float:
            values = by_kind.get(kind)
            return sum(values) / len(values) if values else _MISSING

        measured = [mean(("keep", False)), mean(("keep", True)), mean(("recompute", False))]
        if measured[2] == _MISSING:
            measured[2] = mean(("recompute", True))
        peak = probe["peak"] if probe["peak"] is not None else torch.cuda.max_memory_allocated(self.device)
        grads_at_peak = probe["grads"] if probe["grads"] is not None else self._grad_bytes
        recomputed = probe["recomputed"]
        estimate = _MISSING
        if recomputed:  # the fused MLP's recompute also leaves act(gate) * up for its backward (Ib)
            kept_hidden = self.shapes.intermediate * self.shapes.act_bytes if self.shapes.fused_mlp else 0
            estimate = sum(recomputed) / len(recomputed) / tokens - kept_hidden
        basis = list(measured)
        if basis[0] == _MISSING:
            basis[0] = self._estimated.get("keep", _MISSING) if estimate == _MISSING else estimate
        costs = self._costs_with(basis, 0.0)
        modelled = predict_peak(plan, costs, tokens, 0.0)
        # static at the probe = what was measured then, with the gradients that existed at the peak
        static_at_peak = probe["static"] + grads_at_peak
        correction = (peak - static_at_peak - modelled) / tokens
        # the gradients made after the peak was read (the embedding's): ``static`` counts every gradient,
        # so a prediction paired with this correction leaves these out (``LayerCosts.absent_grads``)
        absent = max(0.0, float(self._grad_bytes - grads_at_peak))
        self._calibrated_tokens = tokens
        # what the calibration was fitted to, for a measured-vs-predicted error to be traced to its term
        self.last_probe = {
            "tokens": tokens,
            "plan": plan.describe(),
            "peak_bytes": float(peak),
            "static_bytes": float(static_at_peak),  # weights, buffers, states and the gradients present
            "modelled_bytes": float(modelled),  # the analytic activations of the probed plan
            "correction_per_token": float(correction),
            "gradients_at_peak_bytes": float(grads_at_peak),
            "gradients_absent_at_peak_bytes": absent,
        }
        return [*measured, correction, estimate, absent]

    def _costs_with(
        self, measured: Sequence[float], correction: float, absent_grads: float = 0.0
    ) -> LayerCosts:
        """The analytic costs with the measured ones put in (``_MISSING`` or <= 0: not measured)."""
        keep, keep_tiled, recompute = measured[:3]
        costs = analytic_costs(self.shapes, self.chunk_tokens)
        changes: dict[str, float] = {"correction": correction, "absent_grads": absent_grads}
        if keep != _MISSING and keep > 0:
            changes["keep"] = keep
            changes["keep_tiled"] = costs.keep_tiled * keep / costs.keep
        if keep_tiled != _MISSING and keep_tiled > 0:
            changes["keep_tiled"] = keep_tiled
        if recompute != _MISSING and recompute > 0:
            changes["recompute"] = recompute
        return replace(costs, **changes)

    def _calibrate(self, calibration: Sequence[float]) -> None:
        """Puts a probe's measurements in; modes an earlier probe measured and this one did not keep
        their earlier measured cost (they stay per-token costs whatever the plan)."""
        for name, value in zip(("keep", "keep_tiled", "recompute"), calibration[:3], strict=True):
            if value != _MISSING and value > 0:
                self._measured[name] = value
        if len(calibration) > 4 and calibration[4] != _MISSING and calibration[4] > 0:
            self._estimated["keep"] = calibration[4]
        merged = [self._measured.get(name, _MISSING) for name in ("keep", "keep_tiled", "recompute")]
        if merged[0] == _MISSING:  # no kept layer measured: the recomputes' estimate (not "measured":
            merged[0] = self._estimated.get("keep", _MISSING)  # a plan that keeps layers is still probed)
        if "keep_tiled" not in self._measured:
            merged[1] = _MISSING  # scaled from the (measured or estimated) keep in _costs_with
        absent = calibration[5] if len(calibration) > 5 and calibration[5] != _MISSING else 0.0
        if self._grads_persist:
            absent = 0.0
        self.costs = self._costs_with(merged, calibration[3], max(0.0, absent))
        self.calibrated = True

    # --- after an out-of-memory error ----------------------------------------------------------
    def step_down(self) -> bool:
        """A smaller plan after an OOM (more recompute / offload / tiling); False when none is smaller.

        The device just proved it cannot hold the failed plan's predicted peak, so every later plan is
        capped at ``STEP_DOWN`` times that (whatever the length).
        """
        self.oom_retries += 1
        self._discard_probe()  # a failed attempt measures nothing worth calibrating from
        self._probe_wanted = True
        tokens = max(self.tokens, 1)
        static = self._static()
        failed_peak = predict_peak(self.plan, self.costs, tokens, static, self._graph_pool(tokens))
        failed_peak += loss_chunk_extra(self.loss_chunk_bytes, tokens, self.shapes)
        if self.mlp_products:
            failed_peak += mlp_products_bytes(self.plan, tokens, self.shapes)
        if self.kept_graphs:
            failed_peak += self._kept_graphs(self.plan, tokens, 0.0, True)[1]
        if self.budget is None:  # never planned (CPU without a budget): the failed plan is the measure
            self.budget = failed_peak
        self._budget_cap = STEP_DOWN * failed_peak
        previous = (self.plan, self.loss_chunk_bytes, self.mlp_products, self.kept_graphs)
        self._replan(tokens, static, "out of memory: stepped down")
        return (self.plan, self.loss_chunk_bytes, self.mlp_products, self.kept_graphs) != previous

    # --- logging -------------------------------------------------------------------------------
    def pop_log(self) -> dict[str, float]:
        """The plan's metrics when it changed since the last call (for the Trainer's log), else {}."""
        out, self._log = self._log, {}
        return out


def model_shapes(model: torch.nn.Module, layers: Sequence[torch.nn.Module], fused_loss: bool) -> ModelShapes:
    """The shapes of ``model`` (a transformers model or a PeftModel around one) for the memory model."""
    from cpt_plugin.offload.head_groups import replays_attention
    from cpt_plugin.patching.registry import mlp_feeds_residual_only

    config = getattr(model, "config", None)
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        config = getattr(get_base(), "config", config)
    config = getattr(config, "get_text_config", lambda: config)()
    hidden = int(config.hidden_size)
    heads = int(getattr(config, "num_attention_heads", 1))
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    layer0 = layers[0]
    act_dtype = next((p.dtype for p in layer0.parameters() if p.is_floating_point()), torch.float32)
    if act_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        act_dtype = torch.bfloat16  # quantized weights compute in 16 bits
    rank_attn = rank_mlp = 0
    for name, module in layer0.named_modules():
        if name.endswith("lora_A.default") or (name.split(".")[-2:-1] == ["lora_A"]):
            rank = int(getattr(module, "out_features", 0))
            if ".mlp." in f".{name}":
                rank_mlp += rank
            else:
                rank_attn += rank
    return ModelShapes(
        layers=len(layers),
        hidden=hidden,
        intermediate=int(getattr(config, "intermediate_size", 4 * hidden)),
        heads=heads,
        kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=head_dim,
        vocab=int(getattr(config, "vocab_size", 0)),
        act_bytes=torch.empty(0, dtype=act_dtype).element_size(),
        lora_rank_attn=rank_attn,
        lora_rank_mlp=rank_mlp,
        fused_loss=fused_loss,
        residual_mlp=mlp_feeds_residual_only(layer0),
        fused_mlp=_mlp_is_fused(layer0),
        qk_norm=isinstance(getattr(getattr(layer0, "self_attn", None), "q_norm", None), torch.nn.Module),
        sandwich_norms=all(
            isinstance(getattr(layer0, name, None), torch.nn.Module)
            for name in ("pre_feedforward_layernorm", "post_feedforward_layernorm")
        ),
        attention_replay=any(replays_attention(m) for m in layer0.modules()),
    )


def _mlp_is_fused(layer: torch.nn.Module) -> bool:
    """Whether the layer's gate, up and down projections are all marked for the fused LoRA MLP."""
    from cpt_plugin.patching.lora import is_marked_fused

    mlp = getattr(layer, "mlp", None)
    return mlp is not None and all(
        is_marked_fused(getattr(mlp, name, None)) for name in ("gate_proj", "up_proj", "down_proj")
    )


def install_planner(
    model: torch.nn.Module,
    *,
    budget_gib: float | None = None,
    tiled_mlp: bool = False,
    chunk_tokens: int = 4096,
    fused_loss: bool = True,
    _simulate_offload: bool = False,
    _static_bytes: Callable[[], float] | None = None,
) -> MemoryPlanner:
    """Per-layer checkpointing of ``model`` driven by a :class:`MemoryPlanner` (see the module doc)."""
    from cpt_plugin.offload.tiled_mlp import set_tiled_layers

    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no decoder layers that support checkpointing.")
    planner = MemoryPlanner(
        layers,
        model_shapes(model, layers, fused_loss),
        [p for p in model.parameters() if p.requires_grad],
        budget_gib=budget_gib,
        chunk_tokens=chunk_tokens,
        tiled_mlp=tiled_mlp,
        can_offload=torch.cuda.is_available() or _simulate_offload,
        set_tiling=lambda active: set_tiled_layers(layers, active, chunk_tokens),
        static_bytes=_static_bytes,
        host_static_bytes=lambda: float(
            sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        ),
    )
    if tiled_mlp:
        planner.plan = LayerPlan.uniform(len(layers), "keep", tiled=True)
        set_tiled_layers(layers, planner.plan.tiled, chunk_tokens)
    from cpt_plugin.model_parts import causal_lm_heads

    planner.loss_modules = causal_lm_heads(model)
    planner.holder = enable_layer_plan(model, planner.plan, planner, _simulate_offload=_simulate_offload)
    planner.holder.mlp_products = False  # the planner's choice from here on (``_mlp_products``)
    model.__dict__["_cpt_memory_planner"] = planner
    return planner


def find_planner(model: Any) -> MemoryPlanner | None:
    """The planner installed on ``model`` (or on the model a wrapper such as DDP holds), or None."""
    for candidate in (model, getattr(model, "module", None)):
        if isinstance(candidate, torch.nn.Module):
            planner = candidate.__dict__.get("_cpt_memory_planner")
            if isinstance(planner, MemoryPlanner) and layer_plan_holder(candidate) is planner.holder:
                return planner
    return None
