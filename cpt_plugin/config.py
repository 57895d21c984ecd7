"""CPTConfig: the one place where cpt-plugin's behaviour is configured.

Every entry point (CPTCallback, the CLI, the Axolotl plugin, auto-activation) turns its own
settings into one ``CPTConfig`` and hands it to the same core functions.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEDULES = (
    "none",  # keep the Trainer's own scheduler
    "cosine",  # re-warm then cosine decay to min_lr_ratio * max LR
    "wsd",  # warm-up, stable, decay
    "infinite_cosine",  # Ibrahim et al. 2024: warm-up, cosine cool-down, constant, exp anneal
    "infinite_inv_sqrt",  # Ibrahim et al. 2024: warm-up, inverse-sqrt cool-down, constant, exp anneal
    "constant",  # warm-up then constant
)
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_8bit")
CHECKPOINTING_MODES = ("off", "recompute", "offload", "auto")
TRAINED_EMBEDDINGS_DTYPES = ("float32", "bfloat16_sr", "model")
EMBEDDING_OPTIMIZERS = ("adamw", "adamw_8bit")
EMBEDDING_ROWS = ("all", "fresh")
# with replay data, the defaults of the options that are None (docs/RECIPE.md: measured together)
REPLAY_DEFAULTS = {"domain_shift_ratio": 4.0, "output_row_projection": 4, "final_step_back": 0.975}
SHIFTED_FRESH_LR_FACTOR = 2.0  # fresh-row LR / LoRA LR with domain-shifted rows, unless set
KERNEL_NAMES = ("rms_norm", "rope", "swiglu", "fused_linear_cross_entropy", "fused_lora")

CPT_KEYS_EXAMPLE = "cpt-plugin keys (e.g. 'lora_r: 64')"  # what a cpt-plugin YAML file holds


class CPTConfigError(ValueError):
    """A configuration value is wrong; the message names the key and the fix."""


# --- the did-you-mean hint and the YAML reader every config file goes through ----------------------
def did_you_mean(word: object, choices: Sequence[str], otherwise: str, *, cutoff: float = 0.6) -> str:
    """ "Did you mean 'x'?" for the choice closest to ``word``; ``otherwise`` (e.g. the choices) if none is."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=cutoff)
    return f"Did you mean '{close[0]}'?" if close else otherwise


def unknown_key_error(key: str, valid: Sequence[str], where: str) -> CPTConfigError:
    """ "Unknown {where} key 'k'. Did you mean ...?" (or the valid keys): one wording for every section."""
    hint = did_you_mean(key, valid, f"Valid keys: {', '.join(valid)}.", cutoff=0.5)
    return CPTConfigError(f"Unknown {where} key '{key}'. {hint}")


@dataclass(frozen=True)
class YamlMapping:
    """A YAML file's top-level mapping and its composed node (to name the line of a key in an error)."""

    data: dict[str, Any]
    node: Any = None

    def line_of(self, message: str) -> str:
        """', line N' of the first key quoted in ``message`` that the mapping holds, else ''."""
        keys = {key.value: key for key, _ in getattr(self.node, "value", ()) if hasattr(key, "start_mark")}
        for quoted in re.findall(r"'([^']+)'", message):
            if quoted in keys:
                return f", line {keys[quoted].start_mark.line + 1}"
        return ""


def load_yaml_mapping(
    path: str | Path | None, *, expected: str, where: str | None = None, text: str | None = None
) -> YamlMapping:
    """Reads ``path`` (or ``text``) as a YAML mapping; an empty file is ``{}``.

    Every failure is a CPTConfigError that starts with ``where`` (default: the path), names the line
    where YAML saw the problem, and says the fix; ``expected`` words what the mapping should hold.
    """
    import yaml

    where = where or str(path)
    if text is None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise CPTConfigError(
                f"{where}: no such file (working directory {os.getcwd()}). Check the path."
            ) from None
        except (OSError, UnicodeDecodeError) as error:
            raise CPTConfigError(
                f"{where}: cannot be read ({error}). Give a readable UTF-8 text file."
            ) from error
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise CPTConfigError(f"{where}{line}: not valid YAML ({problem}). Fix the file.") from error
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CPTConfigError(f"{where}: expected a mapping of {expected}, got a {type(data).__name__}.")
    return YamlMapping(data, node)


@dataclass
class CPTConfig:
    """Settings of a continued-pretraining run.

    Values left at ``None`` are taken from the Trainer's ``TrainingArguments`` (learning rate,
    warm-up, weight decay) so that a user's existing script keeps its meaning.
    """

    # --- LoRA / what is trained -------------------------------------------------------------
    lora_r: int = 128
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    use_rslora: bool = True
    target_modules: list[str] | str | None = None  # None: every attention and MLP projection
    train_embeddings: bool = True  # input embeddings and lm_head fully trained
    embedding_rows: str = "all"  # "fresh": only new or untrained rows train (PEFT trainable tokens)
    # dtype of the trained embedding copies on 16-bit models: "bfloat16_sr" (bf16 copies whose updates the
    # optimizer rounds stochastically, so small embedding-LR updates survive; fp16 models: fp32 copies),
    # "float32" (fp32 copies) or "model" (the model's dtype, round-to-nearest, as plain PEFT does)
    trained_embeddings_dtype: str = "bfloat16_sr"
    # --- learning rates ---------------------------------------------------------------------
    learning_rate: float | None = None  # None: TrainingArguments.learning_rate
    embedding_learning_rate: float | None = None  # None: learning_rate * embedding_lr_ratio
    embedding_lr_ratio: float = 0.1
    # rows of tokens the base never trained (added or healed: cpt_plugin/vocabulary) at their own LR
    # None: the LoRA LR, or twice it when domain-shifted rows are on (known rows keep the embedding LR)
    fresh_row_learning_rate: float | None = None  # None: the LoRA LR (2x it with domain-shifted rows)
    row_aware_embedding_lr: bool = True  # False: every embedding row at the embedding LR
    # --- with replay data (a CPTDataset with a replay source): less forgetting, docs/RECIPE.md ------
    # None: on (at the value in brackets) when the train_dataset is a CPTDataset with replay, else off.
    # rows of tokens >= this many times more frequent in the training data than in the replay data learn at the
    # fresh-row LR too; 0: off [4]
    domain_shift_ratio: float | None = None  # None: 4 with replay data (untied embeddings), else 0: off
    # lm_head rows' updates kept off this many leading directions of the old domain's final hidden states
    # (the base model's, on replay text, computed once at train begin); 0: off [4]
    output_row_projection: int | None = None  # None: 4 with replay data (untied embeddings), else 0: off
    # at the end of training the trained weights step back toward the start of CPT: LoRA's B times this,
    # trained embedding copies start + this x (end - start); 1: off [0.975]
    output_row_projection_refresh: int = (
        25  # recompute the directions every N steps from the model as it trains; 0: once
    )
    final_step_back: float | None = None  # None: 0.975 with replay data (untied embeddings), else 1: off
    weight_decay: float | None = None  # None: TrainingArguments.weight_decay
    optimizer: str | None = None  # None: follow TrainingArguments.optim (AdamW kinds), else fused AdamW
    embedding_optimizer: str = "adamw"  # "adamw_8bit": bitsandbytes 8-bit states for the embedding group
    # --- schedule ---------------------------------------------------------------------------
    schedule: str = "cosine"
    warmup_ratio: float | None = None  # None: TrainingArguments warm-up
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.1  # eta_min / eta_max
    decay_ratio: float = 0.2  # wsd: fraction of the steps spent decaying
    constant_lr_ratio: float = 0.5  # infinite schedules: eta_const / eta_max
    cooldown_steps: int | None = None  # infinite schedules: T_cd (None: 20% of the steps)
    anneal_steps: int | None = None  # infinite schedules: T_ann (None: 10% of the steps; 0: none)
    inv_sqrt_alpha: float = 10.0  # alpha of the inverse-sqrt cool-down
    # --- data -------------------------------------------------------------------------------
    max_seq_length: int = 2048
    packing: bool = True
    replay_ratio: float = 0.0
    seed: int = 42
    # --- speed and memory ---------------------------------------------------------------------
    kernels: bool | list[str] | None = (
        None  # None: every kernel when CUDA is available; True/False; or a list
    )
    gradient_checkpointing: str = "auto"  # auto: the memory planner when the Trainer checkpoints, else off
    # auto's memory budget (peak allocated GiB per device); None: free memory at the first step - 1 GiB - 5%
    memory_budget_gib: float | None = None
    offload_embeddings: bool | None = (
        None  # frozen embedding originals off the GPU; None: on when checkpointing on one GPU
    )
    # decoder layers as CUDA graphs; None: checkpointed layers (offload, recompute) of batches up to
    # 16,384 tokens, where the host is the bound, and kept layers (auto, off) once the memory planner or
    # the device's room grants their extra memory; true: every layer, any length; false: none
    cuda_graphs: bool | None = None  # None: checkpointed (<=16K tokens) and roomy kept layers; true: all
    attention_replay: bool | None = None  # offloaded layers skip recomputing attention; None: where it pays
    tiled_mlp: bool = False  # run the MLP over the sequence in chunks (long-context memory)
    tiled_mlp_chunk_tokens: int = 4096
    rope_scaling: dict[str, Any] | None = None  # e.g. {"rope_type": "yarn", "factor": 4.0}
    # --- logging ------------------------------------------------------------------------------
    log_metrics: bool = True
    # --- held-out evaluation (cpt_plugin/evaluation.py), when eval data is given ----------------
    eval_every_steps: int = 100  # held-out loss of both domains every N steps; 0: start and end only
    eval_tokens: int = 32768  # tokens per domain in one evaluation (a fixed, small cost)
    # --- safety: never lose a run (cpt_plugin/safety) -----------------------------------------
    guard: bool = True  # a non-finite step is skipped, a diverged run stopped, a NaN model never saved
    guard_max_bad_steps: int = 3  # non-finite steps in a row before the run stops
    guard_collapse_steps: int = 20  # steps with the loss flat at ln(vocab_size) before a warning; 0: off
    output_dir_lock: bool = True  # one run per output_dir (lock file: pid, host, start time)
    # --- monitoring: see what a run did (cpt_plugin/monitoring) -------------------------------
    sample_prompts: list[str] | None = None  # greedy completions, base before and trained after training
    sample_max_new_tokens: int = 48  # new tokens per sample completion
    memory_report: bool = True  # memory table at step 1 and at the end (+ PNG chart in output_dir)
    # --- vocabulary (cpt_plugin/vocabulary) -----------------------------------------------------
    heal_untrained_tokens: bool = True  # embedding rows the base never trained reset to the trained mean
    new_tokens: list[str] | None = None  # tokens to add (CLI; scripts call cpt_plugin.add_new_tokens)
    extend_vocabulary: int = 0  # learn N new tokens from the training corpus (words that save most tokens)
    new_token_init: str = "subtoken_mean"  # new rows: "subtoken_mean" of their old pieces, or "mean" of rows

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> CPTConfig:
        """Builds a config from a mapping; an unknown key is an error naming the closest valid one."""
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in valid:
                raise unknown_key_error(key, valid, "cpt-plugin config")
        return cls(**dict(values))

    @classmethod
    def from_yaml(cls, path: str | Path) -> CPTConfig:
        """The config in a YAML file; an error names the file and the line of the key."""
        loaded = load_yaml_mapping(path, expected=CPT_KEYS_EXAMPLE)
        try:
            return cls.from_dict(loaded.data)
        except CPTConfigError as error:
            raise CPTConfigError(f"{path}{loaded.line_of(str(error))}: {error}") from error

    @classmethod
    def coerce(
        cls, value: CPTConfig | Mapping[str, Any] | str | Path | None = None, **kwargs: Any
    ) -> CPTConfig:
        """Accepts a config, a dict, a YAML path or keyword arguments."""
        if isinstance(value, CPTConfig):
            return value.replace(**kwargs) if kwargs else value
        if isinstance(value, (str, Path)):
            base = cls.from_yaml(value)
            return base.replace(**kwargs) if kwargs else base
        merged = dict(value or {})
        merged.update(kwargs)
        return cls.from_dict(merged)

    def replace(self, **changes: Any) -> CPTConfig:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            return CPTConfig.from_dict({**self.to_dict(), **changes})  # raises with a hint
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------------------------------
    def enabled_kernels(self) -> tuple[str, ...]:
        if self.kernels is None:  # auto: the Triton kernels are for GPUs
            import torch

            return KERNEL_NAMES if torch.cuda.is_available() else ()
        if self.kernels is True:
            return KERNEL_NAMES
        if not self.kernels:
            return ()
        return tuple(self.kernels)

    def resolved_fresh_lr(self, learning_rate: float) -> float:
        """The fresh-row LR: as set, else the LoRA LR, twice it with domain-shifted rows (measured so)."""
        if self.fresh_row_learning_rate:
            return self.fresh_row_learning_rate
        return learning_rate * (SHIFTED_FRESH_LR_FACTOR if self.domain_shift_ratio else 1.0)

    def resolved_embedding_lr(self, learning_rate: float) -> float:
        if self.embedding_learning_rate is not None:
            return self.embedding_learning_rate
        return learning_rate * self.embedding_lr_ratio

    def _validate_replay_options(self, fail: Any, check_number: Any) -> None:
        check_number("domain_shift_ratio", self.domain_shift_ratio, allow_zero=True)
        if self.domain_shift_ratio and not (self.train_embeddings and self.row_aware_embedding_lr):
            fail("domain_shift_ratio", "it gives embedding rows their own LR, but train_embeddings or "
                 "row_aware_embedding_lr is off", "Set both to true, or domain_shift_ratio: 0.")  # fmt: skip
        if 0 < self.domain_shift_ratio <= 1:
            fail("domain_shift_ratio", f"got {self.domain_shift_ratio!r}",
                 "Use 0 (off) or a ratio above 1, e.g. 4 (tokens 4x more frequent in the new domain).")  # fmt: skip

    # ------------------------------------------------------------------------------------------
    def validate(self) -> None:
        def fail(key: str, problem: str, fix: str) -> None:
            raise CPTConfigError(f"cpt-plugin config '{key}': {problem}. {fix}")

        def check_number(key: str, value: Any, *, allow_zero: bool, integer: bool = False) -> None:
            kind = int if integer else (int, float)
            if isinstance(value, bool) or not isinstance(value, kind):
                fail(key, f"expected a {'whole ' if integer else ''}number, got {value!r}", "Give a number.")
            if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
                bound = ">= 0" if allow_zero else "> 0"
                fail(key, f"got {value!r}", f"Use a value {bound}.")

        for field in dataclasses.fields(
            self
        ):  # the switches: a YAML "yes"/"on" or a typo is not silently truthy
            value = getattr(self, field.name)
            if field.type == "bool" and not isinstance(value, bool):
                fail(field.name, f"expected true or false, got {value!r}", "Write true or false.")
            if field.type == "bool | None" and value is not None and not isinstance(value, bool):
                fail(
                    field.name,
                    f"expected true, false or null, got {value!r}",
                    "Write true, false or null (the default).",
                )
        check_number("lora_r", self.lora_r, allow_zero=False, integer=True)
        check_number("lora_alpha", self.lora_alpha, allow_zero=False)
        if not 0 <= self.lora_dropout < 1:
            fail("lora_dropout", f"got {self.lora_dropout!r}", "Use a value in [0, 1).")
        for key in ("learning_rate", "embedding_learning_rate", "fresh_row_learning_rate", "weight_decay"):
            value = getattr(self, key)
            if value is not None:
                check_number(key, value, allow_zero=key not in ("learning_rate", "fresh_row_learning_rate"))
        if self.embedding_rows not in EMBEDDING_ROWS:
            fix = did_you_mean(
                self.embedding_rows, EMBEDDING_ROWS, f"Choose one of {', '.join(EMBEDDING_ROWS)}."
            )
            fail("embedding_rows", f"got {self.embedding_rows!r}", fix)
        if self.embedding_rows == "fresh" and not self.train_embeddings:
            fail("embedding_rows", "is 'fresh', which trains some embedding rows, but train_embeddings is off",
                 "Set train_embeddings: true, or embedding_rows: all.")  # fmt: skip
        if self.embedding_rows == "fresh" and self.domain_shift_ratio:  # None (auto) stays off there
            fail("embedding_rows", "is 'fresh' (the rows marked before PEFT wraps the model), but "
                 "domain_shift_ratio marks rows after that", "Set domain_shift_ratio: 0, or embedding_rows: all.")  # fmt: skip
        check_number("embedding_lr_ratio", self.embedding_lr_ratio, allow_zero=True)
        if self.domain_shift_ratio is not None:
            self._validate_replay_options(fail, check_number)
        if self.output_row_projection is not None:
            check_number("output_row_projection", self.output_row_projection, allow_zero=True, integer=True)
            if self.output_row_projection and not self.train_embeddings:
                fail("output_row_projection", "it shapes lm_head updates, but train_embeddings is off",
                     "Set train_embeddings: true, or output_row_projection: 0.")  # fmt: skip
        check_number(
            "output_row_projection_refresh", self.output_row_projection_refresh, allow_zero=True, integer=True
        )
        if self.final_step_back is not None:
            check_number("final_step_back", self.final_step_back, allow_zero=False)
            if self.final_step_back > 1:
                fail("final_step_back", f"got {self.final_step_back!r}",
                     "Use a value in (0, 1]: 1 keeps the trained weights, 0.975 steps 2.5% back.")  # fmt: skip
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            fix = did_you_mean(self.optimizer, OPTIMIZERS, f"Choose one of {', '.join(OPTIMIZERS)}.")
            fail("optimizer", f"unsupported optimizer {self.optimizer!r}", fix)
        if self.schedule not in SCHEDULES:
            fix = did_you_mean(self.schedule, SCHEDULES, f"Choose one of {', '.join(SCHEDULES)}.")
            fail("schedule", f"unknown schedule {self.schedule!r}", fix)
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            fail("warmup_ratio", f"got {self.warmup_ratio!r}", "Use a fraction in [0, 1).")
        for key in ("warmup_steps", "cooldown_steps", "anneal_steps"):
            value = getattr(self, key)
            if value is not None:
                check_number(key, value, allow_zero=True, integer=True)
        if not 0 <= self.min_lr_ratio <= 1:
            fail("min_lr_ratio", f"got {self.min_lr_ratio!r}", "Use a fraction in [0, 1] of the peak LR.")
        if not 0 <= self.decay_ratio <= 1:
            fail("decay_ratio", f"got {self.decay_ratio!r}", "Use a fraction in [0, 1] of the steps.")
        if not 0 < self.constant_lr_ratio <= 1:
            fail(
                "constant_lr_ratio",
                f"got {self.constant_lr_ratio!r}",
                "Use a fraction in (0, 1] of the peak LR.",
            )
        if self.schedule.startswith("infinite") and self.min_lr_ratio > self.constant_lr_ratio:
            fail(
                "min_lr_ratio",
                "is above constant_lr_ratio",
                "The final anneal must go down: keep min_lr_ratio <= constant_lr_ratio.",
            )
        check_number("inv_sqrt_alpha", self.inv_sqrt_alpha, allow_zero=False)
        check_number("max_seq_length", self.max_seq_length, allow_zero=False, integer=True)
        check_number("tiled_mlp_chunk_tokens", self.tiled_mlp_chunk_tokens, allow_zero=False, integer=True)
        if (
            isinstance(self.replay_ratio, bool)
            or not isinstance(self.replay_ratio, (int, float))
            or not 0 <= self.replay_ratio < 1
        ):
            fail(
                "replay_ratio",
                f"got {self.replay_ratio!r}",
                "Use a fraction in [0, 1), e.g. 0.05 for 5% replayed tokens.",
            )
        if isinstance(self.target_modules, str) and self.target_modules not in ("all-linear",):
            self.target_modules = [self.target_modules]
        if self.kernels not in (True, False, None):
            if isinstance(self.kernels, str):
                self.kernels = [self.kernels]
            if not isinstance(self.kernels, (list, tuple)):
                fail(
                    "kernels",
                    f"got {self.kernels!r}",
                    f"Use true, false or a list out of {', '.join(KERNEL_NAMES)}.",
                )
            for name in self.kernels:
                if name not in KERNEL_NAMES:
                    fix = did_you_mean(name, KERNEL_NAMES, f"Choose from {', '.join(KERNEL_NAMES)}.")
                    fail("kernels", f"unknown kernel {name!r}", fix)
            self.kernels = list(self.kernels)
        if self.trained_embeddings_dtype not in TRAINED_EMBEDDINGS_DTYPES:
            fail(
                "trained_embeddings_dtype",
                f"got {self.trained_embeddings_dtype!r}",
                f"Choose one of {', '.join(TRAINED_EMBEDDINGS_DTYPES)}.",
            )
        if self.embedding_optimizer not in EMBEDDING_OPTIMIZERS:
            fail(
                "embedding_optimizer",
                f"got {self.embedding_optimizer!r}",
                f"Choose one of {', '.join(EMBEDDING_OPTIMIZERS)}.",
            )
        if self.gradient_checkpointing not in CHECKPOINTING_MODES:
            fail(
                "gradient_checkpointing",
                f"got {self.gradient_checkpointing!r}",
                f"Choose one of {', '.join(CHECKPOINTING_MODES)}.",
            )
        if self.memory_budget_gib is not None:
            check_number("memory_budget_gib", self.memory_budget_gib, allow_zero=False)
            if self.gradient_checkpointing != "auto":
                fail(
                    "memory_budget_gib",
                    f"is only used by gradient_checkpointing: auto, not {self.gradient_checkpointing!r}",
                    "Set gradient_checkpointing: auto, or remove memory_budget_gib.",
                )
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict) or "rope_type" not in self.rope_scaling:
                fail(
                    "rope_scaling",
                    f"got {self.rope_scaling!r}",
                    'Give a mapping such as {"rope_type": "yarn", "factor": 4.0}.',
                )
            if self.rope_scaling["rope_type"] not in ("linear", "dynamic", "yarn"):
                fail(
                    "rope_scaling",
                    f"unknown rope_type {self.rope_scaling['rope_type']!r}",
                    "Use linear, dynamic or yarn.",
                )
        # safety (cpt_plugin/safety)
        for key in ("guard", "output_dir_lock"):
            if not isinstance(getattr(self, key), bool):
                fail(key, f"expected true or false, got {getattr(self, key)!r}", "Use true or false.")
        check_number("guard_max_bad_steps", self.guard_max_bad_steps, allow_zero=False, integer=True)
        check_number("guard_collapse_steps", self.guard_collapse_steps, allow_zero=True, integer=True)
        check_number("eval_every_steps", self.eval_every_steps, allow_zero=True, integer=True)
        check_number("eval_tokens", self.eval_tokens, allow_zero=False, integer=True)
        # monitoring (cpt_plugin/monitoring)
        if isinstance(self.sample_prompts, str):
            self.sample_prompts = [self.sample_prompts]
        if self.sample_prompts is not None:
            prompts = self.sample_prompts
            if not isinstance(prompts, (list, tuple)) or not prompts:
                fail(
                    "sample_prompts",
                    f"expected a non-empty list of strings, got {prompts!r}",
                    'Give prompts such as ["The capital of France is"], or leave it unset.',
                )
            for prompt in prompts:
                if not isinstance(prompt, str) or not prompt.strip():
                    fail(
                        "sample_prompts",
                        f"every prompt must be a non-empty string, got {prompt!r}",
                        "Remove it or write the text the model should continue.",
                    )
            self.sample_prompts = list(prompts)
        check_number("sample_max_new_tokens", self.sample_max_new_tokens, allow_zero=False, integer=True)
        if not isinstance(self.memory_report, bool):
            fail("memory_report", f"expected true or false, got {self.memory_report!r}", "Use true or false.")
        # vocabulary extension (cpt_plugin/vocabulary/extension.py)
        if self.new_tokens is not None:
            tokens = self.new_tokens
            if isinstance(tokens, str) or not isinstance(tokens, (list, tuple)) or not tokens:
                fail(
                    "new_tokens",
                    f"expected a non-empty list of strings, got {tokens!r}",
                    'Give the tokens to add, e.g. ["Kubernetes", " kubectl"], or leave it unset.',
                )
            for token in tokens:
                if not isinstance(token, str) or not token:
                    fail("new_tokens", f"every token must be a non-empty string, got {token!r}", "Remove it.")
            duplicates = sorted({t for t in tokens if tokens.count(t) > 1})
            if duplicates:
                fail("new_tokens", f"{duplicates[0]!r} is listed twice", "Remove the duplicate.")
            self.new_tokens = list(tokens)
        check_number("extend_vocabulary", self.extend_vocabulary, allow_zero=True, integer=True)
        if self.new_token_init not in ("subtoken_mean", "mean"):
            fix = did_you_mean(
                self.new_token_init, ("subtoken_mean", "mean"), "Choose subtoken_mean or mean."
            )
            fail("new_token_init", f"unknown init {self.new_token_init!r}", fix)
        if (self.new_tokens or self.extend_vocabulary) and not self.train_embeddings:
            key = "new_tokens" if self.new_tokens else "extend_vocabulary"
            fail(
                key,
                "adds embedding rows, but train_embeddings is false, so the new rows would never be trained",
                "Set train_embeddings: true.",
            )
