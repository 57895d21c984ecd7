"""Kernel micro-benchmarks: forward + backward of each op, PyTorch eager vs Liger-Kernel vs cpt-plugin.

  python -m benchmarks.kernels [--out DIR] [--device cpu] [--ops rms_norm,swiglu,rope,flce,nf4] [--impls ...]

Impls: eager, liger, cpt, and for flce ``cpt@MIB`` (cpt-plugin with a logits-chunk budget of MIB MiB, e.g.
``--ops flce --impls liger,cpt,cpt@64,cpt@256`` to weigh memory against speed in one call).

``nf4`` is forward only: one Mistral-7B layer's seven 4-bit base weights (q/o 4096×4096, k/v 1024×4096,
gate/up 14336×4096, down 4096×14336; NF4, blocksize 64, nested absmax, as QLoRA loads them) dequantized to
bf16, what the fused LoRA path does once per layer per pass. Its impls are ``bnb``
(bitsandbytes.functional.dequantize_4bit, two kernels for a nested absmax, then a cast if needed) and
``cpt`` (cpt_plugin.kernels.nf4, one launch); other impls are skipped for it, and ``bnb`` for the other
ops. Its row's ms is the layer's sum; ``per_shape`` has ms and GB/s per weight shape; its rel. err is
against bnb's output (0: bit-exact). Bytes: packed codes + absmax (+ the nested scales) read, output written.

Time: triton.testing.do_bench, median (GPU); every input is far larger than L2, so no rotation is needed.
Bytes (for % of the device copy rate measured in the same run): per pass, each input read once and each
output written once, forward and backward counted separately (e.g. SwiGLU: fwd a, b -> c; bwd dc, a, b ->
da, db: 8 tensors). Extra peak memory: peak during forward + backward beyond the inputs, the output
gradients and the input gradients (flce rows also carry the analytic count of cpt-plugin's
``extra_memory_bytes`` as ``extra_analytic_gib``). Rel. err: ||out - ref|| / ||ref|| over outputs and input gradients,
ref = eager on float32 copies of the inputs. Writes DIR/kernels.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.hw import copy_gbps, environment, matmul_tflops, time_ms

EPS = 1e-6


# -- eager references (HF's math) ---------------------------------------------------------------
def rms_norm_eager(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)
    return w * y.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_eager(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def flce_eager(h, w, labels):
    return F.cross_entropy((h @ w.t()).float(), labels)


# -- implementations --------------------------------------------------------------------------------
def _liger(op: str) -> Callable:
    import liger_kernel.transformers.functional as LF

    return {
        "rms_norm": lambda x, w: LF.liger_rms_norm(x, w, EPS),
        "swiglu": LF.liger_swiglu,
        "rope": LF.liger_rope,
        "flce": LF.liger_fused_linear_cross_entropy,
    }[op]


def _cpt(op: str) -> Callable:
    if op == "rms_norm":
        from cpt_plugin.kernels.rms_norm import rms_norm

        return lambda x, w: rms_norm(x, w, EPS)
    if op == "swiglu":
        from cpt_plugin.kernels.swiglu import swiglu

        return swiglu
    if op == "rope":
        from cpt_plugin.kernels.rope import apply_rope

        return apply_rope
    from cpt_plugin.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

    return fused_linear_cross_entropy


EAGER = {
    "rms_norm": rms_norm_eager,
    "swiglu": lambda a, b: F.silu(a) * b,
    "rope": rope_eager,
    "flce": flce_eager,
}
IMPLS = ("eager", "bnb", "liger", "cpt")
OPS = ("rms_norm", "swiglu", "rope", "flce", "nf4")
NF4_IMPLS = ("bnb", "cpt")


def applies(op: str, impl: str) -> bool:
    """Whether main runs ``impl`` for ``op``: nf4 has bnb and cpt only, bnb is for nf4 only."""
    if op == "nf4":
        return impl in NF4_IMPLS
    return impl != "bnb"


def chunk_budget(impl: str) -> int | None:
    """Bytes of the logits-chunk budget of a ``cpt@MIB`` impl; None for the default."""
    if not impl.startswith("cpt@"):
        return None
    mib = impl.partition("@")[2]
    if not mib.isdigit() or int(mib) < 1:
        raise ValueError(f"bad impl {impl!r}: use cpt@MIB with a whole number of MiB, e.g. cpt@64")
    return int(mib) * 2**20


def get_impl(op: str, impl: str) -> Callable:
    if impl == "eager":
        return EAGER[op]
    if impl == "liger":
        return _liger(op)
    budget = chunk_budget(impl)
    if budget is None:
        return _cpt(op)
    if op != "flce":
        raise ValueError(f"{impl}: a chunk budget applies to flce only")
    import functools

    return functools.partial(_cpt(op), chunk_bytes=budget)


# -- cases ----------------------------------------------------------------------------------------
@dataclass
class Case:
    """Inputs of one op: leaves that need gradients, other inputs, output gradients, counted work."""

    shape: str
    grad_inputs: list[torch.Tensor]
    other_inputs: list[torch.Tensor]
    grad_outputs: list[torch.Tensor] | None  # None: scalar loss
    bytes: int
    flops: float = 0.0

    def args(self) -> list[torch.Tensor]:
        return [*self.grad_inputs, *self.other_inputs]


def make_case(op: str, device: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Case:
    """GPU shapes from ANCHORS.md; tiny odd shapes on the CPU (a dry run)."""
    gpu = device.startswith("cuda")
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, grad=False, scale=1.0):
        t = torch.randn(*shape, device=device, dtype=dtype, generator=gen) * scale
        return t.requires_grad_(grad)

    if op == "rms_norm":
        n, d = (16384, 4096) if gpu else (37, 64)
        x, w, dy = randn(n, d, grad=True), randn(d, grad=True), randn(n, d)
        e = x.element_size()
        return Case(f"{n}×{d}", [x, w], [], [dy], 5 * n * d * e + 3 * d * e)
    if op == "swiglu":
        n, d = (8192, 14336) if gpu else (33, 96)
        a, b, dc = randn(n, d, grad=True), randn(n, d, grad=True), randn(n, d)
        return Case(f"{n}×{d}", [a, b], [], [dc], 8 * n * d * a.element_size())
    if op == "rope":
        bsz, hq, hk, t, hd = (4, 32, 8, 4096, 128) if gpu else (2, 4, 2, 17, 32)
        q, k = randn(bsz, hq, t, hd, grad=True), randn(bsz, hk, t, hd, grad=True)
        pos = torch.arange(t, device=device, dtype=torch.float32)
        inv = 1.0 / (500000.0 ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd))
        ang = torch.outer(pos, inv)
        ang = torch.cat((ang, ang), dim=-1)
        cos = ang.cos().to(dtype).expand(bsz, t, hd).contiguous()
        sin = ang.sin().to(dtype).expand(bsz, t, hd).contiguous()
        dq, dk = randn(bsz, hq, t, hd), randn(bsz, hk, t, hd)
        e = q.element_size()
        nbytes = 4 * (q.numel() + k.numel()) * e + 4 * cos.numel() * e
        return Case(
            f"q {hq} heads + k {hk} heads, {bsz}×{t}, head_dim {hd}", [q, k], [cos, sin], [dq, dk], nbytes
        )
    if op == "flce":
        n, hdim, vocab = (8192, 2048, 128256) if gpu else (29, 64, 257)
        h, w = randn(n, hdim, grad=True), randn(vocab, hdim, grad=True, scale=0.02)
        labels = torch.randint(0, vocab, (n,), device=device, generator=gen)
        e = h.element_size()
        return Case(
            f"{n} tokens × {hdim} × {vocab} vocab",
            [h, w],
            [labels],
            None,
            2 * (h.numel() + w.numel()) * e,
            6.0 * n * hdim * vocab,
        )
    raise ValueError(f"unknown op {op!r}")


def fwd_bwd(fn: Callable, case: Case) -> Callable[[], Any]:
    def run():
        out = fn(*case.args())
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        if case.grad_outputs is None:
            outs[0].backward()
        else:
            torch.autograd.backward(outs, case.grad_outputs)
        return outs

    return run


def rel_err(fn: Callable, case: Case, op: str) -> float:
    """Largest relative error over outputs and input gradients against eager on float32 copies."""

    def grads_of(f, leaves, others, gouts):
        out = f(*leaves, *others)
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        if gouts is None:
            outs[0].backward()
        else:
            torch.autograd.backward(outs, gouts)
        return [o.detach().float() for o in outs] + [leaf.grad.float() for leaf in leaves]

    leaves = [t.detach().clone().requires_grad_(True) for t in case.grad_inputs]
    gouts = None if case.grad_outputs is None else [g.clone() for g in case.grad_outputs]
    got = grads_of(fn, leaves, case.other_inputs, gouts)
    ref_leaves = [t.detach().float().requires_grad_(True) for t in case.grad_inputs]
    ref_others = [t.float() if t.is_floating_point() else t for t in case.other_inputs]
    ref_gouts = None if case.grad_outputs is None else [g.float() for g in case.grad_outputs]
    ref = grads_of(EAGER[op], ref_leaves, ref_others, ref_gouts)
    worst = 0.0
    for a, b in zip(got, ref, strict=True):
        if not torch.isfinite(a).all():
            return float("nan")
        worst = max(worst, ((a - b).norm() / b.norm().clamp_min(1e-30)).item())
    return worst


def extra_peak_gib(run: Callable[[], Any], case: Case, device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    for t in case.grad_inputs:
        t.grad = None
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    grads = sum(t.numel() * t.element_size() for t in case.grad_inputs)
    extra = torch.cuda.max_memory_allocated() - base - grads
    for t in case.grad_inputs:
        t.grad = None
    return extra / 2**30


# -- nf4: 4-bit base weights dequantized (forward only) -------------------------------------------
def nf4_layer(device: str) -> list[tuple[str, int, int]]:
    """(name, rows, cols) of one Mistral-7B layer's projections on GPU; a small layer on the CPU (dry run)."""
    h, kv, inter = (4096, 1024, 14336) if device.startswith("cuda") else (64, 16, 192)
    return [
        ("q", h, h),
        ("k", kv, h),
        ("v", kv, h),
        ("o", h, h),
        ("gate", inter, h),
        ("up", inter, h),
        ("down", h, inter),
    ]


def _nf4_impl(impl: str) -> Callable[[torch.Tensor, Any, torch.dtype], torch.Tensor]:
    if impl == "bnb":
        import bitsandbytes.functional as bnb_functional

        def bnb_dequantize(packed: torch.Tensor, state: Any, dtype: torch.dtype) -> torch.Tensor:
            out = bnb_functional.dequantize_4bit(packed, state)
            return out if out.dtype == dtype else out.to(dtype)

        return bnb_dequantize
    if impl == "cpt":
        from cpt_plugin.kernels.nf4 import dequantize_4bit_triton

        return dequantize_4bit_triton
    raise ValueError(f"nf4 impls are {', '.join(NF4_IMPLS)}, not {impl!r}")


def _nf4_bytes(packed: torch.Tensor, state: Any, out: torch.Tensor) -> int:
    read = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
    if state.nested:
        read += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return read + out.numel() * out.element_size()


def bench_nf4(
    impl: str, device: str, copy_rate: float | None, dtype: torch.dtype = torch.bfloat16
) -> dict[str, Any]:
    """One layer's 4-bit weights to ``dtype``: ms and GB/s per distinct shape, summed over the layer."""
    import bitsandbytes.functional as bnb_functional

    fn = _nf4_impl(impl)
    reference = _nf4_impl("bnb")
    layer = nf4_layer(device)
    gen = torch.Generator(device=device).manual_seed(0)
    per_shape: dict[tuple[int, int], dict[str, Any]] = {}
    worst = 0.0
    extra = None
    for _, rows, cols in layer:
        if (rows, cols) in per_shape:
            continue
        weight = torch.randn(rows, cols, device=device, dtype=dtype, generator=gen) * 0.02
        packed, state = bnb_functional.quantize_4bit(
            weight, blocksize=64, quant_type="nf4", compress_statistics=True
        )
        del weight
        got, want = fn(packed, state, dtype), reference(packed, state, dtype)
        worst = max(worst, ((got.float() - want.float()).norm() / want.float().norm()).item())
        exact = torch.equal(got, want)
        nbytes = _nf4_bytes(packed, state, got)
        del got, want
        if device.startswith("cuda"):
            gc.collect()
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out = fn(packed, state, dtype)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base - out.numel() * out.element_size()
            extra = max(extra or 0.0, peak / 2**30)
            del out
        ms = time_ms(lambda packed=packed, state=state: fn(packed, state, dtype), device)
        per_shape[(rows, cols)] = {
            "shape": f"{rows}×{cols}",
            "ms": ms,
            "bytes": nbytes,
            "gbps": nbytes / (ms * 1e-3) / 1e9,
            "bit_exact_vs_bnb": exact,
        }
    ms = sum(per_shape[(rows, cols)]["ms"] for _, rows, cols in layer)
    nbytes = sum(per_shape[(rows, cols)]["bytes"] for _, rows, cols in layer)
    names: dict[tuple[int, int], list[str]] = {}
    for name, rows, cols in layer:
        names.setdefault((rows, cols), []).append(name)
    row: dict[str, Any] = {
        "shape": "layer: "
        + ", ".join(f"{'/'.join(names[key])} {value['shape']}" for key, value in per_shape.items())
        + f"; nf4, blocksize 64, nested absmax, {str(dtype).removeprefix('torch.')} out",
        "status": "ok",
        "ms": ms,
        "bytes": nbytes,
        "gbps": nbytes / (ms * 1e-3) / 1e9,
        "rel_err": worst,
        "bit_exact_vs_bnb": all(value["bit_exact_vs_bnb"] for value in per_shape.values()),
        "extra_peak_gib": extra,
        "per_shape": [dict(value, names="/".join(names[key])) for key, value in per_shape.items()],
    }
    if copy_rate:
        row["pct_copy"] = 100.0 * row["gbps"] / copy_rate
        for value in row["per_shape"]:
            value["pct_copy"] = 100.0 * value["gbps"] / copy_rate
    return row


def bench_one(
    op: str, impl: str, device: str, copy_rate: float | None, matmul_rate: float | None
) -> dict[str, Any]:
    row: dict[str, Any] = {"op": op, "impl": impl}
    if op == "nf4":
        return _bench_nf4_row(row, impl, device, copy_rate)
    case = None
    try:
        fn = get_impl(op, impl)
        case = make_case(op, device)
        row["shape"] = case.shape
        row["rel_err"] = rel_err(fn, case, op)
        run = fwd_bwd(fn, case)
        row["extra_peak_gib"] = extra_peak_gib(run, case, device)
        if op == "flce" and impl.startswith("cpt"):
            from cpt_plugin.kernels.fused_linear_cross_entropy import extra_memory_bytes

            h, w = case.grad_inputs
            plan = extra_memory_bytes(
                h.shape[0], h.shape[1], w.shape[0], h.dtype, device=device, chunk_bytes=chunk_budget(impl)
            )
            row["extra_analytic_gib"] = plan["total"] / 2**30
        ms = time_ms(run, device, grad_to_none=case.grad_inputs)
        row.update(status="ok", ms=ms, bytes=case.bytes, gbps=case.bytes / (ms * 1e-3) / 1e9)
        if copy_rate:
            row["pct_copy"] = 100.0 * row["gbps"] / copy_rate
        if case.flops:
            row["tflops"] = case.flops / (ms * 1e-3) / 1e12
            if matmul_rate:
                row["pct_matmul"] = 100.0 * row["tflops"] / matmul_rate
    except Exception as exc:  # noqa: BLE001 - recorded per row
        _record_failure(row, exc)
        if case is not None:
            row.setdefault("shape", case.shape)
    finally:
        del case
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return row


def _record_failure(row: dict[str, Any], exc: Exception) -> None:
    """A row's failure: 'unavailable' (the implementation is not installed here) or 'error', with its cause."""
    missing = isinstance(exc, (ImportError, AttributeError))
    row.update(
        status="unavailable" if missing else "error",
        error=f"{type(exc).__name__}: {exc}"[:500],
        traceback=traceback.format_exc()[-1500:],
    )


def _bench_nf4_row(row: dict[str, Any], impl: str, device: str, copy_rate: float | None) -> dict[str, Any]:
    try:
        row.update(bench_nf4(impl, device, copy_rate))
    except Exception as exc:  # noqa: BLE001 - recorded per row
        _record_failure(row, exc)
    finally:
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return row


def _gib(value: float | None) -> str:
    return "– (CUDA only)" if value is None else f"+{value:.3f} GiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.kernels",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="outputs/bench")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--impls", default=",".join(IMPLS))
    args = parser.parse_args(argv)
    device = args.device
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "device": device,
        "environment": environment(device),
        "command": "python -m benchmarks.kernels " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    result.update(copy_gbps(device))
    result.update(matmul_tflops(device))
    print(
        f"copy {result['copy_gbps']:.0f} GB/s, bf16 matmul {result['matmul_tflops']:.1f} TFLOP/s", flush=True
    )
    rows = []
    for op in [o.strip() for o in args.ops.split(",") if o.strip()]:
        for impl in [i.strip() for i in args.impls.split(",") if i.strip()]:
            if not applies(op, impl.partition("@")[0]):
                continue
            row = bench_one(op, impl, device, result["copy_gbps"], result["matmul_tflops"])
            rows.append(row)
            if row["status"] == "ok":
                print(
                    f"{op:>9} {impl:<6} {row['ms']:9.3f} ms  {row.get('pct_copy', 0):5.1f}% copy  "
                    f"err {row['rel_err']:.1e}  extra peak {_gib(row.get('extra_peak_gib'))}"
                    + (
                        f" (analytic {row['extra_analytic_gib']:.3f} GiB)"
                        if "extra_analytic_gib" in row
                        else ""
                    ),
                    flush=True,
                )
                for shape in row.get("per_shape", []):
                    print(
                        f"{'':>9} {'':<6} {shape['ms']:9.3f} ms  {shape.get('pct_copy', 0):5.1f}% copy  "
                        f"{shape['gbps']:7.0f} GB/s  {shape['names']} {shape['shape']}"
                        f"{'' if shape['bit_exact_vs_bnb'] else '  (not bit-exact vs bnb)'}",
                        flush=True,
                    )
            else:
                print(f"{op:>9} {impl:<6} {row['status']}: {row['error'][:160]}", flush=True)
            result["rows"] = rows
            (out / "kernels.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
