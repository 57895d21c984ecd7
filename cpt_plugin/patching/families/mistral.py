"""Mistral (MistralForCausalLM): the Llama recipe under Mistral's names."""

from cpt_plugin.patching.family import FamilySpec

MISTRAL = FamilySpec(
    name="mistral",
    model_types=("mistral",),
    module="transformers.models.mistral.modeling_mistral",
    rms_norm_class="MistralRMSNorm",
    mlp_class="MistralMLP",
    decoder_layer_class="MistralDecoderLayer",
    residual_mlp=True,
    causal_lm_classes=("MistralForCausalLM",),
)
