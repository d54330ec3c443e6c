"""The chaos suite: its pure parts, a short real run that must PASS, and the
regression test for the bug the chaos run found in the bootstrapper."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from walship.consumer.bootstrap import Bootstrapper, LogView
from walship.shared.chaos.faults import bad_crc_message, check_undecodable, garbage_message
from walship.shared.chaos.plan import (
    ALL_FAULTS,
    ChaosReport,
    Check,
    FaultKind,
    FaultPlan,
    choose_writer_profile,
    dense_check,
    digest_checks,
    exit_expected,
)
from walship.shared.chaos.procs import last_error_line
from walship.shared.codec import peek_header
from walship.shared.errors import NoConnectingSnapshotError
from walship.shared.model import Batch, Op, Transaction, WriterId
from walship.shared.snapshot import FileSnapshotStore
from walship.shared.snapshot.create import create_snapshot
from walship.shared.snapshot.progress import NullProgress, Progress
from walship.shared.store import ReplicaStore, digest_file

WRITER = WriterId(stream_id=b"C" * 16, epoch=3)

# --- pure parts ------------------------------------------------------------------------


def test_fault_plan_is_seeded_and_every_kind_comes_in_each_round() -> None:
    def draw(seed: int, n: int) -> list[tuple[float, FaultKind]]:
        plan = FaultPlan(random.Random(seed), ALL_FAULTS, (1.0, 2.0))
        return [plan.next() for _ in range(n)]

    k = len(ALL_FAULTS)
    a = draw(5, 3 * k)
    assert a == draw(5, 3 * k)
    assert [kind for _, kind in a] != [kind for _, kind in draw(6, 3 * k)]
    for r in range(3):
        assert {kind for _, kind in a[r * k : (r + 1) * k]} == set(ALL_FAULTS)
    assert all(1.0 <= pause <= 2.0 for pause, _ in a)


def test_writer_profiles_cover_split_transactions() -> None:
    rng = random.Random(1)
    profiles = [choose_writer_profile(rng, 400.0) for _ in range(200)]
    assert {p.name for p in profiles} == {"small", "deletes", "large"}
    large = next(p for p in profiles if p.name == "large")
    # Bigger than one 900 kB message: the publisher must split it into parts.
    assert large.txn_entries * large.value_bytes > 900_000
    assert "--rate" in large.args()


def test_exit_expectations() -> None:
    corrupt = "Error: undecodable message on the topic; it is not applied (partition=2)"
    assert exit_expected("reader", corrupt, corrupt_injected=True)
    assert not exit_expected("reader", corrupt, corrupt_injected=False)
    assert not exit_expected(
        "reader", "Error: two different batches claim seq 5", corrupt_injected=True
    )
    assert not exit_expected(
        "publisher", "Error: fetch: Kafka is unavailable", corrupt_injected=True
    )
    assert not exit_expected("writer", corrupt, corrupt_injected=True)


def test_dense_check() -> None:
    assert dense_check([(1, 3), (4, 1), (5, 10)]) == (True, 14, "seqs 1..14 dense")
    ok, entries, detail = dense_check([(1, 3), (5, 1)])
    assert not ok and entries == 3 and "expected seq 4" in detail
    assert not dense_check([(2, 1)])[0]


def test_digest_checks_fail_on_any_difference() -> None:
    w = {"seq": 10, "keys": 4, "sha256": "ab" * 32}
    same = digest_checks(w, {"r1": dict(w), "r2": dict(w)}, 10)
    assert all(c.ok for c in same)
    for bad in ({**w, "sha256": "cd" * 32}, {**w, "seq": 9}, {**w, "keys": 5}, None):
        checks = digest_checks(w, {"r1": dict(w), "r2": bad}, 10)
        assert [c.ok for c in checks] == [True, True, False]
    assert not digest_checks(w, {}, 11)[0].ok  # state.db behind the WAL


def test_report_verdict_and_json() -> None:
    report = ChaosReport(command="walship chaos", seed=1, duration_s=5, work_dir="/tmp/x")
    assert report.verdict == "FAIL"  # nothing checked is not a pass
    report.checks.append(Check("a", True, "fine"))
    report.count_fault(FaultKind.CORRUPT)
    assert report.verdict == "PASS" and "RESULT: PASS" in report.render()
    doc = report.to_json()
    assert doc["faults"] == {"corrupt": 1} and doc["verdict"] == "PASS"
    report.checks.append(Check("b", False, "broken"))
    assert report.verdict == "FAIL" and "[FAIL] b: broken" in report.render()


def test_corrupt_messages_are_refused_by_the_real_decoder() -> None:
    rng = random.Random(3)
    for _ in range(20):
        check_undecodable(garbage_message(rng))
        value = bad_crc_message(WRITER, 41, rng)
        check_undecodable(value)
        header = peek_header(value)  # the header still parses: readers can name the seqs
        assert header.first_seq == 41


def test_last_error_line(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("=== start 1\nINFO a\nError: it broke (topic=t)\nINFO after\n")
    assert last_error_line(log) == "Error: it broke (topic=t)"
    log.write_text("=== start 1\nTraceback\nKeyError: 'x'\n")
    assert last_error_line(log) == "KeyError: 'x'"
    assert last_error_line(tmp_path / "missing.log") == ""


# --- the bug the chaos run found --------------------------------------------------------


def _quiet(_: str) -> Progress:
    return NullProgress("bootstrap")


def _apply(store: ReplicaStore, first: int, n: int, tag: bytes) -> int:
    txns = [
        Transaction.of(first + i, [(Op.PUT, tag + b"%d" % i, b"v")], 1000 + i) for i in range(n)
    ]
    store.apply([Batch.from_transactions(WRITER, txns)], offsets={0: first + n}, writer=WRITER)
    return first + n - 1


async def test_bootstrap_never_moves_a_replica_back_to_an_older_snapshot(tmp_path: Path) -> None:
    """walship chaos --seed 1: a reader at seq 7335 stopped by a corrupt message was
    "bootstrapped" to the newest snapshot, at seq 6663, then stopped anyway: its
    replica went back in time. Now an older snapshot is refused and the replica kept."""
    snaps = FileSnapshotStore(tmp_path / "snaps")
    with ReplicaStore(tmp_path / "writer.db") as src:
        _apply(src, 1, 50, b"a")
        await create_snapshot(src, snaps, topic="t", partitions=1)
    with ReplicaStore(tmp_path / "replica.db") as replica:
        _apply(replica, 1, 50, b"a")
        _apply(replica, 51, 30, b"b")
    before = digest_file(tmp_path / "replica.db")
    assert before.seq == 80

    async def inspect() -> LogView:
        return LogView(1, {0: 0}, {0: 200}, {0: 1})

    b = Bootstrapper(
        tmp_path / "replica.db", snaps, topic="t", inspect_log=inspect, progress=_quiet
    )
    with pytest.raises(NoConnectingSnapshotError) as info:
        await b("undecodable message on the topic (partition=0, offset=90)")
    msg = str(info.value)
    assert "no snapshot past the replica's seq 80" in msg and "newest: seq 50" in msg
    assert "undecodable message" in msg  # the reason that stopped the reader stays visible
    assert digest_file(tmp_path / "replica.db") == before
    assert b.loaded_chunks == 0

    # A snapshot past the replica is loaded as before.
    with ReplicaStore(tmp_path / "writer.db") as src:
        _apply(src, 51, 30, b"b")
        _apply(src, 81, 10, b"c")
        m = await create_snapshot(src, snaps, topic="t", partitions=1)
    cp = await b("undecodable message on the topic (partition=0, offset=90)")
    assert cp is not None and cp.applied_seq == m.seq == 90


# --- a real run ---------------------------------------------------------------------------


def _run_chaos(tmp_path: Path, *args: str, timeout_s: float) -> dict[str, object]:
    report = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALSHIP_")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "walship.shared.cli.main",
            "chaos",
            "--work-dir",
            str(tmp_path / "work"),
            "--report",
            str(report),
            "--quiet",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
    )
    assert report.exists(), proc.stderr[-3000:]
    doc: dict[str, object] = json.loads(report.read_text())
    assert proc.returncode == (0 if doc["verdict"] == "PASS" else 1)
    assert doc["verdict"] == "PASS", proc.stdout[-6000:]
    return doc


@pytest.mark.kafka
def test_short_chaos_run_passes(tmp_path: Path) -> None:
    if os.environ.get("WALSHIP_TEST_BOOTSTRAP_SERVERS"):
        pytest.skip("the chaos run drives its own embedded cluster")
    doc = _run_chaos(tmp_path, "--duration", "30", "--seed", "7", timeout_s=400)
    faults = doc["faults"]
    assert isinstance(faults, dict)
    assert set(faults) == {k.value for k in FaultKind}  # every kind injected at least once
    written, verified = doc["entries_written"], doc["entries_verified"]
    assert isinstance(written, int) and written > 3000 and verified == written
    digests = doc["digests"]
    assert isinstance(digests, dict) and len(digests) == 4
    assert len({d["sha256"] for d in digests.values()}) == 1
    bootstraps = doc["bootstraps"]
    assert isinstance(bootstraps, dict) and sum(bootstraps.values()) >= 1
    assert doc["durable_regressions"] == 0 and doc["applied_regressions"] == []


@pytest.mark.kafka
@pytest.mark.slow
def test_two_minute_chaos_run_passes(tmp_path: Path) -> None:
    if os.environ.get("WALSHIP_TEST_BOOTSTRAP_SERVERS"):
        pytest.skip("the chaos run drives its own embedded cluster")
    doc = _run_chaos(tmp_path, "--duration", "120", "--seed", "11", timeout_s=900)
    assert doc["entries_verified"] == doc["entries_written"]
