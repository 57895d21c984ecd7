"""BatchedAdamW8bit against bitsandbytes' own AdamW8bit: the same bits, one update launch per group, no
device synchronization, and checkpoints that load both ways."""

from __future__ import annotations

import io

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from cpt_plugin import optim_8bit  # noqa: E402
from cpt_plugin.optim_8bit import BatchedAdamW8bit  # noqa: E402

# Sizes off the 256-element blocks (a partial last block), one below min_8bit_size (32-bit states), bf16
# and fp32 in one group (two flat batches), and LoRA-like factors.
SHAPES = [((37, 131), torch.float32), ((8, 512), torch.float32), ((3, 5), torch.float32),
          ((40, 110), torch.float32), ((50, 90), torch.float32),
          ((64, 97), torch.bfloat16), ((129, 33), torch.float32)]  # fmt: skip
FIRST_GROUP = 5


@pytest.fixture(autouse=True)
def _flat_path_on_the_cpu(monkeypatch):
    """The flat path runs on accelerators only; the CPU tests take it too, to check its bits here."""
    monkeypatch.setattr(optim_8bit, "FLAT_DEVICE_TYPES", ("cuda", "xpu", "cpu"))


def _params(seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype)) for shape, dtype in SHAPES]


def _groups(params):
    return [
        {"params": params[:FIRST_GROUP], "lr": 1e-2, "weight_decay": 0.01},
        {"params": params[FIRST_GROUP:], "lr": 3e-3, "weight_decay": 0.0},
    ]


def _set_grads(params, step: int, skip: int | None = None) -> None:
    gen = torch.Generator().manual_seed(1000 + step)
    for index, p in enumerate(params):
        grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        p.grad = None if index == skip else grad


def _run(optimizer_cls, steps: range, params=None, optimizer=None, skip_at=None):
    params = params if params is not None else _params(0)
    optimizer = optimizer or optimizer_cls(_groups(params), betas=(0.9, 0.995), eps=1e-8)
    for step in steps:
        _set_grads(params, step, skip=1 if step == skip_at else None)
        optimizer.step()
    return params, optimizer


def _assert_same(params_a, params_b, opt_a, opt_b) -> None:
    for a, b in zip(params_a, params_b, strict=True):
        assert torch.equal(a.detach(), b.detach())
        for key, value in opt_b.state[b].items():
            other = opt_a.state[a][key]
            assert torch.equal(torch.as_tensor(other), torch.as_tensor(value)), key


# The default (every small tensor of a batch in one chunk); several chunks in a batch; chunks next to
# tensors updated in place; every fp32 tensor in place.
@pytest.mark.parametrize("chunk_bytes", [32 << 20, 48 << 10, 36 << 10, 16 << 10])
def test_bitwise_bitsandbytes_over_steps_with_a_tensor_skipped(monkeypatch, chunk_bytes):
    monkeypatch.setattr(optim_8bit, "CHUNK_BYTES", chunk_bytes)
    reference, ref_opt = _run(bnb.optim.AdamW8bit, range(4), skip_at=2)
    batched, opt = _run(BatchedAdamW8bit, range(4), skip_at=2)
    _assert_same(batched, reference, opt, ref_opt)
    assert opt.state[batched[1]]["step"] == 3 and opt.state[batched[0]]["step"] == 4
    assert opt.state[batched[2]]["state1"].dtype == torch.float32  # below min_8bit_size: 32-bit states


def test_on_the_cpu_by_default_each_tensor_takes_bitsandbytes_own_update(monkeypatch):
    import bitsandbytes.functional as F

    monkeypatch.setattr(optim_8bit, "FLAT_DEVICE_TYPES", ("cuda", "xpu"))
    updates = []
    real = F.optimizer_update_8bit_blockwise
    monkeypatch.setattr(
        F, "optimizer_update_8bit_blockwise", lambda *a, **k: (updates.append(1), real(*a, **k))
    )
    reference, ref_opt = _run(bnb.optim.AdamW8bit, range(2))
    updates.clear()
    batched, opt = _run(BatchedAdamW8bit, range(2))
    assert len(updates) == 2 * 6  # six 8-bit tensors, one update each per step
    _assert_same(batched, reference, opt, ref_opt)


def test_chunks_gather_small_tensors_and_leave_large_ones_in_place():
    params = [torch.empty(shape) for shape in [(37, 131), (8, 512), (40, 110), (50, 90)]]

    def layout(chunk_elements):
        chunks = optim_8bit._layout(params, chunk_elements)
        index = {id(p): i for i, p in enumerate(params)}
        return [(c.start, c.length, [index[id(p)] for p in c.params], c.direct) for c in chunks]

    assert layout(12288) == [(0, 8960, [0, 1], False), (8960, 9216, [2, 3], False)]
    assert layout(9216) == [(0, 4864, [0], True), (4864, 4096, [1], False), (8960, 4608, [2], True),
                            (13568, 4608, [3], True)]  # fmt: skip


def test_one_update_per_flat_batch_and_no_device_sync(monkeypatch):
    import bitsandbytes.functional as F
    import bitsandbytes.optim.optimizer as bnb_optimizer

    syncs, updates = [], []
    monkeypatch.setattr(bnb_optimizer, "sync_gpu", lambda t: syncs.append(t))
    real = F.optimizer_update_8bit_blockwise
    monkeypatch.setattr(
        F, "optimizer_update_8bit_blockwise", lambda *a, **k: (updates.append(a[1].numel()), real(*a, **k))
    )
    _run(BatchedAdamW8bit, range(2))
    # per step: group 1's four 8-bit fp32 tensors in one chunk; group 2: a bf16 batch and an fp32 batch
    padded_first_group = (19 + 16 + 18 + 18) * 256  # each tensor padded to whole blocks
    assert len(updates) == 2 * 3 and updates[:3] == [padded_first_group, 25 * 256, 17 * 256]
    assert syncs == []


def _saved(optimizer) -> dict:
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize(("first", "second"), [(BatchedAdamW8bit, BatchedAdamW8bit),
                                               (BatchedAdamW8bit, bnb.optim.AdamW8bit),
                                               (bnb.optim.AdamW8bit, BatchedAdamW8bit)])  # fmt: skip
def test_a_checkpoint_resumes_exactly_across_both_optimizers(first, second):
    straight, straight_opt = _run(bnb.optim.AdamW8bit, range(5))
    params, opt = _run(first, range(3))
    state = _saved(opt)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed_opt = second(_groups(resumed), betas=(0.9, 0.995), eps=1e-8)
    resumed_opt.load_state_dict(state)
    _run(second, range(3, 5), params=resumed, optimizer=resumed_opt)
    _assert_same(resumed, straight, resumed_opt, straight_opt)


def test_parameters_changed_outside_the_optimizer_are_read_each_step():
    """The flat parameter buffer is a scratch copy: an edit between steps (a loaded checkpoint, a merge)
    is what the next update starts from."""
    reference, ref_opt = _run(bnb.optim.AdamW8bit, range(2))
    batched, opt = _run(BatchedAdamW8bit, range(2))
    with torch.no_grad():
        for a, b in zip(reference, batched, strict=True):
            a.mul_(0.5)
            b.mul_(0.5)
    _run(bnb.optim.AdamW8bit, range(2, 4), params=reference, optimizer=ref_opt)
    _run(BatchedAdamW8bit, range(2, 4), params=batched, optimizer=opt)
    _assert_same(batched, reference, opt, ref_opt)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bitwise_bitsandbytes_on_cuda_at_lora_shapes():
    shapes = [(32, 4096), (4096, 32), (32, 14336), (14336, 32), (32, 1000), (2047, 1501)]  # last: in place
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen) for s in shapes]
    runs = []
    for cls in (bnb.optim.AdamW8bit, BatchedAdamW8bit):
        params = [torch.nn.Parameter(t.clone().cuda()) for t in base]
        optimizer = cls(params, lr=1e-3)
        for step in range(3):
            g = torch.Generator().manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).cuda()
            optimizer.step()
        runs.append((params, optimizer))
    (ref, ref_opt), (ours, opt) = runs
    _assert_same(ours, ref, opt, ref_opt)
