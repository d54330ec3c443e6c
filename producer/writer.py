"""The reference writer: WAL append, then apply to ``<data-dir>/state.db``.

Durable WAL cycles are applied to state.db in order, in a worker thread, while
the WAL writes the next cycle (cycles waiting for the apply are merged into one
store transaction); an append returns only after both, so an append that
returned is durable in the WAL and visible in state.db. On
start, WAL records beyond state.db's applied_seq are replayed (a crash between
the WAL fsync and the store commit loses nothing).

Once a second the writer deletes WAL segments that are no longer needed: all
their records published (``published.json``) and, with ``wal_release =
"snapshotted"``, also covered by a writer snapshot (``snapshotted.json``), so a
topic that lost data can still be re-fed from the WAL until then.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path

from opentelemetry import trace
from walship.producer.identity import WriterIdentity
from walship.producer.wal import FsyncPolicy, WalReader, WalWriter
from walship.shared.errors import WalError, WalshipError
from walship.shared.model import Batch, Op, Transaction, WriterId
from walship.shared.store import ReplicaStore
from walship.shared.telemetry import context_from_traceparent, traceparent_of_current

log = logging.getLogger(__name__)

STATE_DB_NAME = "state.db"
WAL_DIR_NAME = "wal"
_REPLAY_BYTES = 16 << 20


class WalRelease(StrEnum):
    PUBLISHED = "published"
    SNAPSHOTTED = "snapshotted"
    NEVER = "never"


_tracer = trace.get_tracer("walship.producer.writer")


class Writer:
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
    ) -> None:
        self.data_dir = Path(data_dir)
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
        return self.wal.last_seq

    async def __aenter__(self) -> Writer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

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
        """WAL hook, worker thread: one store transaction per group-commit cycle."""
        store = self._store
        if store is None:
            raise WalError("writer is stopped", path=str(self.data_dir))
        store.apply([Batch.from_transactions(self.writer_id, txns)], writer=self.writer_id)

    async def append(
        self,
        ops_keys_values: Sequence[tuple[Op, bytes, bytes]],
        *,
        timestamp_us: int | None = None,
        traceparent: str | None = None,
    ) -> Transaction:
        """Append durably (per the fsync policy) and apply to state.db; returns the txn.

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
