"""Shared test helpers for kernel tests: dtype tolerances and a scale-aware closeness check."""

from __future__ import annotations

import torch

# Relative to the largest magnitude of the expected tensor (outputs are rounded once to the dtype).
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, tol: float, name: str = "") -> None:
    """max |actual - expected| <= tol * max(|expected|, 1e-3): robust to scale, strict on shape/finiteness."""
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    scale = max(expected.abs().max().item(), 1e-3)
    err = (actual - expected).abs().max().item()
    assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol:.3g} * {scale:.3g}"
