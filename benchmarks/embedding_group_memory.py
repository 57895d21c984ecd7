"""Bytes of the trained embedding group (weight, gradient, optimizer states) at Llama-3.2-1B's embedding
shape (128256 x 2048, tied) for each ``trained_embeddings_dtype`` x ``embedding_optimizer``, measured from
the tensors after one optimizer step (issue 16, item 3). The CPU is enough: the sizes do not depend on the
device, and only the embedding matrix has Llama-1B's size (one small decoder layer).

    python -m benchmarks.embedding_group_memory [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

SETTINGS = [
    ("float32", "adamw"),
    ("bfloat16_sr", "adamw"),
    ("bfloat16_sr", "adamw_8bit"),
    ("float32", "adamw_8bit"),
]
GIB = 2**30


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(dtype: str, embedding_optimizer: str, vocab: int = 128256, hidden: int = 2048) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from cpt_plugin import CPTConfig, prepare_model
    from cpt_plugin.model_parts import embedding_parameter_ids
    from cpt_plugin.optim import create_optimizer

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=512, num_hidden_layers=1,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    cpt = CPTConfig(lora_r=8, trained_embeddings_dtype=dtype, embedding_optimizer=embedding_optimizer,
                    kernels=False, heal_untrained_tokens=False)  # fmt: skip
    peft_model = prepare_model(model, cpt)
    optimizer = create_optimizer(peft_model, cpt, learning_rate=2e-4)
    ids = torch.randint(0, vocab, (1, 16))
    start = time.perf_counter()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    seconds = time.perf_counter() - start
    wanted = embedding_parameter_ids(peft_model)
    params = list({id(p): p for p in peft_model.parameters() if id(p) in wanted and p.requires_grad}.values())
    weight = _bytes(params)
    grad = _bytes(p.grad for p in params if p.grad is not None)
    state = _bytes(v for p in params for v in optimizer.state[p].values() if torch.is_tensor(v))
    return {
        "dtype": dtype, "embedding_optimizer": embedding_optimizer, "trained_params": sum(p.numel() for p in params),
        "weight_gib": weight / GIB, "grad_gib": grad / GIB, "state_gib": state / GIB,
        "total_gib": (weight + grad + state) / GIB, "step_s": round(seconds, 1),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = []
    for dtype, embedding_optimizer in SETTINGS:
        rows.append(measure(dtype, embedding_optimizer))
        print(json.dumps(rows[-1]), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
