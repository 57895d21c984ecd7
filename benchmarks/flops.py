"""Model FLOPs per trained token of the CPT workload (what MFU divides by), from the shapes alone.

Counting (multiply-add = 2 FLOPs; recomputation by gradient checkpointing NOT counted, as MFU asks):
  forward   = 2 * (frozen projection params + LoRA params + lm_head params)
              + attention: 2 * seq * n_heads * head_dim per layer (QK^T and PV, each 2*ctx*d, over the
                average causal context seq/2)
  backward  = 1x forward for frozen projections (input gradient only)
              + 2x forward for trained matmuls (LoRA factors, lm_head: input and weight gradients)
              + 2x forward for attention (dQ, dK from dS; dV, dP from dO)
The embedding lookup and its scatter-add gradient are not matmuls and count zero.
For Llama-3.2-1B shapes at seq 2048 this gives forward 2.79 + backward 3.62 = 6.41 GFLOP/token
(ANCHORS.md quotes ~6.3, forward 2.8).
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.workloads import LORA_R, Workload

FORMULA = (
    "model FLOPs/token = forward 2·(frozen projection + LoRA + lm_head params) + causal attention 2·seq·heads·head_dim"
    " per layer; backward 1× forward for frozen projections, 2× for LoRA, lm_head and attention; recomputation"
    " not counted (Llama-3.2-1B at 2048: 2.79 + 3.62 = 6.41 GFLOP/token)"
)


@dataclass(frozen=True)
class FlopCount:
    forward: float
    backward: float

    @property
    def total(self) -> float:
        return self.forward + self.backward


def projection_shapes(w: Workload) -> list[tuple[int, int]]:
    """(in_features, out_features) of the seven projections of one decoder layer."""
    h, i, hd = w.hidden_size, w.intermediate_size, w.resolved_head_dim
    q_out, kv_out = w.num_attention_heads * hd, w.num_key_value_heads * hd
    return [(h, q_out), (h, kv_out), (h, kv_out), (q_out, h), (h, i), (h, i), (i, h)]


def flops_per_token(w: Workload, seq: int, lora_r: int = LORA_R) -> FlopCount:
    """Model FLOPs per token at sequence length ``seq`` (see the module docstring for the formula)."""
    shapes = projection_shapes(w)
    frozen = w.num_hidden_layers * sum(a * b for a, b in shapes)
    lora = w.num_hidden_layers * sum(lora_r * (a + b) for a, b in shapes)
    head = w.vocab_size * w.hidden_size
    attention = 2.0 * seq * w.num_attention_heads * w.resolved_head_dim * w.num_hidden_layers
    forward = 2.0 * (frozen + lora + head) + attention
    backward = 2.0 * frozen + 4.0 * (lora + head) + 2.0 * attention
    return FlopCount(forward=forward, backward=backward)


def mfu(w: Workload, seq: int, tokens_per_s: float, matmul_flops_per_s: float) -> float:
    """Model FLOPs utilisation against the measured bf16 matmul rate (a fraction, 0..1)."""
    if not matmul_flops_per_s or not tokens_per_s:
        return float("nan")
    return flops_per_token(w, seq).total * tokens_per_s / matmul_flops_per_s
