"""The decoder MLP run over the sequence in chunks, for long-context memory.

Why: with checkpointing, peak memory per token is one layer's recompute working set, dominated by the
MLP intermediates (gate, up, activation: ~48 KiB/token at Llama-1B size). Running the MLP over
``chunk_tokens`` tokens at a time bounds that to one chunk. The forward keeps only the MLP output; the
backward recomputes each chunk with grad and accumulates the parameter gradients (LoRA weights included),
so the cost is one extra MLP forward.

That extra forward is avoided inside our checkpointing: when a decoder layer is recomputed in backward,
the recompute only has to reproduce the tensors the layer saved, and for the families whose MLP output
goes straight into the residual add (Llama, Mistral, Qwen2/3) the tiled MLP saves its input and nothing
downstream saves anything derived from its output. There the recompute skips the chunk loop and returns
zeros of the right shape, which only feed the thrown-away layer output.

Per layer: the memory planner turns tiling on for some layers only (``set_tiled_layers``); a wrapped MLP
whose flag is off runs its plain forward.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

from cpt_plugin.offload.checkpointing import in_recompute
from cpt_plugin.patching.registry import mlp_feeds_residual_only

_AUTOCAST_DEVICES = ("cuda", "cpu")


def _autocast_state() -> list[tuple[str, bool, torch.dtype]]:
    return [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES]


class _TiledMLP(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        mlp_forward: Callable,
        chunk_tokens: int,
        unused_output: tuple[int, torch.dtype] | None,
        x: torch.Tensor,
        *params: torch.Tensor,
    ):
        ctx.mlp_forward, ctx.chunk_tokens, ctx.params = mlp_forward, chunk_tokens, params
        ctx.autocast = _autocast_state()
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        ctx.save_for_backward(x)
        if unused_output is not None:  # a recompute whose output nobody reads: (features, dtype)
            features, dtype = unused_output
            # zeros (hooks never see garbage) from one element: no tokens x hidden buffer in the recompute
            return x.new_zeros((), dtype=dtype).expand(*x.shape[:-1], features)
        flat = x.reshape(-1, x.shape[-1])
        out = None
        with torch.no_grad():
            for start in range(0, flat.shape[0], chunk_tokens):
                piece = mlp_forward(flat[start : start + chunk_tokens])
                if out is None:
                    out = piece.new_empty(flat.shape[0], piece.shape[-1])
                out[start : start + piece.shape[0]] = piece
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        params = ctx.params
        need_x = ctx.needs_input_grad[3]
        need_params = [p for p, need in zip(params, ctx.needs_input_grad[4:], strict=True) if need]
        flat = x.reshape(-1, x.shape[-1])
        grad_flat = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = torch.empty_like(flat) if need_x else None
        param_grads: list[torch.Tensor | None] = [None] * len(need_params)
        devices = [x.device] if x.is_cuda else []
        with ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=devices))
            torch.set_rng_state(ctx.cpu_rng)  # same chunk order as the forward: same dropout masks
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, x.device)
            for device_type, enabled, dtype in ctx.autocast:
                stack.enter_context(torch.autocast(device_type=device_type, dtype=dtype, enabled=enabled))
            for start in range(0, flat.shape[0], ctx.chunk_tokens):
                stop = min(start + ctx.chunk_tokens, flat.shape[0])
                chunk = flat[start:stop].detach().requires_grad_(need_x)
                with torch.enable_grad():
                    piece = ctx.mlp_forward(chunk)
                inputs = ([chunk] if need_x else []) + need_params
                if not inputs or not piece.requires_grad:
                    continue
                grads = torch.autograd.grad(piece, inputs, grad_flat[start:stop], allow_unused=True)
                if need_x:
                    grad_x[start:stop] = grads[0] if grads[0] is not None else 0
                    grads = grads[1:]
                for i, g in enumerate(grads):
                    if g is not None:
                        param_grads[i] = g if param_grads[i] is None else param_grads[i].add_(g)
        it = iter(param_grads)
        out_params = [next(it) if need else None for need in ctx.needs_input_grad[4:]]
        ctx.params = ctx.mlp_forward = None
        return (None, None, None, grad_x.view_as(x) if need_x else None, *out_params)


def _module_params(mlp_forward: Callable) -> list[torch.Tensor]:
    owner = mlp_forward if isinstance(mlp_forward, nn.Module) else getattr(mlp_forward, "__self__", None)
    if isinstance(owner, nn.Module):
        return [p for p in owner.parameters() if p.requires_grad]
    return []


def tiled_mlp(
    mlp_forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    chunk_tokens: int,
    params: Sequence[torch.Tensor] | None = None,
    unused_output: tuple[int, torch.dtype] | None = None,
) -> torch.Tensor:
    """``mlp_forward(x)`` computed over chunks of ``chunk_tokens`` tokens (all leading dims flattened).

    ``params`` are the trainable tensors ``mlp_forward`` uses; by default those of the module it is
    (or is bound to). Their gradients are accumulated over the chunks and returned through autograd.
    ``unused_output`` = (features, dtype) says the caller will not read the output (a recompute): the
    graph and the saved input are built as usual, the chunks are not computed.
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be > 0, got {chunk_tokens}")
    tokens = x.numel() // max(x.shape[-1], 1) if x.dim() >= 2 else 0
    if tokens <= chunk_tokens:
        return mlp_forward(x)
    params = list(_module_params(mlp_forward) if params is None else params)
    return _TiledMLP.apply(mlp_forward, chunk_tokens, unused_output, x, *params)


# ----------------------------------------------------------------------------------------------
# Installation on a model's decoder layers
# ----------------------------------------------------------------------------------------------
_INNER = "_cpt_tiled_inner_forward"
_CHUNK = "_cpt_tiled_chunk_tokens"
_SKIP = "_cpt_tiled_skip_recompute"  # the layer adds the MLP output to the residual and saves nothing of it
_OUT = "_cpt_tiled_output"  # (features, dtype) of the last computed output
_ACTIVE = "_cpt_tiled_active"  # False: wrapped but running plainly (the planner's per-layer choice)


def _tiled_forward(self: nn.Module, x: Any, *args: Any, **kwargs: Any) -> Any:
    """Instance ``forward`` of a decoder MLP: the class's forward (or an earlier instance wrapper), tiled."""
    inner = self.__dict__.get(_INNER)
    base = inner if inner is not None else types.MethodType(type(self).forward, self)  # class patches apply
    chunk_tokens = self.__dict__[_CHUNK]
    if not self.__dict__.get(_ACTIVE, True):
        return base(x, *args, **kwargs)
    if args or kwargs or not isinstance(x, torch.Tensor) or x.dim() < 2:
        return base(x, *args, **kwargs)
    if x.numel() // x.shape[-1] <= chunk_tokens:
        return base(x)  # short sequences run as is
    if not torch.is_grad_enabled():  # an eval, or our checkpoint's graph-free forward: chunks, nothing saved
        out = _chunked_without_grad(base, x, chunk_tokens)
        self.__dict__[_OUT] = (out.shape[-1], out.dtype)
        return out
    params = [p for p in self.parameters() if p.requires_grad]
    unused_output = self.__dict__.get(_OUT) if self.__dict__.get(_SKIP) and in_recompute() else None
    out = tiled_mlp(base, x, chunk_tokens, params=params, unused_output=unused_output)
    if unused_output is None:
        self.__dict__[_OUT] = (out.shape[-1], out.dtype)
    return out


def _chunked_without_grad(base: Any, x: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """``base(x)`` computed ``chunk_tokens`` rows at a time into one output, so that the MLP's
    intermediate activations (tokens x intermediate, the largest tensors of a long-context step) exist for
    one chunk only."""
    flat = x.reshape(-1, x.shape[-1])
    out: torch.Tensor | None = None
    for start in range(0, flat.shape[0], chunk_tokens):
        piece = base(flat[start : start + chunk_tokens])
        if out is None:
            out = piece.new_empty(flat.shape[0], piece.shape[-1])
        out[start : start + piece.shape[0]] = piece
    assert out is not None
    return out.view(*x.shape[:-1], out.shape[-1])


def _decoder_mlps(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(decoder layer, its mlp) pairs."""
    pairs: list[tuple[nn.Module, nn.Module]] = []
    for module in model.modules():
        mlp = module._modules.get("mlp") if isinstance(module, nn.Module) else None
        if isinstance(mlp, nn.Module) and all(mlp is not m for _, m in pairs):
            pairs.append((module, mlp))
    return pairs


def enable_tiled_mlp(model: nn.Module, chunk_tokens: int = 4096) -> int:
    """Wraps every decoder layer's ``mlp`` (instance level) to run in chunks; returns how many were wrapped.

    Calling again changes the chunk size. The class's ``forward`` is looked up at each call, so a kernel
    patch applied to the class before or after this still runs inside the tiles. In the layers whose family
    declares ``FamilySpec.residual_mlp`` (``mlp_feeds_residual_only``) the recompute of our checkpointing skips the MLP's chunks (see module doc).
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be > 0, got {chunk_tokens}")
    pairs = _decoder_mlps(model)
    for layer, mlp in pairs:
        if _CHUNK not in mlp.__dict__:
            mlp.__dict__[_INNER] = mlp.__dict__.get("forward")
            mlp.__dict__["forward"] = types.MethodType(_tiled_forward, mlp)
        mlp.__dict__[_CHUNK] = int(chunk_tokens)
        mlp.__dict__[_SKIP] = mlp_feeds_residual_only(layer)
        mlp.__dict__[_ACTIVE] = True
    return len(pairs)


def set_tiled_layers(layers: Sequence[nn.Module], active: Sequence[bool], chunk_tokens: int) -> int:
    """Tiles the MLP of ``layers[i]`` where ``active[i]``, runs the others plainly; returns how many are tiled.

    For the memory planner, which decides per decoder layer. Layers without an ``mlp`` child are skipped.
    """
    if len(layers) != len(active):
        raise ValueError(f"{len(layers)} layers but {len(active)} tiling flags")
    tiled = 0
    for layer, on in zip(layers, active, strict=True):
        mlp = layer._modules.get("mlp")
        if not isinstance(mlp, nn.Module):
            continue
        if on and _CHUNK not in mlp.__dict__:
            mlp.__dict__[_INNER] = mlp.__dict__.get("forward")
            mlp.__dict__["forward"] = types.MethodType(_tiled_forward, mlp)
            mlp.__dict__[_SKIP] = mlp_feeds_residual_only(layer)
            mlp.__dict__[_CHUNK] = int(chunk_tokens)
        if _CHUNK in mlp.__dict__:
            mlp.__dict__[_CHUNK] = int(chunk_tokens)
            mlp.__dict__[_ACTIVE] = bool(on)
            tiled += bool(on)
    return tiled


def disable_tiled_mlp(model: nn.Module) -> int:
    """Undoes :func:`enable_tiled_mlp`; returns how many MLPs were restored."""
    restored = 0
    for _, mlp in _decoder_mlps(model):
        if _CHUNK in mlp.__dict__:
            del mlp.__dict__[_CHUNK]
            mlp.__dict__.pop(_SKIP, None)
            mlp.__dict__.pop(_OUT, None)
            mlp.__dict__.pop(_ACTIVE, None)
            inner = mlp.__dict__.pop(_INNER, None)
            if inner is None:
                mlp.__dict__.pop("forward", None)
            else:
                mlp.__dict__["forward"] = inner
            restored += 1
    return restored
