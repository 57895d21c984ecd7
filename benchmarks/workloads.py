"""Model shapes (random weights, built from configs) and the batch x sequence shapes of each suite."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_R = 128
LORA_ALPHA = 32.0
LORA_LR = 5e-5
EMBEDDING_LR = 5e-6  # 1/10 of the LoRA learning rate


@dataclass(frozen=True)
class Recipe:
    """What is trained and how the frozen base is stored; every system builds the same recipe."""

    lora_r: int
    train_embeddings: bool  # embed_tokens/lm_head fully trained (PEFT modules_to_save) at EMBEDDING_LR
    quantize_4bit: bool  # decoder-layer linears as bitsandbytes NF4 (double quant, bf16 compute)
    optimizer: str  # "adamw_fused" (torch) | "adamw_8bit" (bitsandbytes)


RECIPES: dict[str, Recipe] = {
    # The CPT recipe of the product: rsLoRA r=128 everywhere + both embeddings trained.
    "cpt": Recipe(lora_r=LORA_R, train_embeddings=True, quantize_4bit=False, optimizer="adamw_fused"),
    # The Mistral-7B QLoRA workload of ../shared/ANCHORS.md: NF4 base, LoRA r=32 on the 7 projections,
    # no embeddings trained, bitsandbytes AdamW8bit.
    "qlora": Recipe(lora_r=32, train_embeddings=False, quantize_4bit=True, optimizer="adamw_8bit"),
}


@dataclass(frozen=True)
class Workload:
    """One model shape; ``model_type`` selects the transformers config class and the patchers."""

    name: str
    model_type: str  # "llama" | "qwen3" | "mistral"
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    rope_theta: float
    max_position_embeddings: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    recipe_name: str = "cpt"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def recipe(self) -> Recipe:
        return RECIPES[self.recipe_name]

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def config_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            vocab_size=self.vocab_size,
            tie_word_embeddings=self.tie_word_embeddings,
            rope_theta=self.rope_theta,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            head_dim=self.resolved_head_dim,
        )
        kwargs.update(self.extra)
        return kwargs

    def make_config(self):  # -> transformers.PretrainedConfig
        """The transformers config; SDPA attention for every system."""
        import transformers

        cls = {
            "llama": transformers.LlamaConfig,
            "qwen3": transformers.Qwen3Config,
            "mistral": transformers.MistralConfig,
        }[self.model_type]
        config = cls(**self.config_kwargs())
        config._attn_implementation = "sdpa"
        return config


WORKLOADS: dict[str, Workload] = {
    "llama-1b": Workload(
        name="llama-1b",
        model_type="llama",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        max_position_embeddings=131072,
    ),
    "qwen3-0.6b": Workload(
        name="qwen3-0.6b",
        model_type="qwen3",
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
    ),
    "mistral-7b": Workload(
        name="mistral-7b",
        model_type="mistral",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32768,
        tie_word_embeddings=False,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        # Mistral-7B-v0.3 has no sliding window; MistralConfig's default (4096) would make every system
        # build a seq x seq mask and leave the flash SDPA path.
        extra={"sliding_window": None},
    ),
    # Tiny shapes for `--device cpu` dry runs and tests: same code path, no timing claims.
    "tiny-llama": Workload(
        name="tiny-llama",
        model_type="llama",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=257,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        max_position_embeddings=4096,
    ),
    "tiny-qwen3": Workload(
        name="tiny-qwen3",
        model_type="qwen3",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=263,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
    ),
    "tiny-mistral": Workload(
        name="tiny-mistral",
        model_type="mistral",
        hidden_size=64,
        # a multiple of 64 (QLoRA's block size): bitsandbytes 0.50's native CPU dequantize misreads rows whose
        # length is not one (kernels/nf4.py), which would make its HF + PEFT row disagree with ours here
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=251,
        tie_word_embeddings=False,
        rope_theta=1000000.0,
        max_position_embeddings=4096,
        extra={"sliding_window": None},
    ),
}
# The QLoRA recipe on the Mistral shapes (the workload of ../shared/ANCHORS.md's Mistral-7B section).
for _base in ("mistral-7b", "tiny-mistral"):
    WORKLOADS[f"{_base}-qlora"] = replace(WORKLOADS[_base], name=f"{_base}-qlora", recipe_name="qlora")

# On `--device cpu` every workload is replaced by its tiny counterpart (same family, same code path).
TINY_OF = {
    "llama-1b": "tiny-llama",
    "qwen3-0.6b": "tiny-qwen3",
    "mistral-7b": "tiny-mistral",
    "mistral-7b-qlora": "tiny-mistral-qlora",
}


@dataclass(frozen=True)
class SuiteSpec:
    """What one suite measures; the max-context search runs on ``maxctx_workloads`` at batch 1."""

    workloads: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]  # (batch, seq)
    maxctx_workloads: tuple[str, ...]
    maxctx_start: int
    maxctx_cap: int
    maxctx_granularity: int
    warmup: int
    steps: int


SUITES: dict[str, SuiteSpec] = {
    "quick": SuiteSpec(
        workloads=("llama-1b",),
        shapes=((4, 2048),),
        maxctx_workloads=("llama-1b",),
        maxctx_start=16384,
        maxctx_cap=131072,
        maxctx_granularity=8192,
        warmup=3,
        steps=10,
    ),
    "full": SuiteSpec(
        workloads=("llama-1b", "qwen3-0.6b", "mistral-7b"),
        shapes=((4, 2048), (1, 8192), (1, 16384), (1, 32768)),
        maxctx_workloads=("llama-1b", "mistral-7b"),
        maxctx_start=8192,
        maxctx_cap=262144,
        maxctx_granularity=4096,
        warmup=3,
        steps=10,
    ),
}

# CPU dry runs: tiny shapes, few steps.
CPU_SHAPES: tuple[tuple[int, int], ...] = ((2, 32), (1, 64))
CPU_MAXCTX = dict(start=64, cap=256, granularity=32)
CPU_STEPS = dict(warmup=1, steps=2)


def resolve_workload(name: str, device: str) -> Workload:
    """The workload to build: the named one on CUDA, its tiny counterpart on the CPU."""
    if device == "cpu":
        name = TINY_OF.get(name, name)
    try:
        return WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}") from None
