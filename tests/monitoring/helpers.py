"""Tiny Trainer runs for the monitoring tests: tiny Llama, a word-level tokenizer, a few CPU steps."""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Trainer

from cpt_plugin import CPTCallback
from tests.tiny import RandomBlocks, tiny_llama, training_args

VOCAB = 257  # tiny_llama's default vocabulary: "<unk>", "</s>" and w0 .. w254


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose ids fit tiny_llama's embedding rows (no hub access)."""
    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(VOCAB - 2)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", pad_token="</s>"
    )


def make_trainer(
    tmp_path, *, cpt: dict[str, Any] | None = None, tokenizer: Any = "word", **args: Any
) -> Trainer:
    return Trainer(
        model=tiny_llama(seed=0),
        args=training_args(tmp_path, **{"per_device_train_batch_size": 2, "max_steps": 3, **args}),
        train_dataset=RandomBlocks(n=16, seed=3),
        processing_class=word_tokenizer() if tokenizer == "word" else tokenizer,
        callbacks=[CPTCallback(**{"lora_r": 4, "max_seq_length": 16, **(cpt or {})})],
    )
