"""Adaptation vs forgetting: held-out loss on the new domain and on the old one while CPT trains.

``HeldoutEvaluator`` is a ``TrainerCallback``. Every ``eval_every_steps`` optimizer steps it measures the
token-weighted mean loss (and perplexity) of the model on two fixed held-out sets, each cut to
``eval_tokens`` tokens so that the cost of one evaluation is small and known in advance. The base model's
values are measured once at step 0 through PEFT's ``disable_adapter()`` (no second copy of the model) and
kept as the reference lines. Values go through ``Trainer.log`` (keys ``eval_new_loss``,
``eval_new_perplexity``, ``eval_old_loss``, ``eval_old_perplexity``, ``eval_tokens_seen``), so W&B and
TensorBoard see them; at the end a PNG shows both curves against tokens seen, with the base lines.

Users of ``CPTCallback`` pass the data there: ``CPTCallback(eval_new=dataset, eval_old=dataset)``; the
callback adds this evaluator to the Trainer.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

DOMAINS = ("new", "old")  # the new domain (what CPT adapts to) and the old one (what it may forget)
PLOT_NAME = "heldout_loss.png"


def _as_lists(block: dict[str, Any]) -> dict[str, list[int]]:
    ids = block["input_ids"]
    ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
    out = {"input_ids": ids}
    for key, default in (("labels", ids), ("position_ids", list(range(len(ids))))):
        value = block.get(key, default)
        out[key] = value.tolist() if torch.is_tensor(value) else list(value)
    return out


def take_blocks(source: Any, max_tokens: int) -> list[dict[str, list[int]]]:
    """The first blocks of ``source`` (a CPTDataset, a datasets.Dataset or an iterable of blocks with
    ``input_ids``) up to ``max_tokens`` tokens, at least one block. Read once, kept for every evaluation."""
    blocks: Iterable[dict[str, Any]] = source.iter_blocks() if hasattr(source, "iter_blocks") else source
    taken, tokens = [], 0
    for block in blocks:
        block = _as_lists(block)
        if taken and tokens + len(block["input_ids"]) > max_tokens:
            break
        taken.append(block)
        tokens += len(block["input_ids"])
    if not taken:
        raise ValueError(
            "cpt-plugin: the held-out evaluation data is empty; give at least one block of text."
        )
    return taken


@torch.no_grad()
def heldout_loss(model: Any, blocks: list[dict[str, Any]], batch_size: int = 8) -> float:
    """Token-weighted mean loss over fixed held-out blocks (the same blocks at every evaluation)."""
    from cpt_plugin.data import collate_packed
    from cpt_plugin.model_parts import input_device

    was_training = model.training
    model.eval()
    device = input_device(model)
    total, count = 0.0, 0
    try:
        for start in range(0, len(blocks), batch_size):
            batch = {k: v.to(device) for k, v in collate_packed(blocks[start : start + batch_size]).items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch, use_cache=False).loss) * n
            count += n
    finally:
        model.train(was_training)
    return total / max(count, 1)


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else math.inf


COSTLY_OVERHEAD = 0.05  # a predicted share of training time above this is worth a warning


class HeldoutEvaluator(TrainerCallback):
    """Held-out loss on the new and the old domain every ``every_steps`` steps, the base at step 0.

    Args:
        eval_new / eval_old: held-out data of the new / old domain (either may be None).
        every_steps: evaluate every N optimizer steps (0: only at the start and the end).
        max_tokens: tokens per domain in one evaluation (the first blocks of each set).
        tokens_seen: returns the training tokens seen so far (for the x axis); None: estimated from steps.
        plot: write ``heldout_loss.png`` into the output directory at the end.
    """

    def __init__(
        self,
        eval_new: Any = None,
        eval_old: Any = None,
        *,
        every_steps: int = 100,
        max_tokens: int = 32768,
        tokens_seen: Callable[[], int] | None = None,
        plot: bool = True,
    ) -> None:
        self.sources = {
            name: src for name, src in zip(DOMAINS, (eval_new, eval_old), strict=True) if src is not None
        }
        self.every_steps = every_steps
        self.max_tokens = max_tokens
        self.tokens_seen = tokens_seen
        self.plot = plot
        self.trainer: Any = None  # set by the Trainer hook (integrations/hf.py), to log through Trainer.log
        self.blocks: dict[str, list[dict[str, list[int]]]] = {}
        self.base: dict[str, float] = {}  # the base model's loss per domain (step 0)
        self.history: list[dict[str, float]] = []  # {"step", "tokens_seen", "new", "old"}
        self._weights_changed = False  # after the last step (final_step_back): evaluate again at train end
        self.plot_path: Path | None = None

    # --- measuring --------------------------------------------------------------------------------
    def evaluate(self, model: Any, batch_size: int = 8, *, base: bool = False) -> dict[str, float]:
        """Loss per domain; ``base=True`` measures with the adapter disabled (PEFT models)."""
        disable = getattr(model, "disable_adapter", None) if base else None
        with disable() if disable is not None else contextlib.nullcontext():
            return {name: heldout_loss(model, blocks, batch_size) for name, blocks in self.blocks.items()}

    def _tokens(self, args: Any, state: Any) -> int:
        if getattr(state, "num_input_tokens_seen", 0):
            return int(state.num_input_tokens_seen)
        if self.tokens_seen is not None:
            return int(self.tokens_seen())
        length = len(next(iter(self.blocks.values()))[0]["input_ids"]) if self.blocks else 0
        return int(state.global_step * args.train_batch_size * args.gradient_accumulation_steps * length)

    def _record(self, args: Any, state: Any, losses: dict[str, float]) -> None:
        entry = {"step": state.global_step, "tokens_seen": self._tokens(args, state), **losses}
        self.history.append(entry)
        logs: dict[str, float] = {}
        for name, loss in losses.items():
            logs[f"eval_{name}_loss"] = round(loss, 4)
            logs[f"eval_{name}_perplexity"] = round(_perplexity(loss), 3)
        logs["eval_tokens_seen"] = entry["tokens_seen"]
        if self.trainer is not None:
            should_log = self.trainer.control.should_log
            self.trainer.log(logs)
            self.trainer.control.should_log = should_log  # Trainer.log resets it: keep this step's loss log
        else:
            logger.info("cpt-plugin: held-out at step %d: %s", state.global_step, logs)

    def predicted_overhead(self, tokens_per_step: int) -> float | None:
        """The share of training time one evaluation per ``every_steps`` steps adds (None: no periodic one).

        A held-out token costs a forward, a trained token a forward and a backward (~3 forwards, more with
        checkpointing): overhead ~ eval tokens / (3 x every_steps x tokens per step). The GPU benchmark
        (benchmarks/evaluator_overhead.py) measures it.
        """
        if not self.every_steps or tokens_per_step <= 0 or not self.blocks:
            return None
        eval_tokens = sum(len(b["input_ids"]) for blocks in self.blocks.values() for b in blocks)
        return eval_tokens / (3 * self.every_steps * tokens_per_step)

    def _warn_if_costly(self, args: Any) -> None:
        length = len(next(iter(self.blocks.values()))[0]["input_ids"]) if self.blocks else 0
        per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * length
        overhead = self.predicted_overhead(per_step)  # per device: each rank evaluates the same blocks
        if overhead is not None and overhead > COSTLY_OVERHEAD:
            logger.warning(
                "cpt-plugin: the held-out evaluation (%s tokens every %d steps of %s tokens per device) will add "
                "about %.0f%% to the training time. Raise eval_every_steps or lower eval_tokens to make it "
                "smaller.",
                f"{sum(len(b['input_ids']) for v in self.blocks.values() for b in v):,}",
                self.every_steps,
                f"{per_step:,}",
                100 * overhead,
            )

    # --- TrainerCallback events -------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: D401 - HF signature
        if not self.sources or model is None:
            return control
        if not self.blocks:
            self.blocks = {name: take_blocks(src, self.max_tokens) for name, src in self.sources.items()}
            if state.is_world_process_zero:
                self._warn_if_costly(args)
        if not self.base:
            self.base = self.evaluate(model, args.per_device_eval_batch_size, base=True)
            if state.global_step == 0:
                self._record(args, state, self.base)
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if (
            self.blocks
            and model is not None
            and self.every_steps
            and state.global_step % self.every_steps == 0
        ):
            self._record(args, state, self.evaluate(model, args.per_device_eval_batch_size))
        return control

    def weights_changed(self) -> None:
        """The model's weights changed after the last step (``final_step_back``): the end-of-training
        evaluation runs again and replaces one made at that step."""
        self._weights_changed = True

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self.blocks or model is None:
            return control
        changed, self._weights_changed = self._weights_changed, False
        if changed and self.history and self.history[-1]["step"] == state.global_step:
            self.history.pop()  # measured before the weights changed: the final model's numbers replace it
        if not self.history or self.history[-1]["step"] != state.global_step:
            self._record(args, state, self.evaluate(model, args.per_device_eval_batch_size))
        if self.plot and state.is_world_process_zero and args.output_dir:
            self.plot_path = plot_heldout(self.history, self.base, Path(args.output_dir) / PLOT_NAME)
        return control


# --- the picture ------------------------------------------------------------------------------------
DOMAIN_COLORS = {"new": "tab:blue", "old": "tab:orange"}


def draw_heldout(
    ax: Any,
    history: list[dict[str, float]],
    base: dict[str, float],
    *,
    names: dict[str, str] | None = None,
    label: str = "",
    linestyle: str = "-",
    base_lines: bool = True,
) -> None:
    """Draws held-out loss against tokens seen on ``ax``: one curve per domain, dashed base lines."""
    names = names or {"new": "new domain", "old": "old domain"}
    for domain in DOMAINS:
        points = [(h["tokens_seen"], h[domain]) for h in history if domain in h]
        if not points:
            continue
        color = DOMAIN_COLORS[domain]
        ax.plot(
            [t for t, _ in points],
            [v for _, v in points],
            linestyle,
            marker="o",
            markersize=3,
            color=color,
            label=f"{names[domain]}{label}",
        )
        if base_lines and domain in base:
            ax.axhline(base[domain], color=color, linestyle=":", linewidth=1, label=f"{names[domain]}: base")
    ax.set_xlabel("training tokens seen")
    ax.set_ylabel("held-out loss")
    ax.grid(alpha=0.3)


def plot_heldout(history: list[dict[str, float]], base: dict[str, float], path: str | Path) -> Path | None:
    """The evaluator's PNG (held-out loss of both domains against tokens seen). None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("cpt-plugin: matplotlib is not installed; no held-out loss picture written.")
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    draw_heldout(ax, history, base)
    ax.set_title("cpt-plugin: held-out loss (lower is better)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def iter_history(trainer_log_history: Iterable[dict[str, Any]]) -> Iterator[dict[str, float]]:
    """The evaluator's entries read back from ``trainer.state.log_history`` (e.g. after a resume)."""
    for entry in trainer_log_history:
        if "eval_tokens_seen" in entry:
            values = {d: entry[f"eval_{d}_loss"] for d in DOMAINS if f"eval_{d}_loss" in entry}
            yield {"step": entry["step"], "tokens_seen": entry["eval_tokens_seen"], **values}
