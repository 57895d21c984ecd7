"""Largest trainable context: doubling then bisection over a probe function, and the memory slope."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

ProbeFn = Callable[[int, float], dict[str, Any]]  # (seq, timeout_s) -> result with "status"


@dataclass
class SearchResult:
    max_ok: int | None  # largest length that trained (None: none did)
    min_fail: int | None  # smallest length that failed (None: none failed up to the cap)
    status: str  # "exact" (bracket within granularity), "cap", "budget", "no_ok", "unavailable"
    probes: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_ok": self.max_ok,
            "min_fail": self.min_fail,
            "status": self.status,
            "probes": self.probes,
        }


def search_max_context(
    probe: ProbeFn,
    start: int,
    cap: int,
    granularity: int,
    budget_s: float = float("inf"),
    min_probe_s: float = 10.0,
    abort_statuses: tuple[str, ...] = ("unavailable",),
    clock: Callable[[], float] = time.monotonic,
) -> SearchResult:
    """Doubles from ``start`` until a probe fails or ``cap`` passes, then bisects between the last success
    and the first failure down to ``granularity`` tokens (midpoints on multiples of it). A probe counts as
    passed only when its status is "ok"; each gets at most the remaining budget as its timeout; a status in
    ``abort_statuses`` (the system cannot run at all) ends the search, and so does a probe whose status is
    "budget" (stopped by the time budget rather than by its own limit)."""
    deadline = clock() + budget_s
    probes: list[dict[str, Any]] = []
    ok: int | None = None
    fail: int | None = None

    aborted = False

    def run(seq: int) -> bool | None:
        nonlocal aborted
        remaining = deadline - clock()
        if remaining < min_probe_s:
            return None
        result = probe(seq, remaining)
        probes.append({"seq": seq, **result})
        if result.get("status") in abort_statuses:
            aborted = True
            return None
        if result.get("status") == "budget":  # cut short by the budget: says nothing about memory
            return None
        return result.get("status") == "ok"

    def stopped() -> SearchResult:
        return SearchResult(ok, fail, "unavailable" if aborted else "budget", probes)

    seq = start
    while True:
        passed = run(seq)
        if passed is None:
            return stopped()
        if not passed:
            fail = seq
            break
        ok = seq
        if seq >= cap:
            return SearchResult(ok, None, "cap", probes)
        seq = min(seq * 2, cap)
    low = ok or 0
    while fail - low > granularity:
        mid = low + max(granularity, (fail - low) // 2 // granularity * granularity)
        if mid >= fail:
            break
        passed = run(mid)
        if passed is None:
            return stopped()
        if passed:
            ok = low = mid
        else:
            fail = mid
    return SearchResult(ok, fail, "exact" if ok is not None else "no_ok", probes)


def memory_slope_kib_per_token(points: list[tuple[int, float]], min_seq: int = 0) -> float | None:
    """Least-squares slope of peak memory (GiB) against tokens, in KiB per token (None: < 2 lengths)."""
    pts = [(float(s), m) for s, m in points if s >= min_seq and m is not None]
    if len({s for s, _ in pts}) < 2:
        return None
    mean_s = sum(s for s, _ in pts) / len(pts)
    mean_m = sum(m for _, m in pts) / len(pts)
    num = sum((s - mean_s) * (m - mean_m) for s, m in pts)
    den = sum((s - mean_s) ** 2 for s, _ in pts)
    return num / den * 2**20  # GiB/token -> KiB/token
