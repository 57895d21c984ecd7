"""bitsandbytes' AdamW8bit, stepped in a few kernel launches per parameter group instead of one per tensor.

Why: ``bnb.optim.AdamW8bit.step`` launches one update per parameter and then synchronizes the device
(``torch.cuda.synchronize()`` after every tensor). A QLoRA model has hundreds of LoRA factors (448 on
Mistral-7B at every linear layer), so the step is bound by the host: 30 ms of a 725 ms Mistral-7B step at
1 x 8192 tokens on an H200, the device idle meanwhile. Here the 8-bit states of a group live in flat
buffers; small tensors are updated in chunks (their gradients and values gathered into a 32 MiB scratch
pair by ``_foreach_copy_``, one blockwise update, the values copied back) and large ones in place, one
launch each. Nothing waits for the device.

The result is bitwise bitsandbytes' own: its update is independent per 256-element block, and every
tensor starts on a block boundary (its segment padded with zero gradients and states of zero, which stay
below every real block maximum). The optimizer state keeps bitsandbytes' per-parameter layout
(``state1``, ``absmax1``... are views into the flat buffers), so checkpoints load in plain bitsandbytes and
plain bitsandbytes checkpoints load here.
Tensors this path does not take (on the CPU, 32-bit states below ``min_8bit_size``, per-parameter
overrides, paged or ``max_unorm`` set-ups) get bitsandbytes' own per-tensor update, without the
synchronization.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import bitsandbytes as bnb
import bitsandbytes.functional as F
import torch

BLOCK = 256  # bitsandbytes' block size for blockwise 8-bit optimizer states
# Where launches and synchronizations cost: on the CPU the per-tensor update neither launches nor waits,
# and the gather would only add copies (15% slower at Mistral-7B's LoRA shapes on two cores).
FLAT_DEVICE_TYPES = ("cuda", "xpu")
CHUNK_BYTES = 32 << 20  # one scratch buffer (gradients or values) of a chunk of small tensors

_STATE_KEYS = ("state1", "state2", "absmax1", "absmax2")


def _padded(numel: int) -> int:
    return -(-numel // BLOCK) * BLOCK


@dataclass
class _Chunk:
    """Consecutive tensors of a batch: ``length`` padded elements from ``start`` in the flat states.

    ``direct``: one tensor large enough to be updated in place (no gather). Otherwise its tensors'
    gradients and values are gathered into views of the batch's scratch pair, updated there in one
    launch, and the values copied back."""

    start: int
    length: int
    params: list[torch.Tensor]
    direct: bool = False
    states: dict[str, torch.Tensor] = field(default_factory=dict)  # the flat states of the chunk
    grad_views: list[torch.Tensor] = field(default_factory=list)
    param_views: list[torch.Tensor] = field(default_factory=list)
    grad: torch.Tensor | None = None  # the scratch slices the chunk's launch reads and updates
    values: torch.Tensor | None = None


@dataclass
class _FlatBatch:
    """Same-device, same-dtype 8-bit tensors of a group whose states live in one set of flat buffers."""

    states: list[dict]
    chunks: list[_Chunk]
    state1_views: list[torch.Tensor]  # what each tensor's state["state1"] is while the batch owns it

    def owns_its_states(self) -> bool:
        """Whether the parameters' states still point into these buffers (a load or a re-plan replaces
        them all at once, so the first state view of each tensor tells)."""
        return all(
            state["state1"] is view for state, view in zip(self.states, self.state1_views, strict=True)
        )


@dataclass
class _GroupPlan:
    """How one step updates a group: its flat batches, and the tensors left to bitsandbytes' own update."""

    batches: list[_FlatBatch]
    others: list[int]  # indices into the group's params

    def valid(self) -> bool:
        return all(batch.owns_its_states() for batch in self.batches)


def _zero_code(qmap: torch.Tensor) -> int:
    return int(qmap.abs().argmin())


def _layout(params: list[torch.Tensor], chunk_elements: int) -> list[_Chunk]:
    """Chunks over ``params`` laid out one after the other, each tensor padded to whole blocks."""
    chunks: list[_Chunk] = []
    offset = 0
    current: _Chunk | None = None
    for p in params:
        size = _padded(p.numel())
        if size >= chunk_elements // 2:
            chunks.append(_Chunk(offset, size, [p], direct=True))
            current = None
        elif current is not None and current.length + size <= chunk_elements:
            current.params.append(p)
            current.length += size
        else:
            current = _Chunk(offset, size, [p])
            chunks.append(current)
        offset += size
    return chunks


def _build_batch(params: list[torch.Tensor], states: list[dict]) -> _FlatBatch:
    """Flat states for ``params`` with the existing states copied in; the states then point into them."""
    device, dtype = params[0].device, params[0].dtype
    sizes = [_padded(p.numel()) for p in params]
    total = sum(sizes)
    flat = {  # the padding holds each map's code of 0.0 (byte 0 is -1.0 in the signed map)
        "state1": torch.full((total,), _zero_code(states[0]["qmap1"]), dtype=torch.uint8, device=device),
        "state2": torch.full((total,), _zero_code(states[0]["qmap2"]), dtype=torch.uint8, device=device),
        "absmax1": torch.zeros(total // BLOCK, dtype=torch.float32, device=device),
        "absmax2": torch.zeros(total // BLOCK, dtype=torch.float32, device=device),
    }
    offset = 0
    for p, size, state in zip(params, sizes, states, strict=True):
        n, blocks = p.numel(), slice(offset // BLOCK, (offset + size) // BLOCK)
        views = {
            "state1": flat["state1"][offset : offset + n].view(p.shape),
            "state2": flat["state2"][offset : offset + n].view(p.shape),
            "absmax1": flat["absmax1"][blocks],
            "absmax2": flat["absmax2"][blocks],
        }
        for key, view in views.items():
            view.copy_(
                state[key].reshape(view.shape)
                if key.startswith("state")
                else state[key].reshape(-1)[: view.numel()]
            )
            state[key] = view
        offset += size

    chunks = _layout(params, max(BLOCK, CHUNK_BYTES // params[0].element_size()))
    scratch = max((c.length for c in chunks if not c.direct), default=0)
    scratch_grad = torch.zeros(scratch, dtype=dtype, device=device)
    scratch_param = torch.zeros(scratch, dtype=dtype, device=device)
    by_param = {id(p): state for p, state in zip(params, states, strict=True)}
    for chunk in chunks:
        end = chunk.start + chunk.length
        if chunk.direct:
            chunk.states = {key: by_param[id(chunk.params[0])][key] for key in _STATE_KEYS}  # shaped as p
            continue
        chunk.states = {
            "state1": flat["state1"][chunk.start : end],
            "state2": flat["state2"][chunk.start : end],
            "absmax1": flat["absmax1"][chunk.start // BLOCK : end // BLOCK],
            "absmax2": flat["absmax2"][chunk.start // BLOCK : end // BLOCK],
        }
        chunk.grad, chunk.values = scratch_grad[: chunk.length], scratch_param[: chunk.length]
        local = 0
        for p in chunk.params:
            chunk.grad_views.append(scratch_grad[local : local + p.numel()].view(p.shape))
            chunk.param_views.append(scratch_param[local : local + p.numel()].view(p.shape))
            local += _padded(p.numel())
    return _FlatBatch(list(states), chunks, [state["state1"] for state in states])


class BatchedAdamW8bit(bnb.optim.AdamW8bit):
    """``bnb.optim.AdamW8bit`` with the same arguments, state and results, stepped in chunks, not per tensor."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._plans: dict[tuple, _GroupPlan] = {}  # (group index, ids of the tensors with gradients)

    def load_state_dict(self, state_dict, move_to_device: bool = True) -> None:
        super().load_state_dict(state_dict, move_to_device=move_to_device)
        self._plans = {}  # the loaded states are copied into fresh flat buffers at the next step

    def _flat_eligible(self, p: torch.Tensor, state: dict, gindex: int, pindex: int) -> bool:
        return (
            state["state1"].dtype == torch.uint8
            and p.device.type in FLAT_DEVICE_TYPES
            and type(p.data) is torch.Tensor  # not a DTensor or another subclass
            and p.grad.dtype == p.dtype
            and (gindex, pindex) not in self.mng.index2config
            and id(p) not in self.mng.pid2config
        )

    def _plan(self, gindex: int, group: dict, indices: list[int]) -> _GroupPlan:
        """Batches the group's tensors with gradients by device, dtype and step count (a tensor without a
        gradient in some step is one step behind the others)."""
        self._plans = {key: plan for key, plan in self._plans.items() if key[0] != gindex}  # stale now
        batches: dict[tuple, list[int]] = {}
        others = []
        for pindex in indices:
            p = group["params"][pindex]
            state = self.state[p]
            if len(state) == 0:
                self.init_state(group, p, gindex, pindex)
            if self._flat_eligible(p, state, gindex, pindex):
                batches.setdefault((p.device, p.dtype, state["step"]), []).append(pindex)
            else:
                others.append(pindex)
        flat = []
        for members in batches.values():
            params = [group["params"][i] for i in members]
            flat.append(_build_batch(params, [self.state[p] for p in params]))
        return _GroupPlan(flat, others)

    @torch.no_grad()
    def step(self, closure=None):
        if self.is_paged or self.args.max_unorm > 0.0:
            return super().step(closure)  # paged memory needs bitsandbytes' synchronization
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        for gindex, group in enumerate(self.param_groups):
            indices = [i for i, p in enumerate(group["params"]) if p.grad is not None]
            key = (gindex, *(id(group["params"][i]) for i in indices))
            plan = self._plans.get(key)
            if plan is None or not plan.valid():
                plan = self._plans[key] = self._plan(gindex, group, indices)
            for batch in plan.batches:
                self._step_batch(group, batch)
            for pindex in plan.others:
                self.update_step(group, group["params"][pindex], gindex, pindex)  # bitsandbytes' own
        return loss

    def _step_batch(self, group: dict, batch: _FlatBatch) -> None:
        step = batch.states[0]["step"] + 1
        for chunk in batch.chunks:
            if chunk.direct:
                p = chunk.params[0]
                if not p.is_contiguous():
                    p.data = p.data.contiguous()
                grad, values = p.grad.contiguous(), p
            else:
                grad, values = chunk.grad, chunk.values
                grad.zero_()  # the padding between tensors: zero gradients keep its states at zero
                torch._foreach_copy_(chunk.grad_views, [p.grad for p in chunk.params])
                torch._foreach_copy_(chunk.param_views, chunk.params)
            self._update(group, grad, values, chunk.states, batch.states[0], step)
            if not chunk.direct:
                torch._foreach_copy_(chunk.params, chunk.param_views)
        for state in batch.states:
            state["step"] = step

    def _update(self, group, grad, values, states, state0, step: int) -> None:
        betas = group["betas"]
        F.optimizer_update_8bit_blockwise(
            self.optimizer_name,
            grad,
            values,
            states["state1"],
            states["state2"],
            betas[0],
            betas[1],
            betas[2] if len(betas) >= 3 else 0.0,
            group.get("alpha", 0.0),
            group["eps"],
            step,
            group["lr"],
            state0["qmap1"],
            state0["qmap2"],
            states["absmax1"],
            states["absmax2"],
            group["weight_decay"],
            gnorm_scale=1.0,
            skip_zeros=self.args.skip_zeros,
        )
