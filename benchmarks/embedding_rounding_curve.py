"""Do bf16 embedding copies with stochastic rounding learn like fp32 copies? (issue 16, item 2)

The question behind ``trained_embeddings_dtype: bfloat16_sr`` being the default: at the CPT recipe's
embedding LR (1/10 of the LoRA LR) an AdamW update is far below bf16's resolution for weights of the usual
magnitude, so round-to-nearest bf16 copies (``model``) barely train, fp32 copies (``float32``) cost 2.45 GiB
more at Llama-1B shapes, and stochastically rounded bf16 copies (``bfloat16_sr``) should train as fp32 does
in expectation. This runs the three on the same bf16 model and data, at two or more seeds, and compares the
training-loss curves, the held-out loss of the new domain and the share of embedding entries that moved.

Offline and on the CPU: a tiny Llama is pretrained on the CLI default's old domain (English prose of the
standard library) in fp32, cast to bf16, then continually pretrained on the new domain (its Python source)
with every CPT setting at its default except the dtype of the trained embedding copies. The learning rate is
the realistic one (LoRA 2e-4, embeddings 2e-5), where bf16 resolution matters; at the CLI default's 2e-3
every update would survive bf16 anyway and the comparison would say nothing.

    python -m benchmarks.embedding_rounding_curve --out DIR [--seeds 0 1] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

DTYPES = ("float32", "bfloat16_sr", "model")
TINY = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)  # fmt: skip


def _args(out: Path, steps: int, lr: float, seed: int, logging_steps: int) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=8, learning_rate=lr,
        logging_steps=logging_steps, save_strategy="no", report_to=[], seed=seed, use_cpu=True,
        disable_tqdm=True, lr_scheduler_type="cosine", warmup_steps=max(steps // 20, 1),
    )  # fmt: skip


def _base(out: Path, corpora: dict[str, Path], tokenizer: Any, seq: int, steps: int) -> Path:
    """Pretrains the old-domain base once (fp32) and caches it in ``out/base``."""
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer

    from cpt_plugin.data import CPTDataset

    folder = out / "base"
    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, **TINY)
    model = LlamaForCausalLM(config)
    data = CPTDataset(corpora["old_train"], tokenizer, seq, seed=0)
    Trainer(model=model, args=_args(out / "base-run", steps, 3e-3, 0, steps), train_dataset=data).train()
    model.save_pretrained(folder)
    return folder


def _moved_share(before: torch.Tensor, after: torch.Tensor) -> float:
    return float((before.float() != after.float()).float().mean())


def run_one(base: Path, corpora: dict[str, Path], tokenizer: Any, dtype: str, seed: int, args: Any) -> dict:
    from transformers import LlamaForCausalLM, Trainer

    from cpt_plugin import CPTCallback, CPTConfig
    from cpt_plugin.data import CPTDataset
    from cpt_plugin.evaluation import heldout_loss, take_blocks

    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    before = model.get_input_embeddings().weight.detach().clone()
    config = CPTConfig(lora_r=32, lora_alpha=32, max_seq_length=args.seq, trained_embeddings_dtype=dtype,
                       embedding_lr_ratio=0.1, kernels=False, seed=seed, memory_report=False,
                       output_dir_lock=False)  # fmt: skip
    data = CPTDataset(corpora["new_train"], tokenizer, args.seq, seed=seed)
    out = args.out / "runs" / f"{dtype}-seed{seed}"
    trainer = Trainer(
        model=model, args=_args(out, args.steps, args.lr, seed, max(1, min(10, args.steps // 2))), train_dataset=data,
        callbacks=[CPTCallback(config)],
    )  # fmt: skip
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    trained = trainer.model
    trained.eval()
    embedding = trained.get_input_embeddings()
    weight = getattr(getattr(embedding, "modules_to_save", {}), "default", embedding).weight
    heldout = take_blocks(CPTDataset(corpora["new_heldout"], tokenizer, args.seq, seed=0), args.eval_tokens)
    with torch.no_grad():
        new_loss = heldout_loss(trained, heldout)
    curve = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    return {
        "dtype": dtype, "seed": seed, "seconds": round(seconds, 1), "heldout_new_loss": new_loss,
        "curve": curve, "embedding_dtype": str(weight.dtype).replace("torch.", ""),
        "embedding_entries_moved": _moved_share(before, weight.detach().cpu()),
    }  # fmt: skip


def summarize(results: list[dict]) -> dict[str, dict[str, float]]:
    """Per dtype: mean and spread (max - min over seeds) of held-out loss, last-50-steps train loss, moved."""
    table: dict[str, dict[str, float]] = {}
    for dtype in DTYPES:
        rows = [r for r in results if r["dtype"] == dtype]
        if not rows:
            continue
        tail = [statistics.mean(loss for step, loss in r["curve"][-5:]) for r in rows]
        held = [r["heldout_new_loss"] for r in rows]
        table[dtype] = {
            "heldout_new_loss": statistics.mean(held), "heldout_spread": max(held) - min(held),
            "train_loss_last_50": statistics.mean(tail), "train_spread": max(tail) - min(tail),
            "entries_moved": statistics.mean(r["embedding_entries_moved"] for r in rows), "seeds": len(rows),
        }  # fmt: skip
    return table


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    colours = {"float32": "tab:blue", "bfloat16_sr": "tab:green", "model": "tab:red"}
    for r in results:
        steps, losses = zip(*r["curve"], strict=True)
        label = f"{r['dtype']} (seed {r['seed']})"
        ax.plot(steps, losses, color=colours[r["dtype"]], alpha=0.5 + 0.5 * (r["seed"] == 0), label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("Trained embedding copies: fp32 vs bf16 + stochastic rounding vs bf16")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--base-steps", type=int, default=400)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--corpora-mb", type=float, default=1.0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    from cpt_plugin.cli.corpora import train_tokenizer, write_default_corpora

    corpora = write_default_corpora(args.out / "corpora", max_mb=args.corpora_mb)
    tokenizer = train_tokenizer([corpora["old_train"], corpora["new_train"]], vocab_size=2048,
                                out_dir=args.out / "tokenizer")  # fmt: skip
    base = _base(args.out, corpora, tokenizer, args.seq, args.base_steps)
    results = []
    for seed in args.seeds:
        for dtype in DTYPES:
            cached = args.out / "runs" / f"{dtype}-seed{seed}.json"
            if cached.exists():
                results.append(json.loads(cached.read_text()))
                continue
            result = run_one(base, corpora, tokenizer, dtype, seed, args)
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps(result) + "\n")
            results.append(result)
            print(json.dumps({k: v for k, v in result.items() if k != "curve"}), flush=True)
    table = summarize(results)
    (args.out / "summary.json").write_text(json.dumps(table, indent=1) + "\n")
    _plot(results, args.out / "loss_curves.png")
    for dtype, row in table.items():
        print(f"{dtype:12s} held-out {row['heldout_new_loss']:.4f} ± {row['heldout_spread'] / 2:.4f}  "
              f"train(last 50) {row['train_loss_last_50']:.4f}  entries moved {row['entries_moved']:.1%}")  # fmt: skip
    assert all(math.isfinite(r["heldout_new_loss"]) for r in results)
    return table


if __name__ == "__main__":
    main()
