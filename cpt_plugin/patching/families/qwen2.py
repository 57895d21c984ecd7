"""Qwen2 (Qwen2ForCausalLM): Llama-style blocks with q/k/v biases (untouched by our kernels)."""

from cpt_plugin.patching.family import FamilySpec

QWEN2 = FamilySpec(
    name="qwen2",
    model_types=("qwen2",),
    module="transformers.models.qwen2.modeling_qwen2",
    rms_norm_class="Qwen2RMSNorm",
    mlp_class="Qwen2MLP",
    decoder_layer_class="Qwen2DecoderLayer",
    residual_mlp=True,
    causal_lm_classes=("Qwen2ForCausalLM",),
)
