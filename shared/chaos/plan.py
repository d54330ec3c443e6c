"""The pure part of the chaos suite: what to inject when, and what the run proved.

Everything random comes from one ``random.Random(seed)``: the order of fault
kinds, the pauses between them, their parameters and the writer's load
profile. The processes' timing is real, so two runs of a seed inject the same
faults in the same order but not at the same sequences.

No I/O here: :mod:`walship.shared.chaos.run` does the doing.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any


class FaultKind(StrEnum):
    WRITER_KILL = "writer_kill"  # SIGKILL the writer, restart it (new epoch, new load profile)
    PUBLISHER_KILL = "publisher_kill"  # SIGKILL the publisher, restart it
    READER_KILL = "reader_kill"  # SIGKILL a reader, restart it
    BROKER_DOWN = "broker_down"  # a broker down for a while (sometimes with leader failover)
    LEADER_MOVE = "leader_move"  # partition leadership moved to another broker
    RETENTION = "retention"  # log prefixes deleted past a stopped reader's position
    CORRUPT = "corrupt"  # an undecodable message produced to a partition


ALL_FAULTS: tuple[FaultKind, ...] = tuple(FaultKind)


@dataclass(frozen=True)
class ChaosConfig:
    """One chaos run. Durations in seconds, rates in entries per second."""

    duration_s: float = 300.0
    seed: int = 1
    readers: int = 3
    partitions: int = 6
    brokers: int = 3
    rate_per_s: float = 400.0
    keys: int = 20_000
    fault_interval_s: tuple[float, float] = (1.5, 5.0)
    snapshot_every_s: float = 15.0
    gap_timeout_ms: int = 5_000
    catch_up_timeout_s: float = 240.0
    topic: str = "chaos"
    faults: tuple[FaultKind, ...] = ALL_FAULTS
    work_dir: Path | None = None
    keep_work_dir: bool = False

    def __post_init__(self) -> None:
        if self.duration_s <= 0:
            raise ValueError("duration_s must be > 0")
        if self.readers < 1 or self.partitions < 1 or self.brokers < 1:
            raise ValueError("readers, partitions and brokers must be >= 1")
        low, high = self.fault_interval_s
        if not 0 < low <= high:
            raise ValueError("fault_interval_s must be (low, high) with 0 < low <= high")
        if not self.faults:
            raise ValueError("at least one fault kind is needed")


class FaultPlan:
    """The seeded sequence of (pause before, fault kind).

    Kinds are drawn from shuffled bags holding each enabled kind once, so every
    kind occurs within the first ``len(kinds)`` faults and none is starved on a
    short run; the order inside each bag, the pauses and all parameters still
    vary with the seed.
    """

    def __init__(
        self, rng: random.Random, kinds: Sequence[FaultKind], interval_s: tuple[float, float]
    ) -> None:
        self.rng = rng
        self._kinds = list(kinds)
        self._interval = interval_s
        self._bag: list[FaultKind] = []

    def next(self) -> tuple[float, FaultKind]:
        if not self._bag:
            self._bag = list(self._kinds)
            self.rng.shuffle(self._bag)
        return self.rng.uniform(*self._interval), self._bag.pop()


@dataclass(frozen=True)
class WriterProfile:
    """How one incarnation of the writer generates load (``walship writer load`` flags)."""

    name: str
    txn_entries: int
    value_bytes: int
    delete_ratio: float
    rate_per_s: float

    def args(self) -> list[str]:
        return [
            "--txn-entries",
            str(self.txn_entries),
            "--value-bytes",
            str(self.value_bytes),
            "--delete-ratio",
            str(self.delete_ratio),
            "--rate",
            str(self.rate_per_s),
        ]


def choose_writer_profile(rng: random.Random, rate_per_s: float) -> WriterProfile:
    """Small transactions mostly; sometimes delete-heavy; sometimes transactions larger
    than one Kafka message (split into parts on one partition) at a low rate so the
    mock cluster's ~5 MB per partition is not flooded."""
    roll = rng.random()
    if roll < 0.12:
        # 60 x 16 kB = 960 kB > 900 kB message limit: every txn goes out in 2 parts.
        return WriterProfile("large", 60, 16_000, 0.0, max(1.0, min(rate_per_s, 30.0)))
    if roll < 0.3:
        return WriterProfile("deletes", rng.randint(1, 20), 100, 0.3, rate_per_s)
    return WriterProfile("small", rng.randint(1, 20), rng.choice([16, 100, 300]), 0.0, rate_per_s)


# --- process exits -------------------------------------------------------------------

# A reader stops on purpose (BRIEF rule 6) when it meets an undecodable message
# and no snapshot past it exists yet; it is restarted and recovers by bootstrap
# once the writer's next snapshot covers the message. A reader started while
# the brokers it needs are down may also give up at start.
_EXPECTED_READER_STOPS = (
    "undecodable message",
    "no snapshot past",
    "connects with the log",
    "unavailable",
    "timed out",
    "KafkaConnectionError",
)


def exit_expected(role: str, reason: str, *, corrupt_injected: bool) -> bool:
    """Is a process exiting on its own with ``reason`` the documented behaviour?

    Writers and publishers never stop on their own under these faults (the
    publisher retries while Kafka is unavailable); readers stop on corrupt
    input and may fail to start while brokers are down.
    """
    if role != "reader":
        return False
    if not corrupt_injected and "undecodable message" in reason:
        return False
    return any(pattern in reason for pattern in _EXPECTED_READER_STOPS)


# --- the report -----------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


@dataclass(frozen=True)
class ExitRecord:
    process: str
    role: str
    code: int
    reason: str
    at_s: float
    expected: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "process": self.process,
            "role": self.role,
            "code": self.code,
            "reason": self.reason,
            "at_s": round(self.at_s, 1),
            "expected": self.expected,
        }


@dataclass
class ChaosReport:
    command: str
    seed: int
    duration_s: float
    work_dir: str
    elapsed_s: float = 0.0
    faults: dict[str, int] = field(default_factory=dict)
    fault_failures: list[str] = field(default_factory=list)
    restarts: dict[str, int] = field(default_factory=dict)
    exits: list[ExitRecord] = field(default_factory=list)
    bootstraps: dict[str, int] = field(default_factory=dict)
    snapshots: int = 0
    writer_profiles: dict[str, int] = field(default_factory=dict)
    entries_written: int = 0
    entries_verified: int = 0
    last_seq: int = 0
    max_lag_seqs: int = 0
    max_lag_by_reader: dict[str, int] = field(default_factory=dict)
    durable_regressions: int = 0
    applied_regressions: list[str] = field(default_factory=list)
    digests: dict[str, dict[str, Any]] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed else "FAIL"

    def count_fault(self, kind: FaultKind) -> None:
        self.faults[kind.value] = self.faults.get(kind.value, 0) + 1

    def to_json(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "seed": self.seed,
            "duration_s": self.duration_s,
            "elapsed_s": round(self.elapsed_s, 1),
            "work_dir": self.work_dir,
            "faults": dict(sorted(self.faults.items())),
            "faults_total": sum(self.faults.values()),
            "fault_failures": list(self.fault_failures),
            "restarts": dict(sorted(self.restarts.items())),
            "exits": [e.to_json() for e in self.exits],
            "bootstraps": dict(sorted(self.bootstraps.items())),
            "snapshots": self.snapshots,
            "writer_profiles": dict(sorted(self.writer_profiles.items())),
            "entries_written": self.entries_written,
            "entries_verified": self.entries_verified,
            "last_seq": self.last_seq,
            "max_lag_seqs": self.max_lag_seqs,
            "max_lag_by_reader": dict(sorted(self.max_lag_by_reader.items())),
            "durable_regressions": self.durable_regressions,
            "applied_regressions": list(self.applied_regressions),
            "digests": self.digests,
            "checks": [c.to_json() for c in self.checks],
            "verdict": self.verdict,
        }

    def render(self) -> str:
        """The figures as plain text (one fact per line)."""
        lines = [
            f"chaos run: {self.command}",
            f"  elapsed {self.elapsed_s:.1f}s (faults for {self.duration_s:.0f}s), "
            f"work dir {self.work_dir}",
            f"  faults injected: {sum(self.faults.values())} ({_pairs(self.faults)})",
        ]
        if self.fault_failures:
            lines.append(f"  fault actions that failed: {len(self.fault_failures)}")
            lines.extend(f"    - {f}" for f in self.fault_failures[:10])
        lines += [
            f"  restarts: {_pairs(self.restarts)}",
            f"  writer load profiles: {_pairs(self.writer_profiles)}",
            f"  snapshots taken: {self.snapshots}",
            f"  bootstraps: {sum(self.bootstraps.values())} ({_pairs(self.bootstraps)})",
            f"  process exits on their own: {len(self.exits)} "
            f"({sum(1 for e in self.exits if not e.expected)} unexpected)",
        ]
        for e in self.exits[:12]:
            tag = "expected" if e.expected else "UNEXPECTED"
            lines.append(f"    - t={e.at_s:.1f}s {e.process} exit {e.code} [{tag}]: {e.reason}")
        lines += [
            f"  entries written (durable in the WAL): {self.entries_written} "
            f"(last seq {self.last_seq})",
            f"  entries verified in every replica: {self.entries_verified}",
            f"  max lag observed: {self.max_lag_seqs} seqs ({_pairs(self.max_lag_by_reader)})",
            f"  durable seq regressions: {self.durable_regressions}",
            f"  replica applied seq regressions: {len(self.applied_regressions)}",
            "  digests:",
        ]
        for name, d in self.digests.items():
            lines.append(
                f"    {name:<10} seq {d.get('seq')} keys {d.get('keys')} "
                f"sha256 {str(d.get('sha256'))[:16]}"
            )
        lines.append("  checks:")
        lines.extend(f"    [{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}" for c in self.checks)
        lines.append(f"RESULT: {self.verdict}")
        return "\n".join(lines)


def _pairs(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def digest_checks(
    writer: Mapping[str, Any], replicas: Mapping[str, Mapping[str, Any] | None], last_seq: int
) -> list[Check]:
    """Every replica holds the writer's state at the writer's last seq (BRIEF rule 8)."""
    checks = [
        Check(
            "writer state.db at the WAL's last seq",
            writer.get("seq") == last_seq,
            f"state.db seq {writer.get('seq')}, WAL last seq {last_seq}",
        )
    ]
    for name, d in replicas.items():
        if d is None:
            checks.append(Check(f"{name} digest", False, "no digest (replica missing)"))
            continue
        same = (
            d.get("seq") == writer.get("seq")
            and d.get("keys") == writer.get("keys")
            and d.get("sha256") == writer.get("sha256")
        )
        checks.append(
            Check(
                f"{name} equals the writer",
                same,
                f"seq {d.get('seq')} keys {d.get('keys')} sha256 {str(d.get('sha256'))[:16]}"
                + ("" if same else f" vs writer sha256 {str(writer.get('sha256'))[:16]}"),
            )
        )
    return checks


def dense_check(first_seqs_and_counts: Iterable[tuple[int, int]]) -> tuple[bool, int, str]:
    """(dense from 1?, entries, detail) over (first_seq, entry count) of WAL transactions."""
    expected = 1
    entries = 0
    for first, count in first_seqs_and_counts:
        if first != expected:
            return False, entries, f"expected seq {expected}, found a transaction at {first}"
        expected = first + count
        entries += count
    return True, entries, f"seqs 1..{expected - 1} dense"
