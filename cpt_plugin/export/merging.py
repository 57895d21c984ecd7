"""Merged 16-bit export: the CPT model as one plain transformers checkpoint (safetensors only).

Why not ``merge_and_unload()``: it merges in place (the caller's adapter model is gone afterwards), it
leaves the trained embedding copies in fp32 (cpt-plugin keeps them fp32 or bf16, embedding_precision.py),
and a deep copy to merge on would double the GPU memory of a model that was just trained there. Instead
the merged weights are computed one module at a time (base weight + PEFT's own ``get_delta_weight``, in
fp32, rounded once) and moved to the CPU at once; the model passed in is left as it was.

The result: every tensor in the model dtype, tied embeddings saved as one tensor with
``tie_word_embeddings`` set, the vocabulary size of config, weights and tokenizer consistent, and a
directory that ``AutoModelForCausalLM.from_pretrained`` loads without cpt-plugin installed.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cpt_plugin import CPTConfigError
from cpt_plugin.export.paths import (
    ADAPTER_WEIGHTS,
    atomic_directory,
    check_new_output,
    find_adapter_dir,
    find_base_dir,
    find_tokenizer_dir,
    read_adapter_config,
)
from cpt_plugin.model_parts import embedding_names
from cpt_plugin.third_party import peft_deprecations_quiet, quiet_hub_save_notice

logger = logging.getLogger(__name__)

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_DTYPES.update({"fp16": torch.float16, "f16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32})


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise CPTConfigError(
        f"cpt-plugin export: dtype {dtype!r} is not one of bfloat16, float16, float32. Leave it unset to "
        "keep the model's own dtype."
    )


def _embedding_names(model: nn.Module) -> tuple[str, str | None]:
    """Module names of the input embeddings and of lm_head (None when the model has none)."""
    input_name, output_name = embedding_names(model)
    if input_name is None:
        raise CPTConfigError(
            f"cpt-plugin export: {type(model).__name__} has no input embeddings; only causal LMs are exported."
        )
    return input_name, output_name


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype most frozen floating weights of the base have (the base model's dtype, also under QLoRA).

    LoRA factors and trained copies are left out: an adapter reloaded for export has nothing trainable,
    and its fp32 factors can outnumber a small base's weights (a bf16 base then came out fp32).
    """
    counts: dict[torch.dtype, int] = {}
    for name, param in model.named_parameters():
        if "lora_" in name or "modules_to_save" in name:
            continue
        if param.is_floating_point() and not param.requires_grad:
            counts[param.dtype] = counts.get(param.dtype, 0) + param.numel()
    if not counts:
        counts = {p.dtype: p.numel() for p in model.parameters() if p.is_floating_point()}
    return max(counts, key=counts.get) if counts else torch.float32


def _dense_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight as a dense tensor (bitsandbytes 4/8-bit weights dequantized)."""
    weight = module.weight
    if type(weight).__name__ == "Params4bit":
        from cpt_plugin.quantized import dequantize_4bit

        return dequantize_4bit(weight)
    if type(weight).__name__ == "Int8Params" or weight.dtype in (torch.uint8, torch.int8):
        from peft.utils.integrations import dequantize_module_weight

        return dequantize_module_weight(module)
    return weight


def _is_quantized(module: nn.Module) -> bool:
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def _lora_weight(module: Any, name: str) -> torch.Tensor:
    """Base weight + the deltas of the active adapters that are not merged into it yet (fp32 sum)."""
    if any(module.use_dora.get(a, False) for a in module.active_adapters if hasattr(module, "use_dora")):
        raise CPTConfigError(
            f"cpt-plugin export: {name} is a DoRA layer; cpt-plugin merges plain (rs)LoRA only. Merge it with "
            "PEFT's merge_and_unload() and save that model."
        )
    weight = _dense_weight(module.get_base_layer()).float()
    for adapter in module.active_adapters:
        known = adapter in getattr(module, "lora_A", {}) or adapter in getattr(module, "lora_embedding_A", {})
        if known and adapter not in module.merged_adapters:
            weight = weight + module.get_delta_weight(adapter).float()
    return weight


def _trainable_tokens_weight(layer: Any) -> torch.Tensor:
    """PEFT's trainable tokens (``trainable_token_indices``): the base weight with the trained rows of the
    active adapters written in (PEFT's own ``get_merged_weights``), or the base weight when none is active."""
    active = [a for a in layer.active_adapters if a in layer.token_indices]
    if layer.disable_adapters or layer.merged or not active:
        return layer.base_layer.weight
    return layer.get_merged_weights(active)


def _saved_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The parameters and persistent buffers ``model.state_dict()`` holds, without calling it.

    Why: a bitsandbytes 4-bit layer rewrites its weight when its state dict is taken (it undoes the CPU
    repacking, re-quantizing absmax), and the model passed to the exporter is to be left as it was.
    """
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        for name, param in module._parameters.items():
            if param is not None:
                yield prefix + name, param
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                yield prefix + name, buffer


def merged_state_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The plain model's state dict, on the CPU, in ``dtype``: LoRA merged, trained copies (and PEFT's
    trainable token rows) in place.

    Works on a PeftModel and on a model with adapters injected in place; the model is not changed.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    try:
        from peft.utils.other import TrainableTokensWrapper as trainable_tokens
    except ImportError:  # a PEFT without trainable tokens
        trainable_tokens = None

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out: dict[str, torch.Tensor] = {}
    handled: set[str] = set()

    def put(key: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        out[key] = (tensor.to(dtype) if tensor.is_floating_point() else tensor).cpu().contiguous()

    def under_handled(name: str) -> bool:
        parts = name.split(".")
        return any(".".join(parts[:i]) in handled for i in range(1, len(parts) + 1))

    with torch.no_grad():
        for name, module in base.named_modules():
            if not name or under_handled(name):
                continue
            if isinstance(module, LoraLayer):
                put(f"{name}.weight", _lora_weight(module, name))
                for pname, param in module.get_base_layer().named_parameters(recurse=False):
                    if pname != "weight":
                        put(f"{name}.{pname}", param)
                handled.add(name)
            elif isinstance(module, ModulesToSaveWrapper):
                adapter = module.active_adapter
                adapter = adapter[0] if isinstance(adapter, (list, tuple)) else adapter
                source = module.modules_to_save[adapter] if adapter in module.modules_to_save else None
                source = source if source is not None else module.original_module
                for key, tensor in source.state_dict().items():
                    put(f"{name}.{key}", tensor)
                handled.add(name)
            elif trainable_tokens is not None and isinstance(module, trainable_tokens):
                layer = module.token_adapter
                for pname, param in layer.base_layer.named_parameters(recurse=False):
                    put(f"{name}.{pname}", _trainable_tokens_weight(layer) if pname == "weight" else param)
                handled.add(name)
            elif _is_quantized(module):
                put(f"{name}.weight", _dense_weight(module))
                if getattr(module, "bias", None) is not None:
                    put(f"{name}.bias", module.bias)
                handled.add(name)
        for key, tensor in _saved_tensors(base):
            if key not in out and not under_handled(key.rsplit(".", 1)[0]):
                put(key, tensor)
    # Separate copies of what shared memory in the model (safetensors refuses shared tensors); a tied
    # pair is resolved by the caller.
    seen: set[int] = set()
    for key, tensor in out.items():
        if tensor.data_ptr() in seen:
            out[key] = tensor.clone()
        seen.add(out[key].data_ptr())
    return out


def _tokenizer_size(tokenizer: Any) -> int:
    return len(tokenizer)


def check_vocabulary(rows: int, tokenizer: Any, where: str) -> None:
    """A tokenizer with more tokens than embedding rows would produce ids the model cannot embed."""
    if tokenizer is None:
        return
    size = _tokenizer_size(tokenizer)
    if size > rows:
        raise CPTConfigError(
            f"cpt-plugin export: the tokenizer ({where}) has {size} tokens but the model's embeddings have "
            f"{rows} rows, so token ids {rows}..{size - 1} cannot be embedded. Resize the model before "
            f"training (model.resize_token_embeddings(len(tokenizer))), or pass the tokenizer the model was "
            "trained with."
        )


def _plain_config(base: nn.Module, dtype: torch.dtype, rows: int, tied: bool) -> Any:
    config = copy.deepcopy(base.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.vocab_size = rows
    config.tie_word_embeddings = tied
    config.architectures = [type(base).__name__]
    config.dtype = dtype
    return config


def _check_keys(base: nn.Module, config: Any, keys: set[str], output_key: str | None, tied: bool) -> None:
    """The merged keys are exactly those the plain model class loads (catches PEFT layout changes)."""
    with torch.device("meta"):
        plain = type(base)(copy.deepcopy(config))
    expected = set(plain.state_dict())
    if tied and output_key:
        expected.discard(output_key)
    if keys != expected:
        raise RuntimeError(
            f"cpt-plugin export: the merged weights do not match {type(base).__name__}'s parameters (missing "
            f"{sorted(expected - keys)[:5]}, unexpected {sorted(keys - expected)[:5]}). Please report this "
            "with your peft and transformers versions."
        )


def _resolve_tied(
    state: dict[str, torch.Tensor], base: nn.Module, input_key: str, output_key: str | None
) -> bool:
    """Drops the lm_head copy of tied embeddings; returns whether the saved model ties them."""
    tied = bool(getattr(base.config, "tie_word_embeddings", False))
    if not tied or output_key is None or output_key not in state:
        return tied and output_key is not None
    if torch.equal(state[input_key], state[output_key]):
        del state[output_key]
        return True
    logger.warning(
        "cpt-plugin export: the model's config ties embed_tokens and lm_head, but the trained copies differ "
        "(the adapter was trained untied): saving both and tie_word_embeddings=False, so the merged model "
        "computes what the adapter model computed."
    )
    return False


def _check_tokenizer_reloads(directory: Path, tokenizer: Any) -> None:
    """Warns when AutoTokenizer loads the saved tokenizer as something else (transformers picks a tokenizer
    class from config.json's model type for some families, e.g. Qwen2Tokenizer, which adds its own tokens)."""
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(str(directory))
    sample = "cpt-plugin export: def f(x):\n    return x ** 2  # caf\u00e9"
    if len(reloaded) != len(tokenizer) or reloaded(sample)["input_ids"] != tokenizer(sample)["input_ids"]:
        logger.warning(
            "cpt-plugin export: AutoTokenizer loads the saved tokenizer as %s with %d tokens (saved: %s, %d tokens), "
            "because transformers chooses the class from config.json's model type. Load it with "
            "PreTrainedTokenizerFast.from_pretrained(...) to get the tokenizer the model was trained with.",
            type(reloaded).__name__,
            len(reloaded),
            type(tokenizer).__name__,
            len(tokenizer),
        )


def _save(
    out: Path, state: dict[str, torch.Tensor], config: Any, base: nn.Module, tokenizer: Any | None
) -> None:
    from huggingface_hub import save_torch_state_dict

    quiet_hub_save_notice()  # its INFO line names the temporary folder, not out
    with atomic_directory(out) as tmp:
        save_torch_state_dict(state, tmp, metadata={"format": "pt"}, safe_serialization=True)
        config.save_pretrained(tmp)
        generation = getattr(base, "generation_config", None)
        if generation is not None and base.can_generate():
            generation.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            _check_tokenizer_reloads(tmp, tokenizer)


def _export(
    model: nn.Module, out: Path, dtype: torch.dtype | None, tokenizer: Any | None, started: float
) -> Path:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    input_name, output_name = _embedding_names(base)
    rows = int(base.get_input_embeddings().weight.shape[0])
    check_vocabulary(rows, tokenizer, "given")
    dtype = dtype or _model_dtype(base)
    state = merged_state_dict(model, dtype)
    input_key = f"{input_name}.weight"
    output_key = f"{output_name}.weight" if output_name else None
    tied = _resolve_tied(state, base, input_key, output_key)
    config = _plain_config(base, dtype, rows, tied)
    _check_keys(base, config, set(state), output_key, tied)
    _save(out, state, config, base, tokenizer)
    size_gb = sum(t.numel() * t.element_size() for t in state.values()) / 1e9
    logger.info(
        "cpt-plugin: merged model written to %s (%s, %.2f GB, vocabulary %d, %s embeddings%s) in %.1f s",
        out,
        str(dtype).removeprefix("torch."),
        size_gb,
        rows,
        "tied" if tied else "untied",
        "" if tokenizer is not None else ", no tokenizer saved",
        time.perf_counter() - started,
    )
    return out


def _adapter_embedding_rows(adapter_dir: Path, input_name: str) -> int | None:
    """Rows of the trained input-embedding copy saved in the adapter (None when not trained)."""
    from safetensors import safe_open

    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), "pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
            if key.endswith(f"{input_name}.weight") and "lora_" not in key:
                return int(handle.get_slice(key).get_shape()[0])
    return None


def _load_tokenizer(tokenizer: Any, *search: Path | None) -> Any | None:
    from transformers import AutoTokenizer

    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    directory = Path(tokenizer) if tokenizer is not None else find_tokenizer_dir(*search)
    if directory is None:
        return None
    return AutoTokenizer.from_pretrained(str(directory))


def qlora_quantization() -> Any:
    """The 4-bit set-up of cpt-plugin's QLoRA runs (the CLI's ``model.load_in_4bit``): NF4, double
    quantization, bf16 compute. Loading a base with it again gives the same 4-bit weights (deterministic)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def _load_adapter_model(
    adapter_dir: Path,
    base_dir: Path,
    dtype: torch.dtype | None,
    tokenizer: Any | None,
    base_4bit: bool = False,
) -> nn.Module:
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(base_dir))
    if getattr(config, "quantization_config", None) is not None:
        raise CPTConfigError(
            f"cpt-plugin export: the base model in {base_dir} is saved quantized; merging needs the 16-bit "
            "weights. Pass the original 16-bit base directory with base=PATH (--base PATH)."
        )
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    input_name, _ = _embedding_names(skeleton)
    base_rows = int(skeleton.get_input_embeddings().weight.shape[0])
    rows = _adapter_embedding_rows(adapter_dir, input_name) or base_rows
    check_vocabulary(rows, tokenizer, "found for the adapter")
    kwargs: dict[str, Any] = {"dtype": dtype or "auto"}
    if base_4bit:
        if rows != base_rows:
            raise CPTConfigError(
                f"cpt-plugin export: the adapter in {adapter_dir} has {rows} embedding rows, its base {base_rows}; "
                "a 4-bit base cannot be resized. Merge without base_4bit (--base-4bit), or load the 4-bit base, "
                "resize it as the run did, add the adapter and pass that model to merge()."
            )
        # the 4-bit base of a QLoRA run, as it trained: its leftovers (norms, embeddings) were kept bf16
        kwargs = {"dtype": dtype or torch.bfloat16, "quantization_config": qlora_quantization()}
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), **kwargs)
    if rows != base_rows:  # the run resized the vocabulary: the base must have the adapter's shape
        model.resize_token_embeddings(rows, mean_resizing=False)
    # PeftModel.__init__ reads transformers' deprecated is_gradient_checkpointing (a FutureWarning the user
    # cannot act on; there is no argument that avoids the read): quieted for this call only.
    with peft_deprecations_quiet():
        return PeftModel.from_pretrained(model, str(adapter_dir))


def merge(
    adapter_or_model: Any,
    out_dir: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    *,
    base: str | os.PathLike | None = None,
    tokenizer: Any | None = None,
    base_4bit: bool = False,
) -> Path:
    """Writes the merged 16-bit model to ``out_dir`` and returns its path.

    ``adapter_or_model``: an in-memory model made by cpt-plugin (``setup_model``), or an adapter directory
    (final save or checkpoint) or cpt-plugin run directory. For a directory, the base model is the local
    path in ``adapter_config.json`` (``base_model_name_or_path``) unless ``base`` is given.
    ``dtype``: the saved dtype (default: the model's own). ``tokenizer``: a tokenizer or its directory,
    saved beside the weights; for a directory it is found beside the adapter (or the base) when not given.
    ``base_4bit``: the adapter was trained on a 4-bit base (QLoRA with cpt-plugin's NF4 set-up,
    :func:`qlora_quantization`): the base is loaded that way and dequantized, so the merged model is the
    one that was trained (merged into the original 16-bit weights it would be off by the quantization
    error). An adapter directory does not record this, hence the switch; an in-memory model needs none.
    ``out_dir`` must not exist; nothing is left there if the export fails.
    """
    started = time.perf_counter()
    out = check_new_output(out_dir, "merged model")
    dtype = resolve_dtype(dtype)
    if isinstance(adapter_or_model, (str, os.PathLike)):
        adapter_dir = find_adapter_dir(adapter_or_model)
        base_dir = find_base_dir(adapter_dir, read_adapter_config(adapter_dir), base)
        tok = _load_tokenizer(tokenizer, adapter_dir, adapter_dir.parent, base_dir)
        model = _load_adapter_model(adapter_dir, base_dir, dtype, tok, base_4bit)
        return _export(model, out, dtype, tok, started)
    if not isinstance(adapter_or_model, nn.Module):
        raise CPTConfigError(
            f"cpt-plugin export: merge() got a {type(adapter_or_model).__name__}; give the model returned by "
            "setup_model, or an adapter directory."
        )
    return _export(adapter_or_model, out, dtype, _load_tokenizer(tokenizer), started)
