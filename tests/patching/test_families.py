"""Whole-model equivalence: every supported family, patched vs unpatched, same loss, grads and logits."""

from __future__ import annotations

import pytest
import torch

from cpt_plugin.patching.registry import patch, unpatch
from tests.patching.models import FAMILIES, assert_same_grads, batch, tiny_model, train_step


@pytest.mark.parametrize("model_type", FAMILIES)
def test_patched_model_matches_unpatched(model_type: str) -> None:
    model = tiny_model(model_type)
    inputs = batch()
    want_loss, want_grads, _ = train_step(model, inputs)
    model.eval()
    with torch.no_grad():
        want_logits = model(input_ids=inputs["input_ids"]).logits

    report = patch(model)
    assert set(report.applied) == {"rms_norm", "rope", "swiglu", "fused_linear_cross_entropy"}, report
    norms = [m for m in model.modules() if "RMSNorm" in type(m).__name__]
    assert norms and all(type(m).__name__.startswith("CPT") for m in norms)

    got_loss, got_grads, out = train_step(model, inputs)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-4, atol=1e-6)
    assert_same_grads(got_grads, want_grads)

    assert out.logits is None  # training with labels: no [tokens, vocab] logits

    model.eval()
    with torch.no_grad():
        got = model(**inputs)
    torch.testing.assert_close(got.logits, want_logits, rtol=1e-4, atol=1e-5)
    assert got.loss is not None  # evaluation keeps transformers' loss and logits

    unpatch(model)
    assert not any(type(m).__name__.startswith("CPT") for m in model.modules())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_patched_model_matches_unpatched_on_gpu(model_type: str, dtype: torch.dtype) -> None:
    """The real Triton kernels: same loss and gradients as transformers (bf16: bf16-level tolerance)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = tiny_model(model_type, hidden_size=128, intermediate_size=352, vocab_size=1031).to("cuda", dtype)
    inputs = {k: v.cuda() for k, v in batch(shape=(2, 67)).items()}
    want_loss, want_grads, _ = train_step(model, inputs)
    patch(model)
    got_loss, got_grads, out = train_step(model, inputs)
    assert out.logits is None
    tol = dict(rtol=1e-3, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got_loss, want_loss, **tol)
    for name, want in want_grads.items():
        got = got_grads[name].float()
        want = want.float()
        # relative to the gradient's scale: bf16 reductions differ in order
        scale = want.abs().max().clamp_min(1e-6)
        assert ((got - want).abs().max() / scale) < (2e-3 if dtype == torch.float32 else 6e-2), name
