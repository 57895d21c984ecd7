"""4-bit dequantization: the Triton kernel vs its reference and vs bitsandbytes, and the routing of
cpt_plugin.quantized.dequantize_4bit (kernel for the standard layout, the old path for the CPU-repacked one).

On the CPU the kernel runs through the interpreter (tests/conftest.py sets TRITON_INTERPRET=1). The CPU
``quantize_4bit`` of bitsandbytes 0.50.2 (its pure-PyTorch default backend) writes the same layout as CUDA:
flat row-major codes, high nibble first, blocks that run across rows. Its native CPU ``dequantize_4bit``
(AVX512 build) does not read that layout back when a row's length is not a multiple of the block size
(e.g. 16×48 at blocksize 64 came out with 2x the quantization error); there the kernel is checked against
the quantization bound of the original weight instead, and against bitsandbytes on CUDA by the GPU test.
"""

from __future__ import annotations

from math import prod

import pytest
import torch

from cpt_plugin.kernels import nf4
from cpt_plugin.kernels._utils import use_triton
from cpt_plugin.kernels.nf4 import dequantize_4bit_reference, dequantize_4bit_triton, unsupported_reason
from tests.kernel_math._helpers import DTYPES

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")
# The CPU tests run the kernel through the interpreter; a GPU machine (no TRITON_INTERPRET) runs the GPU ones.
interpreted = pytest.mark.skipif(
    not use_triton(torch.empty(0)), reason="CPU kernel tests need TRITON_INTERPRET=1 (tests/conftest.py)"
)

SHAPES = [(96, 200), (64, 64), (33, 64), (256, 384), (7, 9)]


def _quantize(shape, blocksize=64, quant_type="nf4", nested=True, dtype=torch.float32, device="cpu", **kw):
    weight = torch.randn(*shape, device=device).to(dtype)
    packed, state = F.quantize_4bit(
        weight, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested, **kw
    )
    return weight, packed, state


def _bnb_reads_it_on_cpu(shape, blocksize: int) -> bool:
    """Where bitsandbytes' native CPU dequantize agrees with its own quantize (see the module docstring)."""
    return len(shape) == 1 or shape[-1] % blocksize == 0 or shape[0] == 1


def _bnb(packed, state, dtype):
    """bitsandbytes' own dequantization, asked for ``dtype`` directly (quant_state.dtype is the output's)."""
    original = state.dtype
    state.dtype = dtype
    try:
        return F.dequantize_4bit(packed, state)
    finally:
        state.dtype = original


@interpreted
def test_layout_high_nibble_first():
    """Element 2i is byte i's high nibble: values on the NF4 grid with absmax 1 come back as their codes."""
    code = F.get_4bit_type("nf4", device="cpu")
    codes = torch.tensor([15, 0, 3, 12, 7, 9] + [15] * 58)
    packed, state = F.quantize_4bit(code[codes].reshape(1, 64), blocksize=64, quant_type="nf4")
    assert packed.dtype == torch.uint8 and packed.shape == (32, 1)
    assert packed.flatten()[:3].tolist() == [(15 << 4) | 0, (3 << 4) | 12, (7 << 4) | 9]
    assert torch.equal(dequantize_4bit_triton(packed, state, torch.float32), code[codes].reshape(1, 64))


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nested", [False, True], ids=["fp32_absmax", "nested"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_is_the_reference_and_bitsandbytes(shape, quant_type, nested, dtype):
    """Bit-exact in every output dtype: both compute code x absmax in fp32 and round once."""
    weight, packed, state = _quantize(shape, quant_type=quant_type, nested=nested)
    got = dequantize_4bit_triton(packed, state, dtype)
    want = dequantize_4bit_reference(packed, state, dtype)
    assert got.dtype == dtype and got.shape == shape
    assert torch.equal(got, want)
    if _bnb_reads_it_on_cpu(shape, state.blocksize):
        assert torch.equal(want, _bnb(packed, state, dtype))


@interpreted
@pytest.mark.parametrize("blocksize", nf4.BLOCKSIZES)
@pytest.mark.parametrize("shape", [(33, 64), (96, 200), (3, 5)], ids=lambda s: "x".join(map(str, s)))
def test_every_blocksize_and_partial_blocks(shape, blocksize):
    """All of bitsandbytes' block sizes, with a last block that is partial (and an odd element count)."""
    for nested in (False, True):
        weight, packed, state = _quantize(shape, blocksize=blocksize, nested=nested)
        got = dequantize_4bit_triton(packed, state, torch.float32)
        assert torch.equal(got, dequantize_4bit_reference(packed, state, torch.float32))
        if _bnb_reads_it_on_cpu(shape, blocksize):
            assert torch.equal(got, _bnb(packed, state, torch.float32))
        if not nested:
            _assert_within_quantization_error(got, weight, blocksize, state.code)


def _assert_within_quantization_error(got, weight, blocksize, code):
    """|w - dequantized| <= half the widest gap of the code grid x the block's absmax (fp32 absmax)."""
    flat = weight.float().reshape(-1)
    n = flat.numel()
    padded = torch.nn.functional.pad(flat, (0, -n % blocksize))
    absmax = padded.reshape(-1, blocksize).abs().amax(1).repeat_interleave(blocksize)[:n]
    half_gap = code.sort().values.diff().max() / 2
    err = (got.reshape(-1) - flat).abs()
    assert (err <= absmax * half_gap * (1 + 1e-5)).all()


@interpreted
def test_where_bitsandbytes_cpu_kernel_disagrees_ours_stays_within_the_quantization_error():
    shape, blocksize = (16, 48), 64
    weight, packed, state = _quantize(shape, blocksize=blocksize, nested=False)
    assert not _bnb_reads_it_on_cpu(shape, blocksize)
    _assert_within_quantization_error(
        dequantize_4bit_triton(packed, state, torch.float32), weight, 64, state.code
    )


@interpreted
@pytest.mark.parametrize(
    "target_bytes,shape,blocksize",
    [(16, (7, 9), 32), (64, (33, 64), 128), (96, (33, 64), 64), (256, (96, 200), 64)],
    ids=["1_block_odd", "1_block_partial", "2_blocks_odd_count", "8_blocks_two_nested_scales"],
)
def test_many_programs_and_tails(monkeypatch, target_bytes, shape, blocksize):
    """Small programs (1-8 blocks each, not dividing the block count; 300 blocks span two of the nested
    absmax's scales): every tail mask and the nested lookup across programs are exercised."""
    monkeypatch.setattr(nf4, "_INTERPRETER_TARGET_BYTES", target_bytes)
    nf4._blocks_per_program.cache_clear()
    try:
        _, packed, state = _quantize(shape, blocksize=blocksize, nested=True)
        assert triton_programs(state) > 1
        for dtype in (torch.float32, torch.bfloat16):
            got = dequantize_4bit_triton(packed, state, dtype)
            assert torch.equal(got, dequantize_4bit_reference(packed, state, dtype)), dtype
    finally:
        nf4._blocks_per_program.cache_clear()


def triton_programs(state) -> int:
    return -(-state.absmax.numel() // nf4._blocks_per_program(state.blocksize, "cpu"))


@interpreted
def test_bf16_weight_and_bf16_quant_storage():
    """A bf16 weight (quant_state.dtype bf16) whose codes bitsandbytes stores in a bf16 tensor (FSDP)."""
    _, packed, state = _quantize((64, 128), dtype=torch.bfloat16, quant_storage=torch.bfloat16)
    assert packed.dtype == torch.bfloat16 and state.dtype == torch.bfloat16
    got = dequantize_4bit_triton(packed, state, torch.bfloat16)
    assert torch.equal(got, F.dequantize_4bit(packed, state))


@interpreted
def test_unsupported_inputs_say_why():
    _, packed, state = _quantize((32, 64))
    assert unsupported_reason(packed, state, torch.bfloat16) is None
    assert "dtype" in unsupported_reason(packed, state, torch.float64)
    assert "packed bytes" in unsupported_reason(packed[:-1], state, torch.float32)
    with pytest.raises(ValueError, match="cannot read"):
        dequantize_4bit_triton(packed, state, torch.float64)


# -- cpt_plugin.quantized.dequantize_4bit: which path ----------------------------------------------
def _linear4bit(out_features=96, in_features=64, compute_dtype=torch.float32, quant_type="nf4", nested=True):
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    layer = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=False,
        compute_dtype=compute_dtype,
        quant_type=quant_type,
        compress_statistics=nested,
    )
    layer.weight = bnb.nn.Params4bit(
        linear.weight.data, requires_grad=False, quant_type=quant_type, compress_statistics=nested
    )
    try:
        layer.weight = layer.weight.to("cpu")
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"bitsandbytes cannot quantize on this CPU: {exc}")
    return layer


@pytest.fixture
def calls(monkeypatch):
    """Counts of the kernel and of bitsandbytes' dequantize_4bit as dequantize_4bit calls them."""
    seen = {"triton": [], "bnb": 0}
    kernel, bnb_dequantize = nf4.dequantize_4bit_checked, F.dequantize_4bit

    def spy_kernel(packed, state, dtype):
        seen["triton"].append(dtype)
        return kernel(packed, state, dtype)

    def spy_bnb(*args, **kwargs):
        seen["bnb"] += 1
        return bnb_dequantize(*args, **kwargs)

    monkeypatch.setattr(nf4, "dequantize_4bit_checked", spy_kernel)
    monkeypatch.setattr(F, "dequantize_4bit", spy_bnb)
    return seen


@interpreted
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_standard_layout_takes_the_kernel_in_the_requested_dtype(calls, quant_type, nested):
    from cpt_plugin.quantized import dequantize_4bit

    weight = _linear4bit(quant_type=quant_type, nested=nested).weight
    state = weight.quant_state
    assert state.dtype == torch.float32 and not getattr(state, "packing_format_for_cpu", False)
    full = dequantize_4bit(weight)
    assert full.dtype == torch.float32 and calls["triton"] == [torch.float32] and calls["bnb"] == 0
    assert torch.equal(full, F.dequantize_4bit(weight.data, state))
    half = dequantize_4bit(weight, torch.bfloat16)
    assert half.dtype == torch.bfloat16 and calls["triton"][-1] == torch.bfloat16
    assert torch.equal(half, full.to(torch.bfloat16))  # one rounding from fp32 either way


@interpreted
def test_a_weight_is_checked_once_per_dtype(calls, monkeypatch):
    """The layout checks cost more host time than the launch: their answer stays with the weight."""
    from cpt_plugin import quantized

    checks = []
    real = nf4.unsupported_reason
    monkeypatch.setattr(nf4, "unsupported_reason", lambda *a: checks.append(a[2]) or real(*a))
    weight = _linear4bit().weight
    for _ in range(3):
        quantized.dequantize_4bit(weight, torch.bfloat16)
    quantized.dequantize_4bit(weight, torch.float32)
    assert checks == [torch.bfloat16, torch.float32]
    assert calls["triton"] == [torch.bfloat16] * 3 + [torch.float32]


def test_without_triton_the_bitsandbytes_path_then_one_cast(calls, monkeypatch):
    from cpt_plugin.quantized import dequantize_4bit

    weight = _linear4bit().weight
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as on a plain CPU: use_triton() says no
    got = dequantize_4bit(weight, torch.bfloat16)
    assert calls["triton"] == [] and calls["bnb"] == 1 and got.dtype == torch.bfloat16
    assert torch.equal(got, F.dequantize_4bit(weight.data, weight.quant_state).to(torch.bfloat16))
    assert dequantize_4bit(weight, torch.float64).dtype == torch.float64  # no kernel dtype: old path


@interpreted
def test_cpu_repacked_layout_keeps_the_old_path(calls):
    """After an eval forward without gradients on an AVX512-BF16 CPU, bitsandbytes repacks the weight for
    its CPU kernel; that layout is read by the existing code, never by the kernel."""
    from cpt_plugin.quantized import dequantize_4bit

    layer = _linear4bit(compute_dtype=torch.bfloat16, out_features=64, in_features=128)
    want = dequantize_4bit(layer.weight, torch.float32)
    assert calls["triton"] == [torch.float32]
    with torch.no_grad():
        layer.eval()(torch.randn(3, 128, dtype=torch.bfloat16))
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16 (or bitsandbytes no longer repacks): nothing to read")
    got = dequantize_4bit(layer.weight, torch.bfloat16)
    assert calls["triton"] == [torch.float32] and got.dtype == torch.bfloat16
    assert (got.float() - want).norm() / want.norm() < 5e-3  # bitsandbytes' repack rounds absmax to bf16


@interpreted
def test_fused_lora_dequantizer_asks_for_its_dtype(calls):
    from cpt_plugin.patching.lora import _dequantizer

    layer = _linear4bit()
    out = _dequantizer(layer)(torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.shape == (96, 64) and calls["triton"] == [torch.bfloat16]


@interpreted
def test_nf4_benchmark_dry_run_on_cpu():
    from benchmarks.kernels import bench_one

    for impl in ("bnb", "cpt"):
        row = bench_one("nf4", impl, "cpu", copy_rate=1.0, matmul_rate=None)
        assert row["status"] == "ok", row
        assert row["rel_err"] == 0.0 and row["bit_exact_vs_bnb"] and len(row["per_shape"]) == 4
        layer_elements = sum(prod(s) for s in [(64, 64), (16, 64), (16, 64), (64, 64)]) + 3 * 192 * 64
        assert row["bytes"] > layer_elements * 2  # the bf16 output alone
    assert bench_one("nf4", "eager", "cpu", None, None)["status"] == "error"


# -- on the GPU machine ------------------------------------------------------------------------------
MISTRAL_SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", MISTRAL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bit_exact_vs_bitsandbytes_on_gpu_at_mistral_shapes(shape):
    """QLoRA's weights (bf16 weight, NF4, blocksize 64, nested absmax) and the variants, against
    bitsandbytes' CUDA kernels: bit-exact in bf16 and fp32."""
    torch.manual_seed(0)
    cases = [("nf4", True, 64), ("nf4", False, 64), ("fp4", True, 64)]
    if shape == (4096, 4096):
        cases += [("nf4", True, bs) for bs in nf4.BLOCKSIZES if bs != 64] + [("fp4", False, 128)]
    for quant_type, nested, blocksize in cases:
        _, packed, state = _quantize(
            shape, blocksize, quant_type, nested, dtype=torch.bfloat16, device="cuda"
        )
        for dtype in (torch.bfloat16, torch.float32):
            got = dequantize_4bit_triton(packed, state, dtype)
            assert torch.equal(got, _bnb(packed, state, dtype)), (quant_type, nested, blocksize, dtype)
        del packed, state, got


@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape", [(64, 112), (16, 48), (96, 200), (7, 9)], ids=lambda s: "x".join(map(str, s))
)
def test_bit_exact_vs_bitsandbytes_on_gpu_where_its_cpu_kernel_is_off(shape):
    """Rows not a multiple of the block size (tiny-mistral's down_proj is 64×112): bitsandbytes' CUDA
    kernel reads its layout as we do (its native CPU kernel does not, see the module docstring)."""
    torch.manual_seed(0)
    for quant_type, nested, blocksize in [("nf4", True, 64), ("fp4", False, 64), ("nf4", True, 128)]:
        _, packed, state = _quantize(shape, blocksize, quant_type, nested, device="cuda")
        for dtype in (torch.bfloat16, torch.float32):
            got = dequantize_4bit_triton(packed, state, dtype)
            assert torch.equal(got, _bnb(packed, state, dtype)), (quant_type, nested, blocksize, dtype)
            assert torch.equal(got, dequantize_4bit_reference(packed, state, dtype))


@pytest.mark.gpu
def test_quantized_dequantize_4bit_on_gpu_takes_the_kernel(calls):
    from cpt_plugin.quantized import dequantize_4bit

    layer = _linear4bit(out_features=1024, in_features=4096, compute_dtype=torch.bfloat16).to("cuda")
    weight = layer.weight
    got = dequantize_4bit(weight, torch.bfloat16)
    assert calls["triton"] == [torch.bfloat16] and got.dtype == torch.bfloat16 and got.is_cuda
    assert torch.equal(got, _bnb(weight.data, weight.quant_state, torch.bfloat16))
