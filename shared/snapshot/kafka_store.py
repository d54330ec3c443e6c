"""Snapshots in a Kafka topic (``kafka://<topic>``), for deployments without a shared volume.

Everything goes to partition 0 of the topic, so the log order is the write
order: chunk pieces first, the manifest last. Message keys (UTF-8)::

    <snapshot_id>/c/<index:06d>/<piece:04d>   a piece of chunk <index> (header wsnap-pieces)
    <snapshot_id>/m                           the manifest (written last)
    <snapshot_id>/d                           deletion marker

A chunk frame larger than ``piece_bytes`` is cut into pieces so every message
stays below Kafka's default 1 MB limit. Listing reads the topic once and then
only what was appended since (an in-memory index of key -> offset); reading a
chunk seeks straight to its pieces.

Deletion appends tombstones (null values) for every key of the snapshot, so a
compacted topic (cleanup.policy=compact) eventually drops the data, plus a
deletion marker that keeps the id deleted even where nothing is compacted (a
plain-retention topic, the embedded dev cluster). Create the topic with
``retention.ms=-1`` (or compaction): time-based retention would silently delete
snapshots.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from walship.shared.errors import (
    ConfigError,
    KafkaOperationError,
    SnapshotCorruptError,
    SnapshotError,
    SnapshotNotFoundError,
)
from walship.shared.kafka import describe_topic, ensure_topic, kafka_errors
from walship.shared.snapshot.base import retain_newest
from walship.shared.snapshot.format import (
    Manifest,
    decode_manifest,
    encode_manifest,
    is_snapshot_id,
    newest_first,
    parse_snapshot_id,
)

log = logging.getLogger(__name__)

PIECE_BYTES_DEFAULT = 900_000
PIECES_HEADER = "wsnap-pieces"
READ_AHEAD_BYTES = 32 << 20
# Keys other than our own in the index's namespace are ignored, never fatal.
_CLIENT_KEYS = frozenset(
    {
        "bootstrap_servers",
        "client_id",
        "security_protocol",
        "ssl_context",
        "sasl_mechanism",
        "sasl_plain_username",
        "sasl_plain_password",
    }
)


def chunk_key(snapshot_id: str, index: int, piece: int) -> bytes:
    return f"{snapshot_id}/c/{index:06d}/{piece:04d}".encode()


def manifest_key(snapshot_id: str) -> bytes:
    return f"{snapshot_id}/m".encode()


def deleted_key(snapshot_id: str) -> bytes:
    return f"{snapshot_id}/d".encode()


@dataclass
class _Entry:
    """What the topic holds for one snapshot id, as offsets into partition 0."""

    pieces: dict[int, dict[int, int]] = field(default_factory=dict)  # index -> piece -> offset
    piece_counts: dict[int, int] = field(default_factory=dict)
    manifest_offset: int | None = None
    manifest: Manifest | None = None
    deleted: bool = False


class KafkaSnapshotStore:
    """A SnapshotStore over partition 0 of a Kafka topic."""

    def __init__(
        self,
        topic: str,
        kafka: Mapping[str, Any] | str,
        *,
        piece_bytes: int = PIECE_BYTES_DEFAULT,
        replication_factor: int | None = None,
        timeout_ms: int = 30_000,
    ) -> None:
        if not topic:
            raise ConfigError("a Kafka snapshot URL needs a topic: kafka://<topic>")
        self.topic = topic
        self._kwargs = {"bootstrap_servers": kafka} if isinstance(kafka, str) else dict(kafka)
        self._client_kwargs = {k: v for k, v in self._kwargs.items() if k in _CLIENT_KEYS}
        self.piece_bytes = piece_bytes
        self.replication_factor = replication_factor
        self.timeout_ms = timeout_ms
        self._tp = TopicPartition(topic, 0)
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._index: dict[str, _Entry] = {}
        self._scanned = 0  # next offset of partition 0 not yet indexed
        self._begin = 0  # log start offset of partition 0 at the last scan
        self._cache: dict[int, bytes] = {}  # read-ahead: offset -> value
        self._cache_bytes = 0
        self._lock = asyncio.Lock()

    @classmethod
    def from_url(
        cls, url: str, kafka: Mapping[str, Any] | str, **kwargs: Any
    ) -> KafkaSnapshotStore:
        parsed = urlparse(url)
        topic = (parsed.netloc + parsed.path).strip("/")
        if parsed.scheme != "kafka" or not topic or "/" in topic:
            raise ConfigError("a Kafka snapshot URL looks like kafka://<topic>", snapshot_url=url)
        return cls(topic, kafka, **kwargs)

    @property
    def url(self) -> str:
        return f"kafka://{self.topic}"

    # --- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        if self._consumer is not None:
            return
        try:
            await describe_topic(self._kwargs, self.topic, timeout_ms=self.timeout_ms)
        except KafkaOperationError:
            if self.replication_factor is None:
                raise KafkaOperationError(
                    f"snapshot topic {self.topic!r} does not exist; create it with 1 partition "
                    "and retention.ms=-1 (or cleanup.policy=compact)",
                    topic=self.topic,
                ) from None
            await ensure_topic(
                self._kwargs,
                self.topic,
                1,
                self.replication_factor,
                create=True,
                configs={"retention.ms": "-1", "max.message.bytes": str(self.piece_bytes + 65536)},
            )
        async with kafka_errors("opening the snapshot topic", topic=self.topic):
            consumer = AIOKafkaConsumer(
                **self._client_kwargs,
                group_id=None,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                request_timeout_ms=self.timeout_ms,
                max_partition_fetch_bytes=max(4 << 20, 2 * self.piece_bytes),
                fetch_max_bytes=max(16 << 20, 4 * self.piece_bytes),
            )
            await consumer.start()
            consumer.assign([self._tp])
            self._consumer = consumer

    async def _ensure_producer(self) -> AIOKafkaProducer:
        await self.start()
        if self._producer is None:
            async with kafka_errors("starting the snapshot producer", topic=self.topic):
                producer = AIOKafkaProducer(
                    **self._client_kwargs,
                    acks="all",
                    enable_idempotence=True,
                    max_request_size=self.piece_bytes + 65536,
                    request_timeout_ms=self.timeout_ms,
                    linger_ms=5,
                )
                await producer.start()
                self._producer = producer
        return self._producer

    async def close(self) -> None:
        producer, consumer = self._producer, self._consumer
        self._producer = self._consumer = None
        if producer is not None:
            await producer.stop()
        if consumer is not None:
            await consumer.stop()

    async def __aenter__(self) -> KafkaSnapshotStore:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- writes -------------------------------------------------------------

    async def _send_all(
        self, messages: list[tuple[bytes, bytes | None, list[tuple[str, bytes]]]]
    ) -> None:
        producer = await self._ensure_producer()
        async with kafka_errors("writing to the snapshot topic", topic=self.topic):
            futures = [
                await producer.send(self.topic, value=v, key=k, partition=0, headers=h)
                for k, v, h in messages
            ]
            await asyncio.gather(*futures)

    async def put_chunk(self, snapshot_id: str, index: int, data: bytes) -> None:
        parse_snapshot_id(snapshot_id)
        pieces = [data[i : i + self.piece_bytes] for i in range(0, len(data), self.piece_bytes)]
        pieces = pieces or [b""]
        header = [(PIECES_HEADER, str(len(pieces)).encode())]
        await self._send_all(
            [(chunk_key(snapshot_id, index, n), p, header) for n, p in enumerate(pieces)]
        )

    async def put_manifest(self, manifest: Manifest) -> None:
        manifest.validate()
        async with self._lock:
            await self._scan()
            entry = self._index.get(manifest.snapshot_id, _Entry())
            if entry.deleted:
                raise SnapshotError("snapshot id was deleted", snapshot=manifest.snapshot_id)
            for info in manifest.chunks:
                if not self._chunk_complete(entry, info.index):
                    raise SnapshotError(
                        "refusing to write a manifest before all its chunks",
                        snapshot=manifest.snapshot_id,
                        chunk=info.index,
                    )
        await self._send_all([(manifest_key(manifest.snapshot_id), encode_manifest(manifest), [])])

    @staticmethod
    def _chunk_complete(entry: _Entry, index: int) -> bool:
        count = entry.piece_counts.get(index)
        return count is not None and len(entry.pieces.get(index, {})) == count

    # --- the index ----------------------------------------------------------

    async def _scan(self) -> None:
        """Index everything appended to partition 0 since the last scan."""
        await self.start()
        consumer = self._consumer
        assert consumer is not None
        async with kafka_errors("reading the snapshot topic", topic=self.topic):
            begin = (await consumer.beginning_offsets([self._tp]))[self._tp]
            end = (await consumer.end_offsets([self._tp]))[self._tp]
            self._begin = begin
            if self._scanned < begin:
                self._scanned = begin
            if self._scanned >= end:
                return
            consumer.seek(self._tp, self._scanned)
            while self._scanned < end:
                batch = await consumer.getmany(self._tp, timeout_ms=self.timeout_ms)
                records = batch.get(self._tp, [])
                if not records:
                    raise SnapshotError(
                        "snapshot topic returned nothing before its end offset",
                        topic=self.topic,
                        offset=self._scanned,
                        end_offset=end,
                    )
                for r in records:
                    self._index_record(r.offset, r.key, r.value, r.headers)
                    self._scanned = r.offset + 1

    def _index_record(
        self, offset: int, key: bytes | None, value: bytes | None, headers: Any
    ) -> None:
        if key is None:
            return
        try:
            parts = key.decode().split("/")
        except UnicodeDecodeError:
            return
        if not parts or not is_snapshot_id(parts[0]):
            return
        sid = parts[0]
        entry = self._index.setdefault(sid, _Entry())
        kind = parts[1] if len(parts) > 1 else ""
        if kind == "d" and len(parts) == 2:
            entry.deleted = True
            entry.manifest = None
        elif kind == "m" and len(parts) == 2:
            if value is None:  # tombstone
                entry.manifest_offset = None
                entry.manifest = None
                return
            entry.manifest_offset = offset
            try:
                entry.manifest = decode_manifest(value, where=f"{self.topic}@{offset}")
            except SnapshotCorruptError as exc:
                log.warning("skipping unreadable snapshot manifest: %s", exc)
                entry.manifest = None
        elif kind == "c" and len(parts) == 4:
            try:
                index, piece = int(parts[2]), int(parts[3])
                count = int(dict(headers or ()).get(PIECES_HEADER, b"1"))
            except ValueError:
                return
            if value is None:  # tombstone
                entry.pieces.get(index, {}).pop(piece, None)
                return
            if piece == 0:
                entry.pieces[index] = {}  # a rewrite of the chunk starts over
            entry.pieces.setdefault(index, {})[piece] = offset
            entry.piece_counts[index] = count

    # --- reads --------------------------------------------------------------

    async def list_manifests(self) -> list[Manifest]:
        async with self._lock:
            await self._scan()
            return newest_first(
                e.manifest
                for sid, e in self._index.items()
                if e.manifest is not None and not e.deleted and self._intact(sid, e)
            )

    def _intact(self, snapshot_id: str, entry: _Entry) -> bool:
        """All chunks still in the topic: retention (or the dev cluster's 5 MB cap)
        may have deleted the oldest messages; such a snapshot is unusable."""
        assert entry.manifest is not None
        for info in entry.manifest.chunks:
            pieces = entry.pieces.get(info.index, {})
            if not self._chunk_complete(entry, info.index) or min(pieces.values()) < self._begin:
                log.warning(
                    "snapshot %s in %s lost chunk %d to retention; not listing it",
                    snapshot_id,
                    self.topic,
                    info.index,
                )
                return False
        return True

    async def get_manifest(self, snapshot_id: str) -> Manifest:
        parse_snapshot_id(snapshot_id)
        async with self._lock:
            await self._scan()
            entry = self._index.get(snapshot_id)
        if entry is None or entry.deleted or entry.manifest_offset is None:
            raise SnapshotNotFoundError("no such snapshot", snapshot=snapshot_id, topic=self.topic)
        if entry.manifest is None:
            raise SnapshotCorruptError(
                "snapshot manifest is unreadable",
                snapshot=snapshot_id,
                topic=self.topic,
                offset=entry.manifest_offset,
            )
        return entry.manifest

    async def get_chunk(self, snapshot_id: str, index: int) -> bytes:
        parse_snapshot_id(snapshot_id)
        async with self._lock:
            entry = self._index.get(snapshot_id)
            if entry is None or not self._chunk_complete(entry, index):
                await self._scan()
                entry = self._index.get(snapshot_id)
            if entry is None or not self._chunk_complete(entry, index):
                raise SnapshotCorruptError(
                    "snapshot chunk is missing", snapshot=snapshot_id, chunk=index, topic=self.topic
                )
            offsets = [entry.pieces[index][n] for n in range(entry.piece_counts[index])]
            return b"".join([await self._read_at(o, snapshot_id, index) for o in offsets])

    async def _read_at(self, offset: int, snapshot_id: str, index: int) -> bytes:
        """The value at ``offset``; one fetch also caches the records after it, since a
        loader reads a snapshot's chunks in log order."""
        cached = self._cache.pop(offset, None)
        if cached is not None:
            self._cache_bytes -= len(cached)
            return cached
        consumer = self._consumer
        assert consumer is not None

        def gone() -> SnapshotCorruptError:
            return SnapshotCorruptError(
                "snapshot chunk is no longer in the topic (retention?)",
                snapshot=snapshot_id,
                chunk=index,
                topic=self.topic,
                offset=offset,
            )

        async with kafka_errors("reading a snapshot chunk", topic=self.topic, offset=offset):
            consumer.seek(self._tp, offset)
            while True:
                batch = await consumer.getmany(self._tp, timeout_ms=self.timeout_ms)
                records = [r for r in batch.get(self._tp, []) if r.offset >= offset]
                if not batch.get(self._tp):
                    raise gone()
                if not records:
                    continue
                if records[0].offset != offset or records[0].value is None:
                    raise gone()
                self._cache.clear()
                self._cache_bytes = 0
                for r in records[1:]:
                    if r.value is not None and self._cache_bytes + len(r.value) <= READ_AHEAD_BYTES:
                        self._cache[r.offset] = r.value
                        self._cache_bytes += len(r.value)
                value: bytes = records[0].value
                return value

    # --- deletion -----------------------------------------------------------

    async def delete(self, snapshot_id: str) -> None:
        parse_snapshot_id(snapshot_id)
        async with self._lock:
            await self._scan()
            entry = self._index.get(snapshot_id, _Entry())
        # Manifest tombstone first: the snapshot stops existing before its chunks go.
        messages: list[tuple[bytes, bytes | None, list[tuple[str, bytes]]]] = [
            (manifest_key(snapshot_id), None, []),
            (deleted_key(snapshot_id), b"deleted", []),
        ]
        for index, pieces in sorted(entry.pieces.items()):
            messages.extend((chunk_key(snapshot_id, index, n), None, []) for n in sorted(pieces))
        await self._send_all(messages)

    async def retain(self, keep: int) -> list[str]:
        return await retain_newest(self, keep)
