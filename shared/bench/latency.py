"""Append-to-apply latency from the two processes' records (pure).

The writer records ``(last_seq, t)`` when each append returned; the reader
records ``(last_seq, t)`` after each replica commit (a commit covers every
sequence up to its last). A transaction's latency is the time from its append
returning to the first commit whose last sequence reaches the transaction's.
Both stamps come from the same system-wide monotonic clock.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LatencySummary:
    count: int
    missing: int  # transactions no recorded commit covered
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    min_ms: float

    def to_json(self) -> dict[str, float | int]:
        return {
            "count": self.count,
            "missing": self.missing,
            "p50_ms": round(self.p50_ms, 2),
            "p90_ms": round(self.p90_ms, 2),
            "p99_ms": round(self.p99_ms, 2),
            "max_ms": round(self.max_ms, 2),
            "min_ms": round(self.min_ms, 2),
        }


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of ascending values."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError("q must be within 0..100")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def txn_latencies_s(
    returns: Sequence[tuple[int, float]], commits: Sequence[tuple[int, float]]
) -> tuple[list[float], int]:
    """(latency of each covered transaction in seconds, count of uncovered ones)."""
    ordered = sorted(commits)
    seqs = [s for s, _ in ordered]
    times = [t for _, t in ordered]
    out: list[float] = []
    missing = 0
    for last_seq, returned in returns:
        i = bisect.bisect_left(seqs, last_seq)
        if i == len(seqs):
            missing += 1
            continue
        out.append(times[i] - returned)
    return out, missing


def summarize(
    returns: Sequence[tuple[int, float]],
    commits: Sequence[tuple[int, float]],
    *,
    warmup_s: float = 0.0,
) -> LatencySummary:
    """Latency distribution, leaving out appends in the first ``warmup_s`` seconds."""
    if returns and warmup_s > 0:
        t0 = min(t for _, t in returns)
        returns = [(s, t) for s, t in returns if t - t0 >= warmup_s]
    latencies, missing = txn_latencies_s(returns, commits)
    if not latencies:
        raise ValueError("no transaction was both appended and applied")
    ms = sorted(x * 1000 for x in latencies)
    return LatencySummary(
        count=len(ms),
        missing=missing,
        p50_ms=percentile(ms, 50),
        p90_ms=percentile(ms, 90),
        p99_ms=percentile(ms, 99),
        max_ms=ms[-1],
        min_ms=ms[0],
    )
