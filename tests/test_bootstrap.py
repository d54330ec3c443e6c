"""Bootstrap from a snapshot: choice, policies, resumable load, crash safety, swap."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from walship.consumer.applier import SqliteApplier
from walship.consumer.bootstrap import (
    FIRST_START,
    Bootstrapper,
    BootstrapPolicy,
    LogView,
    choose_snapshot,
)
from walship.shared.errors import NoConnectingSnapshotError, SnapshotCorruptError
from walship.shared.model import Batch, Op, Transaction, WriterId
from walship.shared.snapshot import FileSnapshotStore, Manifest
from walship.shared.snapshot.create import create_snapshot
from walship.shared.snapshot.flaky import FlakyStore
from walship.shared.snapshot.progress import NullProgress, Progress
from walship.shared.store import ReplicaStore, digest_file

WRITER = WriterId(stream_id=b"S" * 16, epoch=1)
TOPIC = "stream"


def fill(store: ReplicaStore, keys: int, *, start_seq: int = 1, txn_keys: int = 500) -> int:
    """Apply ``keys`` puts (plus a few deletes) in transactions; returns the last seq."""
    seq = start_seq
    batches = []
    for base in range(0, keys, txn_keys):
        ops = [(Op.PUT, f"k{i:07d}".encode(), os.urandom(20)) for i in range(base, base + txn_keys)]
        if base:
            ops.append((Op.DELETE, f"k{base - 1:07d}".encode(), b""))
        txn = Transaction.of(seq, ops, timestamp_us=1_000_000 + seq)
        batches.append(Batch.from_transactions(WRITER, [txn]))
        seq = txn.last_seq + 1
    store.apply(batches, offsets={0: 11, 1: 22}, writer=WRITER)
    return seq - 1


def quiet(_: str) -> Progress:
    return NullProgress("bootstrap")


def view(log_start: dict[int, int] | None = None) -> LogView:
    start = log_start if log_start is not None else {0: 5, 1: 5}
    return LogView(2, start, {0: 100, 1: 100}, {0: 40, 1: 41})


async def make_snapshot(
    tmp_path: Path, keys: int = 5000
) -> tuple[FileSnapshotStore, Manifest, str]:
    snaps = FileSnapshotStore(tmp_path / "snaps")
    with ReplicaStore(tmp_path / "writer.db") as src:
        fill(src, keys)
        m = await create_snapshot(src, snaps, topic=TOPIC, partitions=2, chunk_keys=100)
        return snaps, m, src.digest().sha256


def bootstrapper(tmp_path: Path, store: object, **kw: object) -> Bootstrapper:
    async def inspect() -> LogView:
        return view()

    return Bootstrapper(
        tmp_path / "replica.db",
        store,  # type: ignore[arg-type]
        topic=TOPIC,
        inspect_log=kw.pop("inspect_log", inspect),  # type: ignore[arg-type]
        progress=quiet,
        **kw,  # type: ignore[arg-type]
    )


async def test_bootstrap_loads_verifies_and_swaps(tmp_path: Path) -> None:
    snaps, m, expected = await make_snapshot(tmp_path)
    b = bootstrapper(tmp_path, snaps)
    cp = await b("retention expired")
    assert cp is not None and cp.applied_seq == m.seq
    assert dict(cp.offsets) == {0: 11, 1: 22} and cp.writer == WRITER
    d = digest_file(tmp_path / "replica.db")
    assert d.sha256 == expected and d.seq == m.seq
    with ReplicaStore(tmp_path / "replica.db") as r:
        assert r.checkpoint() == cp
    assert not b.fresh_path.exists() and not b.progress_path.exists()
    assert b.loaded_chunks == len(m.chunks) == 50


async def test_interrupted_ten_times_never_reloads_a_chunk(tmp_path: Path) -> None:
    snaps, m, expected = await make_snapshot(tmp_path)
    rng = random.Random(7)
    crash_after = sorted(rng.sample(range(len(m.chunks)), 10))
    loads: Counter[int] = Counter()

    class Crash(Exception):
        pass

    def on_loaded(index: int) -> None:
        loads[index] += 1
        # The nastiest point: the chunk is committed, its progress not yet recorded.
        if crash_after and index == crash_after[0]:
            crash_after.pop(0)
            raise Crash(index)

    attempts = 0
    while True:
        attempts += 1
        try:
            cp = await bootstrapper(tmp_path, snaps, on_chunk_loaded=on_loaded)("expired")
            break
        except Crash:
            continue
    assert attempts == 11
    assert cp is not None and cp.applied_seq == m.seq
    assert loads == Counter(range(len(m.chunks)))  # every chunk loaded exactly once
    assert digest_file(tmp_path / "replica.db").sha256 == expected


async def test_transient_chunk_read_failures_are_retried(tmp_path: Path) -> None:
    snaps, _m, expected = await make_snapshot(tmp_path, keys=1000)
    flaky = FlakyStore(snaps, fail={"get_chunk": {2, 5}})
    cp = await bootstrapper(tmp_path, flaky)("expired")
    assert cp is not None and digest_file(tmp_path / "replica.db").sha256 == expected


async def test_corrupt_chunk_stops_and_leaves_the_replica_alone(tmp_path: Path) -> None:
    snaps, m, _ = await make_snapshot(tmp_path, keys=1000)
    with ReplicaStore(tmp_path / "replica.db") as old:
        old.apply([Batch.from_transactions(WRITER, [Transaction.of(1, [(Op.PUT, b"a", b"1")], 1)])])
    before = digest_file(tmp_path / "replica.db")
    flaky = FlakyStore(snaps, corrupt={"get_chunk": {4}})
    with pytest.raises(SnapshotCorruptError) as info:
        await bootstrapper(tmp_path, flaky)("expired")
    assert info.value.context["snapshot"] == m.snapshot_id and info.value.context["chunk"] == 3
    assert digest_file(tmp_path / "replica.db") == before


async def test_no_connecting_snapshot_says_what_is_missing(tmp_path: Path) -> None:
    snaps, m, _ = await make_snapshot(tmp_path, keys=200)

    async def truncated() -> LogView:
        return LogView(2, {0: 50, 1: 3}, {0: 100, 1: 100}, {0: 900, 1: 901})

    with pytest.raises(NoConnectingSnapshotError) as info:
        await bootstrapper(tmp_path, snaps, inspect_log=truncated)("expired")
    msg = str(info.value)
    assert "partition 0 needs offset 11 but the log starts at 50" in msg
    assert f"seqs {m.seq + 1}..899 are gone" in msg
    assert "walship snapshot create" in msg
    assert not (tmp_path / "replica.db").exists()


async def test_empty_store_is_reported(tmp_path: Path) -> None:
    snaps = FileSnapshotStore(tmp_path / "empty")
    with pytest.raises(NoConnectingSnapshotError, match="holds no snapshots"):
        await bootstrapper(tmp_path, snaps)("expired")


async def test_policies(tmp_path: Path) -> None:
    snaps, m, _ = await make_snapshot(tmp_path, keys=200)

    async def complete() -> LogView:
        return view({0: 0, 1: 0})

    # when_needed: a complete log on first start is simply replayed.
    assert await bootstrapper(tmp_path, snaps, inspect_log=complete).prepare() is None
    # never: first start replays; a real need is an error saying how to fix it.
    never = bootstrapper(tmp_path, snaps, policy=BootstrapPolicy.NEVER)
    assert await never.prepare() is None
    with pytest.raises(NoConnectingSnapshotError, match="policy is 'never'"):
        await never("retention expired")
    # initial: eagerly loads into an empty replica even when the log is complete...
    initial = bootstrapper(tmp_path, snaps, policy="initial", inspect_log=complete)
    cp = await initial.prepare()
    assert cp is not None and cp.applied_seq == m.seq
    # ...and refuses to overwrite a non-empty one later.
    with pytest.raises(NoConnectingSnapshotError, match="policy is 'initial'"):
        await initial("retention expired")
    # An existing replica resumes from its own checkpoint on first start.
    assert await bootstrapper(tmp_path, snaps).prepare() is None


async def test_truncated_log_on_first_start_bootstraps(tmp_path: Path) -> None:
    snaps, _m, expected = await make_snapshot(tmp_path, keys=300)
    cp = await bootstrapper(tmp_path, snaps)(FIRST_START)
    assert cp is not None and digest_file(tmp_path / "replica.db").sha256 == expected


async def test_swap_under_an_open_applier(tmp_path: Path) -> None:
    snaps, m, expected = await make_snapshot(tmp_path, keys=700)
    applier = SqliteApplier(tmp_path / "replica.db")
    applier.apply([Batch.from_transactions(WRITER, [Transaction.of(1, [(Op.PUT, b"x", b"1")], 1)])])

    async def inspect() -> LogView:
        return view()

    b = Bootstrapper.for_applier(applier, snaps, topic=TOPIC, inspect_log=inspect, progress=quiet)
    cp = await b("expired")
    assert cp is not None
    assert applier.checkpoint().applied_seq == m.seq
    assert applier.store.get(b"x") is None
    assert applier.digest().sha256 == expected
    applier.close()


def test_choose_snapshot_prefers_newest_that_connects(tmp_path: Path) -> None:
    _snaps, m, _ = asyncio.run(make_snapshot(tmp_path, keys=50))

    def variant(seq: int, offsets: dict[int, int], **over: object) -> Manifest:
        fields = {f: getattr(m, f) for f in m.__dataclass_fields__}
        fields.update(
            seq=seq, offsets=offsets, snapshot_id=f"{seq:020d}-{m.created_at_us:020d}", **over
        )
        return Manifest(**fields)  # type: ignore[arg-type]

    old = variant(10, {0: 1, 1: 1})
    mid = variant(20, {0: 6, 1: 6})
    new = variant(30, {0: 9, 1: 4})
    other_topic = variant(40, {0: 99, 1: 99}, topic="other")
    got, rejected = choose_snapshot(
        [old, mid, new, other_topic], view(), topic=TOPIC, stream_id=WRITER.stream_id.hex()
    )
    assert got == mid
    assert "other" in rejected[0] and "partition 1 needs offset 4" in rejected[1]
    got, _ = choose_snapshot([mid], view(), topic=TOPIC, stream_id="ff" * 16)
    assert got is None


_CHILD = """
import asyncio, sys, time
from pathlib import Path
from walship.consumer.bootstrap import Bootstrapper, LogView
from walship.shared.snapshot import FileSnapshotStore
from walship.shared.snapshot.progress import NullProgress

root = Path(sys.argv[1])

async def inspect():
    return LogView(2, {0: 5, 1: 5}, {0: 100, 1: 100}, {0: 40, 1: 41})

def loaded(index):
    with open(root / "loads.log", "a") as f:
        f.write(f"{index}\\n")
    time.sleep(0.004)

b = Bootstrapper(root / "replica.db", FileSnapshotStore(root / "snaps"), topic="stream",
                 inspect_log=inspect, progress=lambda _: NullProgress("b"), on_chunk_loaded=loaded)
asyncio.run(b("expired"))
"""


def test_sigkill_at_random_points_completes_identically(tmp_path: Path) -> None:
    _, m, expected = asyncio.run(make_snapshot(tmp_path, keys=20_000))
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    rng = random.Random(11)
    kills = 0
    for _ in range(40):
        if kills == 10:
            break
        proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)])
        # Wait until it is loading, then kill it at a random moment.
        deadline = time.monotonic() + 30
        while not (tmp_path / "replica.db.bootstrap").exists() and proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail("child never started loading")
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.15))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    if not (tmp_path / "replica.db").exists():
        subprocess.run([sys.executable, str(script), str(tmp_path)], check=True)
    assert kills >= 5
    logged = Counter(int(x) for x in (tmp_path / "loads.log").read_text().split())
    # A kill between a chunk's commit and its log line can drop a line, never add one.
    assert max(logged.values()) == 1, [i for i, n in logged.items() if n > 1]
    assert len(logged) >= len(m.chunks) - kills
    assert digest_file(tmp_path / "replica.db").sha256 == expected
    with ReplicaStore(tmp_path / "replica.db") as r:
        assert r.checkpoint().applied_seq == m.seq


async def test_scheduler_snapshots_every_n_seqs_and_keeps_newest(tmp_path: Path) -> None:
    from walship.shared.snapshot.create import SchedulePolicy, SnapshotScheduler

    snaps = FileSnapshotStore(tmp_path / "snaps")
    db = tmp_path / "replica.db"
    now = [0.0]
    with ReplicaStore(db) as store:
        sched = SnapshotScheduler.for_replica(
            db,
            snaps,
            topic=TOPIC,
            partitions=2,
            policy=SchedulePolicy(every_seqs=1000, every_s=60, keep=2),
        )
        sched._clock = lambda: now[0]
        assert (await sched.tick()) is not None  # the first snapshot (seq 0 > -1)
        last = fill(store, 500)
        assert await sched.tick() is None  # 500 new seqs, 0 s: not due
        now[0] = 61.0
        m = await sched.tick()
        assert m is not None and m.seq == last  # due by time
        last = fill(store, 1500, start_seq=last + 1)
        m = await sched.tick()
        assert m is not None and m.seq == last  # due by sequences
        listed = await snaps.list_manifests()
        assert len(listed) == 2 and listed[0].seq == last
        assert await sched.tick() is None  # nothing new
        assert digest_file(db).sha256 == listed[0].digest


# --- integration: Writer + Publisher + Reader on the embedded cluster -------------------


async def _append(writer: object, start: int, count: int) -> None:
    rng = random.Random(start)
    for i in range(start, start + count):
        ops = [(Op.PUT, b"k%05d" % rng.randrange(3000), rng.randbytes(60)) for _ in range(5)]
        if i % 7 == 0:
            ops.append((Op.DELETE, b"k%05d" % rng.randrange(3000), b""))
        await writer.append(ops)  # type: ignore[attr-defined]


async def _publish(data_dir: Path, topic: str, servers: str) -> dict[int, int]:
    from walship.producer.publisher import Publisher

    async with Publisher(
        data_dir, topic=topic, partitions=3, producer_kwargs={"bootstrap_servers": servers}
    ) as pub:
        await pub.run(until_caught_up=True)
        return pub.offsets


def _reader(path: Path, servers: str, topic: str, snaps: FileSnapshotStore, rid: str) -> object:
    from walship.consumer.bootstrap import kafka_log_inspector
    from walship.consumer.reader import Reader

    kwargs = {"bootstrap_servers": servers}
    applier = SqliteApplier(path)
    boot = Bootstrapper.for_applier(
        applier, snaps, topic=topic, inspect_log=kafka_log_inspector(topic, kwargs), progress=quiet
    )
    reader = Reader(
        applier,
        topic=topic,
        reader_id=rid,
        client_kwargs=kwargs,
        bootstrap=boot,
        gap_timeout_ms=1000,
    )
    reader.bootstrapper = boot  # type: ignore[attr-defined]
    return reader


@pytest.mark.kafka
async def test_readers_bootstrap_after_the_log_start_moved(
    tmp_path: Path, devcluster: object
) -> None:
    from walship.producer.writer import Writer
    from walship.shared.devcluster import DevCluster
    from walship.shared.snapshot.create import create_from_data_dir

    assert isinstance(devcluster, DevCluster)
    servers, topic = devcluster.bootstrap_servers, "boot-int"
    devcluster.create_topic(topic, 3)
    data = tmp_path / "writer"
    snaps = FileSnapshotStore(tmp_path / "snaps")
    async with Writer(data) as writer:
        await _append(writer, 0, 300)
        await _publish(data, topic, servers)
        # Reader A follows up to here, then stops.
        a = _reader(tmp_path / "a.db", servers, topic, snaps, "a")
        async with a:  # type: ignore[attr-defined]
            await asyncio.wait_for(a.run(until_caught_up=True), 60)  # type: ignore[attr-defined]
        a_seq = digest_file(tmp_path / "a.db").seq
        assert a_seq == writer.last_seq
        await _append(writer, 300, 300)
        await _publish(data, topic, servers)
        m = await create_from_data_dir(data, snaps, topic=topic, partitions=3, chunk_keys=200)
        await _append(writer, 600, 300)
        await _publish(data, topic, servers)
        final = writer.last_seq
    expected = digest_file(data / "state.db")
    assert expected.seq == final and m.seq < final
    # Retention: the log start of every partition moves past reader A's position,
    # up to exactly where the snapshot continues.
    for p in range(3):
        devcluster.truncate(topic, p, m.offsets.get(p, 0))
    a = _reader(tmp_path / "a.db", servers, topic, snaps, "a")
    async with a:  # type: ignore[attr-defined]
        await asyncio.wait_for(a.run(until_seq=final), 90)  # type: ignore[attr-defined]
    assert a.bootstrapper.loaded_chunks == len(m.chunks)  # type: ignore[attr-defined]
    assert digest_file(tmp_path / "a.db") == expected
    # A brand-new reader joining now bootstraps the same way (prepare, as the CLI does).
    b = _reader(tmp_path / "b.db", servers, topic, snaps, "b")
    cp = await b.bootstrapper.prepare()  # type: ignore[attr-defined]
    assert cp is not None and cp.applied_seq == m.seq
    async with b:  # type: ignore[attr-defined]
        await asyncio.wait_for(b.run(until_seq=final), 90)  # type: ignore[attr-defined]
    assert digest_file(tmp_path / "b.db") == expected
    # And one that does not prepare: the reader finds the gap itself and calls the hook.
    c = _reader(tmp_path / "c.db", servers, topic, snaps, "c")
    async with c:  # type: ignore[attr-defined]
        await asyncio.wait_for(c.run(until_seq=final), 90)  # type: ignore[attr-defined]
    assert digest_file(tmp_path / "c.db") == expected


async def test_snapshot_while_writes_continue_is_consistent(tmp_path: Path) -> None:
    import threading

    txns: list[Transaction] = []
    seq = 1
    rng = random.Random(3)
    for _ in range(400):
        ops = [(Op.PUT, b"k%04d" % rng.randrange(2000), rng.randbytes(30)) for _ in range(50)]
        ops.append((Op.DELETE, b"k%04d" % rng.randrange(2000), b""))
        txns.append(Transaction.of(seq, ops, seq))
        seq = txns[-1].last_seq + 1
    snaps = FileSnapshotStore(tmp_path / "snaps")
    db = tmp_path / "live.db"
    with ReplicaStore(db) as live:
        live.apply([Batch.from_transactions(WRITER, txns[:100])], writer=WRITER)
        stop = threading.Event()

        def keep_writing() -> None:
            for t in txns[100:]:
                if stop.is_set():
                    return
                live.apply([Batch.from_transactions(WRITER, [t])], writer=WRITER)

        worker = threading.Thread(target=keep_writing)
        worker.start()
        try:
            m = await create_snapshot(live, snaps, topic=TOPIC, partitions=2, chunk_keys=50)
        finally:
            stop.set()
            worker.join()
    upto = next(i for i, t in enumerate(txns) if t.last_seq == m.seq)
    with ReplicaStore(tmp_path / "ref.db") as ref:
        ref.apply([Batch.from_transactions(WRITER, txns[: upto + 1])], writer=WRITER)
        assert ref.digest().sha256 == m.digest
    assert m.seq_timestamp_us in (0, txns[upto].timestamp_us)
