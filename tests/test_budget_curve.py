"""benchmarks.budget_curve: pooling rounds into one point per system, and the picture."""

from __future__ import annotations

import pytest

from benchmarks.budget_curve import _short, plot, pooled_points


def _row(system: str, times: list[float], peak: float, plan: dict | None = None) -> dict:
    row = {"system": system, "batch": 4, "seq": 2048, "step_times_s": times, "peak_allocated_gib": peak}
    if plan:
        row["memory_plan"] = plan
    return row


def test_rounds_pool_into_the_median_step_at_the_highest_peak() -> None:
    plan = {"budget_gib": 8.0, "plan": "keep 5, recompute 4, offload 7, tiled MLP 0"}
    first = {"train": [_row("cpt_auto_8g", [0.1, 0.3], 7.0, plan), _row("unsloth", [0.2], 6.25)]}
    second = {"train": [_row("cpt_auto_8g", [0.2], 7.5, plan), {"system": "x", "status": "timed out"}]}
    points = pooled_points([first, second])
    assert set(points) == {"cpt_auto_8g", "unsloth"}
    assert points["cpt_auto_8g"]["tokens_per_s"] == pytest.approx(8192 / 0.2)
    assert points["cpt_auto_8g"]["peak"] == 7.5 and points["cpt_auto_8g"]["budget"] == 8.0
    assert "budget" not in points["unsloth"]


def test_plan_labels_are_short_and_the_png_is_written(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    assert _short("keep 2, recompute 5, offload 9, tiled MLP 0") == "keep 2 / rec 5 / off 9"
    assert _short("keep 0, recompute 0, offload 16, tiled MLP 16") == "off 16 / tiled 16"
    plan = {"budget_gib": 6.5, "plan": "keep 2, recompute 5, offload 9, tiled MLP 0"}
    points = pooled_points(
        [{"train": [_row("cpt_auto_6g5", [0.15], 6.2, plan), _row("unsloth", [0.17], 6.25)]}]
    )
    out = plot(points, tmp_path / "curve.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
