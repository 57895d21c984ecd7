"""Resume that survives crashes: incomplete checkpoints are skipped, a changed adapter is refused.

What "complete" means. The Trainer's ``_save_checkpoint`` writes, in this order: the model (for a PEFT
model ``adapter_model.safetensors`` + ``adapter_config.json``, otherwise ``model.safetensors`` or its
shards), then ``optimizer.pt`` and ``scheduler.pt`` (unless ``save_only_model``), the RNG state, and
last ``trainer_state.json``. So a checkpoint is complete when

- ``trainer_state.json`` exists and parses as JSON (it is the Trainer's last write, so it marks the
  end; a torn write does not parse),
- model or adapter weights exist (or an FSDP/DeepSpeed state folder, which those engines load),
- ``optimizer.pt`` and ``scheduler.pt`` exist, when this run saves them (not ``save_only_model``;
  FSDP/DeepSpeed keep the optimizer inside their own state folders).

A process killed while saving leaves a folder without ``trainer_state.json``: with
``resume_from_checkpoint=True`` it is skipped with a warning and the newest complete one is used.

Before any step, the checkpoint's ``adapter_config.json`` (and the dtype of its trained embedding
copies, read from the safetensors header only) is compared with the current model's: a difference is a
``CPTConfigError`` naming the key and both values, instead of a raw size mismatch (another ``lora_r``) or
a silently different scaling (another ``lora_alpha``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

from cpt_plugin.config import CPTConfigError

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
WEIGHT_FILES = (
    "adapter_model.safetensors",
    "adapter_model.bin",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")

# adapter_config.json key -> (CPTConfig key a user changes, what it means)
COMPARED_KEYS = {
    "r": "lora_r",
    "lora_alpha": "lora_alpha",
    "use_rslora": "use_rslora",
    "target_modules": "target_modules",
    "modules_to_save": "train_embeddings",
}


def _engine_state(names: set[str], folder: str) -> bool:
    """FSDP (``pytorch_model_fsdp*``) or DeepSpeed (``global_step*``) state that the engine loads itself."""
    return any(
        name.startswith("pytorch_model_fsdp")
        or (name.startswith("global_step") and os.path.isdir(os.path.join(folder, name)))
        for name in names
    )


def missing_parts(checkpoint: str, *, require_optimizer: bool = True) -> list[str]:
    """What ``checkpoint`` lacks to be resumed from (empty: complete)."""
    try:
        names = set(os.listdir(checkpoint))
    except OSError:
        return ["the folder itself"]
    missing: list[str] = []
    if TRAINER_STATE not in names:
        missing.append(TRAINER_STATE)
    else:
        try:
            with open(os.path.join(checkpoint, TRAINER_STATE), encoding="utf-8") as handle:
                json.load(handle)
        except (OSError, ValueError):
            missing.append(f"a readable {TRAINER_STATE} (it is cut short)")
    engine = _engine_state(names, checkpoint)
    if not engine and not names.intersection(WEIGHT_FILES):
        missing.append("model or adapter weights")
    if require_optimizer and not engine:
        missing.extend(name for name in ("optimizer.pt", "scheduler.pt") if name not in names)
    return missing


def checkpoints_newest_first(output_dir: str) -> list[str]:
    """``checkpoint-N`` folders in ``output_dir``, highest N first."""
    try:
        entries = os.listdir(output_dir)
    except OSError:
        return []
    found = [
        (int(match.group(1)), os.path.join(output_dir, name))
        for name in entries
        if (match := _CHECKPOINT.match(name)) and os.path.isdir(os.path.join(output_dir, name))
    ]
    return [path for _, path in sorted(found, reverse=True)]


def resolve_resume_checkpoint(
    output_dir: str, resume_from_checkpoint: str | bool, *, require_optimizer: bool = True
) -> str | bool:
    """The checkpoint to resume from: the newest complete one for ``True``; a given path is checked.

    Returns ``resume_from_checkpoint`` unchanged when there is no checkpoint at all (the Trainer then
    says so itself).
    """
    if resume_from_checkpoint is True:
        skipped: list[tuple[str, list[str]]] = []
        for path in checkpoints_newest_first(output_dir):
            missing = missing_parts(path, require_optimizer=require_optimizer)
            if not missing:
                for bad, lacks in skipped:
                    logger.warning(
                        "cpt-plugin: skipping the incomplete checkpoint %s (no %s): a run was probably "
                        "stopped while saving it. Resuming from %s, the newest complete checkpoint.",
                        bad,
                        ", no ".join(lacks),
                        path,
                    )
                return path
            skipped.append((path, missing))
        if skipped:
            listed = "; ".join(f"{path} (no {', no '.join(lacks)})" for path, lacks in skipped)
            raise CPTConfigError(
                f"cpt-plugin: resume_from_checkpoint=True found no complete checkpoint in {output_dir!r}: "
                f"{listed}. Runs were probably stopped while saving. Start without resume_from_checkpoint, "
                "or pass the path of a complete checkpoint."
            )
        return resume_from_checkpoint
    path = str(resume_from_checkpoint)
    missing = missing_parts(path, require_optimizer=require_optimizer)
    if missing:
        parent = os.path.dirname(os.path.normpath(path))
        complete = [
            other
            for other in checkpoints_newest_first(parent)
            if not missing_parts(other, require_optimizer=require_optimizer)
        ]
        fix = (
            f"Resume from {complete[0]}, the newest complete checkpoint there, or pass "
            "resume_from_checkpoint=True to pick it."
            if complete
            else "Pass the path of a complete checkpoint."
        )
        raise CPTConfigError(
            f"cpt-plugin: cannot resume from {path!r}: it is incomplete (no {', no '.join(missing)}); a run "
            f"was probably stopped while saving it. {fix}"
        )
    return path


# --- the adapter must be the same one ---------------------------------------------------------------
def _normalized(key: str, value: Any) -> Any:
    if key in ("target_modules", "modules_to_save"):
        if value is None:
            return []
        return value if isinstance(value, str) else sorted(str(v) for v in value)
    if key == "lora_alpha" and value is not None:
        return float(value)
    return value


_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


def _saved_trained_copy_dtypes(checkpoint: str, modules_to_save: list[str]) -> set[str] | None:
    """dtypes of the trained embedding copies in the adapter file (header only), or None when unknown.

    PEFT saves a ``modules_to_save`` copy under the module's own name (``...embed_tokens.weight``).
    """
    path = os.path.join(checkpoint, "adapter_model.safetensors")
    if not os.path.isfile(path) or not modules_to_save:
        return None
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        dtypes = {
            _SAFETENSORS_DTYPES.get(handle.get_slice(name).get_dtype(), handle.get_slice(name).get_dtype())
            for name in handle.keys()  # noqa: SIM118 - safe_open has no __iter__
            if any(f".{module}." in f".{name}" for module in modules_to_save)
        }
    return dtypes or None


def _current_trained_copy_dtypes(model: Any) -> set[str] | None:
    dtypes = {
        str(param.dtype).removeprefix("torch.")
        for name, param in model.named_parameters()
        if ("modules_to_save" in name or "trainable_tokens" in name) and param.requires_grad
    }
    return dtypes or None


def _mismatch(checkpoint: str, key: str, saved: Any, current: Any, config_key: str) -> CPTConfigError:
    return CPTConfigError(
        f"cpt-plugin: cannot resume from {checkpoint!r}: its adapter has {key}={saved!r}, this run's has "
        f"{key}={current!r} (cpt-plugin config '{config_key}'). Resuming would "
        f"{'fail on tensor shapes' if key == 'r' else 'silently train another adapter'}. Set "
        f"'{config_key}' as in that run to resume it, or start a new run in another output_dir."
    )


def check_adapter_matches(checkpoint: str, model: Any) -> None:
    """Raises CPTConfigError when the checkpoint's adapter differs from the model's (key, both values)."""
    config_path = os.path.join(checkpoint, "adapter_config.json")
    peft_configs = getattr(model, "peft_config", None)
    if not os.path.isfile(config_path) or not isinstance(peft_configs, dict) or not peft_configs:
        return
    with open(config_path, encoding="utf-8") as handle:
        saved = json.load(handle)
    adapter = getattr(model, "active_adapter", None)
    if isinstance(adapter, (list, tuple)):
        adapter = adapter[0] if adapter else None
    current_config = peft_configs.get(adapter) or next(iter(peft_configs.values()))
    current = current_config.to_dict() if hasattr(current_config, "to_dict") else vars(current_config)
    for key, config_key in COMPARED_KEYS.items():
        if key not in saved and key not in current:
            continue
        saved_value, current_value = _normalized(key, saved.get(key)), _normalized(key, current.get(key))
        if saved_value != current_value:
            raise _mismatch(checkpoint, key, saved_value, current_value, config_key)
    saved_dtypes = _saved_trained_copy_dtypes(
        checkpoint, _normalized("modules_to_save", saved.get("modules_to_save"))
    )
    current_dtypes = _current_trained_copy_dtypes(model)
    if saved_dtypes and current_dtypes and saved_dtypes != current_dtypes:
        raise _mismatch(
            checkpoint,
            "trained embedding dtype",
            "/".join(sorted(saved_dtypes)),
            "/".join(sorted(current_dtypes)),
            "trained_embeddings_dtype",
        )
