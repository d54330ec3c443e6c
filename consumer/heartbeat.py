"""Reader heartbeats: each reader's position and health, published to ``<topic>.readers``.

Every ``interval_ms`` a reader publishes a small JSON document keyed by its
reader id; ``walship status`` reads the topic and keeps the latest per key.
Heartbeats are advisory: failing to publish one is logged, never fatal to the
reader. ``assess`` (pure) turns heartbeats and the topic's state into the rows
and warnings the status command shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from walship.consumer.reader import ReaderStatus
from walship.shared.errors import KafkaOperationError
from walship.shared.kafka import describe_topic, ensure_side_topic, translate_kafka_error
from walship.shared.lifecycle import AsyncService

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_MS_DEFAULT = 5000
# A reader whose heartbeat is older than this many intervals is reported stalled.
STALE_INTERVALS = 3
# Warn when a reader's next offset is within this fraction of the log start.
NEAR_LOG_START_FRACTION = 0.1


def readers_topic(topic: str) -> str:
    return f"{topic}.readers"


def _version() -> str:
    try:
        return version("walship")
    except PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class Heartbeat:
    reader_id: str
    applied_seq: int
    lag_seqs: int
    lag_s: float
    version: str
    host: str
    healthy: bool
    error: str | None
    ts: float  # seconds since the epoch, when it was sent
    interval_s: float = HEARTBEAT_INTERVAL_MS_DEFAULT / 1000
    offsets: dict[int, int] = field(default_factory=dict)  # next offsets (from the checkpoint)
    running: bool = True  # False in the last heartbeat a reader sends when it stops

    def to_json(self) -> bytes:
        doc = asdict(self)
        doc["offsets"] = {str(p): o for p, o in self.offsets.items()}
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Heartbeat:
        """Parse a heartbeat; raises ValueError on anything else."""
        try:
            doc = json.loads(data)
            return cls(
                reader_id=str(doc["reader_id"]),
                applied_seq=int(doc["applied_seq"]),
                lag_seqs=int(doc["lag_seqs"]),
                lag_s=float(doc["lag_s"]),
                version=str(doc.get("version", "")),
                host=str(doc.get("host", "")),
                healthy=bool(doc["healthy"]),
                error=None if doc.get("error") is None else str(doc["error"]),
                ts=float(doc["ts"]),
                interval_s=float(doc.get("interval_s", HEARTBEAT_INTERVAL_MS_DEFAULT / 1000)),
                offsets={int(p): int(o) for p, o in dict(doc.get("offsets") or {}).items()},
                running=bool(doc.get("running", True)),
            )
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a heartbeat: {exc}") from exc

    @classmethod
    def of(
        cls,
        status: ReaderStatus,
        *,
        interval_s: float,
        offsets: Mapping[int, int] | None = None,
        now: float | None = None,
        running: bool = True,
    ) -> Heartbeat:
        return cls(
            reader_id=status.reader_id,
            applied_seq=status.applied_seq,
            lag_seqs=status.lag_seqs,
            lag_s=round(status.lag_s, 3),
            version=_version(),
            host=socket.gethostname(),
            healthy=status.healthy,
            error=status.error,
            ts=time.time() if now is None else now,
            interval_s=interval_s,
            offsets=dict(offsets or {}),
            running=running,
        )


async def ensure_readers_topic(client_kwargs: Mapping[str, Any], topic: str) -> None:
    """Create ``<topic>.readers`` where the cluster allows it (compacted: latest per reader)."""
    await ensure_side_topic(client_kwargs, readers_topic(topic))


class HeartbeatPublisher(AsyncService):
    """Publishes a reader's status every ``interval_ms`` (and once more on stop)."""

    def __init__(
        self,
        status: Callable[[], ReaderStatus],
        *,
        topic: str,
        client_kwargs: Mapping[str, Any],
        interval_ms: int = HEARTBEAT_INTERVAL_MS_DEFAULT,
        offsets: Callable[[], Mapping[int, int]] | None = None,
        create_topic: bool = True,
    ) -> None:
        self._status = status
        self._offsets = offsets
        self.topic = readers_topic(topic)
        self._main_topic = topic
        self._kwargs = dict(client_kwargs)
        self._interval_s = interval_ms / 1000
        self._create_topic = create_topic
        self._producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None
        self.sent = 0

    async def start(self) -> None:
        if self._producer is not None:
            return
        if self._create_topic:
            await ensure_readers_topic(self._kwargs, self._main_topic)
        producer = AIOKafkaProducer(**self._kwargs, acks=1, linger_ms=0)
        try:
            await producer.start()
        except (KafkaError, OSError) as exc:
            await producer.stop()
            raise translate_kafka_error(exc, "start heartbeat producer", topic=self.topic) from exc
        self._producer = producer
        self._task = asyncio.create_task(self._loop(), name="walship-heartbeat")

    async def stop(self) -> None:
        """Stop the loop and send a last heartbeat (idempotent)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        producer = self._producer
        if producer is None:
            return
        await self.publish_now(running=False)
        self._producer = None
        await producer.stop()

    async def publish_now(self, *, running: bool = True) -> None:
        producer = self._producer
        if producer is None:
            return
        status = self._status()
        beat = Heartbeat.of(
            status,
            interval_s=self._interval_s,
            offsets=self._offsets() if self._offsets is not None else None,
            running=running,
        )
        try:
            await producer.send_and_wait(self.topic, beat.to_json(), key=status.reader_id.encode())
            self.sent += 1
        except (KafkaError, OSError) as exc:
            log.warning(
                "heartbeat not published: %s",
                translate_kafka_error(exc, "heartbeat", topic=self.topic),
            )

    async def _loop(self) -> None:
        while True:
            await self.publish_now()
            await asyncio.sleep(self._interval_s)


async def read_heartbeats(
    client_kwargs: Mapping[str, Any], topic: str, *, timeout_ms: int = 10_000
) -> dict[str, Heartbeat]:
    """The latest heartbeat of every reader of ``topic`` (empty if none ever ran)."""
    name = readers_topic(topic)
    try:
        description = await describe_topic(client_kwargs, name)
    except KafkaOperationError:
        return {}
    tps = [TopicPartition(name, p) for p in range(description.partitions)]
    ends = {tp: description.end_offsets.get(tp.partition, 0) for tp in tps}
    latest: dict[str, Heartbeat] = {}
    wanted = [tp for tp in tps if ends[tp] > description.beginning_offsets.get(tp.partition, 0)]
    if not wanted:
        return latest
    consumer = AIOKafkaConsumer(**client_kwargs, enable_auto_commit=False)
    try:
        await consumer.start()
        consumer.assign(wanted)
        await consumer.seek_to_beginning(*wanted)
        remaining = set(wanted)
        deadline = time.monotonic() + timeout_ms / 1000
        while remaining and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200)
            for tp, records in batches.items():
                for record in records:
                    try:
                        beat = Heartbeat.from_json(record.value or b"")
                    except ValueError:
                        continue  # not ours; the topic is advisory
                    latest[beat.reader_id] = beat
                if records and records[-1].offset + 1 >= ends[tp]:
                    remaining.discard(tp)
    except (KafkaError, OSError) as exc:
        raise translate_kafka_error(exc, "read heartbeats", topic=name) from exc
    finally:
        await consumer.stop()
    return latest


# --- assessment (pure) ------------------------------------------------------------


@dataclass(frozen=True)
class TopicState:
    """What the status command knows about the stream besides heartbeats."""

    topic: str
    partitions: int
    log_start_offsets: Mapping[int, int]
    end_offsets: Mapping[int, int]
    last_seq: int | None = None  # from the topic's last messages
    writer_seq: int | None = None  # the writer's WAL (with --data-dir)
    published_seq: int | None = None  # the publisher's position (with --data-dir)


@dataclass(frozen=True)
class ReaderRow:
    reader_id: str
    host: str
    version: str
    running: bool
    applied_seq: int
    lag_seqs: int
    lag_s: float
    heartbeat_age_s: float
    healthy: bool
    error: str | None
    warnings: list[str]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def assess(heartbeats: Mapping[str, Heartbeat], state: TopicState, now: float) -> list[ReaderRow]:
    """One row per reader with lag and warnings (stalled, near log start, unhealthy)."""
    head = max(
        (s for s in (state.last_seq, state.writer_seq) if s is not None),
        default=None,
    )
    rows = []
    for reader_id in sorted(heartbeats):
        beat = heartbeats[reader_id]
        lag = beat.lag_seqs if head is None else max(0, head - beat.applied_seq)
        age = max(0.0, now - beat.ts)
        warnings: list[str] = []
        if not beat.healthy:
            warnings.append(f"unhealthy: {beat.error or 'no reason given'}")
        if not beat.running:
            warnings.append(f"stopped {age:.0f}s ago")
        elif age > STALE_INTERVALS * beat.interval_s:
            warnings.append(f"stalled: last heartbeat {age:.0f}s ago")
        expired: list[str] = []
        near: list[str] = []
        for p, next_offset in sorted(beat.offsets.items()):
            start = state.log_start_offsets.get(p, 0)
            end = state.end_offsets.get(p, 0)
            if next_offset < start:
                expired.append(f"{p} (needs {next_offset}, log starts at {start})")
            elif (
                lag
                and end > start
                and next_offset - start <= (end - start) * NEAR_LOG_START_FRACTION
            ):
                near.append(f"{p} ({next_offset - start} past log start {start})")
        # One line per kind, not per partition: a topic may have dozens.
        if expired:
            warnings.append(f"bootstrap needed: partitions {', '.join(expired)}")
        if near:
            warnings.append(
                f"near log start, retention may overtake it: partitions {', '.join(near)}"
            )
        rows.append(
            ReaderRow(
                reader_id=reader_id,
                host=beat.host,
                version=beat.version,
                running=beat.running,
                applied_seq=beat.applied_seq,
                lag_seqs=lag,
                lag_s=beat.lag_s if lag else 0.0,
                heartbeat_age_s=round(age, 3),
                healthy=beat.healthy,
                error=beat.error,
                warnings=warnings,
            )
        )
    return rows


def status_document(
    heartbeats: Mapping[str, Heartbeat], state: TopicState, now: float
) -> dict[str, Any]:
    """The ``walship status --json`` document."""
    rows = assess(heartbeats, state, now)
    backlog = None
    if state.writer_seq is not None and state.published_seq is not None:
        backlog = max(0, state.writer_seq - state.published_seq)
    return {
        "topic": state.topic,
        "partitions": state.partitions,
        "last_seq": state.last_seq,
        "writer": {
            "last_seq": state.writer_seq,
            "published_seq": state.published_seq,
            "wal_backlog_seqs": backlog,
        },
        "log_start_offsets": {str(p): o for p, o in sorted(state.log_start_offsets.items())},
        "end_offsets": {str(p): o for p, o in sorted(state.end_offsets.items())},
        "readers": [r.to_json() for r in rows],
        "ts": now,
    }
