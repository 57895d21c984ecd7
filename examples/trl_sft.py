"""Continued pretraining with TRL's SFTTrainer on raw text: the only cpt-plugin line is the callback.

    python examples/trl_sft.py                    # tiny random model + stdlib code corpus, CPU, offline
    python examples/trl_sft.py --model Qwen/Qwen3-0.6B --data my_corpus.jsonl --max-steps 2000 --seq-len 2048
    accelerate launch --config_file examples/accelerate_2gpu.yaml examples/trl_sft.py --model ... --data ...

SFTTrainer tokenizes the raw `text` column itself (with `packing=True` it packs without cross-document
attention); CPTCallback adds rsLoRA + trained embeddings, the split-LR optimizer, the CPT schedule, the
kernels and offloaded checkpointing.
"""

from __future__ import annotations

import argparse

import cpt_plugin  # noqa: F401 - first: quiets a bitsandbytes notice that importing PEFT causes

# isort: split
import datasets
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from trl import SFTConfig, SFTTrainer

from cpt_plugin import CPTCallback

# transformers >= 5.24 renamed gradient_checkpointing to activation_checkpointing (the old name warns)
_NEW_NAME = "activation_checkpointing" in SFTConfig.__dataclass_fields__
CHECKPOINTING = {"activation_checkpointing" if _NEW_NAME else "gradient_checkpointing": True}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--model", default="tiny", help="hub id / local path, or 'tiny' for a random tiny Llama"
    )
    parser.add_argument("--data", help="a JSONL file with a 'text' field (default: the stdlib code corpus)")
    parser.add_argument("--output-dir", default="cpt-output-trl-sft", help="adapter, corpora, checkpoints")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--no-packing", action="store_true")
    args = parser.parse_args()

    if args.model == "tiny":
        from cpt_plugin.cli.corpora import train_tokenizer, write_default_corpora

        corpora = write_default_corpora(f"{args.output_dir}/corpora", max_mb=0.4)
        args.data = args.data or str(corpora["new_train"])
        tokenizer = train_tokenizer([corpora["new_train"]], vocab_size=512)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        model = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=len(tokenizer),
                max_position_embeddings=1024,
            )
        )
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa")

    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=args.output_dir,
            max_steps=args.max_steps,
            per_device_train_batch_size=4,
            learning_rate=2e-4 if args.model != "tiny" else 2e-3,
            logging_steps=5,
            max_length=args.seq_len,
            packing=not args.no_packing,
            **CHECKPOINTING,  # activation_checkpointing on transformers >= 5.24, gradient_ before
            dataloader_pin_memory=torch.cuda.is_available(),  # pinning is for copies to a GPU
            bf16=torch.cuda.is_available(),
            report_to=[],
        ),
        train_dataset=datasets.load_dataset("json", data_files=args.data, split="train"),
        processing_class=tokenizer,
        callbacks=[CPTCallback(lora_r=16 if args.model == "tiny" else 128, max_seq_length=args.seq_len)],
    )
    trainer.train()
    trainer.save_model(f"{args.output_dir}/adapter")
    print(f"adapter saved to {args.output_dir}/adapter")


if __name__ == "__main__":
    main()
