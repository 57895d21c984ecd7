"""Merged (and GGUF f16) export time at real model shapes on this machine: ``python -m benchmarks.export_time``.

What a user runs after a CPT run, timed end to end as a separate process (start-up, imports, loading the
base and the adapter, merging, writing, the checks): ``cpt-plugin export RUN --to merged`` and, on its
result, ``cpt-plugin export MERGED --to gguf --outtype f16`` (with the read-back check through
transformers' GGUF loader, as users get it).

The run is made here: the workload's model (Llama-3.2-1B shapes by default: tied, bf16, llama3 RoPE) with
random weights built from its config, saved as the base; then the CPT recipe of ``prepare_model``
(rsLoRA r=128 on every linear layer of the decoder, trained embeddings) with the LoRA B factors and the
embedding copies moved off their init (so the merge does real work), saved as the adapter with a small
byte-level BPE tokenizer (the real tokenizer is not reachable offline; the vocabulary rows stay 128256).

Prints one JSON line (seconds, peak RSS of each export process, sizes, versions). ``--out`` must be a
new or empty folder with about 3x the model size free (base, merged, GGUF).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.workloads import LORA_ALPHA, LORA_R, WORKLOADS

# Llama-3.2-1B's RoPE (config.json of meta-llama/Llama-3.2-1B); the workload table does not carry it.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
TOKENIZER_TEXT = (
    "Continued pretraining adapts a language model to a new domain. The quick brown fox jumps over the "
    "lazy dog.\ndef merge(adapter, out_dir):\n    return export(adapter, out_dir)  # tiny corpus\n"
)


def _config(workload: str) -> Any:
    config = WORKLOADS[workload].make_config()
    if workload == "llama-1b":
        config.rope_parameters = {**LLAMA3_ROPE, "rope_theta": WORKLOADS[workload].rope_theta}
    return config


def _tokenizer(folder: Path) -> Any:
    from cpt_plugin.cli.corpora import train_tokenizer

    text = folder / "tokenizer-corpus.txt"
    text.write_text(TOKENIZER_TEXT * 50, encoding="utf-8")
    tokenizer = train_tokenizer([text], vocab_size=512)
    text.unlink()
    return tokenizer


def make_run(workload: str, out: Path) -> dict[str, Any]:
    """Writes ``out/base`` (the model) and ``out/run/adapter`` (the CPT adapter + tokenizer)."""
    from transformers import AutoModelForCausalLM

    from cpt_plugin import CPTConfig, prepare_model

    started = time.perf_counter()
    torch.manual_seed(0)
    config = _config(workload)
    tokenizer = _tokenizer(out)
    config.vocab_size = max(config.vocab_size, len(tokenizer))  # only the tiny dry-run workload grows
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # no fp32 copy of 1.2B weights
    model.save_pretrained(str(out / "base"))
    tokenizer.save_pretrained(str(out / "base"))
    model.name_or_path = str((out / "base").resolve())  # the adapter's base_model_name_or_path
    parameters = sum(p.numel() for p in model.parameters())
    peft_model = prepare_model(model, CPTConfig(lora_r=LORA_R, lora_alpha=LORA_ALPHA, max_seq_length=2048))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.01 * torch.randn(param.shape, generator=generator))
            elif param.requires_grad:  # the trained embedding copies
                param.add_(0.002 * torch.randn(param.shape, generator=generator).to(param.dtype))
    trained = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    peft_model.save_pretrained(str(out / "run" / "adapter"))
    tokenizer.save_pretrained(str(out / "run" / "adapter"))
    return {
        "parameters": parameters,
        "trained_parameters": trained,
        "setup_s": round(time.perf_counter() - started, 1),
    }


def _timed(command: list[str]) -> tuple[float, float]:
    """Wall seconds and the peak RSS (GiB) of ``command`` run as its own process; raises on failure."""
    started = time.perf_counter()
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage (ru_maxrss: KiB on Linux)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, command)
    return round(seconds, 1), round(usage.ru_maxrss / 2**20, 2)


def _machine() -> str:
    """CPU model, cores and memory, as the results table names the machine."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {os.cpu_count()} cores, {memory:.0f} GiB"


def _size_gb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 1e9, 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.export_time", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--out", required=True, help="a new or empty folder for the base, merged model and GGUF"
    )
    parser.add_argument("--workload", default="llama-1b", choices=sorted(WORKLOADS))
    parser.add_argument("--no-gguf", action="store_true", help="time the merged export only")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        parser.error(f"--out {out} is not empty; give a new folder (the benchmark writes ~3x the model size)")
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"benchmark": "export_time", "workload": args.workload}
    result.update(make_run(args.workload, out))
    gc.collect()  # the run's model is gone before the export processes start
    cli = [sys.executable, "-m", "cpt_plugin.cli", "export"]
    result["merged_s"], result["merged_peak_rss_gib"] = _timed(
        [*cli, str(out / "run"), "--to", "merged", "--out", str(out / "merged")]
    )
    result["merged_gb"] = _size_gb(out / "merged")
    if not args.no_gguf:
        gguf = out / "model-f16.gguf"
        result["gguf_f16_s"], result["gguf_peak_rss_gib"] = _timed(
            [*cli, str(out / "merged"), "--to", "gguf", "--outtype", "f16", "--out", str(gguf)]
        )
        result["gguf_gb"] = _size_gb(gguf)
    import transformers

    result.update(
        {
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "machine": _machine(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "command": "python -m benchmarks.export_time --out DIR"
            + ("" if args.workload == "llama-1b" else f" --workload {args.workload}")
            + (" --no-gguf" if args.no_gguf else ""),
        }
    )
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
