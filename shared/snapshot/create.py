"""Writing snapshots: from a replica, from the writer's data dir, and periodically.

A snapshot reads the store inside ONE read transaction (``ReplicaStore.iter_items``),
so it neither stops nor sees the writes and applies that go on meanwhile; the
digest is computed from the same rows, so it belongs to exactly that sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from walship.shared.crypto import Keyring
from walship.shared.errors import SnapshotError, WalshipError
from walship.shared.lifecycle import AsyncService
from walship.shared.model import WriterId
from walship.shared.snapshot.base import SnapshotStore
from walship.shared.snapshot.format import (
    FORMAT_VERSION,
    ChunkInfo,
    Manifest,
    chunk_info,
    encode_chunk,
    make_snapshot_id,
)
from walship.shared.snapshot.progress import NullProgress, Progress
from walship.shared.store import DigestBuilder, ReplicaStore

log = logging.getLogger(__name__)

CHUNK_KEYS_DEFAULT = 20_000
CHUNK_RAW_BYTES_MAX_DEFAULT = 4 << 20  # uncompressed key+value bytes per chunk
ZSTD_LEVEL_DEFAULT = 3


def _now_us() -> int:
    return time.time_ns() // 1000


def rechunk(
    chunks: Iterable[list[tuple[bytes, bytes]]], *, keys_max: int, raw_bytes_max: int
) -> Iterator[tuple[list[bytes], list[bytes], int]]:
    """Regroup key-sorted pairs into (keys, values, raw bytes) within both limits.

    A single pair larger than ``raw_bytes_max`` becomes a chunk of its own.
    """
    keys: list[bytes] = []
    values: list[bytes] = []
    raw = 0
    for chunk in chunks:
        for k, v in chunk:
            size = len(k) + len(v)
            if keys and (len(keys) >= keys_max or raw + size > raw_bytes_max):
                yield keys, values, raw
                keys, values, raw = [], [], 0
            keys.append(k)
            values.append(v)
            raw += size
    if keys:
        yield keys, values, raw


async def write_snapshot(
    snapshot_store: SnapshotStore,
    chunks: Iterable[list[tuple[bytes, bytes]]],
    *,
    seq: int,
    seq_timestamp_us: int,
    writer: WriterId | None,
    topic: str,
    partitions: int,
    offsets: Mapping[int, int],
    source: str,
    chunk_keys: int = CHUNK_KEYS_DEFAULT,
    chunk_raw_bytes_max: int = CHUNK_RAW_BYTES_MAX_DEFAULT,
    level: int = ZSTD_LEVEL_DEFAULT,
    created_at_us: int | None = None,
    progress: Progress | None = None,
    keyring: Keyring | None = None,
) -> Manifest:
    """Store key-sorted ``chunks`` as snapshot ``seq``: every chunk, then the manifest.

    Chunks are encrypted with ``keyring.current_id`` when set (the manifest stays plaintext).

    Compression runs in a worker thread while the previous chunk is stored, so
    the event loop stays responsive and disk/network overlap with CPU.
    """
    if partitions < 1:
        raise SnapshotError("a snapshot needs the topic's partition count", topic=topic)
    progress = progress or NullProgress("snapshot create")
    created = created_at_us if created_at_us is not None else _now_us()
    sid = make_snapshot_id(seq, created)
    digest = DigestBuilder()
    infos: list[ChunkInfo] = []
    raw_total = 0
    pending: asyncio.Task[None] | None = None
    progress.start(None, None)
    try:
        for index, (keys, values, raw) in enumerate(
            rechunk(chunks, keys_max=chunk_keys, raw_bytes_max=chunk_raw_bytes_max)
        ):
            digest.update(zip(keys, values, strict=True))
            frame = await asyncio.to_thread(
                encode_chunk, keys, values, level=level, keyring=keyring
            )
            infos.append(chunk_info(index, frame, keys))
            raw_total += raw
            if pending is not None:
                await pending
            pending = asyncio.ensure_future(snapshot_store.put_chunk(sid, index, frame))
            progress.advance(done_bytes=len(frame), keys=len(keys))
        if pending is not None:
            await pending
            pending = None
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
    d = digest.digest(seq)
    manifest = Manifest(
        snapshot_id=sid,
        stream_id=writer.stream_id.hex() if writer is not None else "",
        writer_epoch=writer.epoch if writer is not None else None,
        seq=seq,
        seq_timestamp_us=seq_timestamp_us,
        created_at_us=created,
        source=source,
        topic=topic,
        partitions=partitions,
        offsets={p: o for p, o in offsets.items() if 0 <= p < partitions},
        keys=d.keys,
        total_bytes=sum(c.stored_bytes for c in infos),
        raw_bytes=raw_total,
        chunks=tuple(infos),
        digest=d.sha256,
        format_version=FORMAT_VERSION,
    )
    await snapshot_store.put_manifest(manifest)
    progress.finish()
    log.info(
        "snapshot %s written to %s: seq %d, %d keys, %d chunks, %d bytes",
        sid,
        snapshot_store.url,
        seq,
        manifest.keys,
        len(infos),
        manifest.total_bytes,
    )
    return manifest


class StateBehindPositionError(SnapshotError):
    """The writer's state is behind the published position just read (retry shortly)."""

    retriable = True


async def create_snapshot(
    store: ReplicaStore,
    snapshot_store: SnapshotStore,
    *,
    topic: str,
    partitions: int,
    offsets: Mapping[int, int] | None = None,
    offsets_seq: int | None = None,
    source: str = "replica",
    chunk_keys: int = CHUNK_KEYS_DEFAULT,
    level: int = ZSTD_LEVEL_DEFAULT,
    progress: Progress | None = None,
    keyring: Keyring | None = None,
) -> Manifest:
    """Snapshot ``store`` at its current sequence, without stopping writes.

    ``offsets`` (with the sequence ``offsets_seq`` they go with) come from the
    writer's published position; without them the store's own checkpoint
    offsets are used (a replica). Either way the offsets are read BEFORE the
    read transaction starts, so they belong to a sequence <= the snapshot's:
    a reader resuming there may re-read a few messages it already holds in the
    snapshot and drops them as duplicates (correctness rule 3), but it can
    never miss one. Offsets read after the state could point past messages the
    snapshot does not contain: silent loss.
    """
    cp = store.checkpoint()  # before the read transaction: conservative offsets
    if offsets is None:
        offsets, offsets_seq = cp.offsets, cp.applied_seq
    with store.iter_items(chunk_keys) as (seq, chunks):
        if offsets_seq is not None and offsets_seq > seq:
            raise StateBehindPositionError(
                "the state is behind the published position; its offsets would skip "
                "sequences the snapshot lacks",
                state_seq=seq,
                published_seq=offsets_seq,
                path=str(store.path),
            )
        # The commit time of ``seq`` is only known when nothing was applied in
        # between; otherwise 0 (restore then bounds it by created_at_us).
        ts = cp.applied_timestamp_us if cp.applied_seq == seq else 0
        return await write_snapshot(
            snapshot_store,
            chunks,
            seq=seq,
            seq_timestamp_us=ts,
            writer=cp.writer,
            topic=topic,
            partitions=partitions,
            offsets=offsets,
            source=source,
            chunk_keys=chunk_keys,
            level=level,
            progress=progress,
            keyring=keyring,
        )


async def create_from_data_dir(
    data_dir: Path,
    snapshot_store: SnapshotStore,
    *,
    topic: str,
    partitions: int,
    attempts: int = 50,
    retry_s: float = 0.1,
    chunk_keys: int = CHUNK_KEYS_DEFAULT,
    progress: Progress | None = None,
    keyring: Keyring | None = None,
) -> Manifest:
    """Snapshot the writer's ``<data-dir>/state.db`` with the publisher's offsets.

    ``published.json`` is read BEFORE the state (see ``create_snapshot``): its
    offsets cover only messages of sequences <= its ``seq``, every later
    sequence sits at or after them, and the state read afterwards is at a
    sequence >= that ``seq`` (checked; the writer applies its state right
    after the WAL append, so a short retry covers a publisher that got ahead).
    """
    from walship.producer.position import PublishedPosition

    db = Path(data_dir) / "state.db"
    if not db.is_file():
        raise SnapshotError("no writer state to snapshot", path=str(db))
    with ReplicaStore(db) as store:
        for attempt in range(attempts):
            position = PublishedPosition.load(Path(data_dir))
            try:
                manifest = await create_snapshot(
                    store,
                    snapshot_store,
                    topic=topic,
                    partitions=partitions,
                    offsets=position.offsets,
                    offsets_seq=position.seq,
                    source="writer",
                    chunk_keys=chunk_keys,
                    progress=progress,
                    keyring=keyring,
                )
                await asyncio.to_thread(record_snapshotted, Path(data_dir), manifest.seq)
                return manifest
            except StateBehindPositionError:
                if attempt == attempts - 1:
                    raise
                await asyncio.sleep(retry_s)
    raise AssertionError("unreachable")


SNAPSHOTTED_NAME = "snapshotted.json"


def record_snapshotted(data_dir: Path, seq: int) -> None:
    """Note in the writer's data dir that a snapshot covers the state through ``seq``.

    The writer reads it to release WAL segments only once a snapshot covers
    them (``producer.wal_release = "snapshotted"``). Never moves backwards.
    """
    import json

    from walship.producer.identity import write_atomic

    if seq <= read_snapshotted(data_dir):
        return
    write_atomic(Path(data_dir) / SNAPSHOTTED_NAME, (json.dumps({"seq": seq}) + "\n").encode())


def read_snapshotted(data_dir: Path) -> int:
    """The highest seq a writer snapshot covers (0 when none was taken)."""
    import json

    path = Path(data_dir) / SNAPSHOTTED_NAME
    try:
        seq = json.loads(path.read_text(encoding="utf-8"))["seq"]
    except FileNotFoundError:
        return 0
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SnapshotError(f"unreadable snapshot record: {exc}", path=str(path)) from exc
    if not isinstance(seq, int) or seq < 0:
        raise SnapshotError("snapshot record holds no valid seq", path=str(path))
    return seq


# --- periodic snapshots ------------------------------------------------------------


@dataclass(frozen=True)
class SchedulePolicy:
    """When to snapshot: every ``every_seqs`` sequences or ``every_s`` seconds (with
    new data), whichever comes first; keep the ``keep`` newest."""

    every_seqs: int | None = 100_000
    every_s: float | None = 3600.0
    keep: int = 3
    poll_s: float = 1.0

    def due(self, *, seq: int, last_seq: int, now_s: float, last_s: float) -> bool:
        """Pure: is a snapshot due?"""
        if last_seq < 0:
            return True  # no snapshot yet: a bootstrapping reader needs one
        if seq <= last_seq:
            return False
        if self.every_seqs is not None and seq - last_seq >= self.every_seqs:
            return True
        return self.every_s is not None and now_s - last_s >= self.every_s


class SnapshotScheduler(AsyncService):
    """Takes snapshots periodically beside a running writer or reader.

    ``make`` creates one snapshot (``create_from_data_dir`` for the writer's
    data dir, ``create_snapshot`` over a fresh ReplicaStore for a replica);
    ``current_seq`` reads the source's applied sequence cheaply. Failures are
    logged and retried at the next tick: a missed snapshot only means a
    longer replay for a bootstrapping reader.
    """

    def __init__(
        self,
        snapshot_store: SnapshotStore,
        *,
        make: Callable[[], Awaitable[Manifest]],
        current_seq: Callable[[], int],
        policy: SchedulePolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.snapshot_store = snapshot_store
        self._make = make
        self._current_seq = current_seq
        self.policy = policy or SchedulePolicy()
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self.last_seq = -1
        self._last_s = clock()
        self.created: list[Manifest] = []
        self.failures = 0

    @classmethod
    def for_data_dir(
        cls,
        data_dir: Path,
        snapshot_store: SnapshotStore,
        *,
        topic: str,
        partitions: int,
        policy: SchedulePolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        keyring: Keyring | None = None,
    ) -> SnapshotScheduler:
        db = Path(data_dir) / "state.db"

        def current_seq() -> int:
            with ReplicaStore(db) as s:
                return s.applied_seq

        return cls(
            snapshot_store,
            make=lambda: create_from_data_dir(
                data_dir, snapshot_store, topic=topic, partitions=partitions, keyring=keyring
            ),
            current_seq=current_seq,
            policy=policy,
            clock=clock,
        )

    @classmethod
    def for_replica(
        cls,
        replica_path: Path,
        snapshot_store: SnapshotStore,
        *,
        topic: str,
        partitions: int,
        policy: SchedulePolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        keyring: Keyring | None = None,
    ) -> SnapshotScheduler:
        async def make() -> Manifest:
            with ReplicaStore(replica_path) as s:
                return await create_snapshot(
                    s,
                    snapshot_store,
                    topic=topic,
                    partitions=partitions,
                    source="replica",
                    keyring=keyring,
                )

        def current_seq() -> int:
            with ReplicaStore(replica_path) as s:
                return s.applied_seq

        return cls(snapshot_store, make=make, current_seq=current_seq, policy=policy, clock=clock)

    async def tick(self) -> Manifest | None:
        """Snapshot (and apply retention) if due; returns the new manifest."""
        seq = self._current_seq()
        now = self._clock()
        if not self.policy.due(seq=seq, last_seq=self.last_seq, now_s=now, last_s=self._last_s):
            return None
        manifest = await self._make()
        self.last_seq = manifest.seq
        self._last_s = self._clock()
        self.created.append(manifest)
        await self.snapshot_store.retain(self.policy.keep)
        return manifest

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except WalshipError as exc:
                self.failures += 1
                log.warning("periodic snapshot failed (will retry): %s", exc)
            await asyncio.sleep(self.policy.poll_s)

    async def start(self) -> None:
        if self._task is None:
            existing = await self.snapshot_store.list_manifests()
            if existing:
                self.last_seq = existing[0].seq
            self._task = asyncio.create_task(self._run(), name="walship-snapshot-scheduler")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
