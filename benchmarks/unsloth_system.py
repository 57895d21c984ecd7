"""Unsloth as a benchmark system, set up the way its users write it, on the same workload as the others.

Unsloth loads models by name, so the harness's random-weight model (benchmarks/systems.py ``_build_model``:
same config, same deterministic init, built on the same device so the generators agree) is saved once per
(workload, seed) as config + safetensors + a tiny word-level tokenizer (its loader always loads one) into a
cache folder under /tmp, reused by every Unsloth system of the call. Then, as ../shared/ENVIRONMENT.md
records it:

    FastLanguageModel.from_pretrained(model_name=DIR, max_seq_length=S, dtype=torch.bfloat16,
                                      load_in_4bit=<QLoRA recipe>)
    FastLanguageModel.get_peft_model(model, r=R, lora_alpha=32, lora_dropout=0,
                                     target_modules=[7 projections (+ embed_tokens, lm_head)],
                                     use_gradient_checkpointing="unsloth" | False, use_rslora=True)

(with ``load_in_4bit=True`` Unsloth builds the same NF4 double-quant, bf16-compute BitsAndBytesConfig as
the other systems' quantization). The LoRA A matrices are then re-initialised as for every system and the
optimizer has the same groups and learning rates (``hf_optimizer``).

Unsloth must be imported before transformers and peft: the worker calls ``preimport_unsloth`` first thing
for an Unsloth system, and no benchmarks module imports transformers when it is imported itself.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from benchmarks.systems import (
    UNSLOTH_SYSTEMS,
    Built,
    SystemUnavailable,
    _build_model,
    hf_optimizer,
    init_lora_weights,
)
from benchmarks.workloads import LORA_ALPHA, LORA_TARGETS, Workload

# Saved models, one folder per (workload, seed); big (Llama-1B 2.5 GB, Mistral-7B 14.5 GB in bf16).
CACHE_ROOT = Path("/tmp/cpt_bench_models")
COMPLETE = "SAVED_BY_CPT_BENCH"  # written last: a folder without it is an interrupted save
# The tokenizer's ids match the configs' default bos/eos (1/2); "<pad>" is a distinct, valid pad for Unsloth.
TOKENS = ("<unk>", "<s>", "</s>", "<pad>")

_import_error: str | None = None


def preimport_unsloth() -> None:
    """Imports unsloth now (before anything imports transformers); a failure is kept for build_unsloth."""
    global _import_error
    try:
        importlib.import_module("unsloth")
    except Exception as exc:  # noqa: BLE001 - no CUDA, not installed, version clash: all "unavailable"
        _import_error = f"unsloth not importable: {type(exc).__name__}: {exc}"


def import_unsloth() -> ModuleType:
    if _import_error is not None:
        raise SystemUnavailable(_import_error)
    try:
        return importlib.import_module("unsloth")
    except Exception as exc:  # noqa: BLE001
        raise SystemUnavailable(f"unsloth not importable: {type(exc).__name__}: {exc}") from exc


def write_tokenizer(path: Path) -> None:
    """A four-token word-level tokenizer (tokenizers library, no hub): what Unsloth's loader needs to find."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(TOKENS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(str(path))


def saved_model_dir(workload: Workload, seed: int) -> Path:
    return CACHE_ROOT / f"{workload.name}-seed{seed}"


def save_local_model(workload: Workload, device: str, seed: int, dtype: torch.dtype = torch.bfloat16) -> Path:
    """The workload's model (16-bit, unquantized: Unsloth quantizes on load) as a local folder; cached."""
    path = saved_model_dir(workload, seed)
    if (path / COMPLETE).exists():
        return path
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model = _build_model(workload, device, dtype, seed, quantize=False)
    model.config.pad_token_id = TOKENS.index("<pad>")
    model.save_pretrained(str(tmp))  # safetensors
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    write_tokenizer(tmp)
    (tmp / COMPLETE).write_text(f"{workload.name} seed {seed} {dtype}\n")
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def load_kwargs(workload: Workload, path: Path, max_seq_length: int) -> dict[str, Any]:
    return dict(
        model_name=str(path),
        max_seq_length=max_seq_length,
        dtype=torch.bfloat16,
        load_in_4bit=workload.recipe.quantize_4bit,
    )


def peft_kwargs(system: str, workload: Workload) -> dict[str, Any]:
    recipe = workload.recipe
    targets = list(LORA_TARGETS) + (["embed_tokens", "lm_head"] if recipe.train_embeddings else [])
    return dict(
        r=recipe.lora_r,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0,
        target_modules=targets,
        use_gradient_checkpointing=UNSLOTH_SYSTEMS[system],
        use_rslora=True,
    )


def build_unsloth(
    system: str,
    workload: Workload,
    device: str,
    dtype: torch.dtype,
    seed: int,
    max_seq_length: int | None,
) -> Built:
    """Unsloth's set-up of ``workload``; SystemUnavailable when unsloth cannot be imported here."""
    if dtype != torch.bfloat16:
        raise SystemUnavailable(f"the unsloth systems are set up in bfloat16 only, got {dtype}")
    fast = import_unsloth().FastLanguageModel
    path = save_local_model(workload, device, seed)
    loading = load_kwargs(workload, path, max_seq_length or workload.max_position_embeddings)
    model, _tokenizer = fast.from_pretrained(**loading)
    lora = peft_kwargs(system, workload)
    model = fast.get_peft_model(model, **lora)
    for_training = getattr(fast, "for_training", None)
    if for_training is not None:
        for_training(model)
    else:
        model.train()
    init_lora_weights(model, seed)
    optimizer, fused = hf_optimizer(model, workload.recipe.optimizer)
    unsloth_args = {**loading, "dtype": str(loading["dtype"]), **lora}
    return Built(model, optimizer, {"fused_adamw": fused, "unsloth_args": unsloth_args})
