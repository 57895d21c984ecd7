"""Forward + backward time of causal SDPA per PyTorch backend at a workload's attention shape (CUDA only).

Why: attention is about 12% of the W1 step's GPU time (cuDNN's kernels at 4 x 2048, 32 heads of 64); this
says whether another backend, the GQA form (``enable_gqa``) or the repeated-KV form, or a contiguous
layout would be faster. Inputs are laid out as transformers makes them (projections of shape
batch x seq x heads x dim, transposed), unless ``contiguous``.

    python -m benchmarks.attention_backends --shape 4x2048 --heads 32 --kv-heads 8 --head-dim 64 --out DIR
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch


def _inputs(batch: int, seq: int, heads: int, kv_heads: int, dim: int, contiguous: bool):
    def make(h: int) -> torch.Tensor:
        t = torch.randn(batch, seq, h, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        t = t.contiguous() if contiguous else t
        return t.requires_grad_(True)

    return make(heads), make(kv_heads), make(kv_heads)


def _time(fn, steps: int = 20, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def measure(batch: int, seq: int, heads: int, kv_heads: int, dim: int) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {
        "default": None,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }
    flops = 4 * batch * heads * seq * seq * dim / 2  # causal forward; backward about 2.5x
    rows = []
    for contiguous in (False, True):
        q, k, v = _inputs(batch, seq, heads, kv_heads, dim, contiguous)
        grad = torch.randn(batch, heads, seq, dim, device="cuda", dtype=torch.bfloat16)
        for gqa in (True, False):
            for name, backend in backends.items():

                def step(backend=backend, gqa=gqa, q=q, k=k, v=v, grad=grad) -> None:
                    kk, vv = (k, v) if gqa else (
                        k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
                    )  # fmt: skip
                    ctx = sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()
                    with ctx:
                        out = torch.nn.functional.scaled_dot_product_attention(
                            q, kk, vv, is_causal=True, enable_gqa=gqa
                        )
                    out.backward(grad)

                row = {"backend": name, "gqa": gqa, "contiguous": contiguous}
                try:
                    ms = _time(step)
                    row.update(ms=round(ms, 3), tflops=round(3.5 * flops / ms / 1e9, 1))
                except Exception as error:  # noqa: BLE001 - a backend that refuses the shape: say so
                    row["error"] = f"{type(error).__name__}: {str(error)[:160]}"
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="4x2048")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    batch, seq = (int(v) for v in args.shape.split("x"))
    rows = measure(batch, seq, args.heads, args.kv_heads, args.head_dim)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "attention_backends.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
