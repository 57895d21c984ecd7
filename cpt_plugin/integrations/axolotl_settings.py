"""Axolotl config → CPTConfig, and which setting wins where Axolotl's own keys overlap ours.

Kept free of Axolotl imports so the rules can be checked (and unit-tested) without Axolotl installed.
The rule, in one line: **the ``cpt:`` block owns the CPT recipe** (LoRA shape, trained embeddings, their
learning rate, the schedule, checkpointing); Axolotl keys that mean the same thing are overridden, each
with a message naming both values. Axolotl keeps what is its own: data (``datasets``, ``sequence_len``,
``sample_packing``), and the Trainer's learning rate, warm-up, weight decay and batch sizes (a ``cpt:`` key
left unset follows them, as with ``CPTCallback``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cpt_plugin.config import CPTConfig, CPTConfigError, load_yaml_mapping
from cpt_plugin.trainer_settings import TrainerSettings, optimizer_name_from_trainer, resolve

logger = logging.getLogger("cpt_plugin.integrations.axolotl")

PLUGIN_NAME = "cpt_plugin.integrations.axolotl.CPTPlugin"
ADAPTER_NAME = "cpt"
CONFIG_KEY = "cpt"
_EMBEDDING_MODULES = {"embed_tokens", "lm_head"}
# Axolotl keys with no CPT counterpart that would fight our optimizer groups / adapter: turned off.
_DROPPED = {
    "loraplus_lr_ratio": "LoRA+ learning rates",
    "loraplus_lr_embedding": "LoRA+ learning rates",
    "lr_groups": "custom learning-rate groups",
    "peft_use_dora": "DoRA",
}
# Trainer-level keys of the same name: a cpt: value wins, unset follows Axolotl.
_TRAINER_KEYS = ("learning_rate", "weight_decay", "warmup_steps", "warmup_ratio")


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(float(a) - float(b)) > 1e-12 * max(1.0, abs(float(a)), abs(float(b)))
    return a != b


def _as_plain(value: Any) -> Any:
    """Axolotl's DictDefault (and pydantic objects) → plain dicts/lists."""
    if isinstance(value, Mapping):
        return {str(k): _as_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_plain(v) for v in value]
    return value


def names_plugin(data: Mapping[str, Any]) -> bool:
    return PLUGIN_NAME in (data.get("plugins") or [])


def check_plugin_listed(data: Mapping[str, Any]) -> None:
    """cpt-plugin keys without the plugin line are silently dropped by Axolotl: make that an error."""
    ours = [k for k in data if k == CONFIG_KEY or str(k).startswith("cpt_")]
    if ours and not names_plugin(data):
        raise CPTConfigError(
            f"cpt-plugin: the config sets {', '.join(sorted(ours))} but 'plugins:' does not list "
            f"{PLUGIN_NAME}, so Axolotl would ignore these keys without a word. Add:\n"
            f"plugins:\n  - {PLUGIN_NAME}"
        )


def config_from_block(block: Any) -> CPTConfig:
    """The ``cpt:`` mapping → CPTConfig (its own validation and typo hints)."""
    if block is None:
        return CPTConfig()
    if isinstance(block, CPTConfig):
        return block
    if not isinstance(block, Mapping):
        raise CPTConfigError(
            f"cpt-plugin: 'cpt:' must be a mapping of cpt-plugin keys (e.g. cpt: {{lora_r: 128}}), "
            f"got {type(block).__name__}."
        )
    values = {k: v for k, v in _as_plain(block).items() if v is not None or k in ("target_modules",)}
    config = CPTConfig.from_dict(values)
    if config.domain_shift_ratio:
        raise CPTConfigError(
            "cpt-plugin: 'cpt: domain_shift_ratio' compares a CPTDataset's training and replay corpora, which "
            "Axolotl's own datasets do not provide. Remove it from the cpt: block (it works with CPTCallback "
            "and cpt-plugin train)."
        )
    return config


def resolve_settings(data: Mapping[str, Any]) -> tuple[dict[str, Any], CPTConfig, list[str]]:
    """Returns (Axolotl config with the overlapping keys set our way, CPTConfig, precedence messages).

    Raises CPTConfigError for input that cannot be honoured (bad cpt: values, stray ``cpt_*`` keys,
    an adapter other than cpt/lora, replay).
    """
    out = dict(data)
    notes: list[str] = []
    stray = sorted(k for k in out if str(k).startswith("cpt_"))
    if stray:
        raise CPTConfigError(
            f"cpt-plugin: top-level key(s) {', '.join(stray)} are not read. cpt-plugin keys go under the "
            f"'cpt:' mapping, e.g.\ncpt:\n  {stray[0][4:]}: ..."
        )
    block = _as_plain(out.get(CONFIG_KEY)) or {}
    config = config_from_block(block)
    explicit = set(block) if isinstance(block, Mapping) else set()

    def note(message: str) -> None:
        notes.append(message)

    # --- data belongs to Axolotl -------------------------------------------------------------------
    if config.replay_ratio > 0:
        raise CPTConfigError(
            "cpt-plugin config 'replay_ratio': under Axolotl the data comes from 'datasets:'. Add the replay "
            "corpus as another entry of datasets: (Axolotl mixes them) and leave cpt.replay_ratio unset."
        )
    if "packing" in explicit:
        note("cpt.packing is not used under Axolotl: Axolotl's sample_packing decides packing.")
    seq_len = out.get("sequence_len")
    if seq_len is not None:
        if "max_seq_length" in explicit and _differs(config.max_seq_length, seq_len):
            note(
                f"cpt.max_seq_length={config.max_seq_length} ignored: Axolotl's sequence_len={seq_len} wins "
                "(Axolotl builds the batches)."
            )
        config = config.replace(max_seq_length=int(seq_len))
    if config.rope_scaling is not None:
        raise CPTConfigError(
            "cpt-plugin config 'rope_scaling': under Axolotl, set RoPE scaling with Axolotl's "
            "overrides_of_model_config (the model config is loaded by Axolotl), and leave cpt.rope_scaling unset."
        )

    # --- the adapter: ours -----------------------------------------------------------------------
    adapter = out.get("adapter")
    if adapter in (None, "lora"):
        note(
            f"adapter: {adapter or '(unset)'} → {ADAPTER_NAME}: cpt-plugin sets up the model (rsLoRA "
            f"r={config.lora_r}, alpha={config.lora_alpha:g}"
            + (", embeddings and lm_head fully trained" if config.train_embeddings else "")
            + ")."
        )
        out["adapter"] = ADAPTER_NAME
    elif adapter != ADAPTER_NAME:
        raise CPTConfigError(
            f"cpt-plugin: adapter: {adapter} cannot be combined with {PLUGIN_NAME}, which sets up the CPT "
            f"LoRA and embeddings itself. Use adapter: {ADAPTER_NAME} (or lora, or leave it unset)."
        )
    for key, ours in (
        ("lora_r", config.lora_r),
        ("lora_alpha", config.lora_alpha),
        ("lora_dropout", config.lora_dropout),
        ("peft_use_rslora", config.use_rslora),
    ):
        theirs = out.get(key)
        cpt_key = "use_rslora" if key == "peft_use_rslora" else key
        if theirs is not None and _differs(theirs, ours):
            note(f"{key}: {theirs} ignored: cpt.{cpt_key}={ours} wins (set cpt.{cpt_key} to change it).")
        out[key] = ours
    targets = out.get("lora_target_modules")
    if targets and _differs(
        sorted([targets] if isinstance(targets, str) else targets),
        sorted(
            [config.target_modules]
            if isinstance(config.target_modules, str)
            else (config.target_modules or [])
        ),
    ):
        note(
            f"lora_target_modules: {targets} ignored: cpt.target_modules="
            f"{config.target_modules or 'every attention and MLP projection'} wins."
        )
    if out.get("lora_target_linear") and config.target_modules not in (None, "all-linear"):
        note(f"lora_target_linear: true ignored: cpt.target_modules={config.target_modules} wins.")
    out["lora_target_modules"] = config.target_modules if isinstance(config.target_modules, list) else None
    out["lora_target_linear"] = config.target_modules in (None, "all-linear")
    to_save = out.get("lora_modules_to_save")
    expected = _EMBEDDING_MODULES if config.train_embeddings else set()
    if to_save and set(to_save) != expected:
        what = "the input embeddings and lm_head, fully trained" if config.train_embeddings else "nothing"
        note(
            f"lora_modules_to_save: {list(to_save)} ignored: cpt.train_embeddings={config.train_embeddings} "
            f"wins ({what}; cpt-plugin finds the modules through the model, whatever their names)."
        )
    out["lora_modules_to_save"] = None
    for key, what in _DROPPED.items():
        if out.get(key):
            note(f"{key}: {out[key]} ignored: {what} conflict with cpt-plugin's optimizer groups/adapter.")
            out[key] = None

    # --- learning rates and optimizer ---------------------------------------------------------------
    gc, offload = out.get("gradient_checkpointing"), out.get("activation_offloading")
    trainer = TrainerSettings(
        learning_rate=out.get("learning_rate"),
        optim=out.get("optimizer"),
        gradient_checkpointing=bool(gc) or bool(offload),
    )
    settings = resolve(config, trainer)  # Axolotl's keys in the Trainer's place
    lr = settings.learning_rate
    emb_lr, emb_scale = out.get("embedding_lr"), out.get("embedding_lr_scale")
    ours_text = (
        f"cpt.embedding_learning_rate={config.embedding_learning_rate}"
        if config.embedding_learning_rate is not None
        else f"cpt.embedding_lr_ratio={config.embedding_lr_ratio}"
    )
    if emb_lr is not None and (lr is None or _differs(emb_lr, config.resolved_embedding_lr(float(lr)))):
        note(f"embedding_lr: {emb_lr} ignored: {ours_text} wins.")
    if emb_scale is not None and (
        config.embedding_learning_rate is not None or _differs(emb_scale, config.embedding_lr_ratio)
    ):
        note(f"embedding_lr_scale: {emb_scale} ignored: {ours_text} wins.")
    out["embedding_lr"] = out["embedding_lr_scale"] = None
    for key in _TRAINER_KEYS:
        ours = getattr(config, key)
        if key in explicit and ours is not None and out.get(key) is not None and _differs(out[key], ours):
            note(f"{key}: {out[key]} ignored: cpt.{key}={ours} wins.")
    optimizer = out.get("optimizer")
    if optimizer is not None:
        kind = optimizer_name_from_trainer(optimizer)
        if config.optimizer is not None and kind != config.optimizer:
            note(f"optimizer: {optimizer} ignored: cpt.optimizer={config.optimizer} wins.")
        elif config.optimizer is None and kind is None:
            note(
                f"optimizer: {optimizer} ignored: cpt-plugin builds AdamW over its parameter groups "
                "(adamw_torch_fused; set cpt.optimizer to adamw_torch or adamw_8bit to choose)."
            )
    if config.schedule != "none":
        for key in ("lr_scheduler", "cosine_min_lr_ratio", "cosine_constant_lr_ratio"):
            if out.get(key) is not None and key in data:
                note(
                    f"{key}: {out[key]} ignored: cpt.schedule={config.schedule} wins "
                    "(set cpt.schedule: none to keep Axolotl's scheduler)."
                )

    # --- checkpointing: ours ------------------------------------------------------------------------
    axolotl_offload = gc in ("offload", "offload_disk") or bool(offload)
    mode = config.gradient_checkpointing
    wanted = settings.checkpointing != "off"
    shown = ("offload" if wanted else "off") if mode == "auto" else mode
    if axolotl_offload:
        which = (
            f"gradient_checkpointing: {gc}"
            if gc in ("offload", "offload_disk")
            else (f"activation_offloading: {offload}")
        )
        note(
            f"{which} (Axolotl's activation offloading) turned off: cpt.gradient_checkpointing="
            f"{mode}{f' (→ {shown})' if mode == 'auto' else ''} wins; cpt-plugin's checkpointing "
            "offloads the layer inputs itself."
        )
    elif mode != "auto" and gc is not None and bool(gc) != wanted:
        note(f"gradient_checkpointing: {gc} ignored: cpt.gradient_checkpointing={mode} wins.")
    out["gradient_checkpointing"] = wanted
    out["activation_offloading"] = False
    out[CONFIG_KEY] = config.to_dict()
    return out, config, notes


def load_yaml(path: str | Path) -> dict[str, Any]:
    """An Axolotl config file as a mapping (errors name the file, the line and the fix)."""
    return load_yaml_mapping(path, expected="Axolotl config keys").data


def check_config(config: Mapping[str, Any] | str | Path) -> list[str]:
    """Checks an Axolotl config (dict or YAML path) the way the plugin will; returns the messages.

    Also catches what the plugin cannot see at run time: cpt-plugin keys without the plugin line.
    """
    data = load_yaml(config) if isinstance(config, (str, Path)) else dict(config)
    check_plugin_listed(data)
    if not names_plugin(data):
        return []
    return resolve_settings(data)[2]
