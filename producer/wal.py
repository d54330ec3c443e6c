"""The write-ahead log: segment files, group commit, crash recovery, release.

WalWriter appends transactions and assigns their dense sequences; an append
returns only once the record is durable per the FsyncPolicy (docs/wal.md says
what each policy can lose). Appends queue up while a write+fsync runs in a
worker thread, and the next cycle writes and syncs the whole queue at once
(group commit): throughput grows with concurrency while each append still
waits for its own fsync.

A failed write or fsync leaves nothing behind: the file is truncated back to
the last good end and the sequence counter is unchanged, so appends succeed
again once the disk recovers.

``wal/durable`` (16 bytes: u64 seq + crc) tells other processes how far the
log is acknowledged; WalReader never returns records beyond it, so the
publisher never ships what a crash could still take back.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import fcntl
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

from walship.producer import wal_format as fmt
from walship.producer.inotify import DirWatcher
from walship.shared.codec import decode_transaction, encode_transaction
from walship.shared.errors import (
    DecodeError,
    DurabilityError,
    WalCorruptError,
    WalError,
    WalFullError,
    WalshipError,
    translate_os_error,
)
from walship.shared.lifecycle import AsyncService
from walship.shared.model import Op, Transaction

MARKER_NAME = "durable"
LOCK_NAME = "LOCK"
_RECORD_OVERHEAD_BYTES = fmt.RECORD_HEADER_BYTES + 32  # + msgpack framing, roughly
POLL_INTERVAL_S = 0.25  # only without inotify


class FsyncPolicy(StrEnum):
    ALWAYS = "always"  # every append waits for an fsync; no waiting to collect others
    BATCH = "batch"  # group commit: waits one loop turn so concurrent appends share it
    INTERVAL = "interval"  # append returns after write(); fsync every fsync_interval_ms


@dataclass(slots=True)
class _Pending:
    ops: bytes
    keys: list[bytes]
    values: list[bytes]
    timestamp_us: int
    traceparent: str | None
    future: asyncio.Future[Transaction]


def list_segments(directory: Path) -> list[int]:
    """First seqs of the segment files, ascending."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise translate_os_error(exc, "listing WAL segments", directory) from exc
    seqs = [s for s in (fmt.parse_segment_name(n) for n in names) if s is not None]
    seqs.sort()
    return seqs


def read_marker(directory: Path) -> int | None:
    """The acknowledged seq the writer last published, or None (no marker yet)."""
    marker = read_marker_full(directory)
    return None if marker is None else marker[0]


def read_marker_full(directory: Path) -> tuple[int, int] | None:
    """(seq, flags) of the marker, or None."""
    path = directory / MARKER_NAME
    for _ in range(3):  # a read racing the 16-byte pwrite can see a mix; retry
        try:
            with open(path, "rb") as f:
                data = f.read(16)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise translate_os_error(exc, "reading the WAL marker", path) from exc
        marker = fmt.decode_marker(data)
        if marker is not None:
            return marker
    return None


def _resolve(group: list[_Pending], txns: list[Transaction]) -> None:
    for p, t in zip(group, txns, strict=True):
        if not p.future.done():
            p.future.set_result(t)


def _open_segment(path: Path) -> BinaryIO:
    """Open a segment for reading; FileNotFoundError (released meanwhile) passes through."""
    try:
        return open(path, "rb", buffering=1 << 20)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise translate_os_error(exc, "reading a WAL segment", path) from exc


def _validate(
    ops_keys_values: Sequence[tuple[Op, bytes, bytes]],
) -> tuple[bytes, list[bytes], list[bytes]]:
    """Refuse what the codec would refuse, before a sequence is assigned (caller bugs)."""
    if not ops_keys_values:
        raise ValueError("an append needs at least one entry")
    # Fast path, column-wise in C: returns only what the loop below accepts
    # (plain bytes, ops 0/1, deletes without a value); anything else takes the
    # loop, which accepts or refuses it exactly as before.
    if not isinstance(ops_keys_values, (list, tuple)):
        ops_keys_values = list(ops_keys_values)  # the loop may need a second pass
    try:
        op_col, key_col, value_col = zip(*ops_keys_values, strict=True)
        ops_bytes = bytes(op_col)
    except (TypeError, ValueError):
        pass
    else:
        if (
            not ops_bytes.translate(None, b"\x00\x01")
            and {*map(type, key_col), *map(type, value_col)} == {bytes}
            and not any(value_col[i] for i in _positions(ops_bytes, b"\x01"))
        ):
            return ops_bytes, list(key_col), list(value_col)
    return _validate_entries(ops_keys_values)


def _positions(data: bytes, byte: bytes) -> list[int]:
    """Indexes of ``byte`` in ``data``."""
    out: list[int] = []
    i = data.find(byte)
    while i >= 0:
        out.append(i)
        i = data.find(byte, i + 1)
    return out


def _validate_entries(
    ops_keys_values: Sequence[tuple[Op, bytes, bytes]],
) -> tuple[bytes, list[bytes], list[bytes]]:
    """_validate, entry by entry (any input)."""
    ops = bytearray()
    keys: list[bytes] = []
    values: list[bytes] = []
    for op, key, value in ops_keys_values:
        if op == Op.DELETE:
            if value:
                raise ValueError(f"delete of key {key!r} carries a value")
        elif op != Op.PUT:
            raise ValueError(f"unknown op {op!r}")
        if not isinstance(key, bytes) or not isinstance(value, bytes):
            raise ValueError("keys and values must be bytes")
        ops.append(int(op))
        keys.append(key)
        values.append(value)
    return bytes(ops), keys, values


class WalWriter(AsyncService):
    """Async appender with group commit. One per WAL directory (an flock enforces it)."""

    def __init__(
        self,
        directory: Path,
        *,
        fsync: FsyncPolicy = FsyncPolicy.BATCH,
        fsync_interval_ms: int = 100,
        segment_bytes_max: int = 64 << 20,
        wal_bytes_max: int | None = None,
        on_durable: Callable[[Sequence[Transaction]], None] | None = None,
    ) -> None:
        if fsync_interval_ms < 1:
            raise ValueError("fsync_interval_ms must be >= 1")
        if segment_bytes_max < 4096:
            raise ValueError("segment_bytes_max must be >= 4096")
        self.directory = Path(directory)
        self.policy = FsyncPolicy(fsync)
        self.fsync_interval_ms = fsync_interval_ms
        self.segment_bytes_max = segment_bytes_max
        self.wal_bytes_max = wal_bytes_max
        # Called in a worker thread with durable cycles, in seq order (several
        # merged when it lags), while the next cycle is written; the appends
        # return after it (the Writer applies them to state.db there).
        self._on_durable = on_durable
        # Everything below is touched by the worker thread under _lock.
        self._lock = threading.Lock()
        self._segments: list[int] = []
        self._wal_bytes = 0  # all segment files together
        self._seg_lock = threading.Lock()  # _segments/_wal_bytes, held only briefly
        self._fd = -1
        self._dir_fd = -1
        self._marker_fd = -1
        self._lock_fd = -1
        self._active_size = 0
        self._last_seq = 0
        self._unsynced = False
        self._failed: WalshipError | None = None
        # Event-loop side.
        self._pending: list[_Pending] = []
        self._pending_bytes = 0
        self._wakeup: asyncio.Event | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._syncer: asyncio.Task[None] | None = None
        self._post: asyncio.Task[None] | None = None
        self._durable: list[tuple[list[_Pending], list[Transaction]]] = []
        self._durable_ready: asyncio.Event | None = None
        self._started = False
        self._stopping = False

    # --- lifecycle --------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        await asyncio.to_thread(self._open_and_recover)
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._flusher = asyncio.create_task(self._flush_loop(), name="wal-flush")
        if self._on_durable is not None:
            self._durable_ready = asyncio.Event()
            self._post = asyncio.create_task(self._post_durable_loop(), name="wal-post")
        if self.policy is FsyncPolicy.INTERVAL:
            self._syncer = asyncio.create_task(self._sync_loop(), name="wal-sync")
        self._started = True

    async def stop(self) -> None:
        """Write what is queued, fsync, close. Idempotent."""
        if not self._started:
            return
        self._started = False
        self._stopping = True
        assert self._wakeup is not None
        self._wakeup.set()
        if self._flusher is not None:
            await self._flusher
        if self._post is not None and self._durable_ready is not None:
            self._durable_ready.set()
            await self._post
        if self._syncer is not None:
            self._syncer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._syncer
        await asyncio.to_thread(self._close)

    def _open_and_recover(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(
                self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644
            )
        except OSError as exc:
            raise translate_os_error(exc, "opening the WAL directory", self.directory) from exc
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise WalError("another writer holds this WAL", path=str(self.directory)) from exc
        try:
            self._dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self._recover()
            self._marker_fd = os.open(
                self.directory / MARKER_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644
            )
            os.pwrite(self._marker_fd, self._marker(self._last_seq), 0)
        except OSError as exc:
            self._close()
            raise translate_os_error(exc, "recovering the WAL", self.directory) from exc
        except BaseException:
            self._close()
            raise

    def _recover(self) -> None:
        """Open the last segment, cut a torn tail, find the last valid seq."""
        segs = list_segments(self.directory)
        self._wal_bytes = sum((self.directory / fmt.segment_name(s)).stat().st_size for s in segs)
        if not segs:
            self._create_segment(1)
            self._last_seq = 0
            return
        self._segments = segs
        first = segs[-1]
        path = self.directory / fmt.segment_name(first)
        with open(path, "rb") as f:
            data = f.read()
        if len(data) < fmt.SEGMENT_HEADER_BYTES and data == fmt.segment_header()[: len(data)]:
            # Cut short while being created: finish its header.
            self._segments.pop()
            self._wal_bytes -= len(data)
            self._create_segment(first)
            self._last_seq = first - 1
            return
        problem = fmt.check_segment_header(data)
        if problem:
            raise WalCorruptError(problem, segment=str(path))
        res = fmt.scan(data, first, keep_payloads=False)
        if res.corrupt_at is not None:
            raise WalCorruptError(
                f"damaged record in the middle of the log ({res.damage}), valid records follow",
                segment=str(path),
                offset=res.end,
                seq=res.next_seq,
                next_valid_offset=res.corrupt_at,
            )
        marker = read_marker_full(self.directory)
        if (
            res.damage
            and marker is not None
            and marker[1] & fmt.MARKER_SYNCED
            and marker[0] >= res.next_seq
        ):
            # The writer fsynced this record before it moved the marker past it:
            # it was acknowledged, so it is damage, not a torn write.
            raise WalCorruptError(
                f"damaged acknowledged record at the end of the log ({res.damage})",
                segment=str(path),
                offset=res.end,
                seq=res.next_seq,
                acknowledged_through=marker[0],
            )
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        if res.end < len(data):
            # A torn tail: the write of these bytes never completed, so none of
            # them was acknowledged. Cut them durably before appending again.
            os.ftruncate(self._fd, res.end)
            os.fsync(self._fd)
        self._active_size = res.end
        self._wal_bytes -= len(data) - res.end
        self._last_seq = res.next_seq - 1

    def _create_segment(self, first_seq: int) -> None:
        """Create and durably link a new active segment (header + fsync + dir fsync)."""
        path = self.directory / fmt.segment_name(first_seq)
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o644
        )
        try:
            header = fmt.segment_header()
            if os.write(fd, header) != len(header):
                raise OSError(errno.EIO, "short write of the segment header")
            os.fsync(fd)
            os.fsync(self._dir_fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self._active_size = len(header)
        with self._seg_lock:
            self._segments.append(first_seq)
            self._wal_bytes += len(header)

    def _close(self) -> None:
        with self._lock:
            if self._fd >= 0 and self._unsynced:
                with contextlib.suppress(OSError):
                    os.fsync(self._fd)
                self._unsynced = False
            for name in ("_fd", "_marker_fd", "_dir_fd", "_lock_fd"):
                fd = getattr(self, name)
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                    setattr(self, name, -1)

    # --- state ------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        """The last acknowledged (durable per policy) sequence."""
        return self._last_seq

    @property
    def wal_bytes(self) -> int:
        """Bytes in all segment files."""
        return self._wal_bytes

    @property
    def first_seq(self) -> int:
        """The first sequence still held (segments before it were released)."""
        with self._seg_lock:
            return self._segments[0] if self._segments else self._last_seq + 1

    # --- append -----------------------------------------------------------

    async def append(
        self,
        ops_keys_values: Sequence[tuple[Op, bytes, bytes]],
        *,
        timestamp_us: int | None = None,
        traceparent: str | None = None,
    ) -> Transaction:
        """Append one transaction; returns it with its sequences once durable per policy.

        Raises WalFullError (retriable) when the WAL holds wal_bytes_max bytes or
        more, DurabilityError when the disk refuses the write (nothing of it is
        kept; retry later). Queues synchronously, before its first await, so
        appends started in order get sequences in that order.
        """
        if not self._started or self._wakeup is None:
            raise WalError("WAL writer is not started", path=str(self.directory))
        if self._failed is not None:
            raise self._failed
        ops, keys, values = _validate(ops_keys_values)
        size = _RECORD_OVERHEAD_BYTES + len(ops) * 4 + sum(map(len, keys)) + sum(map(len, values))
        if self.wal_bytes_max is not None:
            used = self.wal_bytes + self._pending_bytes
            if used >= self.wal_bytes_max:
                raise WalFullError(
                    f"WAL holds {used} bytes, limit {self.wal_bytes_max}; "
                    "waiting for the publisher to release segments",
                    path=str(self.directory),
                    wal_bytes=used,
                    wal_bytes_max=self.wal_bytes_max,
                )
        ts = time.time_ns() // 1000 if timestamp_us is None else timestamp_us
        fut: asyncio.Future[Transaction] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(ops, keys, values, ts, traceparent, fut))
        self._pending_bytes += size
        self._wakeup.set()
        return await fut

    async def _flush_loop(self) -> None:
        assert self._wakeup is not None
        while True:
            await self._wakeup.wait()
            if self.policy is FsyncPolicy.BATCH:
                # Let appenders that are already runnable join this cycle.
                await asyncio.sleep(0)
            self._wakeup.clear()
            if not self._pending:
                if self._stopping:
                    return
                continue
            group, self._pending = self._pending, []
            self._pending_bytes = 0
            await self._run_cycle(group)

    async def _run_cycle(self, group: list[_Pending]) -> None:
        try:
            if self._failed is not None:
                raise self._failed
            txns = await asyncio.to_thread(self._write_group, group)
        except BaseException as exc:
            for p in group:
                if not p.future.done():
                    p.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        if self._on_durable is not None:
            # Hand the durable cycle to the post-durable stage and go on writing
            # the next one: the WAL fsync and the state.db apply overlap.
            self._durable.append((group, txns))
            assert self._durable_ready is not None
            self._durable_ready.set()
            return
        _resolve(group, txns)

    async def _post_durable_loop(self) -> None:
        """Run on_durable for durable cycles, in order, merged; then the appends return."""
        assert self._durable_ready is not None and self._on_durable is not None
        while True:
            await self._durable_ready.wait()
            self._durable_ready.clear()
            if not self._durable:
                if self._flusher is None or self._flusher.done():
                    return
                continue
            cycles, self._durable = self._durable, []
            txns = [t for _, ts in cycles for t in ts]
            try:
                if self._failed is not None:
                    raise self._failed
                await asyncio.to_thread(self._on_durable, txns)
            except Exception as exc:
                # The records ARE in the WAL; a restart replays them. Stop
                # accepting appends rather than pile up on a broken consumer.
                err = WalError(
                    f"appended seq {txns[0].first_seq}..{txns[-1].last_seq} durably, "
                    f"but the post-append step failed: {exc}; restart to replay",
                    path=str(self.directory),
                )
                self._failed = err
                for group, _ in cycles:
                    for p in group:
                        if not p.future.done():
                            p.future.set_exception(err)
                continue
            for group, ts in cycles:
                _resolve(group, ts)

    def _write_group(self, group: list[_Pending]) -> list[Transaction]:
        """Worker thread: encode, write, fsync (policy), publish the marker. All or nothing."""
        with self._lock:
            if self._fd < 0:
                raise WalError("WAL writer is closed", path=str(self.directory))
            try:
                if (
                    self._active_size >= self.segment_bytes_max
                    and self._active_size > fmt.SEGMENT_HEADER_BYTES
                ):
                    self._rotate()
            except OSError as exc:
                raise translate_os_error(exc, "rotating the WAL segment", self.directory) from exc
            seq = self._last_seq + 1
            txns: list[Transaction] = []
            parts: list[bytes] = []
            for p in group:
                txn = Transaction(seq, p.ops, p.keys, p.values, p.timestamp_us)
                parts.append(
                    fmt.encode_record(seq, len(p.keys), encode_transaction(txn, p.traceparent))
                )
                txns.append(txn)
                seq += len(p.keys)
            data = b"".join(parts)
            start = self._active_size
            active = self._segments[-1]
            try:
                view = memoryview(data)
                while view:
                    n = os.write(self._fd, view)
                    view = view[n:]
                if self.policy is FsyncPolicy.INTERVAL:
                    self._unsynced = True
                else:
                    os.fdatasync(self._fd)
                os.pwrite(self._marker_fd, self._marker(seq - 1), 0)
            except OSError as exc:
                self._rollback(start)
                raise translate_os_error(
                    exc, "WAL append", self.directory / fmt.segment_name(active)
                ) from exc
            self._active_size = start + len(data)
            with self._seg_lock:
                self._wal_bytes += len(data)
            self._last_seq = seq - 1
            return txns

    def _rollback(self, good_end: int) -> None:
        """Cut a failed write back to the last good end (nothing half-visible)."""
        try:
            os.ftruncate(self._fd, good_end)
        except OSError:
            # Cannot even truncate: stop here rather than append after garbage.
            self._failed = DurabilityError(
                "WAL write failed and truncating the partial record failed too; restart the writer",
                path=str(self.directory),
            )
        with contextlib.suppress(OSError):
            os.pwrite(self._marker_fd, self._marker(self._last_seq), 0)

    def _marker(self, seq: int) -> bytes:
        synced = self.policy is not FsyncPolicy.INTERVAL
        return fmt.encode_marker(seq, fmt.MARKER_SYNCED if synced else 0)

    def _rotate(self) -> None:
        if self._unsynced:
            os.fsync(self._fd)
            self._unsynced = False
        self._create_segment(self._last_seq + 1)

    async def _sync_loop(self) -> None:
        """INTERVAL policy: fsync the active segment every fsync_interval_ms when dirty."""
        while True:
            await asyncio.sleep(self.fsync_interval_ms / 1000)
            if self._unsynced:
                await asyncio.to_thread(self._sync_now)

    def _sync_now(self) -> None:
        with self._lock:
            if self._fd < 0 or not self._unsynced:
                return
            try:
                os.fdatasync(self._fd)
            except OSError as exc:
                # Acknowledged records may now be lost on power failure, and a
                # retried fsync can falsely succeed: refuse appends from here on.
                self._failed = translate_os_error(exc, "periodic WAL fsync", self.directory)
                return
            self._unsynced = False

    async def sync(self) -> None:
        """fsync now (any policy): everything acknowledged so far survives power loss."""
        await asyncio.to_thread(self._sync_now)

    # --- release ----------------------------------------------------------

    def release_through(self, seq: int) -> int:
        """Delete whole segments whose records are all <= seq (never the active one).

        Returns how many segments were deleted. Call with the seq that is both
        published and covered by a snapshot.
        """
        # Only _seg_lock: a write+fsync in progress never blocks the event loop
        # here, and the active segment (the last one) is never touched. No
        # directory fsync: a deletion undone by a crash only leaves an old,
        # valid segment behind, which the next release deletes again.
        deleted = 0
        with self._seg_lock:
            while len(self._segments) > 1 and self._segments[1] - 1 <= seq:
                first = self._segments[0]
                path = self.directory / fmt.segment_name(first)
                try:
                    size = path.stat().st_size
                    os.unlink(path)
                except FileNotFoundError:
                    size = 0
                except OSError as exc:
                    raise translate_os_error(exc, "releasing a WAL segment", path) from exc
                self._segments.pop(0)
                self._wal_bytes -= size
                deleted += 1
        return deleted


class WalReader:
    """Reads acknowledged records of a WAL directory, from any process.

    Never returns records beyond the writer's ``durable`` marker; tolerates
    segments being released (deleted) while it reads.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        # Where the last read ended, per segment: (next_seq, offset). Sequential
        # reads resume there instead of walking the segment from its start.
        self._cursor: tuple[int, int, int] | None = None  # (segment, next_seq, offset)
        self._watcher: DirWatcher | None = None

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None

    def __enter__(self) -> WalReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def last_seq(self) -> int:
        """The last acknowledged seq (from the writer's marker; a scan if there is none)."""
        marker = read_marker(self.directory)
        if marker is not None:
            return marker
        return self._scan_last_seq()

    @property
    def first_seq(self) -> int | None:
        """The first seq still in the log (None when there are no segments)."""
        segs = list_segments(self.directory)
        return segs[0] if segs else None

    def _scan_last_seq(self) -> int:
        segs = list_segments(self.directory)
        if not segs:
            return 0
        path = self.directory / fmt.segment_name(segs[-1])
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return segs[-1] - 1
        except OSError as exc:
            raise translate_os_error(exc, "reading a WAL segment", path) from exc
        if fmt.check_segment_header(data):
            return segs[-1] - 1
        return fmt.scan(data, segs[-1], keep_payloads=False).next_seq - 1

    def read_from(self, seq: int, *, max_bytes: int) -> list[tuple[Transaction, str | None]]:
        """Acknowledged transactions from the one holding ``seq`` on, about max_bytes of
        records (at least one record when any is available)."""
        if seq < 1:
            raise ValueError("seq must be >= 1")
        limit = self.last_seq
        out: list[tuple[Transaction, str | None]] = []
        for _attempt in range(5):
            if seq > limit:
                return out
            segs = list_segments(self.directory)
            if not segs:
                return out
            if seq < segs[0]:
                raise WalError(
                    f"seq {seq} was already released from the WAL; oldest held is {segs[0]}",
                    path=str(self.directory),
                    seq=seq,
                )
            try:
                self._read_segments(segs, seq, limit, max_bytes, out)
                return out
            except FileNotFoundError:
                # A segment was released under us: list again and continue.
                if out:
                    return out
                continue
        return out

    def _read_segments(
        self,
        segs: list[int],
        seq: int,
        limit: int,
        max_bytes: int,
        out: list[tuple[Transaction, str | None]],
    ) -> None:
        idx = bisect.bisect_right(segs, seq) - 1
        total = 0
        while idx < len(segs):
            first = segs[idx]
            path = self.directory / fmt.segment_name(first)
            expected, offset = first, fmt.SEGMENT_HEADER_BYTES
            if self._cursor is not None and self._cursor[0] == first and self._cursor[1] <= seq:
                expected, offset = self._cursor[1], self._cursor[2]
            with _open_segment(path) as f:
                if offset == fmt.SEGMENT_HEADER_BYTES:
                    problem = fmt.check_segment_header(f.read(fmt.SEGMENT_HEADER_BYTES))
                    if problem:
                        if first > limit:
                            return  # being created; nothing acknowledged in it yet
                        raise WalCorruptError(problem, segment=str(path))
                f.seek(offset)
                while expected <= limit:
                    rec = self._next_record(f, path, offset, expected, limit)
                    if rec is None:
                        break
                    offset = rec.end
                    expected = rec.last_seq + 1
                    self._cursor = (first, expected, offset)
                    if rec.last_seq < seq:
                        continue
                    try:
                        out.append(decode_transaction(rec.payload))
                    except DecodeError as exc:
                        raise WalCorruptError(
                            f"WAL record does not decode: {exc}",
                            segment=str(path),
                            offset=rec.offset,
                            seq=rec.first_seq,
                        ) from exc
                    total += rec.size
                    if total >= max_bytes:
                        return
            if expected > limit:
                return
            idx += 1
            if idx < len(segs) and segs[idx] != expected:
                raise WalCorruptError(
                    f"WAL segments do not connect: expected seq {expected}, next segment starts at {segs[idx]}",
                    segment=str(path),
                )
        # Out of segments before the marker: a marker left ahead of the disk by a
        # power failure; the writer rewrites it when it restarts.

    @staticmethod
    def _next_record(
        f: BinaryIO, path: Path, offset: int, expected: int, limit: int
    ) -> fmt.Record | None:
        head = f.read(fmt.RECORD_HEADER_BYTES)
        if not head:
            return None
        length = int.from_bytes(head[:4], "big")
        rest = (
            f.read(max(0, min(length, fmt.RECORD_BYTES_MAX) + 8 - len(head)))
            if len(head) == fmt.RECORD_HEADER_BYTES
            else b""
        )
        rec, why = fmt.parse_record(head + rest, 0)
        if rec is not None and rec.first_seq != expected:
            why = f"record claims seq {rec.first_seq}, expected {expected}"
            rec = None
        if rec is None:
            if why == "short" and expected > limit:
                return None
            raise WalCorruptError(
                f"damaged acknowledged WAL record: {why}",
                segment=str(path),
                offset=offset,
                seq=expected,
            )
        return fmt.Record(offset, rec.size, rec.first_seq, rec.entry_count, rec.payload)

    async def wait_for(self, seq: int, timeout_s: float) -> bool:
        """True once ``seq`` is acknowledged, False after ``timeout_s``. Sleeps on inotify."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        if self._watcher is not None and self._watcher.loop is not loop:
            self._watcher.close()
            self._watcher = None
        if self._watcher is None and self.directory.is_dir():
            self._watcher = DirWatcher.open(self.directory, loop)
        while True:
            if self._watcher is not None:
                self._watcher.changed.clear()
            if self.last_seq >= seq:
                return True
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            if self._watcher is None:
                await asyncio.sleep(min(remaining, POLL_INTERVAL_S))
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._watcher.changed.wait(), remaining)
