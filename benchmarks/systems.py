"""The systems under test: how each builds the same CPT workload (model, PEFT set-up, optimizer).

- ``hf``: transformers + PEFT (rsLoRA, embed_tokens/lm_head in modules_to_save), SDPA, non-reentrant
  gradient checkpointing, fused AdamW with two parameter groups.
- ``liger``: Liger-Kernel's patch for the family (fused linear cross-entropy, RMSNorm, SwiGLU, RoPE)
  applied before the model is built, then exactly the ``hf`` set-up.
- ``unsloth`` / ``unsloth_nogc``: Unsloth as its users write it (benchmarks/unsloth_system.py): the same
  random-weight model saved once to a local folder, ``FastLanguageModel.from_pretrained`` +
  ``get_peft_model`` with its offloaded checkpointing (``"unsloth"``) or none; unavailable without unsloth.
- ``cpt`` / ``cpt_offload`` / ``cpt_nogc``: cpt-plugin's own path (patch -> build -> prepare_model ->
  checkpointing -> create_optimizer), recomputing / offloading checkpointed activations (+ tiled MLP for
  the offload one) / no checkpointing (to compare with ``unsloth_nogc``).
- ``hf_offload`` / ``trl_offload`` / ``axolotl_offload``: the ``hf`` set-up with the activation offloading
  that other tools ship, for side-by-side long-context runs: transformers >= 5.24
  ``activation_checkpointing_enable(offload=True)`` (``save_on_cpu`` around each checkpoint, copies on the
  compute stream); TRL's ``activation_offloading=True`` context (torchtune's ``OffloadActivations``,
  also what Axolotl's ``activation_offloading: true`` wraps); Axolotl 0.19's
  ``activation_offloading: hidden_states`` (offloads only the checkpointed layer inputs, on a side stream).
  Each is "unavailable" where its package (version) is missing.
Every system loads the model in bf16, keeps LoRA parameters as its PEFT set-up creates them (PEFT upcasts
them to fp32) and runs forward under bf16 autocast. Weights are re-initialised deterministically by
parameter name, so every system starts from the same model and sees the same loss curve. The workload's
recipe (benchmarks/workloads.py) says what is trained: the CPT recipe, or QLoRA (NF4 base through
bitsandbytes, LoRA only, 8-bit AdamW; HF-based systems prepare it with PEFT's
``prepare_model_for_kbit_training``, which upcasts the 16-bit leftovers to fp32, cpt-plugin with its own
``prepare_kbit_model``, which keeps them bf16 — each as its users get it).
"""

from __future__ import annotations

import contextlib
import inspect
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks.workloads import EMBEDDING_LR, LORA_ALPHA, LORA_LR, LORA_TARGETS, Workload

# Unsloth systems -> their get_peft_model(use_gradient_checkpointing=...) value.
UNSLOTH_SYSTEMS: dict[str, str | bool] = {"unsloth": "unsloth", "unsloth_nogc": False}
# The default run order; each cpt-plugin row is compared with the Unsloth row of its checkpointing mode.
SYSTEMS = ("hf", "liger", "unsloth", "unsloth_nogc", "cpt_nogc", "cpt", "cpt_offload")
# On request (--systems): offload alone (to compare with recompute), and other tools' activation offloading.
OFFLOAD_COMPETITORS = ("hf_offload", "trl_offload", "axolotl_offload")
EXTRA_SYSTEMS = (
    "cpt_offload_only",
    "cpt_nogc_emb",
    "cpt_offload_emb",
    "cpt_auto",
    "cpt_auto_8g",
    "cpt_auto_6g5",
    "cpt_auto_7g",
    "cpt_auto_10g",
    "cpt_auto_11g",
    "cpt_nogc_graphs",
    "cpt_auto_graphs",
    "cpt_auto_6g5_graphs",
    "cpt_auto_7g_graphs",
    "cpt_auto_8g_graphs",
    "cpt_offload_emb_graphs",
    "cpt_offload_emb_eager",
    "cpt_offload_replay",
    "cpt_auto_11g_replay",
    "cpt_offload_only_noreplay",
    *OFFLOAD_COMPETITORS,
)

# CPTConfig overrides of the two cpt-plugin systems (edit here to benchmark other switches).
CPT_VARIANTS: dict[str, dict[str, Any]] = {
    "cpt": dict(gradient_checkpointing="recompute", tiled_mlp=False),
    "cpt_offload": dict(gradient_checkpointing="offload", tiled_mlp=True, offload_embeddings=True),
    "cpt_offload_only": dict(gradient_checkpointing="offload", tiled_mlp=False, offload_embeddings=False),
    "cpt_nogc": dict(gradient_checkpointing="off", tiled_mlp=False, offload_embeddings=False),
    # as Unsloth sets up the same recipe: the frozen embedding originals off the GPU
    "cpt_nogc_emb": dict(gradient_checkpointing="off", tiled_mlp=False, offload_embeddings=True),
    "cpt_offload_emb": dict(gradient_checkpointing="offload", tiled_mlp=False, offload_embeddings=True),
    # the memory planner (offload/planner.py): default budget, and an 8 GiB one; offload_embeddings at its
    # default (None: the frozen originals go off the GPU in a single-process run)
    "cpt_auto": dict(gradient_checkpointing="auto", tiled_mlp=False, offload_embeddings=None),
    "cpt_auto_8g": dict(
        gradient_checkpointing="auto", tiled_mlp=False, offload_embeddings=None, memory_budget_gib=8.0
    ),
    # 6.5 GiB: the plan's target (95% of the budget) just under Unsloth's peak at W1 4 x 2048 (6.25 GiB)
    "cpt_auto_6g5": dict(
        gradient_checkpointing="auto", tiled_mlp=False, offload_embeddings=None, memory_budget_gib=6.5
    ),
    # 7 and 10 GiB: between, for the curve of tokens/s against the budget (benchmarks/budget_curve.py)
    "cpt_auto_7g": dict(
        gradient_checkpointing="auto", tiled_mlp=False, offload_embeddings=None, memory_budget_gib=7.0
    ),
    "cpt_auto_10g": dict(
        gradient_checkpointing="auto", tiled_mlp=False, offload_embeddings=None, memory_budget_gib=10.0
    ),
    # 11 GiB: under half of Unsloth's peak at 1 x 131,072 tokens (22.67 GiB, H200, 2026-12-01)
    "cpt_auto_11g": dict(
        gradient_checkpointing="auto", tiled_mlp=False, offload_embeddings=None, memory_budget_gib=11.0
    ),
    # offloaded layers' recompute without attention at long context (attention_replay is opt-in)
    "cpt_offload_replay": dict(
        gradient_checkpointing="offload", tiled_mlp=True, offload_embeddings=True, attention_replay=True
    ),
    "cpt_auto_11g_replay": dict(
        gradient_checkpointing="auto",
        tiled_mlp=False,
        offload_embeddings=None,
        memory_budget_gib=11.0,
        attention_replay=True,
    ),
    # cpt_offload_only with the attention recomputed: at W2 (Mistral-7B, 1 x 8192) the replay now runs by
    # default (a large layer, attention_replay.LARGE_LAYER_FLOPS); this is the step without it
    "cpt_offload_only_noreplay": dict(
        gradient_checkpointing="offload", tiled_mlp=False, offload_embeddings=False, attention_replay=False
    ),
    # every layer replayed as CUDA graphs (cuda_graphs unset: only checkpointed layers of batches up to
    # 16,384 tokens, so cpt, cpt_offload and cpt_offload_emb replay theirs there)
    "cpt_nogc_graphs": dict(
        gradient_checkpointing="off", tiled_mlp=False, offload_embeddings=False, cuda_graphs=True
    ),
    "cpt_auto_graphs": dict(gradient_checkpointing="auto", tiled_mlp=False, cuda_graphs=True),
    # the tight budgets with the checkpointed layers graphed: their eager backward is bound by the host
    # (eighteenth session's profile), so graphs may beat a plan that keeps more layers eagerly. `true`
    # also graphs kept layers, whose held memory the planner does not count: compare peaks, not only speed
    **{
        f"cpt_auto_{name}_graphs": dict(
            gradient_checkpointing="auto", tiled_mlp=False, memory_budget_gib=budget, cuda_graphs=True
        )
        for name, budget in (("6g5", 6.5), ("7g", 7.0), ("8g", 8.0))
    },
    "cpt_offload_emb_graphs": dict(
        gradient_checkpointing="offload", tiled_mlp=False, offload_embeddings=True, cuda_graphs=True
    ),
    # cpt_offload_emb without graphs: the offloaded layers run eagerly (as before the fifteenth session)
    "cpt_offload_emb_eager": dict(
        gradient_checkpointing="offload", tiled_mlp=False, offload_embeddings=True, cuda_graphs=False
    ),
}

LIGER_PATCHERS = {
    "llama": "apply_liger_kernel_to_llama",
    "qwen3": "apply_liger_kernel_to_qwen3",
    "mistral": "apply_liger_kernel_to_mistral",
}


class SystemUnavailable(RuntimeError):
    """A system cannot be set up in this environment (missing package or cpt-plugin piece)."""


@dataclass
class Built:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    info: dict[str, Any] = field(default_factory=dict)
    # Entered around each step's forward and backward (how TRL/Axolotl apply their offloading contexts).
    step_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def _seed_of(name: str, seed: int) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


@torch.no_grad()
def init_base_weights(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Same weights for every system whatever its module construction order: one generator per name."""
    for name, param in sorted(model.named_parameters()):
        if param.ndim == 1:
            param.fill_(1.0 if "norm" in name else 0.0)
            continue
        gen = torch.Generator(device=param.device).manual_seed(_seed_of(name, seed))
        param.normal_(0.0, std, generator=gen)


def _lora_key(name: str) -> str:
    """Parameter name without the PEFT wrapper prefixes, so different wrappers give the same key."""
    for prefix in ("base_model.model.", "base_model."):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name


@torch.no_grad()
def init_lora_weights(model: torch.nn.Module, seed: int) -> int:
    """Deterministic LoRA A (uniform, bound 1/sqrt(fan_in), as PEFT's kaiming init); B stays zero."""
    count = 0
    for name, param in sorted(model.named_parameters()):
        if ".lora_A." in name and param.ndim == 2:
            gen = torch.Generator(device=param.device).manual_seed(_seed_of(_lora_key(name), seed))
            bound = 1.0 / param.shape[1] ** 0.5
            param.uniform_(-bound, bound, generator=gen)
            count += 1
    return count


@torch.no_grad()
def quantize_decoder_linears_4bit(model: torch.nn.Module) -> int:
    """Replaces every nn.Linear of the decoder layers by a bitsandbytes NF4 Linear4bit (double quant, bf16
    compute), quantizing the weights in place on their device, as ``BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)`` stores them (lm_head stays 16-bit)."""
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise SystemUnavailable(f"bitsandbytes not importable: {exc}") from exc
    layers = model.get_decoder().layers
    count = 0
    for parent in list(layers.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            weight = child.weight.data
            quantized = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=torch.bfloat16,
                compress_statistics=True,
                quant_type="nf4",
                device="meta",
            )
            quantized.weight = bnb.nn.Params4bit(
                weight, requires_grad=False, compress_statistics=True, quant_type="nf4", module=quantized
            ).to(weight.device)
            if child.bias is not None:
                quantized.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, child_name, quantized)
            count += 1
    model.is_loaded_in_4bit = True  # what transformers' bnb quantizer sets; PEFT dispatches on it
    return count


def _build_model(
    workload: Workload, device: str, dtype: torch.dtype, seed: int, quantize: bool | None = None
) -> torch.nn.Module:
    """The workload's random-weight model; ``quantize`` (default: the recipe's) makes the decoder NF4."""
    from transformers import AutoModelForCausalLM

    config = workload.make_config()
    config.use_cache = False
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    init_base_weights(model, seed)
    if workload.recipe.quantize_4bit if quantize is None else quantize:
        quantize_decoder_linears_4bit(model)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    model.train()
    return model


def _prepare_kbit(system: str, model: torch.nn.Module) -> torch.nn.Module:
    """HF-based systems: PEFT's QLoRA set-up (16-bit leftovers upcast to fp32, input grads); cpt-plugin:
    its own (cpt_plugin.quantized: the leftovers stay bf16), as its pipeline loads a 4-bit model."""
    if system in CPT_VARIANTS:
        from cpt_plugin.quantized import prepare_kbit_model

        return prepare_kbit_model(model)
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def _enable_hf_checkpointing(model: torch.nn.Module) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _is_embedding_param(name: str) -> bool:
    return "embed_tokens" in name or "lm_head" in name


def hf_optimizer(
    model: torch.nn.Module, optimizer: str = "adamw_fused"
) -> tuple[torch.optim.Optimizer, bool]:
    """AdamW with LoRA at LORA_LR and the trained embeddings (if any) at EMBEDDING_LR; torch's fused AdamW
    where supported, or bitsandbytes' AdamW8bit when the recipe asks for it."""
    lora, embed = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (embed if _is_embedding_param(name) else lora).append(param)
    groups = [{"params": lora, "lr": LORA_LR, "weight_decay": 0.0}]
    if embed:
        groups.append({"params": embed, "lr": EMBEDDING_LR, "weight_decay": 0.0})
    if optimizer == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise SystemUnavailable(f"bitsandbytes not importable: {exc}") from exc
        return bnb.optim.AdamW8bit(groups, lr=LORA_LR), False
    try:
        return torch.optim.AdamW(groups, lr=LORA_LR, fused=True), True
    except (RuntimeError, ValueError):  # fused unsupported for this device/dtype
        return torch.optim.AdamW(groups, lr=LORA_LR), False


def _hf_peft(model: torch.nn.Module, workload: Workload) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    recipe = workload.recipe
    config = LoraConfig(
        r=recipe.lora_r,
        lora_alpha=LORA_ALPHA,
        use_rslora=True,
        lora_dropout=0.0,
        bias="none",
        target_modules=list(LORA_TARGETS),
        modules_to_save=["embed_tokens", "lm_head"] if recipe.train_embeddings else None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _apply_liger(workload: Workload) -> None:
    try:
        import liger_kernel.transformers as liger
    except ImportError as exc:
        raise SystemUnavailable(f"liger-kernel not importable: {exc}") from exc
    patcher = getattr(liger, LIGER_PATCHERS[workload.model_type])
    patcher(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True)


def _enable_transformers_offload(model: torch.nn.Module) -> None:
    """transformers >= 5.24: ``activation_checkpointing_enable(offload=True)``."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is None or "offload" not in inspect.signature(enable).parameters:
        import transformers

        raise SystemUnavailable(
            f"transformers {transformers.__version__} has no activation_checkpointing_enable(offload=...) "
            "(added in 5.24)"
        )
    enable(activation_checkpointing_kwargs={"use_reentrant": False}, offload=True)


def _trl_offload_context(model: torch.nn.Module) -> Callable[[], contextlib.AbstractContextManager]:
    """TRL's ``SFTConfig(activation_offloading=True)``: one context per step around forward and backward."""
    try:
        from trl.models.activation_offloading import get_act_offloading_ctx_manager
    except ImportError as exc:
        raise SystemUnavailable(f"trl's activation offloading not importable: {exc}") from exc
    manager = get_act_offloading_ctx_manager(model)  # made once and entered every step, as SFTTrainer does
    return lambda: manager


def _axolotl_offload_context() -> Callable[[], contextlib.AbstractContextManager]:
    """Axolotl's ``activation_offloading: hidden_states``: offloads the checkpointed layer inputs."""
    try:
        from axolotl.monkeypatch.checkpoint_activation_offload import (
            get_checkpoint_hidden_states_offloading_ctx_manager,
        )
    except ImportError as exc:
        raise SystemUnavailable(f"axolotl's checkpoint offloading not importable: {exc}") from exc
    manager = get_checkpoint_hidden_states_offloading_ctx_manager()  # once, entered every step (its pool)
    return lambda: manager


def _build_hf(system: str, workload: Workload, device: str, dtype: torch.dtype, seed: int) -> Built:
    if system in OFFLOAD_COMPETITORS and not device.startswith("cuda"):
        raise SystemUnavailable(f"{system} needs a CUDA device (pinned host memory and streams)")
    if system == "liger":
        _apply_liger(workload)
    model = _build_model(workload, device, dtype, seed)
    if workload.recipe.quantize_4bit:
        model = _prepare_kbit(system, model)
    if system == "hf_offload":
        _enable_transformers_offload(model)
    else:
        _enable_hf_checkpointing(model)
    model = _hf_peft(model, workload)
    init_lora_weights(model, seed)
    optimizer, fused = hf_optimizer(model, workload.recipe.optimizer)
    step_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    if system == "trl_offload":
        step_context = _trl_offload_context(model)
    elif system == "axolotl_offload":
        step_context = _axolotl_offload_context()
    return Built(model, optimizer, {"fused_adamw": fused}, step_context)


def cpt_config(system: str, workload: Workload):  # -> cpt_plugin.CPTConfig
    from cpt_plugin import CPTConfig

    recipe = workload.recipe
    return CPTConfig(
        lora_r=recipe.lora_r,
        lora_alpha=LORA_ALPHA,
        train_embeddings=recipe.train_embeddings,
        optimizer="adamw_8bit" if recipe.optimizer == "adamw_8bit" else None,
        kernels=True,
        learning_rate=LORA_LR,
        embedding_learning_rate=EMBEDDING_LR,
        weight_decay=0.0,
        **CPT_VARIANTS[system],
    )


def _build_cpt(system: str, workload: Workload, device: str, dtype: torch.dtype, seed: int) -> Built:
    """cpt-plugin's path; any missing piece becomes SystemUnavailable (an OOM stays an OOM)."""
    stage = "import"
    try:
        from cpt_plugin import patch

        stage = "CPTConfig"
        cfg = cpt_config(system, workload)
        stage = "patch"
        patch(workload.model_type, cfg)
        stage = "build"
        model = _build_model(workload, device, dtype, seed)
        if workload.recipe.quantize_4bit:
            model = _prepare_kbit(system, model)
        if cfg.gradient_checkpointing != "off":
            _enable_hf_checkpointing(model)
        stage = "setup_model"
        from cpt_plugin import setup_model

        model = setup_model(model, cfg, checkpointing=cfg.gradient_checkpointing)
        init_lora_weights(model, seed)
        stage = "create_optimizer"
        from cpt_plugin.optim import create_optimizer

        optimizer = create_optimizer(model, cfg, learning_rate=LORA_LR, weight_decay=0.0)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - any missing piece of cpt-plugin
        raise SystemUnavailable(f"{stage}: {type(exc).__name__}: {exc}") from exc
    return Built(model, optimizer, {"cpt_config": cfg.to_dict()})


def build_system(
    system: str,
    workload: Workload,
    device: str,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    max_seq_length: int | None = None,
) -> Built:
    """Builds ``system`` on ``workload``; raises SystemUnavailable when it cannot exist here.
    ``max_seq_length`` (the longest sequence it will see) is what Unsloth's loader asks for."""
    if system in ("hf", "liger", *OFFLOAD_COMPETITORS):
        built = _build_hf(system, workload, device, dtype, seed)
    elif system in UNSLOTH_SYSTEMS:
        from benchmarks.unsloth_system import build_unsloth

        built = build_unsloth(system, workload, device, dtype, seed, max_seq_length)
    elif system in CPT_VARIANTS:
        built = _build_cpt(system, workload, device, dtype, seed)
    else:
        raise ValueError(f"unknown system {system!r}; choose from {', '.join(SYSTEMS + EXTRA_SYSTEMS)}")
    params = list(built.model.parameters())
    built.info.update(
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        total_params=sum(p.numel() for p in params),
        trainable_dtypes=sorted({str(p.dtype) for p in params if p.requires_grad}),
        optimizer=type(built.optimizer).__name__,
        param_group_lrs=[g.get("lr") for g in built.optimizer.param_groups],
    )
    return built
