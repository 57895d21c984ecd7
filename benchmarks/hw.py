"""Device measurements shared by the workers and the kernel benchmarks: timing, matmul and copy rates."""

from __future__ import annotations

import datetime
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], Any], device: str, grad_to_none: Sequence[torch.Tensor] | None = None) -> float:
    """Median milliseconds of ``fn``: triton's do_bench (CUDA events) on GPU, a host clock on CPU."""
    if device.startswith("cuda"):
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median"))
    times = []
    for i in range(4):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        start = time.perf_counter()
        fn()
        if i:  # the first call is the warm-up
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def matmul_tflops(device: str, n: int | None = None) -> dict[str, float]:
    """bf16 matmul rate (TFLOP/s, median) of an n x n x n product on random data (8192 on GPU)."""
    n = n or (8192 if device.startswith("cuda") else 256)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    ms = time_ms(lambda: torch.matmul(a, b, out=out), device)
    return {"matmul_n": n, "matmul_ms": ms, "matmul_tflops": 2.0 * n**3 / (ms * 1e-3) / 1e12}


def copy_gbps(device: str, nbytes: int | None = None) -> dict[str, float]:
    """Device-to-device copy rate (GB/s, bytes read + bytes written), median."""
    nbytes = nbytes or (1 << 30 if device.startswith("cuda") else 1 << 22)
    src = torch.randn(nbytes // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return {"copy_bytes": 2 * nbytes, "copy_ms": ms, "copy_gbps": 2 * nbytes / (ms * 1e-3) / 1e9}


# The libraries whose versions are recorded with every result (and printed by the report).
PACKAGES = (
    "transformers",
    "peft",
    "accelerate",
    "triton",
    "liger-kernel",
    "bitsandbytes",
    "trl",
    "axolotl",
    "cpt-plugin",
)


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - not installed
        return None


def environment(device: str) -> dict[str, Any]:
    """Card name, memory and library versions, recorded next to every result."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    for name in PACKAGES:
        info[name] = _version(name)
    try:
        import cpt_plugin

        info["cpt-plugin"] = info["cpt-plugin"] or cpt_plugin.__version__
    except Exception:  # noqa: BLE001
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["card"] = torch.cuda.get_device_name(0)
        info["card_memory_gib"] = props.total_memory / 2**30
        info["sm_count"] = props.multi_processor_count
    else:
        import platform

        info["card"] = f"CPU ({platform.processor() or platform.machine()})"
    return info
