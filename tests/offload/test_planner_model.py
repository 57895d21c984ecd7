"""The planner's analytic memory model against the bytes a patched layer really holds (counted on CPU).

The GPU test (test_planner.py) checks the calibrated prediction; this one checks the uncalibrated model
term by term, which is all a one-step run (the 524,288-token step) ever gets.

The wrappers around our Triton kernels allocate what they allocate on the GPU; the launches themselves
are skipped (``run_kernels=False``: the interpreter runs each program of a grid in Python, 5-25x the
time of the rest) except in the Qwen3 case, which runs them and is held to the same exact count."""

from __future__ import annotations

import pytest


def test_analytic_memory_model_matches_the_counted_bytes() -> None:
    from benchmarks.planner_model_check import check

    result = check(layers=2, fused_mlp=True, tokens=(96, 160), plans=("keep", "recompute"), run_kernels=False)
    assert result["fused_mlp"]
    analytic = result["analytic"]
    # what a kept and a recomputed layer leave for their backward, per token: exact
    assert result["keep"]["layer_saved_per_token"] == pytest.approx([analytic["keep"]] * 2, abs=1)
    assert result["recompute"]["layer_saved_per_token"] == pytest.approx([analytic["recompute"]] * 2, abs=1)
    # a recompute leaves what keeping holds plus act(gate) * up (the planner's keep estimate takes it off)
    intermediate_bytes = result["shapes"]["intermediate_size"] * 2
    holds = result["recompute"]["recompute_holds_per_token"]
    assert holds == pytest.approx([analytic["keep"] + intermediate_bytes] * 2, abs=1)
    # the fused MLP's backward working set beyond the saved activations (one tokens x intermediate buffer)
    assert result["keep"]["peak_beyond_saved_per_token"] == pytest.approx(analytic["work"], rel=0.02)
    # the whole peak within one hidden state per token (Hb: 5% of it with 2 layers here; exact with 3)
    hidden_bytes = result["shapes"]["hidden_size"] * 2
    for plan in ("keep", "recompute"):
        row = result[plan]
        error = abs(row["predicted_peak_per_token"] - row["peak_per_token"])
        assert error <= hidden_bytes, (plan, row)


def test_analytic_memory_model_of_tiled_mlps_matches_the_counted_bytes() -> None:
    """A tiled MLP keeps only its input and output per token; its backward works one chunk at a time."""
    from benchmarks.planner_model_check import check

    result = check(
        layers=2,
        fused_mlp=True,
        tokens=(96, 160),
        plans=("keep", "recompute"),
        tiled_chunk=32,
        run_kernels=False,
    )
    keep_tiled = result["analytic"]["keep"]  # the tiled layer's saved set when tiled_chunk > 0
    assert result["keep"]["layer_saved_per_token"] == pytest.approx([keep_tiled] * 2, abs=1)
    hidden_bytes = result["shapes"]["hidden_size"] * 2
    for plan in ("keep", "recompute"):
        row = result[plan]
        error = abs(row["predicted_peak_per_token"] - row["peak_per_token"])
        assert error <= hidden_bytes, (plan, row)


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text"])
def test_what_a_kept_layer_saves_per_family(family: str) -> None:
    """Qwen3's q/k norms and Gemma 3's four norms per layer are in the model (keep, counted exactly)."""
    from benchmarks.planner_model_check import check

    result = check(
        layers=2,
        fused_mlp=True,
        tokens=(48, 80),
        plans=("keep",),
        family=family,
        run_kernels=family == "qwen3",
    )
    assert result["keep"]["layer_saved_per_token"] == pytest.approx([result["analytic"]["keep"]] * 2, abs=1)


def test_releasing_the_recomputed_output_lowers_a_tiled_layers_peak_by_one_hidden_state(monkeypatch) -> None:
    """Counted: with every MLP tiled, a checkpointed layer peaks where its backward starts, so freeing its
    recomputed output there (checkpointing._release_recomputed_outputs) saves one hidden state per token."""
    from benchmarks.planner_model_check import build_model, measure, peak_slope
    from cpt_plugin.offload import checkpointing

    model = build_model(layers=2, fused_mlp=True)
    tokens = (96, 160)

    def peak() -> float:
        low, high = (measure(model, ("recompute",) * 2, t, tiled_chunk=32, run_kernels=False) for t in tokens)
        return peak_slope(low, high)

    released = peak()
    monkeypatch.setattr(checkpointing, "_release_recomputed_outputs", lambda roots: None)
    kept = peak()
    assert kept - released == pytest.approx(model.config.hidden_size * 2, abs=1)
