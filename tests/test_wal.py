"""WalWriter/WalReader: dense appends, group commit, policies, rotation, release,
backpressure, disk-failure rollback, recovery of torn tails, corruption detection."""

from __future__ import annotations

import asyncio
import errno
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from walship.producer import wal as wal_mod
from walship.producer import wal_format as fmt
from walship.producer.wal import FsyncPolicy, WalReader, WalWriter, list_segments
from walship.shared.errors import DurabilityError, WalCorruptError, WalError, WalFullError
from walship.shared.model import Op, Transaction


def entries(tag: str, n: int = 1) -> list[tuple[Op, bytes, bytes]]:
    return [(Op.PUT, f"{tag}-{i}".encode(), f"value-{tag}-{i}".encode()) for i in range(n)]


def read_all(directory: Path) -> list[Transaction]:
    with WalReader(directory) as r:
        return [t for t, _ in r.read_from(1, max_bytes=1 << 40)]


def size_of(path: Path) -> int:
    return path.stat().st_size


def append_bytes(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def count_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    calls: list[int] = []
    real = getattr(os, name)

    def counted(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, name, counted)
    return calls


async def test_appends_get_dense_seqs_in_call_order_and_read_back(tmp_path: Path) -> None:
    async with WalWriter(tmp_path) as w:
        t1 = await w.append(
            entries("a", 3), timestamp_us=42, traceparent="00-" + "1" * 32 + "-" + "2" * 16 + "-01"
        )
        assert (t1.first_seq, t1.last_seq, t1.timestamp_us) == (1, 3, 42)
        many = await asyncio.gather(*(w.append(entries(f"t{i}", 1 + i % 3)) for i in range(50)))
        seq = 4
        for i, t in enumerate(many):
            assert t.first_seq == seq and t.keys[0] == f"t{i}-0".encode()
            seq = t.last_seq + 1
        assert w.last_seq == seq - 1
    with WalReader(tmp_path) as r:
        got = r.read_from(1, max_bytes=1 << 30)
        assert got[0] == (t1, "00-" + "1" * 32 + "-" + "2" * 16 + "-01")
        assert [t for t, _ in got[1:]] == many
        assert r.last_seq == seq - 1
        # From the middle: starts with the txn holding that seq; max_bytes bounds it
        # but at least one record comes back.
        part = r.read_from(5, max_bytes=1)
        assert len(part) == 1 and part[0][0].first_seq <= 5 <= part[0][0].last_seq
        assert r.read_from(seq, max_bytes=100) == []


@pytest.mark.parametrize("policy", [FsyncPolicy.ALWAYS, FsyncPolicy.BATCH])
async def test_concurrent_appends_share_fsyncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, policy: FsyncPolicy
) -> None:
    async with WalWriter(tmp_path, fsync=policy) as w:
        syncs = count_calls(monkeypatch, "fdatasync")
        await w.append(entries("one"))
        assert len(syncs) == 1  # alone: its own fsync before returning
        await asyncio.gather(*(w.append(entries(f"x{i}")) for i in range(200)))
        assert 1 < len(syncs) + 1 <= 20, f"{len(syncs)} fsyncs for 200 concurrent appends"


async def test_interval_policy_returns_after_write_and_syncs_in_the_background(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs = count_calls(monkeypatch, "fdatasync")
    async with WalWriter(tmp_path, fsync=FsyncPolicy.INTERVAL, fsync_interval_ms=20) as w:
        await w.append(entries("a"))
        assert syncs == []  # acknowledged after write(), before any fsync
        for _ in range(100):
            if syncs:
                break
            await asyncio.sleep(0.01)
        assert len(syncs) == 1
        await asyncio.sleep(0.1)
        assert len(syncs) == 1  # nothing new written: no more fsyncs
        await w.append(entries("b"))
        await w.sync()
        assert len(syncs) == 2
    assert [t.keys[0] for t in read_all(tmp_path)] == [b"a-0", b"b-0"]


async def test_rotation_and_release_through(tmp_path: Path) -> None:
    async with WalWriter(tmp_path, segment_bytes_max=4096) as w:
        for i in range(60):
            await w.append(entries(f"r{i}", 2))  # ~100 bytes a record
        segs = list_segments(tmp_path)
        assert len(segs) >= 2 and segs[0] == 1
        assert w.release_through(segs[1] - 2) == 0  # segment 0 still holds seq segs[1]-1
        before = w.wal_bytes
        assert w.release_through(segs[1] - 1) == 1
        assert list_segments(tmp_path) == segs[1:] and w.wal_bytes < before
        assert w.release_through(10**9) == len(segs) - 2  # never the active segment
        assert list_segments(tmp_path) == [segs[-1]]
        assert w.first_seq == segs[-1]
        t = await w.append(entries("after"))
        assert t.first_seq == 121
    with WalReader(tmp_path) as r:
        with pytest.raises(WalError, match="already released"):
            r.read_from(1, max_bytes=100)
        got = r.read_from(segs[-1], max_bytes=1 << 30)
        assert got[-1][0].first_seq == 121
    async with WalWriter(tmp_path, segment_bytes_max=4096) as w:  # restart after release
        assert w.last_seq == 121


async def test_reader_follows_rotation_and_tolerates_concurrent_release(tmp_path: Path) -> None:
    async with WalWriter(tmp_path, segment_bytes_max=4096) as w:
        reader = WalReader(tmp_path)
        next_seq = 1
        seen: list[int] = []
        for i in range(200):
            await w.append(entries(f"c{i}"))
            if i % 7 == 0:
                for t, _ in reader.read_from(next_seq, max_bytes=500):
                    seen.append(t.first_seq)
                    next_seq = t.last_seq + 1
                # Release what the reader has consumed, as the publisher would.
                w.release_through(next_seq - 1)
        while got := reader.read_from(next_seq, max_bytes=500):
            for t, _ in got:
                seen.append(t.first_seq)
                next_seq = t.last_seq + 1
        assert seen == list(range(1, 201))
        reader.close()


@pytest.mark.parametrize("released_too", [False, True])
async def test_reader_tolerates_segments_released_while_it_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, released_too: bool
) -> None:
    async with WalWriter(tmp_path, segment_bytes_max=4096) as w:
        for i in range(300):
            await w.append(entries(f"v{i}"))
        segs = list_segments(tmp_path)
        assert len(segs) >= 4
        reader = WalReader(tmp_path)
        real_open = wal_mod._open_segment
        raced: list[Path] = []

        def racing_open(path: Path) -> Any:
            if not raced:  # the release lands between listing and opening
                raced.append(path)
                w.release_through((segs[2] if released_too else segs[1]) - 1)
            return real_open(path)

        monkeypatch.setattr(wal_mod, "_open_segment", racing_open)
        if released_too:
            # The segment it wanted is gone: a clear error, not a FileNotFoundError.
            with pytest.raises(WalError, match="already released"):
                reader.read_from(segs[1], max_bytes=1 << 30)
        else:
            got = reader.read_from(segs[1], max_bytes=1 << 30)
            assert got[0][0].first_seq == segs[1] and got[-1][0].last_seq == 300
        assert raced


async def test_wal_full_is_retriable_and_clears_after_release(tmp_path: Path) -> None:
    async with WalWriter(tmp_path, segment_bytes_max=4096, wal_bytes_max=12_000) as w:
        with pytest.raises(WalFullError) as info:
            for i in range(1000):
                await w.append(entries(f"f{i}", 3))
        err = info.value
        assert err.retriable and "limit 12000" in str(err)
        assert err.context["wal_bytes"] >= 12_000
        last = w.last_seq
        assert [t.last_seq for t in read_all(tmp_path)][-1] == last  # nothing dropped
        w.release_through(last)
        t = await w.append(entries("again"))
        assert t.first_seq == last + 1


def failing(
    monkeypatch: pytest.MonkeyPatch, name: str, w: WalWriter, err: int, partial: bool = False
) -> list[bool]:
    """Make os.<name> fail with errno `err` on the WAL's active file while the flag is set."""
    armed = [True]
    real: Callable[..., Any] = getattr(os, name)

    def fake(fd: int, *args: Any) -> Any:
        if armed[0] and fd == w._fd:
            if partial and args:
                real(fd, bytes(args[0])[: len(args[0]) // 2])  # half of it reaches the file
            raise OSError(err, os.strerror(err))
        return real(fd, *args)

    monkeypatch.setattr(os, name, fake)
    return armed


@pytest.mark.parametrize(
    ("name", "err", "partial"),
    [("write", errno.ENOSPC, True), ("write", errno.EROFS, False), ("fdatasync", errno.EIO, False)],
)
async def test_disk_errors_leave_nothing_and_the_writer_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, err: int, partial: bool
) -> None:
    async with WalWriter(tmp_path) as w:
        await w.append(entries("ok1", 2))
        size = size_of(tmp_path / fmt.segment_name(1))
        armed = failing(monkeypatch, name, w, err, partial)
        results = await asyncio.gather(
            *(w.append(entries(f"bad{i}")) for i in range(5)), return_exceptions=True
        )
        assert all(isinstance(r, DurabilityError) for r in results)
        assert results[0].retriable and results[0].context["errno"] == err  # type: ignore[union-attr]
        assert w.last_seq == 2
        assert size_of(tmp_path / fmt.segment_name(1)) == size  # truncated back
        assert WalReader(tmp_path).last_seq == 2
        armed[0] = False  # the condition clears
        t = await w.append(entries("ok2"))
        assert t.first_seq == 3
    assert [t.keys[0] for t in read_all(tmp_path)] == [b"ok1-0", b"ok2-0"]
    async with WalWriter(tmp_path) as w:
        assert w.last_seq == 3


async def test_torn_tail_is_truncated_on_recovery(tmp_path: Path) -> None:
    async with WalWriter(tmp_path) as w:
        for i in range(5):
            await w.append(entries(f"t{i}"))
    seg = tmp_path / fmt.segment_name(1)
    data = seg.read_bytes()
    seg.write_bytes(data[:-7])  # the last record cut short...
    # ...by a crash during its write, before the marker moved past it.
    (tmp_path / wal_mod.MARKER_NAME).write_bytes(fmt.encode_marker(4, fmt.MARKER_SYNCED))
    async with WalWriter(tmp_path) as w:
        assert w.last_seq == 4
        assert size_of(seg) < len(data) - 7  # torn bytes removed
        t = await w.append(entries("new"))
        assert t.first_seq == 5
    assert [t.keys[0] for t in read_all(tmp_path)][-2:] == [b"t3-0", b"new-0"]


async def test_zero_filled_tail_and_half_created_segment_recover(tmp_path: Path) -> None:
    async with WalWriter(tmp_path) as w:
        await w.append(entries("z"))
    seg = tmp_path / fmt.segment_name(1)
    append_bytes(seg, bytes(4096))  # preallocated / zeroed pages after a crash
    (tmp_path / fmt.segment_name(2)).write_bytes(fmt.segment_header()[:3])
    async with WalWriter(tmp_path) as w:
        assert w.last_seq == 1
        assert (await w.append(entries("y"))).first_seq == 2


async def test_corruption_in_the_middle_is_an_error_never_a_truncation(tmp_path: Path) -> None:
    async with WalWriter(tmp_path) as w:
        for i in range(5):
            await w.append(entries(f"m{i}"))
    seg = tmp_path / fmt.segment_name(1)
    data = bytearray(seg.read_bytes())
    data[fmt.SEGMENT_HEADER_BYTES + 30] ^= 0x10  # inside the first record
    seg.write_bytes(bytes(data))
    with pytest.raises(WalCorruptError, match="middle of the log") as info:
        await WalWriter(tmp_path).start()
    assert info.value.context["seq"] == 1
    assert size_of(seg) == len(data)  # nothing was cut
    # The reader refuses the damaged acknowledged record too.
    with pytest.raises(WalCorruptError, match="checksum"):
        WalReader(tmp_path).read_from(1, max_bytes=100)


@pytest.mark.parametrize("policy", [FsyncPolicy.ALWAYS, FsyncPolicy.BATCH])
async def test_damage_to_the_last_acknowledged_record_is_not_taken_for_a_torn_tail(
    tmp_path: Path, policy: FsyncPolicy
) -> None:
    async with WalWriter(tmp_path, fsync=policy) as w:
        for i in range(3):
            await w.append(entries(f"l{i}"))
    seg = tmp_path / fmt.segment_name(1)
    data = bytearray(seg.read_bytes())
    data[-3] ^= 0x01
    seg.write_bytes(bytes(data))
    with pytest.raises(WalCorruptError, match="acknowledged") as info:
        await WalWriter(tmp_path).start()
    assert info.value.context["seq"] == 3
    assert size_of(seg) == len(data)


async def test_second_writer_on_the_same_wal_is_refused(tmp_path: Path) -> None:
    async with WalWriter(tmp_path):
        with pytest.raises(WalError, match="another writer"):
            await WalWriter(tmp_path).start()


async def test_invalid_appends_are_refused_before_a_seq_is_used(tmp_path: Path) -> None:
    async with WalWriter(tmp_path) as w:
        with pytest.raises(ValueError, match="at least one"):
            await w.append([])
        with pytest.raises(ValueError, match="carries a value"):
            await w.append([(Op.DELETE, b"k", b"v")])
        assert (await w.append(entries("fine"))).first_seq == 1
    with pytest.raises(WalError, match="not started"):
        await w.append(entries("late"))


class _Bytes(bytes):
    pass


def _validated(entries: Any) -> tuple[Any, ...]:
    try:
        ops, keys, values = wal_mod._validate(entries)
    except (TypeError, ValueError) as exc:
        return (type(exc).__name__, str(exc))
    return (ops, keys, values, [type(x) for x in [*keys, *values]])


@pytest.mark.parametrize(
    "entries",
    [
        [(Op.PUT, b"k", b"v"), (Op.DELETE, b"k", b"")],
        [(0, b"k", b"v"), (True, b"k", b""), (1.0, b"j", b"")],
        [(Op.DELETE, b"k", b"v")],
        [(Op.PUT, b"k", b"v")] * 4 + [(Op.DELETE, b"k", b"x")],
        [(2, b"k", b"v")],
        [(-1, b"k", b"v")],
        [("x", b"k", b"v")],
        [(0, "k", b"v")],
        [(0, b"k", bytearray(b"v"))],
        [(0, b"k", None)],
        [(0, _Bytes(b"k"), b"v"), (Op.DELETE, b"k", _Bytes(b""))],
        [(Op.DELETE, b"k", _Bytes(b"x"))],
        [()],
        [(0, b"k")],
        [(0, b"k", b"v", 1)],
        [(0, b"k", b"v"), (0, b"k")],
        [b"abc"],
        [None],
    ],
)
def test_validate_fast_path_accepts_and_refuses_like_the_entry_loop(entries: Any) -> None:
    expected: tuple[Any, ...]
    try:
        ops, keys, values = wal_mod._validate_entries(entries)
    except (TypeError, ValueError) as exc:
        expected = (type(exc).__name__, str(exc))
    else:
        expected = (ops, keys, values, [type(x) for x in [*keys, *values]])
    assert _validated(entries) == expected
    assert _validated(iter(entries)) == expected


async def test_reader_never_returns_records_beyond_the_acknowledged_marker(tmp_path: Path) -> None:
    async with WalWriter(tmp_path) as w:
        await w.append(entries("a"))
        await w.append(entries("b"))
    # Simulate a record written but not yet acknowledged (marker still at 2).
    append_bytes(tmp_path / fmt.segment_name(1), fmt.encode_record(3, 1, b"\x90"))
    with WalReader(tmp_path) as r:
        assert r.last_seq == 2
        assert [t.first_seq for t, _ in r.read_from(1, max_bytes=1 << 20)] == [1, 2]
    (tmp_path / wal_mod.MARKER_NAME).unlink()  # no marker: a scan decides
    assert WalReader(tmp_path).last_seq == 3


@pytest.mark.parametrize("inotify", [True, False])
async def test_wait_for_wakes_on_append_and_times_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inotify: bool
) -> None:
    if not inotify:
        monkeypatch.setattr(wal_mod.DirWatcher, "open", classmethod(lambda cls, d, loop: None))
        monkeypatch.setattr(wal_mod, "POLL_INTERVAL_S", 0.02)
    async with WalWriter(tmp_path) as w:
        reader = WalReader(tmp_path)
        assert await reader.wait_for(1, timeout_s=0.05) is False
        loop = asyncio.get_running_loop()
        waiter = asyncio.create_task(reader.wait_for(2, timeout_s=5))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        await w.append(entries("w", 2))
        t0 = loop.time()
        assert await waiter is True
        assert loop.time() - t0 < 1.0
        assert (reader._watcher is not None) is inotify
        reader.close()


# --- property: damage is detected, never returned as data -------------------


def _build(directory: Path, sizes: list[int]) -> list[Transaction]:
    async def go() -> list[Transaction]:
        async with WalWriter(directory, fsync=FsyncPolicy.INTERVAL) as w:
            out = []
            for i, n in enumerate(sizes):
                out.append(await w.append(entries(f"p{i}", n), timestamp_us=i))
            return out

    return asyncio.run(go())


def _recover(directory: Path) -> list[Transaction]:
    async def go() -> int:
        async with WalWriter(directory) as w:
            return w.last_seq

    last = asyncio.run(go())
    got = read_all(directory)
    assert (got[-1].last_seq if got else 0) == last
    return got


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=12),
    cut=st.floats(min_value=0.0, max_value=1.0),
    seed=st.integers(min_value=0, max_value=2**32),
    mode=st.sampled_from(["torn", "flip", "torn+flip"]),
)
def test_damage_is_detected_never_returned(
    tmp_path_factory: pytest.TempPathFactory, sizes: list[int], cut: float, seed: int, mode: str
) -> None:
    directory = tmp_path_factory.mktemp("wal")
    originals = _build(directory, sizes)
    seg = directory / fmt.segment_name(1)
    data = bytearray(seg.read_bytes())
    rng = random.Random(seed)
    # Record boundaries, to know which record the damage hits.
    ends = [r.end for r in fmt.scan(bytes(data), 1).records]
    starts = [fmt.SEGMENT_HEADER_BYTES, *ends[:-1]]
    if "torn" in mode:
        new_len = fmt.SEGMENT_HEADER_BYTES + int(cut * (len(data) - fmt.SEGMENT_HEADER_BYTES))
        del data[new_len:]
    flipped_record = None
    if "flip" in mode and len(data) > fmt.SEGMENT_HEADER_BYTES:
        pos = rng.randrange(fmt.SEGMENT_HEADER_BYTES, len(data))
        data[pos] ^= 1 << rng.randrange(8)
        flipped_record = max(i for i, s in enumerate(starts) if s <= pos)
    seg.write_bytes(bytes(data))
    complete = sum(1 for e in ends if e <= len(data))  # records wholly within the bytes
    try:
        got = _recover(directory)
    except WalCorruptError:
        event("middle damage: WalCorruptError")
        # Only a flip in a record followed by an intact one may be an error.
        assert flipped_record is not None and flipped_record + 1 < complete
        return
    event("tail damage: truncated" if len(got) < len(originals) else "no record damaged")
    # Whatever came back is an undamaged prefix of what was written.
    assert got == originals[: len(got)]
    intact = complete if flipped_record is None else min(complete, flipped_record)
    assert len(got) == intact
    if flipped_record is not None:
        # A flip before the last complete record must have raised.
        assert flipped_record + 1 >= complete


async def test_reader_detects_damage_in_an_older_segment(tmp_path: Path) -> None:
    async with WalWriter(tmp_path, segment_bytes_max=4096) as w:
        for i in range(80):
            await w.append(entries(f"o{i}"))
    seg = tmp_path / fmt.segment_name(1)
    data = bytearray(seg.read_bytes())
    data[-5] ^= 0xFF  # last record of a full (non-active) segment
    seg.write_bytes(bytes(data))
    with pytest.raises(WalCorruptError):
        WalReader(tmp_path).read_from(1, max_bytes=1 << 30)
