"""The reference writer: WAL append, then apply to ``<data-dir>/state.db``.

An append returns once its record is durable in the WAL (per the fsync
policy): that is the acknowledgement. ``state.db`` follows in a background
thread that applies the durable records in order, in large store transactions
(everything that became durable while the previous one committed, up to
``state_apply_entries_max`` entries): one SQLite commit per few hundred entries
rewrote the random 16 KiB pages it touched every time and capped appends at
~20k entries/s; larger groups touch each page once for many entries.
``await writer.wait_applied(seq)`` gives read-your-writes; ``applied_seq`` says
how far state.db is. The state may lag the WAL by at most
``state_lag_entries_max`` entries: beyond that, appends wait for the apply
(backpressure, never an unbounded queue).

On start, WAL records beyond state.db's applied_seq are replayed, so a crash
with records durable in the WAL but not yet in state.db loses nothing. A
failing state.db apply stops the writer: later appends (and ``wait_applied``)
raise; the WAL still holds everything, and a restart replays it.

Once a second the writer deletes WAL segments that are no longer needed: all
their records published (``published.json``) and, with ``wal_release =
"snapshotted"``, also covered by a writer snapshot (``snapshotted.json``), so a
topic that lost data can still be re-fed from the WAL until then.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from enum import StrEnum
from pathlib import Path

from opentelemetry import trace
from walship.producer.identity import WriterIdentity
from walship.producer.wal import FsyncPolicy, WalReader, WalWriter
from walship.shared.errors import WalError, WalshipError
from walship.shared.lifecycle import AsyncService
from walship.shared.model import Batch, Op, Transaction, WriterId
from walship.shared.store import ReplicaStore
from walship.shared.telemetry import context_from_traceparent, traceparent_of_current

log = logging.getLogger(__name__)

STATE_DB_NAME = "state.db"
WAL_DIR_NAME = "wal"
_REPLAY_BYTES = 16 << 20
STATE_LAG_ENTRIES_MAX_DEFAULT = 200_000
STATE_APPLY_ENTRIES_MAX_DEFAULT = 100_000


class WalRelease(StrEnum):
    PUBLISHED = "published"
    SNAPSHOTTED = "snapshotted"
    NEVER = "never"


_tracer = trace.get_tracer("walship.producer.writer")


class _StateApplier:
    """Applies durable transactions to state.db in seq order, from a thread of its own.

    ``submit`` (the WAL's post-durable hook, a worker thread) queues a cycle's
    transactions and returns at once unless the state lags by more than
    ``lag_entries_max`` entries; the thread takes everything queued (up to
    ``apply_entries_max`` entries, whole transactions) into one store
    transaction. sqlite3 releases the GIL while it works, so the event loop
    keeps appending meanwhile.
    """

    def __init__(
        self,
        store: ReplicaStore,
        writer: WriterId,
        applied_seq: int,
        *,
        lag_entries_max: int,
        apply_entries_max: int,
        on_change: Callable[[], None],
    ) -> None:
        self._store = store
        self._writer = writer
        self._lag_entries_max = lag_entries_max
        self._apply_entries_max = apply_entries_max
        self._on_change = on_change
        self._cond = threading.Condition()
        self._queue: deque[Transaction] = deque()
        self._queued_seq = applied_seq
        self.applied_seq = applied_seq  # read without the lock: an int is swapped atomically
        self.error: WalError | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="walship-state-apply", daemon=True)
        self._thread.start()

    def submit(self, txns: Sequence[Transaction]) -> None:
        with self._cond:
            if self.error is not None:
                raise self.error
            self._queue.extend(txns)
            self._queued_seq = txns[-1].last_seq
            self._cond.notify_all()
            while (
                self.error is None and self._queued_seq - self.applied_seq > self._lag_entries_max
            ):
                self._cond.wait()
            if self.error is not None:
                raise self.error

    def close(self) -> None:
        """Apply what is queued, then end the thread (blocking)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()

    def _take(self) -> list[Transaction] | None:
        with self._cond:
            while not self._queue and not self._closing:
                self._cond.wait()
            if not self._queue:
                return None
            txns: list[Transaction] = []
            entries = 0
            while self._queue and entries < self._apply_entries_max:
                txn = self._queue.popleft()
                txns.append(txn)
                entries += len(txn)
            return txns

    def _run(self) -> None:
        while (txns := self._take()) is not None:
            try:
                self._store.apply(
                    [Batch.from_transactions(self._writer, txns)], writer=self._writer
                )
            except Exception as exc:
                err = WalError(
                    f"seq {txns[0].first_seq}..{txns[-1].last_seq} are durable in the WAL, "
                    f"but applying them to state.db failed: {exc}; restart to replay",
                    path=str(self._store.path),
                )
                log.error("%s", err)
                with self._cond:
                    self.error = err
                    self._queue.clear()
                    self._cond.notify_all()
                self._on_change()
                return
            with self._cond:
                self.applied_seq = txns[-1].last_seq
                self._cond.notify_all()
            self._on_change()


class Writer(AsyncService):
    def __init__(
        self,
        data_dir: Path,
        *,
        fsync: FsyncPolicy = FsyncPolicy.BATCH,
        fsync_interval_ms: int = 100,
        segment_bytes_max: int = 64 << 20,
        wal_bytes_max: int | None = None,
        synchronous: str = "normal",
        wal_release: WalRelease | str = WalRelease.PUBLISHED,
        release_interval_s: float = 1.0,
        state_lag_entries_max: int = STATE_LAG_ENTRIES_MAX_DEFAULT,
        state_apply_entries_max: int = STATE_APPLY_ENTRIES_MAX_DEFAULT,
    ) -> None:
        if state_lag_entries_max < 1 or state_apply_entries_max < 1:
            raise ValueError("state_lag_entries_max and state_apply_entries_max must be >= 1")
        self.data_dir = Path(data_dir)
        self.state_lag_entries_max = state_lag_entries_max
        self.state_apply_entries_max = state_apply_entries_max
        self._state: _StateApplier | None = None
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.wal_release = WalRelease(wal_release)
        self.release_interval_s = release_interval_s
        self._release_task: asyncio.Task[None] | None = None
        self.fsync = FsyncPolicy(fsync)
        self.fsync_interval_ms = fsync_interval_ms
        self.segment_bytes_max = segment_bytes_max
        self.wal_bytes_max = wal_bytes_max
        self._synchronous = synchronous
        self._id: WriterId | None = None
        self._store: ReplicaStore | None = None
        self._wal: WalWriter | None = None

    @property
    def wal_dir(self) -> Path:
        return self.data_dir / WAL_DIR_NAME

    @property
    def writer_id(self) -> WriterId:
        if self._id is None:
            raise WalError("writer is not started", path=str(self.data_dir))
        return self._id

    @property
    def wal(self) -> WalWriter:
        if self._wal is None:
            raise WalError("writer is not started", path=str(self.data_dir))
        return self._wal

    @property
    def store(self) -> ReplicaStore:
        if self._store is None:
            raise WalError("writer is not started", path=str(self.data_dir))
        return self._store

    @property
    def last_seq(self) -> int:
        """The last seq durable in the WAL (acknowledged)."""
        return self.wal.last_seq

    @property
    def applied_seq(self) -> int:
        """The last seq applied to state.db (<= last_seq; see ``wait_applied``)."""
        if self._state is None:
            raise WalError("writer is not started", path=str(self.data_dir))
        return self._state.applied_seq

    async def wait_applied(self, seq: int | None = None) -> None:
        """Return once state.db holds ``seq`` (default: everything appended so far).

        Read-your-writes: ``txn = await w.append(...); await w.wait_applied(txn.last_seq)``.
        Raises the WalError that stopped the state apply, if one did.
        """
        state = self._state
        if state is None:
            raise WalError("writer is not started", path=str(self.data_dir))
        target = self.wal.last_seq if seq is None else seq
        if state.applied_seq >= target:
            return
        if state.error is not None:
            raise state.error
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, fut))
        self._wake_waiters()  # the apply may have finished meanwhile
        await fut

    def _state_changed(self) -> None:
        """State-apply thread: wake waiters on the event loop."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake_waiters)

    def _wake_waiters(self) -> None:
        state = self._state
        if state is None or not self._waiters:
            return
        applied, error = state.applied_seq, state.error
        keep: list[tuple[int, asyncio.Future[None]]] = []
        for target, fut in self._waiters:
            if fut.done():
                continue
            if applied >= target:
                fut.set_result(None)
            elif error is not None:
                fut.set_exception(error)
            else:
                keep.append((target, fut))
        self._waiters = keep

    async def start(self) -> None:
        if self._wal is not None:
            return
        self._id = await asyncio.to_thread(WriterIdentity.load_or_create, self.data_dir)
        self._store = await asyncio.to_thread(
            ReplicaStore, self.data_dir / STATE_DB_NAME, synchronous=self._synchronous
        )
        wal = WalWriter(
            self.wal_dir,
            fsync=self.fsync,
            fsync_interval_ms=self.fsync_interval_ms,
            segment_bytes_max=self.segment_bytes_max,
            wal_bytes_max=self.wal_bytes_max,
            on_durable=self._apply_durable,
        )
        try:
            await wal.start()
            await asyncio.to_thread(self._replay, wal.last_seq)
        except BaseException:
            await wal.stop()
            self._store.close()
            self._store = None
            raise
        self._loop = asyncio.get_running_loop()
        self._state = _StateApplier(
            self._store,
            self.writer_id,
            wal.last_seq,
            lag_entries_max=self.state_lag_entries_max,
            apply_entries_max=self.state_apply_entries_max,
            on_change=self._state_changed,
        )
        self._wal = wal
        if self.wal_release is not WalRelease.NEVER:
            self._release_task = asyncio.create_task(self._release_loop())

    async def stop(self) -> None:
        task, self._release_task = self._release_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        wal, self._wal = self._wal, None
        if wal is not None:
            await wal.stop()
        if self._state is not None:
            await asyncio.to_thread(self._state.close)  # applies what is queued
            self._wake_waiters()
            for _, fut in self._waiters:
                if not fut.done():
                    fut.set_exception(WalError("writer stopped", path=str(self.data_dir)))
            self._waiters = []
            self._state = None
        if self._store is not None:
            self._store.close()
            self._store = None

    def release_floor(self) -> int:
        """The highest seq whose WAL records are no longer needed (policy permitting)."""
        from walship.producer.position import PublishedPosition

        floor = PublishedPosition.load(self.data_dir).seq
        if self.wal_release is WalRelease.SNAPSHOTTED:
            from walship.shared.snapshot.create import read_snapshotted

            floor = min(floor, read_snapshotted(self.data_dir))
        return floor

    def release(self) -> int:
        """Delete the WAL segments below the release floor now; returns how many."""
        if self.wal_release is WalRelease.NEVER:
            return 0
        return self.wal.release_through(self.release_floor())

    async def _release_loop(self) -> None:
        while True:
            await asyncio.sleep(self.release_interval_s)
            try:
                released = await asyncio.to_thread(self.release)
            except WalshipError as exc:
                # Not releasing only keeps more WAL; the size limit stays the guard.
                log.warning("WAL release skipped: %s", exc)
                continue
            if released:
                log.debug("released %d WAL segment(s)", released)

    def _replay(self, wal_last_seq: int) -> None:
        """Apply WAL records beyond state.db's applied_seq (worker thread, before appends)."""
        store, writer = self.store, self.writer_id
        applied = store.applied_seq
        if applied > wal_last_seq:
            raise WalError(
                f"state.db is at seq {applied} but the WAL ends at {wal_last_seq}: "
                "the WAL lost acknowledged records (fsync=interval and a power failure?)",
                path=str(self.data_dir),
            )
        with WalReader(self.wal_dir) as reader:
            while applied < wal_last_seq:
                txns = [t for t, _tp in reader.read_from(applied + 1, max_bytes=_REPLAY_BYTES)]
                if not txns:
                    raise WalError(
                        f"cannot replay the WAL from seq {applied + 1}",
                        path=str(self.wal_dir),
                        wal_last_seq=wal_last_seq,
                    )
                batch = Batch.from_transactions(writer, txns).drop_through(applied)
                store.apply([batch], writer=writer)
                applied = batch.last_seq

    def _apply_durable(self, txns: Sequence[Transaction]) -> None:
        """WAL hook, worker thread: hand durable cycles to the state applier."""
        state = self._state
        if state is None:
            raise WalError("writer is stopped", path=str(self.data_dir))
        state.submit(txns)

    async def append(
        self,
        ops_keys_values: Sequence[tuple[Op, bytes, bytes]],
        *,
        timestamp_us: int | None = None,
        traceparent: str | None = None,
    ) -> Transaction:
        """Append durably (per the fsync policy); returns the txn with its sequences.

        state.db applies it shortly after (``wait_applied`` to read your write).

        ``traceparent`` (W3C) makes the append span a child of the caller's trace.
        """
        wal = self.wal
        parent = context_from_traceparent(traceparent) if traceparent else None
        with _tracer.start_as_current_span("walship.append", context=parent) as span:
            # Without telemetry set up the span is invalid: keep the caller's context.
            txn = await wal.append(
                ops_keys_values,
                timestamp_us=timestamp_us,
                traceparent=traceparent_of_current() or traceparent,
            )
            if span.is_recording():
                span.set_attributes(
                    {
                        "walship.first_seq": txn.first_seq,
                        "walship.last_seq": txn.last_seq,
                        "walship.entries": len(txn),
                        "walship.bytes": sum(map(len, txn.keys)) + sum(map(len, txn.values)),
                    }
                )
            return txn
