"""What one call costs the host: microseconds of Python + launch per op, on the GPU machine.

  python -m benchmarks.host_costs [--out DIR] [--calls 400]

Why: an offloaded CPT step's backward waits on the host (``benchmarks/profile_step.py``), so the number of
launches and what each one costs decide its speed. Each op here is called ``--calls`` times back to back
on small tensors (the device finishes each in a few microseconds, so the host is what is timed) after a
warm-up; reported is the host time per call, the median of 5 repeats. The GEMMs run with each cuBLAS
backend torch offers (``torch.backends.cuda.preferred_blas_library``), and the ``out_dtype`` overloads
(bf16 in, fp32 out) are checked against an fp32 reference where the build has them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPEATS = 5


def per_call_us(fn: Callable[[], Any], calls: int) -> float:
    import torch

    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
        torch.cuda.synchronize()
    return 1e6 * statistics.median(times)


def out_dtype_check(torch: Any) -> dict[str, Any]:
    """Do mm/addmm take ``out_dtype=float32`` for bf16 inputs here, and do they match fp32 math?"""
    a = torch.randn(300, 257, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(257, 129, device="cuda", dtype=torch.bfloat16)
    ref = a.float() @ b.float()
    result: dict[str, Any] = {}
    try:
        got = torch.mm(a, b, out_dtype=torch.float32)
        result["mm"] = {"dtype": str(got.dtype), "max_abs_err": float((got - ref).abs().max())}
    except Exception as exc:  # noqa: BLE001 - a build without the overload
        result["mm"] = f"{type(exc).__name__}: {exc}"[:200]
    try:
        zero = torch.zeros((), device="cuda", dtype=torch.float32)
        got = torch.addmm(zero, a, b, beta=0, alpha=0.5, out_dtype=torch.float32)
        result["addmm_scaled"] = {
            "dtype": str(got.dtype),
            "max_abs_err": float((got - 0.5 * ref).abs().max()),
        }
    except Exception as exc:  # noqa: BLE001
        result["addmm_scaled"] = f"{type(exc).__name__}: {exc}"[:200]
    return result


def measure(calls: int) -> dict[str, Any]:
    import torch

    from cpt_plugin.kernels.rms_norm import rms_norm

    dev = "cuda"
    x = torch.randn(64, 256, device=dev, dtype=torch.bfloat16)
    w = torch.randn(128, 256, device=dev, dtype=torch.bfloat16)
    out = torch.empty(64, 128, device=dev, dtype=torch.bfloat16)
    g = torch.randn(64, 128, device=dev, dtype=torch.bfloat16)
    fp32_factors = [torch.randn(16, 256, device=dev) for _ in range(6)]
    bf16_factors = [torch.empty(16, 256, device=dev, dtype=torch.bfloat16) for _ in range(6)]
    norm_w = torch.ones(256, device=dev, dtype=torch.bfloat16)
    ops: dict[str, Callable[[], Any]] = {
        "torch.mm": lambda: torch.mm(x, w.t()),
        "torch.mm(out=)": lambda: torch.mm(x, w.t(), out=out),
        "addmm_": lambda: out.addmm_(g, w[:, :128], alpha=0.5),
        "torch.addmm(beta=0, alpha)": lambda: torch.addmm(out, x, w.t(), beta=0, alpha=0.5),
        "fp32 -> bf16 .to (16x256)": lambda: fp32_factors[0].to(torch.bfloat16),
        "_foreach_copy_ (6 casts)": lambda: torch._foreach_copy_(bf16_factors, fp32_factors),
        "torch.empty": lambda: torch.empty(64, 128, device=dev, dtype=torch.bfloat16),
        "view": lambda: x.view(16, 4, 256),
        "add (bf16)": lambda: x + x,
        "triton rms_norm forward": lambda: rms_norm(x, norm_w, 1e-6),
    }
    try:
        torch.mm(x, w.t(), out_dtype=torch.float32)
        ops["torch.mm(out_dtype=fp32)"] = lambda: torch.mm(x, w.t(), out_dtype=torch.float32)
    except Exception:  # noqa: BLE001 - not in this build
        pass
    rows: dict[str, Any] = {}
    with torch.no_grad():
        for name, fn in ops.items():
            rows[name] = round(per_call_us(fn, calls), 2)
        backends: dict[str, Any] = {}
        original = torch.backends.cuda.preferred_blas_library()
        for backend in ("cublas", "cublaslt"):
            try:
                torch.backends.cuda.preferred_blas_library(backend)
                backends[backend] = {
                    "torch.mm": round(per_call_us(ops["torch.mm"], calls), 2),
                    "addmm_": round(per_call_us(ops["addmm_"], calls), 2),
                }
            except Exception as exc:  # noqa: BLE001
                backends[backend] = f"{type(exc).__name__}: {exc}"[:200]
        torch.backends.cuda.preferred_blas_library(original)
    return {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "default_blas": str(original),
        "host_us_per_call": rows,
        "gemm_host_us_by_blas_backend": backends,
        "out_dtype": out_dtype_check(torch),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--calls", type=int, default=400)
    args = parser.parse_args(argv)
    result = measure(args.calls)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "host_costs.json").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
