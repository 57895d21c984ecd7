"""Sample completions before and after training: what CPT did to the model, in words.

At ``on_train_begin`` the base model (the PEFT model with its adapter switched off, ``disable_adapter()``:
no second copy of the weights) continues each of ``CPTConfig.sample_prompts``; at ``on_train_end`` the
trained model does the same. Decoding is greedy and short (``sample_max_new_tokens``), so the two are
comparable and the cost is a few forward passes. The text streams through ``logging`` as it is generated
(a transformers ``TextStreamer`` whose finished lines go to the logger instead of ``print``), and both sets
land in ``<output_dir>/samples.json`` and ``samples.md``.

Generation runs in eval mode under ``torch.no_grad()``, so checkpointing (offloaded or planned) and the
memory planner stay out of it (they act only on grad-enabled training forwards); the previous mode is
restored afterwards. Every process generates (FSDP / ZeRO-3 need all ranks in each forward); only the
main process logs and writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from transformers import GenerationConfig, TextStreamer, TrainerCallback

from cpt_plugin.model_parts import input_device

logger = logging.getLogger(__name__)

JSON_NAME = "samples.json"
MARKDOWN_NAME = "samples.md"


class LoggingStreamer(TextStreamer):
    """A ``TextStreamer`` that hands each finished line to ``logging`` and keeps the whole text.

    ``TextStreamer`` prints words as they are decoded; a log record per word would be unreadable, so
    lines are logged when they end (and the rest when generation ends).
    """

    def __init__(self, tokenizer: Any, prefix: str, emit: bool, **decode_kwargs: Any) -> None:
        super().__init__(tokenizer, skip_prompt=True, **decode_kwargs)
        self.prefix = prefix
        self.emit = emit
        self.text = ""
        self._line = ""

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.text += text
        self._line += text
        *finished, self._line = self._line.split("\n")
        for line in finished:
            self._log(line)
        if stream_end and self._line:
            self._log(self._line)
            self._line = ""

    def _log(self, line: str) -> None:
        if self.emit:
            logger.info("%s%s", self.prefix, line)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode without gradients for the generation; the previous mode afterwards, even on an error."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def generate_samples(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
    *,
    base: bool,
    emit: bool = True,
) -> list[dict[str, str]]:
    """Greedy completions of ``prompts`` (base: with the PEFT adapter switched off), streamed to the log.

    Each item: ``completion`` (the new text, as streamed) and ``text`` (prompt and completion decoded
    together, so word boundaries are the tokenizer's).
    """
    switch_off = model.disable_adapter() if base else contextlib.nullcontext()
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    # A fresh config, not the model's: greedy and short whatever sampling defaults the model ships with.
    generation = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad
    )
    device = input_device(model)
    completions = []
    with _eval_mode(model), switch_off:
        for index, prompt in enumerate(prompts, start=1):
            if emit:
                logger.info("  [%d] %s", index, prompt)
            streamer = LoggingStreamer(tokenizer, "      | ", emit, skip_special_tokens=True)
            encoded = tokenizer(prompt, return_tensors="pt")
            inputs = {k: encoded[k].to(device) for k in ("input_ids", "attention_mask") if k in encoded}
            output = model.generate(**inputs, generation_config=generation, streamer=streamer)
            text = tokenizer.decode(output[0], skip_special_tokens=True)
            completions.append({"completion": streamer.text, "text": text})
    return completions


def write_samples(output_dir: str, record: dict[str, Any]) -> list[str]:
    """``samples.json`` and ``samples.md`` in ``output_dir``; returns their paths."""
    os.makedirs(output_dir, exist_ok=True)
    json_path = os.path.join(output_dir, JSON_NAME)
    with open(json_path, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2, ensure_ascii=False)
    lines = [
        "# cpt-plugin samples",
        "",
        f"Greedy, {record['max_new_tokens']} new tokens. Base: the model before training "
        "(adapter switched off). Trained: after step "
        f"{record.get('trained_step', '-')}.",
    ]
    for index, sample in enumerate(record["samples"], start=1):
        lines += ["", f"## {index}. {sample['prompt']}"]
        for kind in ("base", "trained"):
            if sample.get(kind) is not None:
                lines += ["", f"**{kind}**", "", "```text", sample[f"{kind}_text"], "```"]
    markdown_path = os.path.join(output_dir, MARKDOWN_NAME)
    with open(markdown_path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return [json_path, markdown_path]


def text_tokenizer(processing_class: Any) -> Any:
    """The tokenizer of a Trainer's ``processing_class`` (a multimodal processor holds one), or None."""
    return getattr(processing_class, "tokenizer", None) or processing_class


class SampleCallback(TrainerCallback):
    """Base completions at the start of training, trained ones at the end (see the module doc)."""

    def __init__(self, prompts: list[str], max_new_tokens: int = 48) -> None:
        self.prompts = list(prompts)
        self.max_new_tokens = max_new_tokens
        self.base: list[dict[str, str]] | None = None
        self.trained: list[dict[str, str]] | None = None
        self._notice_given = False

    def _usable(self, model: Any, tokenizer: Any, main: bool) -> bool:
        """Whether samples can be generated; one notice (main process) saying why not."""
        problem = None
        if tokenizer is None or not callable(tokenizer):
            problem = "the Trainer has no tokenizer (pass processing_class=tokenizer)"
        elif model is None or not callable(getattr(model, "generate", None)):
            problem = "the model cannot generate"
        if problem and main and not self._notice_given:
            self._notice_given = True
            logger.info("cpt-plugin: sample_prompts skipped: %s.", problem)
        return problem is None

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        main = state.is_world_process_zero
        processing_class = text_tokenizer(processing_class)
        if not self._usable(model, processing_class, main):
            return control
        if not callable(getattr(model, "disable_adapter", None)):
            if main:
                logger.info("cpt-plugin: the model has no PEFT adapter to switch off; no base samples.")
            return control
        if main:
            logger.info(
                "cpt-plugin samples before training (base model, greedy, %d new tokens):", self.max_new_tokens
            )
        self.base = generate_samples(
            model, processing_class, self.prompts, self.max_new_tokens, base=True, emit=main
        )
        return control

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        main = state.is_world_process_zero
        processing_class = text_tokenizer(processing_class)
        if not self._usable(model, processing_class, main):
            return control
        if main:
            logger.info("cpt-plugin samples after training (step %d, greedy):", state.global_step)
        self.trained = generate_samples(
            model, processing_class, self.prompts, self.max_new_tokens, base=False, emit=main
        )
        if main and args.output_dir:
            record = {
                "max_new_tokens": self.max_new_tokens,
                "trained_step": state.global_step,
                "samples": [
                    {
                        "prompt": prompt,
                        "base": self.base[i]["completion"] if self.base is not None else None,
                        "trained": self.trained[i]["completion"],
                        "base_text": self.base[i]["text"] if self.base is not None else None,
                        "trained_text": self.trained[i]["text"],
                    }
                    for i, prompt in enumerate(self.prompts)
                ],
            }
            paths = write_samples(args.output_dir, record)
            logger.info("cpt-plugin: samples written to %s", " and ".join(paths))
        return control
