"""Tiny random-weight models and data for tests (no hub access)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments


def tiny_llama(tied: bool = True, vocab_size: int = 257, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config)


class RandomBlocks(Dataset):
    """Fixed random token blocks; labels = input_ids (the model shifts them)."""

    def __init__(self, n: int = 32, length: int = 16, vocab_size: int = 257, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.blocks = torch.randint(0, vocab_size, (n, length), generator=generator)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[index]
        return {"input_ids": ids, "labels": ids.clone()}


def training_args(tmp_path, **overrides) -> TrainingArguments:
    """TrainingArguments of a tiny, deterministic CPU run (no saving, no reporting); overrides win."""
    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        max_steps=4,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=7,
        data_seed=7,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        warmup_steps=0,
    )
    values.update(overrides)
    return TrainingArguments(**values)
