"""Continued pretraining with a stock transformers.Trainer: the only cpt-plugin line is the callback.

    python examples/hf_trainer.py                       # tiny random model + stdlib corpora, CPU, offline
    python examples/hf_trainer.py --model meta-llama/Llama-3.2-1B --data my_corpus/ --replay old_corpus/ \
        --max-steps 2000 --seq-len 2048

Everything except `callbacks=[CPTCallback(...)]` is what an HF user already writes. CPTCallback wraps the
model with rsLoRA + trained embeddings, builds the split-LR optimizer and the CPT schedule, swaps in the
kernels and offloaded checkpointing, and logs the embedding LR, tokens/s and peak memory.
"""

from __future__ import annotations

import argparse

import cpt_plugin  # noqa: F401 - first: quiets a bitsandbytes notice that importing PEFT causes

# isort: split
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)

from cpt_plugin import CPTCallback
from cpt_plugin.data import CPTDataset, collate_packed

# transformers >= 5.24 renamed gradient_checkpointing to activation_checkpointing (the old name warns)
_NEW_NAME = "activation_checkpointing" in TrainingArguments.__dataclass_fields__
CHECKPOINTING = {"activation_checkpointing" if _NEW_NAME else "gradient_checkpointing": True}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--model", default="tiny", help="hub id / local path, or 'tiny' for a random tiny Llama"
    )
    parser.add_argument("--data", help="new-domain text: file, folder, JSONL or saved dataset")
    parser.add_argument("--replay", help="old-domain text replayed to limit forgetting")
    parser.add_argument("--output-dir", default="cpt-output-hf-trainer", help="adapter, corpora, checkpoints")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    if args.model == "tiny":
        from cpt_plugin.cli.corpora import train_tokenizer, write_default_corpora

        corpora = write_default_corpora(f"{args.output_dir}/corpora", max_mb=0.4)
        args.data, args.replay = args.data or corpora["new_train"], args.replay or corpora["old_train"]
        tokenizer = train_tokenizer([corpora["new_train"], corpora["old_train"]], vocab_size=512)
        config = LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=1024,
        )
        model = LlamaForCausalLM(config)
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa")

    train_dataset = CPTDataset(
        args.data,
        tokenizer,
        max_seq_length=args.seq_len,
        replay_source=args.replay,
        replay_ratio=0.25 if args.replay else 0.0,
    )
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=args.output_dir,
            max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=2e-4 if args.model != "tiny" else 2e-3,
            warmup_steps=0.05,
            logging_steps=5,
            **CHECKPOINTING,  # activation_checkpointing on transformers >= 5.24, gradient_ before
            dataloader_pin_memory=torch.cuda.is_available(),  # pinning is for copies to a GPU
            bf16=torch.cuda.is_available(),
            report_to=[],
        ),
        train_dataset=train_dataset,
        data_collator=collate_packed,
        callbacks=[
            CPTCallback(
                lora_r=16 if args.model == "tiny" else 128, max_seq_length=args.seq_len, schedule="cosine"
            )
        ],
    )
    trainer.train()
    trainer.save_model(f"{args.output_dir}/adapter")
    print(f"adapter saved to {args.output_dir}/adapter")


if __name__ == "__main__":
    main()
