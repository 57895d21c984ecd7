"""Fused lm_head + cross-entropy that never materializes the [tokens x vocab] logits.

Why: at a 128K vocabulary the fp32 logits of 8K tokens alone are 4 GiB, and HF's loss keeps several
copies of them. Here the tokens are processed in chunks: for each chunk the logits come from one
cuBLAS matmul into a reused buffer (in the compute dtype, as HF's lm_head produces them), one Triton
kernel turns every row into its loss and overwrites it in place with d(loss)/d(logits) (fp32 math),
and two more matmuls fold that into the gradients of hidden, weight and bias. The gradients are thus
computed during the forward (the backward only scales them by grad_output), so the extra memory is one
logits chunk. CPU tensors without the Triton interpreter take the same chunked path with torch ops.

Memory, analytically (``extra_memory_bytes``), at 8192 tokens x hidden 2048 x vocab 128256, bf16 hidden and
weight (the kernel benchmark's case), beyond the inputs:
- the gradients, returned as they are (autograd steals them into ``.grad``, no copy): grad_hidden
  8192 x 2048 x 2 B = 32 MiB, grad_weight 128256 x 2048 x 2 B = 501 MiB — not "extra", any loss makes them;
- per-token losses 8192 x 4 B = 32 KiB;
- the one logits chunk, overwritten in place by its gradient: rows x 128256 x 2 B. Rows = the chunk budget
  // (vocab x element size), a multiple of 64. Before: budget 256 MiB -> 1024 rows -> 250.5 MiB
  (0.245 GiB; measured +0.24 GiB). Now: 128 MiB -> 512 rows -> 125.3 MiB (0.122 GiB). Liger 0.8.5 uses
  256 rows (62.6 MiB, measured +0.06 GiB).
Not in that case but in training: an fp32 lm_head under bf16 autocast adds its bf16 copy (vocab x hidden
x 2 B = 501 MiB here) and an fp32 hidden its bf16 copy (32 MiB); grad_weight is then fp32 (1002 MiB, the
gradient itself).
Why not 64 MiB (Liger's memory): every chunk reads and writes all of grad_weight (its K is the chunk's
rows), 2 x 501 MiB per chunk, so 256-row chunks move 32 GB per call and ran at Liger's speed on an H200,
while recomputing the logits to write grad_weight once costs a fourth matmul (+33% FLOPs). The budget is
a keyword (``chunk_bytes``) so ``python -m benchmarks.kernels --ops flce --impls liger,cpt,cpt@64``
measures each point side by side.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from cpt_plugin.kernels._utils import use_triton

# Logits-chunk budget (bytes of the one chunk buffer; fixed, so it does not grow with the token count).
# GPU: 128 MiB is 512 rows at a 128K vocab in bf16. Measured on an H200 at 8192 x 2048 x 128256 bf16,
# forward+backward: 64 MiB 29.8 ms (= Liger's time and memory), 128 MiB 24.1 ms (1.20x Liger), 256 MiB
# 22.4 ms, 512 MiB 20.6 ms (Liger 0.8.5: 28.9 ms with a 61 MiB chunk); smaller chunks make the grad_weight
# addmm inefficient (K = chunk rows). CPU: small, the torch path makes a few fp32 temporaries per chunk.
GPU_CHUNK_BYTES = 128 * 1024 * 1024
CPU_CHUNK_BYTES = 16 * 1024 * 1024
# Larger budgets (larger first) a caller with spare device memory may pass as ``chunk_bytes``: the memory
# planner from what its plan leaves free, and a run without checkpointing from the device's free memory.
# 1 GiB (4,160 rows at a 128K vocabulary in bf16: 8,192 tokens in two chunks) measured 20.7 ms against
# 512 MiB's 21.5 on an H200 (2026-12-04); 2 GiB (one chunk) 20.8 ms, so it is not offered.
LARGER_CHUNK_CHOICES = (1024 * 1024 * 1024, 512 * 1024 * 1024, 256 * 1024 * 1024)
CE_BLOCK = 4096
CE_WARPS = 8


def fused_linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: torch.Tensor | int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Plain PyTorch, the same math as transformers' ForCausalLMLoss / fixed_cross_entropy."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    logits = logits.float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if num_items_in_batch is not None:
        loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        return loss / num_items_in_batch
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)


@triton.jit
def _tanh(x):
    # libdevice tanh fails in the interpreter (ENVIRONMENT.md trap 5); saturates cleanly at +-1.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _ce_rows_kernel(
    logits_ptr,
    stride_row,
    labels_ptr,
    loss_ptr,
    scale_ptr,
    n_cols,
    ignore_index,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per row: loss = lse(z) - z[label]; row <- scale * dloss/dlogits (in place)."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row)
    offs = tl.arange(0, BLOCK)
    loss = 0.0
    if label != ignore_index:
        scale = tl.load(scale_ptr).to(tl.float32)
        # Pass 1: online log-sum-exp over the vocabulary, one block at a time.
        m = -float("inf")
        s = 0.0
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            mask = cols < n_cols
            x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                x = softcap * _tanh(x / softcap)
            x = tl.where(mask, x, -float("inf"))
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        z_t = tl.load(base + label).to(tl.float32)
        if HAS_SOFTCAP:
            z_t = softcap * _tanh(z_t / softcap)
        loss = lse - z_t
        # Pass 2: gradient (softmax - onehot) * scale, times the softcap derivative 1 - tanh^2.
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            mask = cols < n_cols
            x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                t = _tanh(x / softcap)
                g = tl.exp(softcap * t - lse)
                g = tl.where(cols == label, g - 1.0, g) * (1.0 - t * t)
            else:
                g = tl.exp(x - lse)
                g = tl.where(cols == label, g - 1.0, g)
            tl.store(base + cols, (g * scale).to(logits_ptr.dtype.element_ty), mask=mask)
    else:
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            mask = cols < n_cols
            tl.store(base + cols, tl.zeros([BLOCK], dtype=logits_ptr.dtype.element_ty), mask=mask)
    tl.store(loss_ptr + row, loss)


def _ce_chunk_triton(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_rows: torch.Tensor,
    scale: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
) -> None:
    rows, n_cols = logits.shape
    if logits.is_cuda:
        block, warps = min(triton.next_power_of_2(n_cols), CE_BLOCK), CE_WARPS
    else:
        block, warps = 256, 4  # small blocks so the CPU tests walk the vocabulary loop
    _ce_rows_kernel[(rows,)](
        logits,
        logits.stride(0),
        labels,
        loss_rows,
        scale,
        n_cols,
        ignore_index,
        float(softcap) if softcap is not None else 1.0,
        HAS_SOFTCAP=softcap is not None,
        BLOCK=block,
        num_warps=warps,
    )


def _ce_chunk_torch(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_rows: torch.Tensor,
    scale: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
) -> None:
    """Same contract as the Triton kernel, in torch ops (fp32 temporaries of one chunk)."""
    z = logits.float()
    if softcap is not None:
        t = torch.tanh(z / softcap)
        z = softcap * t
    lse = torch.logsumexp(z, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(1)
    z_t = z.gather(1, safe).squeeze(1)
    loss_rows.copy_(torch.where(valid, lse - z_t, torch.zeros_like(lse)))
    g = torch.exp(z - lse.unsqueeze(1))
    g.scatter_add_(1, safe, torch.full_like(z_t, -1.0).unsqueeze(1))
    if softcap is not None:
        g.mul_(1.0 - t * t)
    g.mul_((valid.float() * scale).unsqueeze(1))
    logits.copy_(g)


def _accumulate_grad_weight(grad_weight: torch.Tensor, dlogits: torch.Tensor, x: torch.Tensor) -> None:
    """grad_weight += dlogits^T @ x, with fp32 accumulation inside the matmul whatever the dtypes."""
    if grad_weight.dtype == dlogits.dtype:
        grad_weight.addmm_(dlogits.t(), x)
    elif grad_weight.is_cuda and grad_weight.dtype == torch.float32:
        torch.addmm(grad_weight, dlogits.t(), x, out_dtype=torch.float32, out=grad_weight)
    else:
        grad_weight.addmm_(dlogits.t().to(grad_weight.dtype), x.to(grad_weight.dtype))


def _chunk_rows(
    n_rows: int, n_cols: int, elem_size: int, device: torch.device, chunk_bytes: int | None = None
) -> int:
    """Rows of one logits chunk: as many as fit the budget (default: per device type), a multiple of 64."""
    budget = chunk_bytes or (GPU_CHUNK_BYTES if device.type == "cuda" else CPU_CHUNK_BYTES)
    rows = max(1, budget // max(1, n_cols * elem_size))
    if rows >= 64:
        rows = rows // 64 * 64  # matmul-friendly
    return min(rows, n_rows)


def larger_chunk_for(n_rows: int, n_cols: int, elem_size: int, spare: float) -> tuple[int | None, int]:
    """The largest of ``LARGER_CHUNK_CHOICES`` whose logits chunk holds at most ``spare`` bytes more than the
    default GPU chunk, and those extra bytes; (None, 0): keep the default (no room, or the rows already fit
    one default chunk). Where smaller choices give the same rows (a batch that one chunk holds), the
    smallest of them is named, so the budget reported is the memory the chunk takes."""
    cuda = torch.device("cuda")

    def chunk(budget: int | None) -> int:
        return _chunk_rows(n_rows, n_cols, elem_size, cuda, budget) * n_cols * elem_size

    default = chunk(None)
    options = []
    for choice in LARGER_CHUNK_CHOICES:
        extra = chunk(choice) - default
        if extra <= 0:
            break
        options.append((choice, extra))
    for index, (_choice, extra) in enumerate(options):
        if extra <= spare:
            while index + 1 < len(options) and options[index + 1][1] == extra:
                index += 1
            return options[index]
    return None, 0


def compute_element_size(hidden: torch.Tensor, weight: torch.Tensor) -> int:
    """Bytes per logit in the chunk buffer (the compute dtype: autocast's, else the promoted input dtype)."""
    return torch.empty((), dtype=_compute_dtype(hidden, weight)).element_size()


def extra_memory_bytes(
    n_rows: int,
    hidden_size: int,
    vocab: int,
    compute_dtype: torch.dtype = torch.bfloat16,
    hidden_dtype: torch.dtype | None = None,
    weight_dtype: torch.dtype | None = None,
    device: torch.device | str = "cuda",
    chunk_bytes: int | None = None,
) -> dict[str, int]:
    """Bytes the function allocates beyond its inputs and the gradients it returns (see the docstring)."""
    elem = torch.empty((), dtype=compute_dtype).element_size()
    rows = _chunk_rows(n_rows, vocab, elem, torch.device(device), chunk_bytes)
    parts = {"logits_chunk": rows * vocab * elem, "loss_rows": n_rows * 4}
    if (hidden_dtype or compute_dtype) != compute_dtype:
        parts["hidden_cast"] = n_rows * hidden_size * elem
    if (weight_dtype or compute_dtype) != compute_dtype:
        parts["weight_cast"] = vocab * hidden_size * elem
    parts["total"] = sum(parts.values())
    return parts


def _scale_factor(
    labels: torch.Tensor, ignore_index: int, reduction: str, num_items_in_batch: torch.Tensor | int | None
) -> torch.Tensor:
    """The factor from the summed loss to the returned loss, as a 1-element fp32 device tensor (no sync)."""
    device = labels.device
    if num_items_in_batch is not None:
        n = torch.as_tensor(num_items_in_batch, device=device).to(torch.float32).reshape(1)
        return 1.0 / n
    if reduction == "sum":
        return torch.ones(1, dtype=torch.float32, device=device)
    n_valid = (labels != ignore_index).sum().to(torch.float32).reshape(1)
    return 1.0 / n_valid.clamp(min=1.0)


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _forward_with_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    scale: torch.Tensor,
    softcap: float | None,
    dtype: torch.dtype,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
    chunk_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    n_rows = hidden.shape[0]
    n_cols = weight.shape[0]
    x_all = hidden.to(dtype)
    w = weight.to(dtype)
    b = bias.to(dtype) if bias is not None else None
    labels = labels.contiguous()
    device = hidden.device
    ce_chunk = _ce_chunk_triton if use_triton(hidden) else _ce_chunk_torch

    grad_hidden = (
        torch.empty((n_rows, hidden.shape[1]), dtype=dtype, device=device) if need_grad_hidden else None
    )
    grad_weight = None
    if need_grad_weight:
        grad_weight = torch.empty_like(weight) if weight.dtype == dtype else torch.zeros_like(weight)
    grad_bias = torch.zeros(n_cols, dtype=torch.float32, device=device) if need_grad_bias else None
    loss_rows = torch.empty(n_rows, dtype=torch.float32, device=device)
    chunk = _chunk_rows(n_rows, n_cols, w.element_size(), device, chunk_bytes)
    buffer = torch.empty((chunk, n_cols), dtype=dtype, device=device)

    for start in range(0, n_rows, chunk):
        end = min(start + chunk, n_rows)
        x = x_all[start:end]
        logits = buffer[: end - start]
        if b is not None:
            torch.addmm(b, x, w.t(), out=logits)
        else:
            torch.mm(x, w.t(), out=logits)
        ce_chunk(logits, labels[start:end], loss_rows[start:end], scale, ignore_index, softcap)
        if grad_hidden is not None:
            torch.mm(logits, w, out=grad_hidden[start:end])
        if grad_weight is not None:
            if start == 0 and grad_weight.dtype == dtype:
                torch.mm(logits.t(), x, out=grad_weight)  # first chunk: no zero-fill, no read of grad_weight
            else:
                _accumulate_grad_weight(grad_weight, logits, x)
        if grad_bias is not None:
            grad_bias.add_(logits.sum(dim=0, dtype=torch.float32))

    # Not a view (no squeeze): the Trainer scales the returned loss in place (`loss *= world size`), which
    # autograd forbids on a view made inside a custom Function.
    loss = loss_rows.sum() * scale.reshape(())
    if grad_hidden is not None and grad_hidden.dtype != hidden.dtype:
        grad_hidden = grad_hidden.to(hidden.dtype)
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    return loss, grad_hidden, grad_weight, grad_bias


def _run(hidden, weight, labels, bias, ignore_index, scale, softcap, dtype, needs):
    # needs: (grad of hidden?, grad of weight?, grad of bias?, chunk_bytes)
    # Our matmuls pick their dtype explicitly; autocast would re-cast the weight on every chunk.
    with torch.autocast(hidden.device.type, enabled=False):
        return _forward_with_grads(hidden, weight, labels, bias, ignore_index, scale, softcap, dtype, *needs)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, ignore_index, scale, softcap, dtype, needs):
        loss, gh, gw, gb = _run(hidden, weight, labels, bias, ignore_index, scale, softcap, dtype, needs)
        ctx.grads = (gh, gw, gb)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        gh, gw, gb = ctx.grads
        ctx.grads = None  # the gradients are scaled in place: a second backward would be wrong
        if gh is None and gw is None and gb is None:
            raise RuntimeError(
                "fused_linear_cross_entropy: backward called twice (use retain_graph only once)"
            )
        # Always scaled, never tested for 1 first: reading the value would make the host wait for the
        # whole forward on the GPU before it could queue any of backward (about 17 ms of a Llama-1B step
        # on an H200); the multiply costs a fraction of a millisecond.
        for g in (gh, gw, gb):
            if g is not None:
                g.mul_(grad_output.to(g.dtype))
        return gh, gw, None, gb, None, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: torch.Tensor | int | None = None,
    softcap: float | None = None,
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T (+ bias)` against `labels` without the full logits.

    hidden [N, H] (already shifted and flattened), weight [V, H], labels [N] int64. Same result as
    `fused_linear_cross_entropy_reference`: mean over non-ignored tokens (0 when all are ignored),
    "sum", or sum / num_items_in_batch when that is given (transformers' convention).
    ``chunk_bytes`` overrides the logits-chunk budget (GPU_CHUNK_BYTES / CPU_CHUNK_BYTES): memory for speed.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or labels.dim() != 1 or hidden.shape[0] != labels.shape[0]:
        raise ValueError(
            f"expected hidden [N, H], weight [V, H], labels [N]; got {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)}, {tuple(labels.shape)}"
        )
    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    labels = labels.to(hidden.device)
    scale = _scale_factor(labels, ignore_index, reduction, num_items_in_batch)
    dtype = _compute_dtype(hidden, weight)  # decided here, where the caller's autocast is still visible
    if chunk_bytes is not None and chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be a positive number of bytes, got {chunk_bytes!r}")
    plan = (*needs, chunk_bytes)
    if not any(needs):
        with torch.no_grad():
            return _run(hidden, weight, labels, bias, ignore_index, scale, softcap, dtype, plan)[0]
    return _FusedLinearCrossEntropy.apply(
        hidden, weight, labels, bias, ignore_index, scale, softcap, dtype, plan
    )
