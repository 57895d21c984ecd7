"""Where the fused linear + cross-entropy's time goes, per logits-chunk size (GPU only).

Why: issue 18 asks for the fused loss at Liger's extra memory (one 256-row logits chunk at 8192 tokens x
2048 x 128,256) at >= 1.2x Liger's speed. Our 512-row chunk reaches 1.2x at twice that memory, our 256-row
chunk only Liger's speed. This splits one forward+backward into its four pieces, each summed over the
chunks: the logits matmul, the loss/gradient kernel, grad_hidden (dlogits @ W) and grad_weight
(+= dlogits^T @ x), with the operand orders and cuBLAS backends that could pick other kernels, so the
slow piece is named before anything is changed. It also times the matmuls of the other layout, vocabulary
chunks over all tokens (four matmuls, grad_weight written once), and the end-to-end calls of ours and
Liger's at each chunk size.

    python -m benchmarks.flce_breakdown --out DIR   # writes DIR/flce_breakdown.json, prints a table
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

TOKENS, HIDDEN, VOCAB = 8192, 2048, 128256


def _time_ms(fn: Callable[[], object], repeats: int = 7) -> float:
    """Median wall time of ``fn`` on the device, after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _chunks(rows: int) -> list[tuple[int, int]]:
    return [(s, min(s + rows, TOKENS)) for s in range(0, TOKENS, rows)]


def pieces(rows: int, x, w, labels) -> dict[str, float]:
    """ms of each piece of one call, summed over its chunks of ``rows`` tokens."""
    from cpt_plugin.kernels.fused_linear_cross_entropy import _ce_chunk_triton

    buf = torch.empty((rows, VOCAB), dtype=x.dtype, device=x.device)
    gh = torch.empty_like(x)
    gw = torch.zeros_like(w)
    gw32 = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    loss = torch.empty(TOKENS, dtype=torch.float32, device=x.device)
    scale = torch.full((1,), 1.0 / TOKENS, dtype=torch.float32, device=x.device)
    chunks = _chunks(rows)
    torch.mm(x[:rows], w.t(), out=buf)

    def loop(step: Callable[[int, int], object]) -> Callable[[], None]:
        def run() -> None:
            for s, e in chunks:
                step(s, e)

        return run

    out = {
        "logits x@W^T": _time_ms(loop(lambda s, e: torch.mm(x[s:e], w.t(), out=buf[: e - s]))),
        "ce kernel": _time_ms(
            loop(lambda s, e: _ce_chunk_triton(buf[: e - s], labels[s:e], loss[s:e], scale, -100, None))
        ),
        "grad_hidden dl@W": _time_ms(loop(lambda s, e: torch.mm(buf[: e - s], w, out=gh[s:e]))),
        "grad_hidden (W^T dl^T)^T": _time_ms(
            loop(lambda s, e: torch.mm(w.t(), buf[: e - s].t(), out=gh[s:e].t()))
        ),
        "grad_weight += dl^T x (bf16)": _time_ms(loop(lambda s, e: gw.addmm_(buf[: e - s].t(), x[s:e]))),
        "grad_weight^T += x^T dl (bf16)": _time_ms(
            loop(lambda s, e: gw.t().addmm_(x[s:e].t(), buf[: e - s]))
        ),
        "grad_weight += dl^T x (fp32 out)": _time_ms(
            loop(lambda s, e: torch.addmm(gw32, buf[: e - s].t(), x[s:e], out_dtype=torch.float32, out=gw32))
        ),
    }
    return out


def vocab_chunk_layout(vocab_cols: int, x, w) -> dict[str, float]:
    """The matmuls of the vocabulary-chunk layout (all tokens, ``vocab_cols`` logits columns at a time)."""
    buf = torch.empty((TOKENS, vocab_cols), dtype=x.dtype, device=x.device)
    gh32 = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    gw = torch.empty_like(w)
    starts = list(range(0, VOCAB, vocab_cols))

    def logits() -> None:
        for v in starts:
            c = min(vocab_cols, VOCAB - v)
            torch.mm(x, w[v : v + c].t(), out=buf[:, :c])

    def grad_hidden() -> None:
        for v in starts:
            c = min(vocab_cols, VOCAB - v)
            torch.addmm(gh32, buf[:, :c], w[v : v + c], out_dtype=torch.float32, out=gh32)

    def grad_weight() -> None:
        for v in starts:
            c = min(vocab_cols, VOCAB - v)
            torch.mm(buf[:, :c].t(), x, out=gw[v : v + c])

    return {
        "logits (one pass)": _time_ms(logits),
        "grad_hidden += dl@W_c (fp32 out)": _time_ms(grad_hidden),
        "grad_weight_c = dl^T x": _time_ms(grad_weight),
    }


def end_to_end(x, w, labels) -> dict[str, float]:
    """Forward + backward of the whole call: ours at each chunk size, and Liger's when it imports."""
    from cpt_plugin.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

    xs = x.detach().requires_grad_(True)
    ws = w.detach().requires_grad_(True)
    out: dict[str, float] = {}

    def ours(mib: int) -> Callable[[], None]:
        def run() -> None:
            xs.grad = ws.grad = None
            fused_linear_cross_entropy(xs, ws, labels, chunk_bytes=mib * 2**20).backward()

        return run

    for mib in (64, 128, 256):
        out[f"cpt chunk {mib} MiB"] = _time_ms(ours(mib))
    for backend in ("cublaslt", "cublas"):
        try:
            torch.backends.cuda.preferred_blas_library(backend)
            out[f"cpt chunk 64 MiB, {backend}"] = _time_ms(ours(64))
        except Exception as exc:  # noqa: BLE001 - a backend the build lacks is a row, not a crash
            out[f"cpt chunk 64 MiB, {backend}"] = float("nan")
            print(f"{backend}: {exc}")
    torch.backends.cuda.preferred_blas_library("default")
    try:
        import liger_kernel.transformers.functional as LF
    except ImportError:
        return out

    def liger() -> None:
        xs.grad = ws.grad = None
        LF.liger_fused_linear_cross_entropy(xs, ws, labels).backward()

    out["liger"] = _time_ms(liger)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("flce_breakdown: needs a CUDA device")
        return 1
    torch.manual_seed(0)
    dev = torch.device("cuda")
    x = torch.randn(TOKENS, HIDDEN, device=dev, dtype=torch.bfloat16)
    w = torch.randn(VOCAB, HIDDEN, device=dev, dtype=torch.bfloat16) * 0.02
    labels = torch.randint(0, VOCAB, (TOKENS,), device=dev)
    result: dict[str, dict[str, float]] = {}
    for rows in (256, 512, 1024):
        result[f"token chunks of {rows} rows"] = pieces(rows, x, w, labels)
    for cols in (4096, 8192):
        result[f"vocab chunks of {cols} columns"] = vocab_chunk_layout(cols, x, w)
    result["end to end (forward + backward)"] = end_to_end(x, w, labels)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "flce_breakdown.json").write_text(json.dumps(result, indent=2))
    flops = 2 * TOKENS * HIDDEN * VOCAB
    for group, rows_ in result.items():
        print(f"## {group}")
        for name, ms in rows_.items():
            rate = f"{flops / ms / 1e9:7.0f} TFLOP/s" if "kernel" not in name and "end" not in group else ""
            print(f"  {name:40s} {ms:8.2f} ms  {rate}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
