"""Gemma 2 and Gemma 3 (text): (1 + weight) RMSNorm in fp32, tanh-GELU gated MLP, final logit soft-cap.

``gemma3`` (the multimodal Gemma3ForConditionalGeneration) shares the modeling module: its norms,
MLP and RoPE are patched, but its own forward (image tokens, its loss) is left alone; the fused loss
applies to Gemma3ForCausalLM.
"""

from cpt_plugin.patching.family import GEGLU_ACTIVATIONS, FamilySpec

_GEMMA_COMMON = dict(
    rms_norm_cast="gemma",
    rms_norm_offset=1.0,
    rms_norm_eps_attr="eps",
    activation_attrs=("hidden_activation", "hidden_act"),
    activation_kernels=dict(GEGLU_ACTIVATIONS),
    logit_softcap_attr="final_logit_softcapping",
)

GEMMA2 = FamilySpec(
    name="gemma2",
    model_types=("gemma2",),
    module="transformers.models.gemma2.modeling_gemma2",
    rms_norm_class="Gemma2RMSNorm",
    mlp_class="Gemma2MLP",
    causal_lm_classes=("Gemma2ForCausalLM",),
    **_GEMMA_COMMON,
)

GEMMA3 = FamilySpec(
    name="gemma3",
    model_types=("gemma3_text", "gemma3"),
    module="transformers.models.gemma3.modeling_gemma3",
    rms_norm_class="Gemma3RMSNorm",
    mlp_class="Gemma3MLP",
    causal_lm_classes=("Gemma3ForCausalLM",),
    **_GEMMA_COMMON,
)
