"""Qwen3 (Qwen3ForCausalLM): Llama-style blocks plus per-head q/k RMSNorm (same class, also patched)."""

from cpt_plugin.patching.family import FamilySpec

QWEN3 = FamilySpec(
    name="qwen3",
    model_types=("qwen3",),
    module="transformers.models.qwen3.modeling_qwen3",
    rms_norm_class="Qwen3RMSNorm",
    mlp_class="Qwen3MLP",
    decoder_layer_class="Qwen3DecoderLayer",
    residual_mlp=True,
    causal_lm_classes=("Qwen3ForCausalLM",),
)
