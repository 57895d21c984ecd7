"""The `cpt-plugin train` job: config → corpora/tokenizer → model → (base) → CPT → evaluate → save.

It drives a stock ``transformers.Trainer`` with ``CPTCallback``, exactly as a user's own script would.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import logging
import math
import time
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from cpt_plugin.config import CPTConfig, CPTConfigError, did_you_mean, unknown_key_error
from cpt_plugin.data.checks import SPLITS

logger = logging.getLogger(__name__)

RUN_KEYS = {
    "model", "tokenizer", "data", "cpt", "training", "base_pretraining", "compare_without_replay", "export_merged",
}  # fmt: skip
# The keys of each plain section and the types their values may have (checked before anything is built).
SECTION_KEYS: dict[str, dict[str, tuple[type, ...]]] = {
    "model": {
        "name_or_path": (str,),
        "tiny_llama": (dict,),
        "attn_implementation": (str,),
        "dtype": (str,),
        "load_in_4bit": (bool,),
        "load_in_8bit": (bool,),
    },
    "tokenizer": {"name_or_path": (str,), "train_vocab_size": (int,)},
    "data": {
        "train": (str,),
        "replay": (str,),
        "eval_new": (str,),
        "eval_old": (str,),
        "text_field": (str,),
        "split": (str,),
        "default_corpora": (bool,),
        "corpora_max_mb": (int, float),
        "eval_max_blocks": (int,),
    },
}
DATA_PATH_KEYS = ("train", "replay", "eval_new", "eval_old")
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _type_error(key: str, value: Any, types: tuple[type, ...]) -> CPTConfigError:
    words = {
        dict: "mapping",
        float: "number",
        int: "whole number",
        bool: "boolean (true or false)",
        str: "string",
    }
    names = words[float] if float in types else " or ".join(words.get(t, t.__name__) for t in types)
    fix = f"Give a {names}."
    if isinstance(value, str) and (float in types or int in types):
        try:
            number = float(value)
        except ValueError:
            pass
        else:
            fix += f" YAML reads {value} as text: write {number!r}"
            mantissa, _, exponent = value.lower().partition("e")
            if exponent and "." not in mantissa:
                fix += f" (or {mantissa}.0e{exponent if exponent[0] in '+-' else '+' + exponent})"
            fix += "."
    return CPTConfigError(f"Run config '{key}': expected a {names}, got {value!r}. {fix}")


def _is_instance(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False  # YAML's true/false is not a number
    return isinstance(value, types)


def _section(raw: dict[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        example = "name_or_path: ..." if "name_or_path" in SECTION_KEYS.get(name, {}) else "key: value"
        raise CPTConfigError(
            f"Run config '{name}': expected a mapping of keys, got {value!r}. "
            f"Write it as '{name}:' followed by indented '{example}' lines."
        )
    return dict(value)


def _check_section(name: str, values: dict[str, Any]) -> None:
    schema = SECTION_KEYS[name]
    for key, value in values.items():
        if key not in schema:
            raise unknown_key_error(key, sorted(schema), f"run config '{name}'")
        if value is not None and not _is_instance(value, schema[key]):
            raise _type_error(f"{name}.{key}", value, schema[key])


def _check_tiny_llama(values: dict[str, Any]) -> None:
    from transformers import LlamaConfig

    valid = sorted(LlamaConfig().to_dict())
    for key in values:
        if key not in valid:
            raise unknown_key_error(key, valid, "run config 'model.tiny_llama' (LlamaConfig)")


def _training_fields() -> dict[str, Any]:
    from transformers import TrainingArguments

    return {f.name: f.type for f in dataclasses.fields(TrainingArguments) if f.init}


def _simple_types(annotation: Any) -> tuple[type, ...] | None:
    """(int,), (float, int), (bool,) for plain numeric/boolean fields (optionally ``| None``), else None."""
    members = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    if len(members) != 1 or members[0] not in (int, float, bool):
        return None
    return (float, int) if members[0] is float else (members[0],)


def _check_training(name: str, values: dict[str, Any], fields: dict[str, Any]) -> None:
    """Keys of a TrainingArguments section: known (did-you-mean), numbers and booleans of the right type."""
    for key, value in values.items():
        if key not in fields:
            raise unknown_key_error(key, sorted(fields), f"run config '{name}' (TrainingArguments)")
        types = _simple_types(fields[key])
        if value is not None and types and not _is_instance(value, types):
            raise _type_error(f"{name}.{key}", value, types)


@dataclasses.dataclass
class RunConfig:
    """A `cpt-plugin train` YAML: where the model and data come from, CPTConfig and TrainingArguments."""

    model: dict[str, Any]
    data: dict[str, Any]
    cpt: CPTConfig
    training: dict[str, Any]
    tokenizer: dict[str, Any] = dataclasses.field(default_factory=dict)
    base_pretraining: dict[str, Any] | None = None
    compare_without_replay: bool = False
    export_merged: bool = False  # also write output_dir/merged (a full 16-bit copy: ~14 GB for a 7B model)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        """Checks every section (unknown keys with a did-you-mean, types, required keys) before anything runs.

        Data paths are checked by :meth:`check_data` (``run`` calls it before building anything).
        """
        if not isinstance(raw, dict):
            raise CPTConfigError(f"The run config must be a mapping of sections, got {type(raw).__name__}.")
        for key in raw:
            if key not in RUN_KEYS:
                hint = did_you_mean(key, sorted(RUN_KEYS), f"Valid sections: {', '.join(sorted(RUN_KEYS))}.")
                raise CPTConfigError(f"Unknown section '{key}' in the run config. {hint}")
        model, tokenizer, data = (_section(raw, name) for name in ("model", "tokenizer", "data"))
        for name, values in (("model", model), ("tokenizer", tokenizer), ("data", data)):
            _check_section(name, values)
        if not model.get("name_or_path") and not model.get("tiny_llama"):
            raise CPTConfigError(
                "Run config 'model': set model.name_or_path (hub id or local path) or model.tiny_llama."
            )
        if model.get("tiny_llama"):
            _check_tiny_llama(model["tiny_llama"])
        if model.get("dtype", "auto") not in MODEL_DTYPES:
            fix = did_you_mean(model["dtype"], MODEL_DTYPES, f"Choose one of {', '.join(MODEL_DTYPES)}.")
            raise CPTConfigError(f"Run config 'model.dtype': unknown dtype {model['dtype']!r}. {fix}")
        if not data.get("default_corpora") and not data.get("train"):
            raise CPTConfigError(
                "Run config 'data': set data.train (a file, folder, JSONL or saved dataset)."
            )
        if data.get("split", "file") not in SPLITS:
            raise CPTConfigError(
                f"Run config 'data.split': got {data['split']!r}. Choose one of {', '.join(SPLITS)}."
            )
        fields = _training_fields()
        training = _section(raw, "training")
        _check_training("training", training, fields)
        if not training.get("max_steps"):
            raise CPTConfigError(
                "Run config 'training.max_steps': the corpus is streamed, so the number of optimizer steps must "
                "be given (cpt_plugin.data.estimate_steps helps to pick it)."
            )
        base = _section(raw, "base_pretraining") if raw.get("base_pretraining") is not None else None
        if base is not None:
            _check_training("base_pretraining", base, fields)
        compare = raw.get("compare_without_replay", False)
        if not isinstance(compare, bool):
            raise _type_error("compare_without_replay", compare, (bool,))
        export_merged = raw.get("export_merged", False)
        if not isinstance(export_merged, bool):
            raise _type_error("export_merged", export_merged, (bool,))
        cpt = CPTConfig.from_dict(_section(raw, "cpt"))
        quantized = "load_in_4bit" if model.get("load_in_4bit") else "load_in_8bit"
        if (cpt.new_tokens or cpt.extend_vocabulary) and model.get(quantized):
            raise CPTConfigError(
                f"Run config 'model.{quantized}' with new tokens: resizing the embeddings needs the unquantized "
                "model. Remove cpt.new_tokens / cpt.extend_vocabulary, or load the model in 16-bit; to train "
                "quantized, add the tokens to a 16-bit copy (cpt_plugin.add_new_tokens), save it, and point "
                "model.name_or_path at that."
            )
        has_replay = bool(data.get("replay") or data.get("default_corpora"))
        if base is not None and not has_replay:
            raise CPTConfigError(
                "Run config 'base_pretraining' needs data.replay (the old-domain corpus it trains on). "
                "Set data.replay, or remove base_pretraining."
            )
        if cpt.replay_ratio > 0 and not has_replay:
            raise CPTConfigError(
                f"Run config 'cpt.replay_ratio' is {cpt.replay_ratio}, but there is no data.replay to replay "
                "from. Set data.replay (the previous-domain corpus), or cpt.replay_ratio: 0."
            )
        return cls(
            model=model,
            data=data,
            cpt=cpt,
            training=training,
            tokenizer=tokenizer,
            base_pretraining=base,
            compare_without_replay=compare,
            export_merged=export_merged,
        )

    def check_data(self) -> None:
        """Checks every data path (exists, UTF-8, JSONL rows with the text field) before any model is built."""
        from cpt_plugin.data.checks import DataSourceError, validate_source

        for key in DATA_PATH_KEYS:
            path = self.data.get(key)
            if not path:
                continue
            try:
                validate_source(path, self.data.get("text_field", "text"), self.data.get("split", "file"))
            except DataSourceError as error:
                raise DataSourceError(f"Run config 'data.{key}': {error}") from None


def default_config_text() -> str:
    return resources.files("cpt_plugin.cli").joinpath("defaults/default.yaml").read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------------
def _load_tokenizer(run: RunConfig, corpora: dict[str, Path], out: Path) -> Any:
    from transformers import AutoTokenizer

    source = run.tokenizer.get("name_or_path") or run.model.get("name_or_path")
    if source:
        tokenizer = AutoTokenizer.from_pretrained(source)
    else:
        from cpt_plugin.cli.corpora import train_tokenizer

        paths = [corpora[k] for k in ("old_train", "new_train") if k in corpora] or [run.data["train"]]
        tokenizer = train_tokenizer(
            paths, vocab_size=int(run.tokenizer.get("train_vocab_size", 2048)), out_dir=out / "tokenizer"
        )
    if tokenizer.eos_token_id is None:
        raise CPTConfigError(
            f"The tokenizer of {source or 'the run'} has no EOS token, which packing puts between documents. "
            "Set tokenizer.name_or_path to one that has, or add one (tokenizer.eos_token = ...)."
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_model(run: RunConfig, tokenizer: Any) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if run.model.get("tiny_llama"):
        torch.manual_seed(run.training.get("seed", 42))
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **run.model["tiny_llama"],
        )
        config._attn_implementation = "sdpa"
        return LlamaForCausalLM(config)
    path = run.model["name_or_path"]
    model_config = AutoConfig.from_pretrained(path)
    if run.cpt.max_seq_length > getattr(model_config, "max_position_embeddings", math.inf):
        from cpt_plugin.long_context import apply_rope_scaling

        apply_rope_scaling(model_config, run.cpt.max_seq_length, run.cpt.rope_scaling)
    if run.cpt.enabled_kernels():
        from cpt_plugin.patching.registry import patch

        patch(model_config.model_type, run.cpt)
    kwargs: dict[str, Any] = {
        "config": model_config,
        "attn_implementation": run.model.get("attn_implementation", "sdpa"),
    }
    dtype = run.model.get("dtype", "auto")
    kwargs["dtype"] = dtype if dtype == "auto" else getattr(torch, dtype)
    if run.model.get("load_in_4bit") or run.model.get("load_in_8bit"):
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=bool(run.model.get("load_in_4bit")),
            load_in_8bit=bool(run.model.get("load_in_8bit")),
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if "quantization_config" in kwargs:
        from cpt_plugin.quantized import prepare_kbit_model

        model = prepare_kbit_model(model, torch.bfloat16 if dtype == "auto" else getattr(torch, dtype))
    _take_token_ids(model, tokenizer)
    return model


def _take_token_ids(model: Any, tokenizer: Any) -> None:
    """The model's config (and generation config) take the tokenizer's BOS and PAD ids (PAD may be the EOS
    _load_tokenizer chose). The Trainer would align them itself, with a warning-level line for each run."""
    configs = [model.config.get_text_config(), getattr(model, "generation_config", None)]
    for name in ("bos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            for config in configs:
                if config is not None and getattr(config, name, None) != value:
                    setattr(config, name, value)


def _dataset(source: Any, tokenizer: Any, run: RunConfig, **kwargs: Any) -> Any:
    from cpt_plugin.data import CPTDataset

    return CPTDataset(
        source,
        tokenizer,
        run.cpt.max_seq_length,
        seed=run.cpt.seed,
        text_field=run.data.get("text_field", "text"),
        split=run.data.get("split", "file"),
        **kwargs,
    )


def heldout_loss(model: Any, blocks: list[dict[str, Any]], batch_size: int = 8) -> float:
    """Token-weighted mean held-out loss (kept for callers of the CLI module; see cpt_plugin.evaluation)."""
    from cpt_plugin.evaluation import heldout_loss as measure

    return measure(model, blocks, batch_size)


def _training_args(run: RunConfig, out: Path, overrides: dict[str, Any] | None = None) -> Any:
    from transformers import TrainingArguments

    values = {
        "report_to": [],
        "save_strategy": "steps",
        "logging_steps": 10,
        **run.training,
        **(overrides or {}),
    }
    values["output_dir"] = str(
        overrides.get("output_dir") if overrides and "output_dir" in overrides else out
    )
    if not torch.cuda.is_available():
        values.setdefault("use_cpu", True)
    return TrainingArguments(**values)


def _stage_progress(header: str) -> Any:
    """The Trainer's progress bar with the stage as its label and the evaluator's results as one line."""
    from transformers.trainer_callback import ProgressCallback

    class StageProgress(ProgressCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            super().on_train_begin(args, state, control, **kwargs)
            if self.training_bar is not None:
                self.training_bar.set_description(header)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs and "eval_tokens_seen" in logs:
                parts = [
                    f"{domain} domain {logs[f'eval_{domain}_loss']:.3f}"
                    for domain in ("new", "old")
                    if f"eval_{domain}_loss" in logs
                ]
                when = (
                    "before training (the base model)"
                    if state.global_step == 0
                    else (f"at step {state.global_step} ({int(logs['eval_tokens_seen']):,} tokens seen)")
                )
                line = f"  held-out loss {when}: " + ", ".join(parts)
                if self.training_bar is not None:
                    self.training_bar.write(line)
                else:
                    print(line, flush=True)
                return
            super().on_log(args, state, control, logs=logs, **kwargs)

    return StageProgress()


def _train(
    model: Any, dataset: Any, args: Any, callbacks: list[Any], header: str = "", tokenizer: Any = None
) -> Any:
    from transformers import Trainer
    from transformers.trainer_callback import ProgressCallback

    from cpt_plugin.data import collate_packed

    logger.info("cpt-plugin: %s, %d steps", header, args.max_steps)
    if args.max_steps < args.logging_steps:
        logger.info(
            "cpt-plugin: max_steps (%d) < logging_steps (%d): no training loss will be logged for %s.",
            args.max_steps,
            args.logging_steps,
            header,
        )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collate_packed,
        callbacks=callbacks,
        processing_class=tokenizer,  # the sample completions decode with it; checkpoints carry it
    )
    if header and not args.disable_tqdm:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_stage_progress(header))
    trainer.train()
    return trainer


def _domain_names(run_config: RunConfig) -> dict[str, str]:
    """What the two domains are, for the table and the plot."""
    if run_config.data.get("default_corpora") and not run_config.data.get("train"):
        return {"new": "new domain (stdlib code)", "old": "old domain (stdlib prose)"}
    names = {}
    for domain in ("new", "old"):
        source = run_config.data.get(f"eval_{domain}")
        names[domain] = f"{domain} domain ({Path(source).name})" if source else f"{domain} domain"
    return names


def _save_tiny_base(model: Any, tokenizer: Any, folder: Path) -> None:
    """The demo's base model has no home on disk: save it, so the adapter can be reloaded and exported."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a one-shard "Writing model shards" bar says nothing
    try:
        model.save_pretrained(str(folder))
    finally:
        hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(str(folder))
    model.name_or_path = str(folder.resolve())  # PEFT writes it as the adapter's base_model_name_or_path
    model.config._name_or_path = str(folder.resolve())


def _extend_vocabulary(
    run_config: RunConfig, model: Any, tokenizer: Any, train_source: Any, eval_source: Any
) -> dict[str, Any] | None:
    """Adds ``cpt.new_tokens`` and ``cpt.extend_vocabulary`` tokens (learned from the training corpus) for CPT.

    It runs after base pretraining (the base learns the old tokenizer) and before the CPT data and the
    held-out blocks are tokenized. Added tokens get ids from ``len(tokenizer)`` on, so every old id keeps
    its row; the saved base-model/ keeps the old tokenizer, the adapter the extended one.

    What a fair before/after is: the held-out text of both domains is tokenized once, with the extended
    tokenizer, and the base (step 0: the base with its new rows initialised, adapter off) and the CPT
    model are measured on the same blocks, so their per-token losses are over the same tokens. The base on
    its old tokenizer is not a row of the table: the same text is more tokens there, so per-token losses do
    not compare; the summary gives the new-domain held-out text's length under both tokenizers instead.
    """
    cfg = run_config.cpt
    if not cfg.new_tokens and not cfg.extend_vocabulary:
        return None
    from cpt_plugin.data import iter_documents
    from cpt_plugin.vocabulary.extension import add_new_tokens, learn_new_tokens

    text_field, split = run_config.data.get("text_field", "text"), run_config.data.get("split", "file")
    tokens = list(cfg.new_tokens or [])
    if cfg.extend_vocabulary:
        texts = iter_documents(train_source, text_field=text_field, split=split)
        tokens += learn_new_tokens(tokenizer, texts, cfg.extend_vocabulary, exclude=tokens)
    sample = list(itertools.islice(iter_documents(eval_source or train_source, text_field, split), 200))
    before = sum(len(ids) for ids in tokenizer(sample, add_special_tokens=False)["input_ids"])
    new_ids = add_new_tokens(model, tokenizer, tokens, init=cfg.new_token_init)
    after = sum(len(ids) for ids in tokenizer(sample, add_special_tokens=False)["input_ids"])
    return {
        "added_tokens": len(new_ids),
        "ids": [min(new_ids), max(new_ids)],
        "init": cfg.new_token_init,
        "embedding_rows": int(model.get_input_embeddings().weight.shape[0]),
        "tokens": tokens,
        "new_domain_tokens": {"old_tokenizer": before, "extended_tokenizer": after},
    }


def run(run_config: RunConfig, output_dir: str | None = None) -> dict[str, Any]:
    """Runs the job and returns the summary (also written to output_dir/summary.json)."""
    from cpt_plugin.cli.plots import plot_run
    from cpt_plugin.integrations.hf import CPTCallback, check_output_dir
    from cpt_plugin.monitoring import SampleCallback

    started = time.perf_counter()
    out = Path(output_dir or run_config.training.get("output_dir", "cpt-output"))
    check_output_dir(str(out))
    # Everything that can be checked is checked before a corpus is written or a model is built.
    run_config.check_data()
    cpt_args = _training_args(run_config, out)
    base_args = None
    if run_config.base_pretraining:
        base_args = _training_args(
            run_config,
            out,
            {**run_config.base_pretraining, "output_dir": out / "base", "save_strategy": "no"},
        )
    corpora: dict[str, Path] = {}
    if run_config.data.get("default_corpora"):
        from cpt_plugin.cli.corpora import write_default_corpora

        corpora = write_default_corpora(
            out / "corpora", max_mb=float(run_config.data.get("corpora_max_mb", 1.0))
        )
    train_source = run_config.data.get("train") or corpora.get("new_train")
    replay_source = run_config.data.get("replay") or corpora.get("old_train")
    eval_sources = {
        "new": run_config.data.get("eval_new") or corpora.get("new_heldout"),
        "old": run_config.data.get("eval_old") or corpora.get("old_heldout"),
    }
    names = _domain_names(run_config)
    tokenizer = _load_tokenizer(run_config, corpora, out)
    model = _load_model(run_config, tokenizer)
    cfg = run_config.cpt
    replay_name = f"CPT, replay {cfg.replay_ratio:.0%}"
    runs = [replay_name] + (
        ["CPT, no replay"] if run_config.compare_without_replay and cfg.replay_ratio > 0 else []
    )
    stages = (1 if base_args is not None else 0) + len(runs)
    stage = 0
    curves: dict[str, list[tuple[int, float]]] = {}
    if base_args is not None:
        stage += 1
        header = f"{stage}/{stages} base pretraining on the {names['old']}"
        base_trainer = _train(
            model, _dataset(replay_source, tokenizer, run_config), base_args, [], header=header
        )
        curves["base pretraining (old domain)"] = _curve(base_trainer)
    if run_config.model.get("tiny_llama"):
        _save_tiny_base(model, tokenizer, out / "base-model")
    vocabulary = _extend_vocabulary(run_config, model, tokenizer, train_source, eval_sources["new"])
    cfg = cfg.replace(new_tokens=None, extend_vocabulary=0)  # done: the callback must not try again
    eval_blocks = {
        name: list(_dataset(src, tokenizer, run_config).iter_blocks())[
            : int(run_config.data.get("eval_max_blocks", 64))
        ]
        for name, src in eval_sources.items()
        if src
    }
    base_copy = copy.deepcopy(model) if len(runs) > 1 else None

    def cpt_run(name: str, model: Any, config: CPTConfig, args: Any, dataset: Any) -> Any:
        nonlocal stage
        stage += 1
        mix = f" with {config.replay_ratio:.0%} replay of the old" if config.replay_ratio else ", no replay"
        header = f"{stage}/{stages} CPT on the {names['new']}{mix}"
        callback = CPTCallback(config, eval_new=eval_blocks.get("new"), eval_old=eval_blocks.get("old"))
        trainer = _train(model, dataset, args, [callback], header=header, tokenizer=tokenizer)
        curves[name] = _curve(trainer)
        evaluations[name] = callback.evaluator
        samples[name] = next((m for m in callback.monitors if isinstance(m, SampleCallback)), None)
        if callback.domain_shifted_rows is not None and name not in shifted:
            shifted[name] = callback.domain_shifted_rows
        resolved[name] = callback.config  # the replay defaults as this run resolved them
        return trainer

    shifted: dict[str, int] = {}
    resolved: dict[str, Any] = {}

    evaluations: dict[str, Any] = {}
    samples: dict[str, Any] = {}
    replay = replay_source if cfg.replay_ratio > 0 else None
    dataset = _dataset(
        train_source, tokenizer, run_config, replay_source=replay, replay_ratio=cfg.replay_ratio
    )
    trainer = cpt_run(replay_name, model, cfg, cpt_args, dataset)
    trainer.save_model(str(out / "adapter"))
    tokenizer.save_pretrained(str(out / "adapter"))
    merged = _write_merged(trainer.model, tokenizer, out / "merged") if run_config.export_merged else None
    if base_copy is not None:
        args = _training_args(run_config, out, {"output_dir": out / "no-replay", "save_strategy": "no"})
        cpt_run(
            "CPT, no replay",
            base_copy,
            cfg.replace(replay_ratio=0.0),
            args,
            # the replay corpus stays known (never mixed in) so that domain_shift_ratio marks the same rows
            _dataset(train_source, tokenizer, run_config, replay_source=replay_source, replay_ratio=0.0),
        )

    first = next((e for e in evaluations.values() if e is not None), None)
    table: dict[str, dict[str, float]] = {"base": dict(first.base) if first else {}}
    for name, evaluator in evaluations.items():
        if evaluator is not None and evaluator.history:
            table[name] = {d: v for d, v in evaluator.history[-1].items() if d in ("new", "old")}
    plot_run(
        curves,
        {name: e.history for name, e in evaluations.items() if e is not None},
        table["base"],
        out / "loss_curve.png",
        names=names,
        logging_steps=cpt_args.logging_steps,
        max_steps=cpt_args.max_steps,
    )
    summary = {
        "domains": names,
        "heldout_loss": {name: {names[d]: v for d, v in losses.items()} for name, losses in table.items()},
        "heldout_curves": {name: e.history for name, e in evaluations.items() if e is not None},
        "adapter": str(out / "adapter"),
        "base_model": str(out / "base-model")
        if run_config.model.get("tiny_llama")
        else run_config.model.get("name_or_path"),
        "loss_curve": str(out / "loss_curve.png"),
        "merged": str(merged) if merged else None,
        "heldout_plots": [str(e.plot_path) for e in evaluations.values() if e is not None and e.plot_path],
        "samples": _sample_table(samples),
        "summary": str(out / "summary.json"),
        "seconds": round(time.perf_counter() - started, 1),
    }
    if vocabulary:
        summary["vocabulary"] = vocabulary
    run_cfg = resolved.get(replay_name, cfg)
    if shifted.get(replay_name) is not None:
        rows = model.get_input_embeddings().weight.shape[0]
        summary["domain_shifted_rows"] = {
            "rows": shifted[replay_name],
            "of": int(rows),
            "ratio": run_cfg.domain_shift_ratio,
            "learning_rate": run_cfg.resolved_fresh_lr(cpt_args.learning_rate),
        }
    if run_cfg.output_row_projection or (run_cfg.final_step_back or 1.0) != 1.0:
        summary["replay_recipe"] = {
            "output_row_projection": run_cfg.output_row_projection or 0,
            "final_step_back": run_cfg.final_step_back or 1.0,
        }
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(format_summary(summary))
    return summary


def _curve(trainer: Any) -> list[tuple[int, float]]:
    return [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]


def _write_merged(model: Any, tokenizer: Any, folder: Path) -> Path:
    """The trained model as one plain checkpoint in ``output_dir/merged`` (``cpt_plugin.export.merge``).

    The run owns this folder: a merged model left by an earlier run into the same output_dir is moved
    aside, and removed only once the new one is complete (put back if the export fails), so that
    ``make default`` runs again in the same place. ``cpt-plugin export`` itself never overwrites.
    """
    import os
    import shutil

    from cpt_plugin.export import merge

    earlier = None
    if folder.exists():
        earlier = folder.with_name(f".{folder.name}-earlier-run-{os.getpid()}")
        folder.rename(earlier)
    try:
        merge(model, folder, tokenizer=tokenizer)
    except BaseException:
        if earlier is not None and not folder.exists():
            earlier.rename(folder)
        raise
    if earlier is not None:
        shutil.rmtree(earlier, ignore_errors=True)
        logger.info("cpt-plugin: the merged model of an earlier run in %s was replaced", folder)
    return folder


def _sample_table(samples: dict[str, Any]) -> list[dict[str, str | None]]:
    """One row per sample prompt: the base's completion (before CPT) and each run's (after)."""
    rows: list[dict[str, str | None]] = []
    for name, callback in samples.items():
        if callback is None or callback.trained is None:
            continue
        for index, prompt in enumerate(callback.prompts):
            if len(rows) <= index:
                base = callback.base[index]["completion"] if callback.base is not None else None
                rows.append({"prompt": prompt, "base": base})
            rows[index][name] = callback.trained[index]["completion"]
    return rows


def _one_line(text: str, width: int = 72) -> str:
    """A completion on one line of the summary (line breaks shown as a return sign)."""
    line = text.strip().replace("\n", " \u21b5 ")
    return line if len(line) <= width else line[: width - 1] + "\u2026"


def _output_lines(summary: dict[str, Any]) -> list[str]:
    """Where the evaluator's PNG, the merged model and the samples are (when the run made them)."""
    lines = [f"held-out:    {path}" for path in summary.get("heldout_plots", [])[:1]]
    if summary.get("merged"):
        lines.append(f"merged:      {summary['merged']}  (AutoModelForCausalLM.from_pretrained loads it)")
    if summary.get("samples"):
        lines.append(f"samples:     {Path(summary['summary']).parent / 'samples.md'}")
    return lines


def _sample_lines(summary: dict[str, Any]) -> list[str]:
    rows = summary.get("samples") or []
    if not rows:
        return []
    width = max(len(k) for row in rows for k in row if k != "prompt") + 2
    lines = ["", "Samples (greedy; the base before CPT, each run after it)"]
    for index, row in enumerate(rows, start=1):
        lines.append(f"[{index}] {row['prompt']}")
        for name, completion in row.items():
            if name != "prompt" and completion is not None:
                lines.append(f"    {name.ljust(width)}| {_one_line(completion)}")
    return lines


def _vocabulary_line(vocabulary: dict[str, Any] | None) -> list[str]:
    if not vocabulary:
        return []
    counts = vocabulary["new_domain_tokens"]
    before, after = counts["old_tokenizer"], counts["extended_tokenizer"]
    return [
        f"vocabulary:  {vocabulary['added_tokens']} tokens added ({vocabulary['init']} init); the new domain's "
        f"held-out text is {after:,} tokens instead of {before:,} ({(after - before) / max(before, 1):+.1%})"
    ]


def _shifted_rows_line(shifted: dict[str, Any] | None) -> list[str]:
    if not shifted:
        return []
    return [
        f"embeddings:  {shifted['rows']} of {shifted['of']} rows are the new domain's own tokens (at least "
        f"{shifted['ratio']:g}x more frequent there than in the replay data): they learned at the fresh-row LR "
        f"({shifted['learning_rate']:g}), the others at the embedding LR (cpt.domain_shift_ratio)"
    ]


def _replay_recipe_line(recipe: dict[str, Any] | None) -> list[str]:
    if not recipe:
        return []
    parts = []
    if recipe["output_row_projection"]:
        parts.append(
            f"lm_head updates kept off {recipe['output_row_projection']} directions of the old domain"
        )
    if recipe["final_step_back"] != 1.0:
        parts.append(f"the trained weights stepped back to {recipe['final_step_back']:g} of their change")
    return [f"forgetting:  {'; '.join(parts)} (the replay defaults, docs/RECIPE.md)"]


def format_summary(summary: dict[str, Any]) -> str:
    """The before/after table: adaptation (new domain) and forgetting (old domain), with the change."""
    table = summary["heldout_loss"]
    base = table.get("base", {})
    domains = list(base)
    width = max(len(k) for k in table) + 2
    col = max([len(d) for d in domains] + [12]) + 2
    lines = [
        "",
        "Held-out loss (lower is better; change against the base model in brackets)",
        "model".ljust(width) + "".join(d.rjust(col) for d in domains),
    ]
    for name, losses in table.items():
        cells = []
        for d in domains:
            cell = f"{losses[d]:.3f}"
            if name != "base":
                cell += f" ({losses[d] - base[d]:+.3f})"
            cells.append(cell.rjust(col))
        lines.append(name.ljust(width) + "".join(cells))
    lines += _sample_lines(summary)
    lines += [
        "",
        f"adapter:     {summary['adapter']}  (base model: {summary['base_model']})",
        f"loss curves: {summary['loss_curve']}",
        *_output_lines(summary),
        f"all numbers: {summary['summary']}",
        *_vocabulary_line(summary.get("vocabulary")),
        *_shifted_rows_line(summary.get("domain_shifted_rows")),
        *_replay_recipe_line(summary.get("replay_recipe")),
        f"took {summary['seconds']} s",
    ]
    return "\n".join(lines)
