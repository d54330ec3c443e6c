"""Writer identity, the reference Writer (WAL + state.db, replay), loadgen and its CLI."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from walship.producer.identity import IDENTITY_NAME, WriterIdentity
from walship.producer.loadgen import run_load
from walship.producer.wal import FsyncPolicy, WalReader, WalWriter
from walship.producer.writer import Writer
from walship.shared.cli.main import main as cli_main
from walship.shared.errors import WalError
from walship.shared.model import Batch, Op
from walship.shared.store import ReplicaStore, digest_file


def test_identity_created_then_epoch_bumped_per_start(tmp_path: Path) -> None:
    first = WriterIdentity.load_or_create(tmp_path)
    assert first.epoch == 1 and len(first.stream_id) == 16
    second = WriterIdentity.load_or_create(tmp_path)
    assert second.stream_id == first.stream_id and second.epoch == 2
    assert WriterIdentity.load(tmp_path) == second
    on_disk = json.loads((tmp_path / IDENTITY_NAME).read_text())
    assert on_disk == {"stream_id": first.stream_id.hex(), "epoch": 2}
    assert not list(tmp_path.glob("*.tmp"))  # atomic replace left no temp file
    other = WriterIdentity.load_or_create(tmp_path / "other")
    assert other.stream_id != first.stream_id


def test_identity_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(WalError, match="start the writer once"):
        WriterIdentity.load(tmp_path)
    (tmp_path / IDENTITY_NAME).write_text('{"stream_id": "zz", "epoch": 1}')
    with pytest.raises(WalError, match="identity file is invalid") as info:
        WriterIdentity.load_or_create(tmp_path)
    assert IDENTITY_NAME in info.value.context["path"]


async def test_append_is_in_wal_then_state_db_after_wait_applied(tmp_path: Path) -> None:
    async with Writer(tmp_path) as w:
        assert w.writer_id.epoch == 1
        t = await w.append([(Op.PUT, b"a", b"1"), (Op.PUT, b"b", b"2")])
        assert w.last_seq == t.last_seq == 2  # durable in the WAL when append returns
        await w.wait_applied(t.last_seq)
        assert w.store.get(b"a") == b"1" and w.store.applied_seq == w.applied_seq == 2
        await asyncio.gather(*(w.append([(Op.PUT, b"k%d" % i, b"v")]) for i in range(100)))
        await w.append([(Op.DELETE, b"a", b"")])
        await w.wait_applied()  # everything appended so far
        assert w.store.get(b"a") is None and w.store.applied_seq == w.last_seq == 103
        cp = w.store.checkpoint()
        assert cp.writer == w.writer_id and cp.offsets == {}
        digest = w.store.digest()
    async with Writer(tmp_path) as w:
        assert w.writer_id.epoch == 2 and w.last_seq == 103
        assert w.store.digest() == digest
        assert (await w.append([(Op.PUT, b"z", b"z")])).first_seq == 104
        await w.wait_applied(104)
        assert w.store.checkpoint().writer == w.writer_id


async def test_start_replays_wal_records_missing_from_state_db(tmp_path: Path) -> None:
    async with Writer(tmp_path) as w:
        await w.append([(Op.PUT, b"a", b"1")])
    # As if the process died after the WAL fsync but before the state.db commit:
    async with WalWriter(tmp_path / "wal") as wal:
        for i in range(50):
            await wal.append([(Op.PUT, b"r%d" % i, b"x"), (Op.DELETE, b"a", b"")])
    async with Writer(tmp_path, segment_bytes_max=4096) as w:
        assert w.store.applied_seq == w.last_seq == 101
        assert w.store.get(b"a") is None and w.store.get(b"r49") == b"x"


async def test_state_db_ahead_of_wal_is_refused(tmp_path: Path) -> None:
    async with Writer(tmp_path) as w:
        for i in range(3):
            await w.append([(Op.PUT, b"k%d" % i, b"v")])
    for seg in (tmp_path / "wal").glob("*.seg"):
        seg.unlink()  # the WAL lost acknowledged records
    with pytest.raises(WalError, match=r"state\.db is at seq 3 but the WAL ends at 0"):
        await Writer(tmp_path).start()


async def test_a_failing_state_apply_stops_the_writer_but_keeps_the_wal(tmp_path: Path) -> None:
    async with Writer(tmp_path) as w:
        await w.append([(Op.PUT, b"a", b"1")])
        await w.wait_applied()
        w.store.close()  # state.db becomes unusable
        t = await w.append([(Op.PUT, b"b", b"2")])  # durable in the WAL: acknowledged
        with pytest.raises(WalError, match="durable in the WAL") as info:
            await w.wait_applied(t.last_seq)
        assert "restart" in str(info.value)
        # The next append is written but refused (its error says it is durable) ...
        with pytest.raises(WalError, match="durably"):
            await w.append([(Op.PUT, b"c", b"3")])
        with pytest.raises(WalError):  # ... and then the writer stops accepting appends
            await w.append([(Op.PUT, b"d", b"4")])
    async with Writer(tmp_path) as w:  # the restart replays the durable record
        assert w.store.get(b"b") == b"2" and w.store.get(b"c") == b"3"
        assert w.last_seq == w.store.applied_seq == 3 and w.store.get(b"d") is None


async def test_loadgen_is_deterministic_per_seed(tmp_path: Path) -> None:
    digests = []
    for run in ("a", "b", "c"):
        seed = 5 if run != "c" else 6
        progress: list[tuple[int, int]] = []
        async with Writer(tmp_path / run, fsync=FsyncPolicy.INTERVAL) as w:
            res = await run_load(
                w,
                entries=2_005,
                keys=300,
                value_bytes=20,
                txn_entries=10,
                delete_ratio=0.2,
                seed=seed,
                progress=lambda d, t, p=progress: p.append((d, t)),
            )
            assert (res.entries, res.txns, res.first_seq, res.last_seq) == (2005, 201, 1, 2005)
            assert progress[-1] == (2005, 2005)
            await w.wait_applied()
            digests.append(w.store.digest())
        with WalReader(tmp_path / run / "wal") as r:
            txns = [t for t, _ in r.read_from(1, max_bytes=1 << 30)]
        assert [len(t) for t in txns] == [10] * 200 + [5]
        assert any(op == Op.DELETE for t in txns for op in t.ops)
        assert all(len(k) == 16 for t in txns for k in t.keys)
    assert digests[0] == digests[1] and digests[0].sha256 != digests[2].sha256
    assert 0 < digests[0].keys <= 300


async def test_loadgen_rate_limit(tmp_path: Path) -> None:
    async with Writer(tmp_path, fsync=FsyncPolicy.INTERVAL) as w:
        t0 = time.monotonic()
        res = await run_load(w, entries=200, txn_entries=10, rate_per_s=1000, seed=1)
        assert res.entries == 200 and time.monotonic() - t0 >= 0.18


async def test_loadgen_surfaces_append_failures(tmp_path: Path) -> None:
    async with Writer(tmp_path, wal_bytes_max=8192, segment_bytes_max=4096) as w:
        with pytest.raises(WalError, match="limit 8192"):
            await run_load(w, entries=10_000, txn_entries=10, seed=1, concurrency=4)


def test_cli_writer_load_and_digest(tmp_path: Path) -> None:
    runner = CliRunner()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALSHIP_")}
    args = ["writer", "load", "--data-dir", str(tmp_path), "--entries", "500", "--keys", "50"]
    res = runner.invoke(cli_main, [*args, "--txn-entries", "7", "--json"], env=env)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert summary["entries"] == 500 and summary["last_seq"] == 500
    res = runner.invoke(cli_main, ["digest", "--data-dir", str(tmp_path)], env=env)
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == digest_file(tmp_path / "state.db").to_json()
    with ReplicaStore(tmp_path / "state.db") as s:
        assert json.loads(res.output)["seq"] == s.applied_seq == 500
    res = runner.invoke(cli_main, ["digest", "--db", str(tmp_path / "nope.db")], env=env)
    assert res.exit_code == 1 and "no store file" in res.output
    res = runner.invoke(cli_main, ["digest"], env=env)
    assert res.exit_code == 2


def _segments(data_dir: Path) -> list[str]:
    return sorted(p.name for p in (data_dir / "wal").glob("*.seg"))


async def _fill(writer: Writer, txns: int) -> None:
    for i in range(txns):
        await writer.append([(Op.PUT, b"k%d" % i, b"v" * 2000)])


async def test_wal_segments_released_once_published(tmp_path: Path) -> None:
    from walship.producer.position import PublishedPosition

    async with Writer(tmp_path, segment_bytes_max=8192, release_interval_s=3600) as writer:
        await _fill(writer, 40)
        before = _segments(tmp_path)
        assert len(before) > 3
        assert writer.release() == 0  # nothing published yet: everything is kept
        PublishedPosition(tmp_path / "published.json").save(20, {0: 20})
        released = writer.release()
        after = _segments(tmp_path)
        assert released == len(before) - len(after) > 0
        # What remains still starts at or below seq 21: nothing unpublished is gone.
        with WalReader(tmp_path / "wal") as reader:
            assert reader.read_from(21, max_bytes=1 << 20)[0][0].first_seq == 21


async def test_wal_release_waits_for_a_snapshot_when_asked(tmp_path: Path) -> None:
    from walship.producer.position import PublishedPosition
    from walship.shared.snapshot.create import record_snapshotted

    async with Writer(
        tmp_path, segment_bytes_max=8192, wal_release="snapshotted", release_interval_s=0.05
    ) as writer:
        await _fill(writer, 40)
        PublishedPosition(tmp_path / "published.json").save(40, {0: 40})
        count = len(_segments(tmp_path))
        await asyncio.sleep(0.2)
        assert len(_segments(tmp_path)) == count  # published, but no snapshot covers it
        record_snapshotted(tmp_path, 30)
        record_snapshotted(tmp_path, 10)  # never moves backwards
        await asyncio.sleep(0.3)  # the background loop releases
        assert len(_segments(tmp_path)) < count
        with WalReader(tmp_path / "wal") as reader:
            assert reader.read_from(31, max_bytes=1 << 20)[0][0].first_seq == 31


async def test_wal_release_never_keeps_everything(tmp_path: Path) -> None:
    from walship.producer.position import PublishedPosition

    async with Writer(tmp_path, segment_bytes_max=8192, wal_release="never") as writer:
        await _fill(writer, 20)
        PublishedPosition(tmp_path / "published.json").save(20, {0: 20})
        count = len(_segments(tmp_path))
        assert writer.release() == 0
        assert len(_segments(tmp_path)) == count


async def test_state_db_lag_is_bounded_and_applies_in_large_groups(tmp_path: Path) -> None:
    groups: list[int] = []
    async with Writer(tmp_path, state_lag_entries_max=50, state_apply_entries_max=40) as w:
        inner = w.store.apply

        def slow_apply(batches: Sequence[Batch], **kw: Any) -> None:
            time.sleep(0.005)  # a slow disk: the state falls behind the WAL
            inner(batches, **kw)
            groups.append(sum(b.entry_count for b in batches))

        w.store.apply = slow_apply  # type: ignore[method-assign]

        async def append_checked(i: int) -> None:
            t = await w.append([(Op.PUT, b"k%d" % i, b"v")])
            # Backpressure: an append returns only while the state lags <= 50 entries.
            assert w.applied_seq >= t.last_seq - 50

        await asyncio.gather(*(append_checked(i) for i in range(300)))
        await w.wait_applied()
        assert w.applied_seq == w.last_seq == 300
    assert sum(groups) == 300 and max(groups) == 40  # grouped, never above the cap
    assert len(groups) < 300 // 4  # far fewer store transactions than appends
    async with Writer(tmp_path) as w:
        assert w.store.applied_seq == 300 and w.store.get(b"k299") == b"v"


async def test_stop_applies_everything_appended(tmp_path: Path) -> None:
    async with Writer(tmp_path) as w:
        for i in range(20):
            await w.append([(Op.PUT, b"k%d" % i, b"v%d" % i)])
    with ReplicaStore(tmp_path / "state.db") as s:
        assert s.applied_seq == 20 and s.get(b"k19") == b"v19"
