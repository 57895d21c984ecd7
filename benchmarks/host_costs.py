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


def triton_launch_costs(calls: int) -> dict[str, Any]:
    """Where a Triton kernel's 90 us of host time goes: our wrapper, the autograd Function, Triton's
    ``kernel[grid](...)`` and the compiled kernel's own launcher (``compiled[grid](...)``, no argument
    specialization), the last checked against the first for the same output."""
    import torch

    from cpt_plugin.kernels import rms_norm as rn

    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(256, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    rstd = torch.empty(64, device="cuda", dtype=torch.float32)
    runtime_args = (x, x.stride(0), w, y, y.stride(0), rstd, 64, 256, 1e-6, 0.0)
    constexprs = {"CAST_LLAMA": True, "BLOCK_ROWS": 16, "BLOCK_COLS": 256}
    grid = (4,)
    rows: dict[str, Any] = {}
    with torch.no_grad():
        rows["rms_norm() public"] = per_call_us(lambda: rn.rms_norm(x, w, 1e-6), calls)
        rows["_RMSNormFunction.apply"] = per_call_us(
            lambda: rn._RMSNormFunction.apply(x, w, 1e-6, 0.0, "llama"), calls
        )
        rows["kernel[grid](...)"] = per_call_us(
            lambda: rn._rms_norm_fwd_kernel[grid](*runtime_args, **constexprs, num_warps=4), calls
        )
        compiled = rn._rms_norm_fwd_kernel[grid](*runtime_args, **constexprs, num_warps=4)
        want = y.clone()
        for label, args in (
            ("compiled[grid](runtime args)", runtime_args),
            ("compiled[grid](all args)", (*runtime_args, *constexprs.values())),
        ):
            try:
                y.zero_()
                compiled[grid](*args)
                torch.cuda.synchronize()
                same = bool(torch.equal(y, want))
                rows[label] = {
                    "us": per_call_us(lambda args=args: compiled[grid](*args), calls),
                    "same_output": same,
                }
            except Exception as exc:  # noqa: BLE001 - the launcher's signature differs between versions
                rows[label] = f"{type(exc).__name__}: {exc}"[:200]
    x.requires_grad_(True)
    rows["rms_norm() with grad"] = per_call_us(lambda: rn.rms_norm(x, w, 1e-6), calls)
    return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in rows.items()}


def _lora_order(t: int, k: int, n: int, r: int) -> dict[str, Any]:
    import torch
    from triton.testing import do_bench

    x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    a = torch.randn(r, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    b = torch.randn(n, r, device="cuda", dtype=torch.bfloat16)
    zero = torch.zeros((), device="cuda", dtype=torch.bfloat16)

    def base_first() -> Any:
        xa = x @ a.t()
        out = x @ w.t()
        return out.addmm_(xa, b.t(), alpha=0.5)

    def lora_first() -> Any:
        xa = x @ a.t()
        out = torch.addmm(zero, xa, b.t(), beta=0, alpha=0.5)
        return out.addmm_(x, w.t())

    return {
        "base_first_ms": round(do_bench(base_first), 4),
        "lora_first_ms": round(do_bench(lora_first), 4),
        "base_gemm_only_ms": round(do_bench(lambda: x @ w.t()), 4),
        "max_abs_diff": float((base_first().float() - lora_first().float()).abs().max()),
    }


def lora_order_ms() -> dict[str, Any]:
    """GPU time of ``x W^T + s (x A^T) B^T`` two ways: base GEMM then the LoRA product added onto it
    (the large output written, read and written again), or the LoRA product first and the base GEMM
    accumulating onto it (beta 1). Llama-1B gate (8192 x 2048 -> 8192, r 128), Mistral-7B gate
    (8192 x 4096 -> 14336, r 32)."""
    return {
        "llama-1b gate": _lora_order(8192, 2048, 8192, 128),
        "mistral-7b gate": _lora_order(8192, 4096, 14336, 32),
    }


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
        "triton": triton_launch_costs(calls),
        "lora_order_ms": lora_order_ms(),
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
