"""Tiny CPT models and a local byte-level BPE tokenizer for the export tests (no hub)."""

from __future__ import annotations

from typing import Any

import torch

from tests.patching.models import tiny_model

VOCAB = 300  # embedding rows; the tokenizer has fewer tokens, so the GGUF vocabulary gets padded
TOKENIZER_VOCAB = 290
TEXT = [
    "def merge(adapter, out_dir):\n    return export(adapter, out_dir)  # tiny corpus\n",
    "The quick brown fox jumps over the lazy dog. Continued pretraining adapts a model to a domain.",
    "for i in range(10):\n    print(i ** 2, 'squares', \"caf\u00e9 \u2713\")\n",
] * 4
# Gemma: llama.cpp scales attention by 1/sqrt(head_dim), so the tiny configs use that too.
EXTRA = {"gemma2": {"query_pre_attn_scalar": 16}, "gemma3_text": {"query_pre_attn_scalar": 16}}


def byte_bpe_tokenizer(vocab_size: int = TOKENIZER_VOCAB) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXT, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def cpt_model(family: str, tied: bool = True, dtype: torch.dtype = torch.bfloat16, **overrides: Any) -> Any:
    """A tiny ``family`` model set up by cpt-plugin, with LoRA B and the embedding copies moved off their init
    (PEFT starts B at zero, which would make any merge look right)."""
    from cpt_plugin import CPTConfig, setup_model

    model = tiny_model(
        family, tie_word_embeddings=tied, vocab_size=VOCAB, **{**EXTRA.get(family, {}), **overrides}
    ).to(dtype)
    config = CPTConfig(lora_r=4, trained_embeddings_dtype="float32", max_seq_length=64, log_metrics=False)
    peft_model = setup_model(model, config)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
            elif param.requires_grad:  # the trained embedding copies
                param.add_(0.02 * torch.randn(param.shape, generator=generator).to(param.dtype))
    return peft_model.eval()


def sample_ids(seed: int = 3, shape: tuple[int, int] = (2, 12)) -> torch.Tensor:
    return torch.randint(0, TOKENIZER_VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())
