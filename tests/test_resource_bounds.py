"""Resource bounds and writer-side disk faults, with real walship processes.

- A stopped (slow) reader never makes the publisher or the writer grow memory:
  Kafka decouples them, so their RSS stays flat while the writer keeps appending.
- A reader applying a long backlog keeps a flat RSS (batches are applied in
  bounded groups; what is buffered ahead of the applies is bounded in total, the
  partitions ahead of the merge point are paused).
- WAL directory full (a small tmpfs: real ENOSPC), read-only (a read-only
  remount: real EROFS) and fsync failures (EIO from a fault hook in the writer
  process): appends fail with a clear error and the writer exits 1 without a
  traceback, nothing half-written is ever published (a restarted writer reuses
  no published seq: readers would refuse two different batches for one seq),
  and the writer carries on once the condition clears.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from walship.producer.wal import WalReader
from walship.shared.devcluster import DevCluster

MB = 1 << 20
RSS_CEILING_MB = 256


def walship(*args: str) -> list[str]:
    return [sys.executable, "-m", "walship.shared.cli.main", *args]


def make_env(
    cluster: DevCluster | None = None, topic: str = "", partitions: int = 6
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WALSHIP_", "OTEL_"))}
    env.update({"OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none"})
    if cluster is not None:
        env.update(
            {
                "WALSHIP_KAFKA__BOOTSTRAP_SERVERS": cluster.bootstrap_servers,
                "WALSHIP_TOPIC__NAME": topic,
                "WALSHIP_TOPIC__PARTITIONS": str(partitions),
                "WALSHIP_TOPIC__REPLICATION_FACTOR": "1",
            }
        )
    return env


def new_topic(cluster: DevCluster, partitions: int = 6) -> str:
    topic = f"rb-{uuid.uuid4().hex[:8]}"
    cluster.create_topic(topic, partitions)
    cluster.create_topic(f"{topic}.readers", 1)
    return topic


def run(
    args: list[str], env: dict[str, str], timeout_s: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout_s)


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:
        return subprocess.Popen(args, env=env, stdout=f, stderr=f, stdin=subprocess.DEVNULL)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


def digest(*args: str) -> dict[str, object]:
    out = run(walship("digest", *args), make_env())
    assert out.returncode == 0, out.stderr
    doc: dict[str, object] = json.loads(out.stdout)
    return doc


def wal_last_seq(data_dir: Path) -> int:
    with WalReader(data_dir / "wal") as r:
        return r.last_seq


def wal_dense(data_dir: Path) -> int:
    """Read every acknowledged record back (checksums verified); the last seq."""
    expected = 1
    with WalReader(data_dir / "wal") as r:
        while txns := r.read_from(expected, max_bytes=8 << 20):
            for txn, _ in txns:
                assert txn.first_seq == expected, f"gap before seq {txn.first_seq}"
                expected = txn.last_seq + 1
    return expected - 1


class RssSampler:
    """Samples a process's RSS (MB) every ``period_s`` in a thread."""

    def __init__(self, pid: int, period_s: float = 0.25) -> None:
        self._proc = psutil.Process(pid)
        self._period = period_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._t0 = time.monotonic()
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                rss = self._proc.memory_info().rss / MB
            except psutil.Error:
                return
            self.samples.append((time.monotonic() - self._t0, rss))
            self._stop.wait(self._period)

    def stop(self) -> list[tuple[float, float]]:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.samples

    def between(self, start_s: float, end_s: float) -> list[float]:
        return [mb for t, mb in self.samples if start_s <= t < end_s]


def wait_for_log(log: Path, text: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in {log} after {timeout_s}s:\n{log.read_text()[-3000:]}")


# --- memory ------------------------------------------------------------------------------


@pytest.mark.kafka
def test_stopped_reader_never_grows_publisher_or_writer_memory(
    devcluster: DevCluster, tmp_path: Path
) -> None:
    topic = new_topic(devcluster)
    env = make_env(devcluster, topic)
    wd = tmp_path / "writer"
    logs = tmp_path
    writer = spawn(
        walship(
            "writer",
            "load",
            "--data-dir",
            str(wd),
            "--entries",
            "100000000",
            "--json",
            "--rate",
            "15000",
            "--value-bytes",
            "100",
            "--keys",
            "50000",
        ),
        env,
        logs / "writer.log",
    )
    time.sleep(1.0)  # the WAL exists before the publisher opens it
    publisher = spawn(walship("producer", "run", "--data-dir", str(wd)), env, logs / "pub.log")
    reader = spawn(
        walship("consumer", "run", "--data-dir", str(tmp_path / "r"), "--reader-id", "slow"),
        env,
        logs / "reader.log",
    )
    try:
        wait_for_log(logs / "reader.log", "reader slow started", 30)
        time.sleep(1.0)
        reader.send_signal(signal.SIGSTOP)  # stopped: consumes nothing from here on
        seq_before = wal_last_seq(wd)
        w_rss, p_rss = RssSampler(writer.pid), RssSampler(publisher.pid)
        time.sleep(24)
        w_rss.stop()
        p_rss.stop()
        seq_after = wal_last_seq(wd)
        published = json.loads((wd / "published.json").read_text())["seq"]
        assert writer.poll() is None and publisher.poll() is None
    finally:
        with contextlib.suppress(ProcessLookupError):
            reader.send_signal(signal.SIGCONT)
        for p in (reader, publisher, writer):
            stop(p)
    appended = seq_after - seq_before
    assert appended > 150_000, f"the writer appended only {appended} entries"
    assert published > seq_before + 100_000, "the publisher did not keep publishing"
    for name, sampler in (("writer", w_rss), ("publisher", p_rss)):
        early = max(sampler.between(2, 8))
        late = max(sampler.between(16, 24))
        peak = max(mb for _, mb in sampler.samples)
        print(f"{name}: RSS early {early:.1f} MB, late {late:.1f} MB, peak {peak:.1f} MB")
        assert late - early < 24, f"{name} RSS grew {early:.1f} -> {late:.1f} MB"
        assert peak < RSS_CEILING_MB


def _backlog_rss(
    devcluster: DevCluster, tmp_path: Path, entries: int, growth_mb_max: float
) -> None:
    topic = new_topic(devcluster)
    env = make_env(devcluster, topic)
    wd = tmp_path / "writer"
    out = run(
        walship(
            "writer",
            "load",
            "--data-dir",
            str(wd),
            "--entries",
            str(entries),
            "--json",
            "--value-bytes",
            "16",
            "--txn-entries",
            "10",
            "--keys",
            str(entries),
        ),
        env,
        timeout_s=600,
    )
    assert out.returncode == 0, out.stderr
    out = run(walship("producer", "run", "--data-dir", str(wd), "--until-caught-up"), env, 600)
    assert out.returncode == 0, out.stderr
    log = tmp_path / "reader.log"
    reader = spawn(
        walship(
            "consumer",
            "run",
            "--data-dir",
            str(tmp_path / "r"),
            "--reader-id",
            "big",
            "--until-seq",
            str(entries),
        ),
        env,
        log,
    )
    try:
        sampler = RssSampler(reader.pid, period_s=0.1)
        wait_for_log(log, "reader big started", 60)
        start_mb = sampler.samples[-1][1]
        assert reader.wait(timeout=600) == 0, log.read_text()[-3000:]
        samples = sampler.stop()
    finally:
        stop(reader)
    peak = max(mb for _, mb in samples)
    print(f"reader applying {entries} entries: RSS at start {start_mb:.1f} MB, peak {peak:.1f} MB")
    # Bounded by configuration, not by the backlog: decoded batches ahead of the
    # applies <= buffer_bytes_max (16 MiB) over all partitions, two apply groups of
    # apply_entries_max, fetches <= fetch_bytes_max, a split-brain history of
    # fingerprints, and SQLite's page cache (64 MiB at most, grows with the table).
    # Measured (docs/performance.md): peak growth 60k ~+30 MB, 300k ~+64 MB (before:
    # ~+72 MB), 1M on 12 partitions ~+105 MB (before: ~+149 MB).
    assert peak - start_mb < growth_mb_max, f"RSS grew from {start_mb:.1f} to {peak:.1f} MB"
    assert peak < RSS_CEILING_MB
    assert digest("--db", str(tmp_path / "r" / "state.db")) == digest("--data-dir", str(wd))


@pytest.mark.kafka
def test_reader_applying_a_backlog_keeps_a_flat_rss(devcluster: DevCluster, tmp_path: Path) -> None:
    _backlog_rss(devcluster, tmp_path, 60_000, growth_mb_max=56)


@pytest.mark.kafka
@pytest.mark.slow
def test_reader_applying_300k_backlog_keeps_a_flat_rss(
    devcluster: DevCluster, tmp_path: Path
) -> None:
    _backlog_rss(devcluster, tmp_path, 300_000, growth_mb_max=80)


# --- writer-side disk faults ----------------------------------------------------------------


def mount_tmpfs(mnt: Path, size: str = "3m") -> None:
    """Mount a small tmpfs at ``mnt`` (needs root; the test is skipped otherwise)."""
    mnt.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {exc}")


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    """Mount points to unmount at the end of the test."""
    points: list[Path] = []
    yield points
    for mnt in reversed(points):
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)


@pytest.fixture
def tmpfs(tmp_path: Path, mounts: list[Path]) -> Path:
    """A 3 MB tmpfs: a data directory that really fills up (ENOSPC) or goes read-only."""
    mnt = tmp_path / "mnt"
    mount_tmpfs(mnt)
    mounts.append(mnt)
    return mnt


def remount(mnt: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(mnt)], check=True)


def assert_clear_failure(out: subprocess.CompletedProcess[str], *reasons: str) -> None:
    assert out.returncode == 1, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("Error:")]
    assert errors, out.stderr[-2000:]
    assert any(r in errors[-1] for r in reasons), errors[-1]
    assert "path=" in errors[-1]  # names where


def publish_and_compare(env: dict[str, str], wd: Path, replica_dir: Path, last_seq: int) -> None:
    """Everything durable reaches a reader, whose replica then equals the writer's state."""
    out = run(walship("producer", "run", "--data-dir", str(wd), "--until-caught-up"), env)
    assert out.returncode == 0, out.stderr[-3000:]
    out = run(
        walship(
            "consumer",
            "run",
            "--data-dir",
            str(replica_dir),
            "--reader-id",
            "check",
            "--until-seq",
            str(last_seq),
        ),
        env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    mine = digest("--db", str(replica_dir / "state.db"))
    assert mine == digest("--data-dir", str(wd)) and mine["seq"] == last_seq


@pytest.mark.kafka
@pytest.mark.parametrize("full", ["wal_dir", "data_dir"])
def test_disk_full_fails_clearly_and_the_writer_recovers(
    full: str, devcluster: DevCluster, tmp_path: Path, mounts: list[Path]
) -> None:
    """``wal_dir``: only the WAL directory fills up (its own small file system);
    ``data_dir``: the whole data dir does (state.db usually hits it first)."""
    topic = new_topic(devcluster)
    env = make_env(devcluster, topic) | {"WALSHIP_PRODUCER__SEGMENT_BYTES_MAX": str(256 << 10)}
    wd = tmp_path / "writer"
    mnt = wd / "wal" if full == "wal_dir" else wd
    mount_tmpfs(mnt)
    mounts.append(mnt)
    out = run(
        walship(
            "writer",
            "load",
            "--data-dir",
            str(wd),
            "--entries",
            "1000000",
            "--json",
            "--value-bytes",
            "200",
        ),
        env,
    )
    assert_clear_failure(out, "No space left on device", "database or disk is full")
    if full == "wal_dir":
        assert "No space left on device" in out.stderr and "/wal" in out.stderr
    last = wal_dense(wd)
    assert last > 1000 and last == wal_last_seq(wd)
    # Still (nearly) full: a restart appends what fits (the failed append's bytes were
    # given back), then fails the same clear way; the WAL stays dense.
    out = run(walship("writer", "load", "--data-dir", str(wd), "--entries", "1000000"), env)
    assert_clear_failure(out, "No space left on device", "database or disk is full")
    last = wal_dense(wd)
    remount(mnt, "size=64m")  # the condition clears
    out = run(walship("writer", "load", "--data-dir", str(wd), "--entries", "500"), env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert wal_dense(wd) == last + 500
    publish_and_compare(env, wd, tmp_path / "replica", last + 500)


def test_read_only_data_dir_fails_clearly_and_the_writer_recovers(tmpfs: Path) -> None:
    env = make_env()
    wd = tmpfs / "writer"
    out = run(walship("writer", "load", "--data-dir", str(wd), "--entries", "100"), env)
    assert out.returncode == 0, out.stderr
    before = digest("--data-dir", str(wd))
    remount(tmpfs, "ro")
    try:
        out = run(walship("writer", "load", "--data-dir", str(wd), "--entries", "100"), env)
        assert_clear_failure(out, "Read-only file system")
    finally:
        remount(tmpfs, "rw")
    assert wal_dense(wd) == 100 and digest("--data-dir", str(wd)) == before
    out = run(walship("writer", "load", "--data-dir", str(wd), "--entries", "100"), env)
    assert out.returncode == 0, out.stderr
    assert wal_dense(wd) == 200


# The writer process with a fault hook: fsync/fdatasync fail with EIO while the flag
# file exists (the kernel's answer when a disk drops writes), as a real disk error would.
_FSYNC_HOOK = """
import errno, os, sys
flag = os.environ["CHAOS_FSYNC_FAIL_FLAG"]
def hooked(real):
    def call(fd):
        if os.path.exists(flag):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd)
    return call
os.fsync = hooked(os.fsync)
os.fdatasync = hooked(os.fdatasync)
from walship.shared.cli.main import main
sys.argv = ["walship", *sys.argv[1:]]
main()
"""


@pytest.mark.kafka
def test_fsync_errors_fail_appends_publish_nothing_half_written_and_recover(
    devcluster: DevCluster, tmp_path: Path
) -> None:
    topic = new_topic(devcluster)
    flag = tmp_path / "fail-fsync"
    env = make_env(devcluster, topic) | {"CHAOS_FSYNC_FAIL_FLAG": str(flag)}
    wd = tmp_path / "writer"
    writer_args = ["writer", "load", "--data-dir", str(wd), "--entries", "10000000"]
    writer = spawn(
        [sys.executable, "-c", _FSYNC_HOOK, *writer_args, "--rate", "5000", "--json"],
        env,
        tmp_path / "writer.log",
    )
    time.sleep(1.0)
    # The publisher runs throughout: it must never ship what was not durable.
    publisher = spawn(walship("producer", "run", "--data-dir", str(wd)), env, tmp_path / "pub.log")
    try:
        time.sleep(3.0)
        flag.touch()
        assert writer.wait(timeout=60) == 1
        time.sleep(2.0)  # the publisher keeps running on what is durable
    finally:
        stop(writer)
        stop(publisher)
    log = (tmp_path / "writer.log").read_text()
    assert "Traceback" not in log
    error = [line for line in log.splitlines() if line.startswith("Error:")][-1]
    assert "Input/output error" in error and "path=" in error, error
    last = wal_dense(wd)
    assert last > 1000
    flag.unlink()  # the disk is healthy again
    out = run(walship("writer", "load", "--data-dir", str(wd), "--entries", "700"), env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert wal_dense(wd) == last + 700
    # Seqs after ``last`` now hold new data; had any failed append been published
    # under those seqs, the reader would refuse the two versions (split brain).
    publish_and_compare(env, wd, tmp_path / "replica", last + 700)
