"""Which part of a patched decoder layer cannot be captured in a CUDA graph: one capture per piece.

  python -m benchmarks.graph_capture_check [--workload llama-1b] [--shape 4x2048] [--out DIR]

Why: the eighth session tried CUDA graphs for the kept decoder layers (commits 5e327e1, baf6003), since
the forward is bound by the host (docs/BENCHMARKS.md). On the H200 the capture of the first layer's
forward was invalidated (``cudaErrorStreamCaptureInvalidated``) without saying which op did it, and a
failed capture leaves the process unusable (the allocator keeps recording to the graph's pool, the CUDA
generator stays in capture mode). So here every piece (the norm, q/k/v through PEFT, RoPE, SDPA with
each backend, attention, MLP, the whole layer, its backward) is captured in a fresh subprocess of its
own (five at once by default), after two eager warm-up calls, with ``torch.cuda.set_sync_debug_mode("error")``
on during the capture (a synchronizing op then raises where it is called) and ``capture_error_mode`` as
given; the ``pair*`` pieces and ``make_graphed`` capture a forward and then its backward, as
``torch.cuda.make_graphed_callables`` does. The report is one line per piece: captured and replayed
equal to eager (the largest difference), or the error and where it came from. The ninth session's run
(docs/BENCHMARKS.md): every forward piece and every pair captured; only a backward captured on its own,
after an eager forward on another stream, did not.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

PIECES = (
    "rms_norm",
    "qkv",
    "rope",
    "sdpa",
    "sdpa_flash",
    "sdpa_efficient",
    "attention",
    "mlp",
    "layer",
    "layer_backward",
    "layer@global",  # torch.cuda.graph's default mode: another thread's unsafe call also invalidates it
    "pair",  # the layer's forward captured, then its backward (make_graphed_callables' order)
    "pair_nested",  # the same, the backward captured inside an outer autograd backward (engine thread)
    "make_graphed",  # torch.cuda.make_graphed_callables on the layer
    "pair_norm",  # forward + backward pairs of the layer's parts, to find the one whose backward fails
    "pair_attention",
    "pair_mlp",
)
PAIRS = ("pair", "pair_nested", "make_graphed", "pair_norm", "pair_attention", "pair_mlp")


def _layer_inputs(model: Any, ids: Any) -> tuple[Any, Any, Any]:
    """(the first decoder layer, its input hidden state, its (cos, sin)) for ``ids``."""
    import torch

    base = model.get_base_model().model
    with torch.no_grad():
        hidden = base.embed_tokens(ids).to(torch.bfloat16)
        position_ids = torch.arange(ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)
        cos, sin = base.rotary_emb(hidden, position_ids)
    return base.layers[0], hidden, (cos, sin)


def _piece(name: str, layer: Any, hidden: Any, rope: tuple[Any, Any], modeling: Any) -> Any:
    """A callable of no arguments that runs ``name`` on static inputs and returns its output tensors."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    attn = layer.self_attn
    heads, kv_heads, head_dim = (
        attn.config.num_attention_heads,
        attn.config.num_key_value_heads,
        attn.head_dim,
    )
    b, t, _ = hidden.shape
    x = hidden.detach().clone().requires_grad_(True)
    q = torch.randn(b, heads, t, head_dim, device=hidden.device, dtype=hidden.dtype)
    k = torch.randn(b, kv_heads, t, head_dim, device=hidden.device, dtype=hidden.dtype)
    v = torch.randn_like(k)
    cos, sin = rope

    def sdpa(backend: Any = None) -> Any:
        def run() -> Any:
            if backend is None:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        return run

    pieces = {
        "rms_norm": lambda: layer.input_layernorm(x),
        "qkv": lambda: (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)),
        "rope": lambda: modeling.apply_rotary_pos_emb(q, k, cos, sin),
        "sdpa": sdpa(),
        "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa_efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
        "attention": lambda: attn(x, position_embeddings=(cos, sin), attention_mask=None)[0],
        "mlp": lambda: layer.mlp(x),
        "layer": lambda: layer(x, position_embeddings=(cos, sin), attention_mask=None),
    }
    if name == "layer_backward":
        out = pieces["layer"]()
        grad = torch.randn_like(out)
        params = [p for p in layer.parameters() if p.requires_grad]

        def backward() -> Any:
            return torch.autograd.grad(out, [x, *params], grad, retain_graph=True)

        return backward
    return pieces[name]


def _first(out: Any) -> Any:
    return out[0] if isinstance(out, (tuple, list)) else out


def _check_pair(name: str, layer: Any, hidden: Any, rope: tuple[Any, Any], mode: str) -> dict[str, Any]:
    """Forward and backward of the whole layer as two graphs (``name`` in PAIRS), replayed against eager."""
    import torch

    cos, sin = rope
    part = {"pair_norm": layer.input_layernorm, "pair_attention": layer.self_attn, "pair_mlp": layer.mlp}
    module = part.get(name, layer)
    params = [p for p in module.parameters() if p.requires_grad]
    x = hidden.detach().clone().requires_grad_(True)
    grad = torch.randn_like(hidden)

    def forward(inp: Any) -> Any:
        if module is layer or module is layer.self_attn:
            return _first(module(inp, position_embeddings=(cos, sin), attention_mask=None))
        return module(inp)

    stream = torch.cuda.Stream()
    stage = "warm-up"
    try:
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                eager = [g.detach().clone() for g in torch.autograd.grad(forward(x), [x, *params], grad)]
        torch.cuda.current_stream().wait_stream(stream)
        if name == "make_graphed":
            stage = "capture"

            class Wrapped(torch.nn.Module):
                def __init__(self) -> None:
                    super().__init__()
                    self.layer = layer

                def forward(self, inp: Any) -> Any:
                    return forward(inp)

            graphed = torch.cuda.make_graphed_callables(Wrapped(), (x,))
            stage = "replay"
            static = torch.autograd.grad(graphed(x), [x, *params], grad)
        else:
            fwd, bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            static_x = x.detach().clone().requires_grad_(True)
            stage = "forward capture"
            with torch.cuda.graph(fwd, stream=stream, capture_error_mode=mode):
                static_out = forward(static_x)
            stage = "backward capture"
            held: dict[str, Any] = {}

            def capture_backward() -> None:
                with torch.cuda.graph(bwd, pool=fwd.pool(), stream=stream, capture_error_mode=mode):
                    held["grads"] = torch.autograd.grad(
                        static_out, [static_x, *params], grad, retain_graph=True
                    )

            if name == "pair_nested":

                class Outer(torch.autograd.Function):
                    @staticmethod
                    def forward(ctx: Any, t: Any) -> Any:
                        return t.clone()

                    @staticmethod
                    def backward(ctx: Any, g: Any) -> Any:
                        capture_backward()
                        return g

                Outer.apply(torch.zeros(1, device="cuda", requires_grad=True)).sum().backward()
            else:
                capture_backward()
            stage = "replay"
            fwd.replay()
            bwd.replay()
            static = held["grads"]
        torch.cuda.synchronize()
        diffs = [float((s.float() - e.float()).abs().max()) for s, e in zip(static, eager, strict=True)]
        return {"piece": name, "status": "ok", "max_abs_diff_vs_eager": max(diffs)}
    except Exception as error:  # noqa: BLE001 - the point is to report it
        frames = traceback.extract_tb(error.__traceback__)
        where = [f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}" for f in frames[-6:]]
        return {"piece": name, "status": f"failed in {stage}", "error": f"{type(error).__name__}: {error}"[:600],
                "where": where}  # fmt: skip


def _flat(out: Any) -> list[Any]:
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flat(o)] if isinstance(out, (tuple, list)) else []


def check_piece(
    name: str, system: str, workload_name: str, batch: int, seq: int, mode: str
) -> dict[str, Any]:
    """Builds the system, warms the piece up twice, captures it once and compares a replay with eager."""
    import importlib

    import torch

    from benchmarks.systems import build_system
    from benchmarks.worker import batch_for_step, train_step
    from benchmarks.workloads import resolve_workload

    device = "cuda"
    workload = resolve_workload(workload_name, device)
    built = build_system(system, workload, device, seed=0, max_seq_length=seq)
    model = built.model
    for step in range(2):  # the model's own lazy set-up (kernels compiled, probes done)
        train_step(
            model,
            built.optimizer,
            batch_for_step(step, batch, seq, workload.vocab_size, 0).to(device),
            device,
        )
    modeling = importlib.import_module(
        f"transformers.models.{workload.model_type}.modeling_{workload.model_type}"
    )
    ids = batch_for_step(5, batch, seq, workload.vocab_size, 0).to(device)
    layer, hidden, rope = _layer_inputs(model, ids)
    if name in PAIRS:
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            return _check_pair(name, layer, hidden, rope, mode)
    run = _piece(name, layer, hidden, rope, modeling)
    stage = "warm-up"
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    eager = [t.detach().clone() for t in _flat(run())]
            torch.cuda.current_stream().wait_stream(side)
            stage = "capture"
            graph = torch.cuda.CUDAGraph()
            torch.cuda.set_sync_debug_mode("error")
            try:
                with torch.cuda.graph(graph, capture_error_mode=mode):
                    static = _flat(run())
            finally:
                torch.cuda.set_sync_debug_mode(0)
        stage = "replay"
        graph.replay()
        torch.cuda.synchronize()
        diffs = [float((s.float() - e.float()).abs().max()) for s, e in zip(static, eager, strict=True)]
        return {"piece": name, "status": "ok", "max_abs_diff_vs_eager": max(diffs) if diffs else None}
    except Exception as error:  # noqa: BLE001 - the point is to report it
        frames = traceback.extract_tb(error.__traceback__)
        where = [f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}" for f in frames[-6:]]
        return {"piece": name, "status": f"failed in {stage}", "error": f"{type(error).__name__}: {error}"[:600],
                "where": where}  # fmt: skip


def _run_child(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """``name`` (``piece`` or ``piece@mode``) checked in a fresh process; its JSON line, or why none came."""
    piece, _, mode = name.partition("@")
    command = [sys.executable, "-m", "benchmarks.graph_capture_check", "--one", piece, "--system", args.system,
               "--workload", args.workload, "--shape", args.shape, "--mode", mode or args.mode]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    except subprocess.TimeoutExpired:
        return {"piece": name, "status": "timed out"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"piece": name, "status": "no result", "error": done.stderr[-600:]}
    result = json.loads(lines[-1])
    result["piece"] = name
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--system", default="cpt_nogc")
    parser.add_argument("--workload", default="llama-1b")
    parser.add_argument("--shape", default="4x2048")
    parser.add_argument("--pieces", default=",".join(PIECES))
    parser.add_argument("--mode", default="thread_local", choices=("global", "thread_local", "relaxed"))
    parser.add_argument("--out", default=None)
    parser.add_argument("--jobs", type=int, default=5, help="pieces checked at once (each its own process)")
    parser.add_argument(
        "--one", default=None, help=argparse.SUPPRESS
    )  # a child: check this piece, print JSON
    args = parser.parse_args(argv)
    batch, seq = (int(v) for v in args.shape.split("x"))
    if args.one:
        print(json.dumps(check_piece(args.one, args.system, args.workload, batch, seq, args.mode)))
        return 0
    names = args.pieces.split(",")
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:  # one child process per piece
        results = list(pool.map(lambda name: _run_child(name, args), names))
    for name, result in zip(names, results, strict=True):
        print(
            f"{name:>22}: {result['status']}  {result.get('error', result.get('max_abs_diff_vs_eager', ''))}"
        )
        for frame in result.get("where", []):
            print(f"{'':>24}{frame}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "graph_capture_check.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
