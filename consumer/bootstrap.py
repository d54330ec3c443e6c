"""Bootstrap a replica from a snapshot when the log no longer holds what it needs.

The ``Reader`` calls a ``Bootstrapper`` as its bootstrap hook (``await b(reason)``)
when retention deleted sequences the replica still needs; a service calls
``await b.prepare()`` once before starting a reader, so a new replica can start
from a snapshot instead of replaying the whole topic.

Loading is crash-safe and resumable:

1. Choose the newest snapshot that *connects*: for every partition, the offset
   the snapshot continues from is still in the log (>= the log start offset).
   When none does, say exactly which partitions/sequences are missing and what
   would fix it (``NoConnectingSnapshotError``).
2. Load its chunks, in order, into a fresh file ``<replica>.bootstrap``; each
   chunk is one SQLite transaction. ``<replica>.bootstrap.progress`` names the
   snapshot being loaded and how many chunks are done. Because chunks are
   key-sorted and each commits atomically, "chunk i is loaded" is the same as
   "its first key is in the file", so after a crash the loader checks the
   recorded count against the data and continues exactly at the first missing
   chunk: no chunk is loaded twice, none is skipped, whatever point the crash hit.
3. Write the snapshot's checkpoint (seq, offsets, writer), recompute the digest
   and compare it with the manifest's.
4. Swap atomically: the replica's store is closed (``before_swap``), its stale
   ``-wal``/``-shm`` files removed, the fresh file renamed over it, the
   directory fsynced, and the store reopened (``after_swap``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from walship.shared.crypto import Keyring
from walship.shared.errors import (
    NoConnectingSnapshotError,
    ReplicaError,
    SnapshotCorruptError,
    SnapshotError,
    WalshipError,
)
from walship.shared.model import WriterId
from walship.shared.snapshot.base import SnapshotStore
from walship.shared.snapshot.file_store import atomic_write
from walship.shared.snapshot.format import Manifest, decode_chunk, missing_partitions
from walship.shared.snapshot.progress import Progress, make_progress
from walship.shared.store import Checkpoint, ReplicaStore

log = logging.getLogger(__name__)

FIRST_START = "first start"
"""The reason ``prepare`` passes: the replica is being opened, nothing failed yet."""

CHUNK_READ_ATTEMPTS = 4


class BootstrapPolicy(StrEnum):
    WHEN_NEEDED = "when_needed"  # only when the log cannot supply what the replica needs
    INITIAL = "initial"  # also eagerly into an empty replica; never over a non-empty one
    NEVER = "never"  # never: stop with an error that says what is missing


@dataclass(frozen=True)
class LogView:
    """What the topic still holds, per partition."""

    partitions: int
    log_start: Mapping[int, int]
    log_end: Mapping[int, int]
    first_seqs: Mapping[int, int | None]  # first seq of the message at log start (None: empty)

    @property
    def complete(self) -> bool:
        """Nothing was ever deleted: the log still supplies every sequence from 1."""
        return all(self.log_start.get(p, 0) == 0 for p in range(self.partitions))

    def earliest_seq(self) -> int | None:
        seqs = [s for s in self.first_seqs.values() if s is not None]
        return min(seqs) if seqs else None


LogInspector = Callable[[], Awaitable[LogView]]


def kafka_log_inspector(
    topic: str, client_kwargs: Mapping[str, Any], *, timeout_ms: int = 10_000
) -> LogInspector:
    """Log start/end offsets (``describe_topic``) and the first sequence at each start."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from walship.shared.codec import peek_header
    from walship.shared.errors import DecodeError
    from walship.shared.kafka import describe_topic, kafka_errors

    async def first_seq(consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> int | None:
        consumer.seek(tp, offset)
        records = await consumer.getmany(tp, timeout_ms=timeout_ms, max_records=1)
        for r in records.get(tp, []):
            try:
                return peek_header(r.value).first_seq
            except DecodeError:
                return None
        return None

    async def inspect() -> LogView:
        desc = await describe_topic(client_kwargs, topic)
        firsts: dict[int, int | None] = dict.fromkeys(range(desc.partitions))
        busy = [
            p for p in range(desc.partitions) if desc.end_offsets[p] > desc.beginning_offsets[p]
        ]
        if busy:
            async with kafka_errors("reading the first message of each partition", topic=topic):
                consumer = AIOKafkaConsumer(
                    **client_kwargs, enable_auto_commit=False, auto_offset_reset="earliest"
                )
                await consumer.start()
                try:
                    tps = [TopicPartition(topic, p) for p in busy]
                    consumer.assign(tps)
                    for tp in tps:
                        firsts[tp.partition] = await first_seq(
                            consumer, tp, desc.beginning_offsets[tp.partition]
                        )
                finally:
                    await consumer.stop()
        return LogView(desc.partitions, desc.beginning_offsets, desc.end_offsets, firsts)

    return inspect


# --- choosing (pure) ------------------------------------------------------------


def choose_snapshot(
    manifests: Sequence[Manifest], log_view: LogView, *, topic: str, stream_id: str | None
) -> tuple[Manifest | None, list[str]]:
    """The newest manifest that connects with the log, and why the others were passed over."""
    rejected: list[str] = []
    for m in sorted(manifests, key=lambda x: x.snapshot_id, reverse=True):
        if m.topic != topic:
            rejected.append(f"{m.snapshot_id}: taken from topic {m.topic!r}, not {topic!r}")
            continue
        if stream_id and m.stream_id and m.stream_id != stream_id:
            rejected.append(f"{m.snapshot_id}: belongs to stream {m.stream_id}, not {stream_id}")
            continue
        if m.partitions != log_view.partitions:
            rejected.append(
                f"{m.snapshot_id}: made for {m.partitions} partitions, the topic has "
                f"{log_view.partitions}"
            )
            continue
        gaps = missing_partitions(m, log_view.log_start)
        if gaps:
            where = ", ".join(
                f"partition {p} needs offset {o} but the log starts at {s}"
                for p, (o, s) in sorted(gaps.items())
            )
            earliest = log_view.earliest_seq()
            seqs = (
                f"seqs {m.seq + 1}..{earliest - 1} are gone"
                if earliest is not None and earliest > m.seq + 1
                else f"messages after seq {m.seq} are gone"
            )
            rejected.append(f"{m.snapshot_id} (seq {m.seq}): {seqs}; {where}")
            continue
        return m, rejected
    return None, rejected


def explain_no_snapshot(
    *, applied_seq: int, log_view: LogView, rejected: Sequence[str], store_url: str
) -> str:
    earliest = log_view.earliest_seq()
    need = f"the replica is at seq {applied_seq} and needs seq {applied_seq + 1}"
    have = (
        f"the earliest sequence left on the topic is {earliest}"
        if earliest is not None
        else "the topic holds no messages"
    )
    starts = ", ".join(f"p{p}@{o}" for p, o in sorted(log_view.log_start.items()))
    lines = [
        f"no snapshot in {store_url} connects with the log: {need}; {have} "
        f"(log start offsets {starts}).",
    ]
    if rejected:
        lines.append("snapshots considered: " + "; ".join(rejected[:5]) + ".")
    else:
        lines.append("the snapshot store holds no snapshots.")
    lines.append(
        "To fix: create a fresh snapshot from the writer (walship snapshot create --data-dir "
        "<writer data dir>) or from a caught-up replica (walship snapshot create --replica "
        "<file>), then restart this reader; to avoid this in future, snapshot more often "
        "than the topic's retention deletes (producer.snapshot_every_s) or raise retention.ms."
    )
    return " ".join(lines)


# --- the bootstrapper ---------------------------------------------------------------


def _sidecar(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _remove_db(path: Path) -> None:
    for p in (path, _sidecar(path, "-wal"), _sidecar(path, "-shm"), _sidecar(path, "-journal")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Bootstrapper:
    """The Reader's bootstrap hook; see the module docstring."""

    def __init__(
        self,
        replica_path: str | Path,
        snapshot_store: SnapshotStore,
        *,
        topic: str,
        inspect_log: LogInspector,
        policy: BootstrapPolicy | str = BootstrapPolicy.WHEN_NEEDED,
        before_swap: Callable[[], None] | None = None,
        after_swap: Callable[[], None] | None = None,
        progress: Callable[[str], Progress] = make_progress,
        on_chunk_loaded: Callable[[int], None] | None = None,
        synchronous: str = "normal",
        keyring: Keyring | None = None,
    ) -> None:
        self.replica_path = Path(replica_path)
        self.fresh_path = _sidecar(self.replica_path, ".bootstrap")
        self.progress_path = _sidecar(self.replica_path, ".bootstrap.progress")
        self.snapshot_store = snapshot_store
        self.topic = topic
        self._inspect_log = inspect_log
        self.policy = BootstrapPolicy(policy)
        self._before_swap = before_swap
        self._after_swap = after_swap
        self._progress = progress
        self._on_chunk_loaded = on_chunk_loaded
        self._synchronous = synchronous
        self._keyring = keyring  # decrypts encrypted chunks (shared/crypto.py)
        self.loaded_chunks = 0  # chunks loaded by this instance (tests count them)

    @classmethod
    def for_applier(
        cls, applier: Any, snapshot_store: SnapshotStore, **kwargs: Any
    ) -> Bootstrapper:
        """Wire the swap to a ``SqliteApplier``: close its store before, reopen after."""

        def before() -> None:
            applier.store.close()

        def after() -> None:
            applier.store = ReplicaStore(
                applier.path, synchronous=kwargs.get("synchronous", "normal")
            )

        return cls(applier.path, snapshot_store, before_swap=before, after_swap=after, **kwargs)

    async def prepare(self) -> Checkpoint | None:
        """Call once before the reader starts: loads a snapshot into an empty replica
        when the policy asks for it (initial) or the log cannot supply seq 1 (when_needed)."""
        return await self(FIRST_START)

    def _replica_checkpoint(self) -> Checkpoint:
        if not self.replica_path.exists():
            return Checkpoint(applied_seq=0)
        with ReplicaStore(self.replica_path) as store:
            return store.checkpoint()

    async def __call__(self, reason: str) -> Checkpoint | None:
        first_start = reason == FIRST_START
        cp = await asyncio.to_thread(self._replica_checkpoint)
        if first_start and cp.applied_seq > 0 and not self.fresh_path.exists():
            return None  # an existing replica resumes from its own checkpoint
        log_view = await self._inspect_log()
        if first_start and self.policy is not BootstrapPolicy.INITIAL and log_view.complete:
            return None  # the log still holds everything from seq 1: just replay it
        if self.policy is BootstrapPolicy.NEVER:
            if first_start:
                return None  # the reader finds out what is missing and says so
            raise NoConnectingSnapshotError(
                f"{reason}; the bootstrap policy is 'never', so the reader stops: set "
                "consumer.bootstrap_policy=when_needed (WALSHIP_CONSUMER__BOOTSTRAP_POLICY) "
                "and a snapshot store to recover automatically",
                topic=self.topic,
                applied_seq=cp.applied_seq,
            )
        if self.policy is BootstrapPolicy.INITIAL and cp.applied_seq > 0 and not first_start:
            raise NoConnectingSnapshotError(
                f"{reason}; the bootstrap policy is 'initial', which only loads snapshots "
                "into an empty replica: set consumer.bootstrap_policy=when_needed, or delete "
                "the replica file to start over from a snapshot",
                topic=self.topic,
                applied_seq=cp.applied_seq,
                replica=str(self.replica_path),
            )
        stream_id = cp.writer.stream_id.hex() if cp.writer is not None else None
        manifests = await self.snapshot_store.list_manifests()
        if not first_start and cp.applied_seq > 0:
            # Only a snapshot past the replica helps: loading an older one would move the
            # replica (and everyone reading it) back in time, and the reader still could
            # not get past what stopped it (found by walship chaos: a reader stopped by a
            # corrupt message went from seq 7335 back to a snapshot at 6663).
            newer = [m for m in manifests if m.seq > cp.applied_seq]
            if not newer:
                newest = max((m.seq for m in manifests), default=None)
                raise NoConnectingSnapshotError(
                    f"{reason}; {self.snapshot_store.url} holds no snapshot past the "
                    f"replica's seq {cp.applied_seq} (newest: "
                    f"{'none' if newest is None else f'seq {newest}'}); the replica is left "
                    "as it is: restart this reader once the writer has taken a newer snapshot",
                    topic=self.topic,
                    applied_seq=cp.applied_seq,
                )
            manifests = newer
        manifest, rejected = choose_snapshot(
            manifests, log_view, topic=self.topic, stream_id=stream_id
        )
        if manifest is None:
            if first_start and log_view.complete:
                return None
            raise NoConnectingSnapshotError(
                explain_no_snapshot(
                    applied_seq=cp.applied_seq,
                    log_view=log_view,
                    rejected=rejected,
                    store_url=self.snapshot_store.url,
                ),
                topic=self.topic,
            )
        log.info(
            "bootstrapping %s from snapshot %s (seq %d, %d keys, %d bytes): %s",
            self.replica_path,
            manifest.snapshot_id,
            manifest.seq,
            manifest.keys,
            manifest.total_bytes,
            reason,
        )
        return await self.load(manifest)

    # --- loading ------------------------------------------------------------

    def _read_progress(self) -> tuple[str, int] | None:
        try:
            obj = json.loads(self.progress_path.read_text(encoding="utf-8"))
            return str(obj["snapshot_id"]), int(obj["chunks_done"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return None  # unreadable: start over (the fresh file is discarded)

    def _write_progress(self, snapshot_id: str, chunks_done: int) -> None:
        body = json.dumps({"snapshot_id": snapshot_id, "chunks_done": chunks_done}).encode()
        atomic_write(self.progress_path, body)

    def _open_fresh(self, manifest: Manifest) -> tuple[ReplicaStore, int]:
        """The fresh store and the index of the first chunk still to load."""
        prior = self._read_progress()
        if prior is None or prior[0] != manifest.snapshot_id or not self.fresh_path.exists():
            if prior is not None:
                log.info("discarding an unfinished bootstrap of another snapshot (%s)", prior[0])
            _remove_db(self.fresh_path)
            self._write_progress(manifest.snapshot_id, 0)
            return ReplicaStore(self.fresh_path, synchronous=self._synchronous), 0
        store = ReplicaStore(self.fresh_path, synchronous=self._synchronous)
        try:
            done = self._verify_done(store, manifest, prior[1])
        except BaseException:
            store.close()
            raise
        log.info(
            "resuming the bootstrap from snapshot %s at chunk %d of %d",
            manifest.snapshot_id,
            done,
            len(manifest.chunks),
        )
        return store, done

    @staticmethod
    def _verify_done(store: ReplicaStore, manifest: Manifest, hint: int) -> int:
        """The number of chunks committed, from the data (chunks commit in order)."""
        chunks = manifest.chunks
        done = max(0, min(hint, len(chunks)))

        def loaded(i: int) -> bool:
            return store.get(chunks[i].first_key) is not None

        if any(not c.first_key for c in chunks):
            # Encrypted chunks keep their first key out of the manifest, so the data
            # cannot be asked. The progress file is written after each chunk commits, so
            # the hint is at most one chunk behind; reloading it is idempotent (upserts).
            return done
        while done > 0 and not loaded(done - 1):
            done -= 1
        while done < len(chunks) and loaded(done):
            done += 1
        return done

    async def _get_chunk(self, manifest: Manifest, index: int) -> bytes:
        for attempt in range(CHUNK_READ_ATTEMPTS):
            try:
                return await self.snapshot_store.get_chunk(manifest.snapshot_id, index)
            except WalshipError as exc:
                if not exc.retriable or attempt == CHUNK_READ_ATTEMPTS - 1:
                    raise
                log.warning("reading chunk %d failed, retrying: %s", index, exc)
                await asyncio.sleep(0.2 * 2**attempt)
        raise AssertionError("unreachable")

    async def load(self, manifest: Manifest) -> Checkpoint:
        """Load ``manifest`` into the fresh file (resuming), verify, and swap it in."""
        store, start = await asyncio.to_thread(self._open_fresh, manifest)
        progress = self._progress("bootstrap")
        try:
            progress.start(manifest.total_bytes, manifest.keys)
            done = manifest.chunks[:start]
            progress.advance(
                done_bytes=sum(c.stored_bytes for c in done), keys=sum(c.keys for c in done)
            )
            next_frame: asyncio.Task[bytes] | None = None
            for info in manifest.chunks[start:]:
                frame = await (next_frame or self._get_chunk(manifest, info.index))
                next_frame = None
                if info.index + 1 < len(manifest.chunks):  # fetch ahead while loading
                    next_frame = asyncio.ensure_future(self._get_chunk(manifest, info.index + 1))
                try:
                    await asyncio.to_thread(
                        self._load_chunk, store, manifest, info.index, frame, self._keyring
                    )
                except BaseException:
                    if next_frame is not None:
                        next_frame.cancel()
                        with contextlib.suppress(BaseException):
                            await next_frame
                    raise
                self.loaded_chunks += 1
                if self._on_chunk_loaded is not None:
                    self._on_chunk_loaded(info.index)
                await asyncio.to_thread(self._write_progress, manifest.snapshot_id, info.index + 1)
                progress.advance(done_bytes=info.stored_bytes, keys=info.keys)
            cp = Checkpoint(
                applied_seq=manifest.seq,
                offsets={p: manifest.offsets.get(p, 0) for p in range(manifest.partitions)},
                writer=(
                    WriterId(bytes.fromhex(manifest.stream_id), manifest.writer_epoch or 0)
                    if manifest.stream_id
                    else None
                ),
                applied_timestamp_us=manifest.seq_timestamp_us,
            )
            await asyncio.to_thread(self._finish, store, manifest, cp)
        finally:
            store.close()
            progress.finish()
        await asyncio.to_thread(self._swap)
        log.info(
            "replica %s now holds snapshot %s at seq %d",
            self.replica_path,
            manifest.snapshot_id,
            manifest.seq,
        )
        return cp

    @staticmethod
    def _load_chunk(
        store: ReplicaStore,
        manifest: Manifest,
        index: int,
        frame: bytes,
        keyring: Keyring | None = None,
    ) -> None:
        info = manifest.chunks[index]
        keys, values = decode_chunk(
            frame, snapshot_id=manifest.snapshot_id, index=index, info=info, keyring=keyring
        )
        store.load_items(zip(keys, values, strict=True))

    def _finish(self, store: ReplicaStore, manifest: Manifest, cp: Checkpoint) -> None:
        store.set_checkpoint(cp)
        digest = store.digest()
        if digest.sha256 != manifest.digest or digest.keys != manifest.keys:
            store.close()
            _remove_db(self.fresh_path)
            with contextlib.suppress(FileNotFoundError):
                self.progress_path.unlink()
            raise SnapshotCorruptError(
                "the loaded snapshot does not match its digest; the partial replica was "
                "discarded (verify the store: walship snapshot verify)",
                snapshot=manifest.snapshot_id,
                expected=manifest.digest[:16],
                actual=digest.sha256[:16],
                keys=digest.keys,
            )

    def _swap(self) -> None:
        swap_database(
            self.fresh_path,
            self.replica_path,
            before=self._before_swap,
            after=self._after_swap,
            progress_path=self.progress_path,
        )


def swap_database(
    fresh: Path,
    target: Path,
    *,
    before: Callable[[], None] | None = None,
    after: Callable[[], None] | None = None,
    progress_path: Path | None = None,
) -> None:
    """Rename the SQLite file ``fresh`` over ``target``, crash-safe.

    The fresh file's WAL is folded in and it is switched to rollback-journal
    mode, so one file holds everything; the target's stale ``-wal``/``-shm``
    are removed first, because SQLite would replay an old WAL into the new
    file. ``before`` closes whatever has ``target`` open; ``after`` reopens it.
    """
    try:
        conn = sqlite3.connect(fresh, isolation_level=None)
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.execute("PRAGMA journal_mode=DELETE")
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise ReplicaError(f"finishing the new database failed: {exc}", path=str(fresh)) from exc
    try:
        fd = os.open(fresh, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if before is not None:
            before()
        for stale in (_sidecar(target, "-wal"), _sidecar(target, "-shm")):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        os.replace(fresh, target)
        _fsync_dir(target.parent)
        if progress_path is not None:
            with contextlib.suppress(FileNotFoundError):
                progress_path.unlink()
    except OSError as exc:
        raise SnapshotError(
            f"swapping in the new database failed: {exc.strerror or exc}", path=str(target)
        ) from exc
    if after is not None:
        after()
