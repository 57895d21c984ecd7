"""Llama (LlamaForCausalLM): SwiGLU MLP, Llama-style RMSNorm casting."""

from cpt_plugin.patching.family import FamilySpec

LLAMA = FamilySpec(
    name="llama",
    model_types=("llama",),
    module="transformers.models.llama.modeling_llama",
    rms_norm_class="LlamaRMSNorm",
    mlp_class="LlamaMLP",
    decoder_layer_class="LlamaDecoderLayer",
    residual_mlp=True,
    causal_lm_classes=("LlamaForCausalLM",),
)
