"""The reader: Kafka -> decode -> merge by sequence -> apply -> commit offsets (the ack).

Each reader is its own consumer group ``walship.<topic>.<reader-id>``, so Kafka
keeps every reader's acknowledgement separately; partitions are assigned
manually (all of them, no rebalancing) and the group id only makes ``commit``
work. The replica's own checkpoint (data, applied seq and per-partition next
offsets in one SQLite transaction) is the truth: on start each partition is
sought to the stored offset, whatever Kafka has committed.

The loop: fetch from all partitions, decode, reassemble split transactions,
offer to the ``SequenceMerger``, take what is dense from applied + 1, apply
(every WAL transaction stays whole), then commit the offsets that became safe.
Applies are pipelined: one runs in a worker thread (sqlite3 releases the GIL
while it works) while the loop fetches, decodes and merges the next group, so
groups grow by themselves when the reader is behind (up to
``apply_entries_max`` entries: fewer, larger SQLite commits) and a reader that
is caught up applies what is ready at once (``apply_linger_ms`` = 0) for low
latency. ``fetch_max_wait_ms`` bounds how long a broker holds a fetch that has
no data. A Kafka broker answers as soon as data arrives, so it only sets how
often an idle reader asks; librdkafka's mock cluster (the embedded dev cluster)
holds every fetch for the full wait even when data arrives, so there it adds
up to that much latency.

Memory stays flat on any backlog: decoded batches waiting in the merger are
bounded per partition (``partition_buffer_bytes_max``) and in total
(``buffer_bytes_max``): over the total, the partitions ahead of the merge point
are paused (all of them while what is buffered is ready to apply: applying
drains it; during a gap all but those that may deliver the missing sequence)
and resumed once the total has drained to half. A gap that outlasts the gap
timeout resumes everything and lifts the total bound until it is filled, so a
paused partition can never hold back the sequence the reader needs. aiokafka's
own prefetch is bounded by ``fetch_bytes_max`` per fetch and
``PARTITION_FETCH_BYTES_MAX`` per partition.

A gap is awaited (``gap_timeout_ms``); if the log can no longer fill it
(``retention_gap``), or a partition's offsets were deleted under us, the
reader calls the bootstrap hook; without one it stops with an error naming the
missing sequences. A message that fails to decode is never applied: the reader
stops with an error naming topic, partition, offset and (when the header is
readable) the sequences, and reports unhealthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError, OffsetOutOfRangeError
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Span, Status, StatusCode
from walship.consumer.applier import Applier
from walship.consumer.merge import Ready, SequenceMerger, Source, retention_gap
from walship.shared.codec import Decoder, Header, PartAssembler, partition_for, peek_header
from walship.shared.dictionaries import learn_dictionaries
from walship.shared.errors import (
    DecodeError,
    KafkaOperationError,
    RetentionExpiredError,
    WalshipError,
)
from walship.shared.kafka import describe_topic, translate_kafka_error
from walship.shared.lifecycle import AsyncService
from walship.shared.model import Batch, WriterId
from walship.shared.store import Checkpoint
from walship.shared.telemetry import context_from_traceparent

log = logging.getLogger(__name__)

BootstrapHook = Callable[[str], Awaitable[Checkpoint | None]]
"""Loads a snapshot into the replica and returns its checkpoint (None: no snapshot fits)."""

APPLY_ENTRIES_MAX_DEFAULT = 50_000
APPLY_LINGER_MS_DEFAULT = 0
FETCH_MAX_WAIT_MS_DEFAULT = 100
GAP_TIMEOUT_MS_DEFAULT = 30_000
PARTITION_BUFFER_BYTES_MAX_DEFAULT = 32 << 20
BUFFER_BYTES_MAX_DEFAULT = 16 << 20
# aiokafka holds up to one fetch response per partition before getmany asks for it
# (its defaults: 50 MB per fetch, 1 MB per partition). A broker still returns a
# first message larger than these, so they never block progress.
FETCH_BYTES_MAX_DEFAULT = 8 << 20
PARTITION_FETCH_BYTES_MAX = 1 << 20
FETCH_RECORDS_MAX_DEFAULT = 1000
POLL_TIMEOUT_MS_DEFAULT = 100
# While an apply runs the loop polls Kafka this briefly, so it notices the end of
# the apply (and starts the next one) without waiting out poll_timeout_ms.
_POLL_WHILE_APPLYING_MS = 5
PROBE_TIMEOUT_MS_DEFAULT = 10_000

_tracer = trace.get_tracer("walship.consumer")
_meter = metrics.get_meter("walship.consumer")
_applied_entries = _meter.create_counter(
    "walship.reader.applied_entries", unit="{entry}", description="Entries applied to the replica"
)
_applied_batches = _meter.create_counter(
    "walship.reader.applied_batches", unit="{batch}", description="Batches applied"
)
_duplicates = _meter.create_counter(
    "walship.reader.duplicates_skipped",
    unit="{batch}",
    description="Batches dropped because the replica already held them",
)
_gaps = _meter.create_counter(
    "walship.reader.gaps_waited",
    unit="{gap}",
    description="Times a missing sequence was awaited for the whole gap timeout",
)
_bootstraps = _meter.create_counter(
    "walship.reader.bootstraps", unit="{bootstrap}", description="Bootstraps from a snapshot"
)
_apply_latency = _meter.create_histogram(
    "walship.reader.apply_latency", unit="ms", description="Time to apply one group of batches"
)
_live_readers: weakref.WeakSet[Reader] = weakref.WeakSet()


def _observe_lag_seqs(_: CallbackOptions) -> Iterable[Observation]:
    for r in list(_live_readers):
        s = r.status()
        yield Observation(s.lag_seqs, {"reader_id": s.reader_id, "topic": s.topic})


def _observe_lag_s(_: CallbackOptions) -> Iterable[Observation]:
    for r in list(_live_readers):
        s = r.status()
        yield Observation(s.lag_s, {"reader_id": s.reader_id, "topic": s.topic})


_meter.create_observable_gauge(
    "walship.reader.lag_seqs",
    callbacks=[_observe_lag_seqs],
    unit="{seq}",
    description="Sequences on the topic not yet applied",
)
_meter.create_observable_gauge(
    "walship.reader.lag_seconds",
    callbacks=[_observe_lag_s],
    unit="s",
    description="Age of the oldest sequence not yet applied",
)


def group_id_for(topic: str, reader_id: str) -> str:
    """The consumer group that holds one reader's acknowledgements."""
    return f"walship.{topic}.{reader_id}"


@dataclass(frozen=True)
class ReaderStatus:
    """What heartbeats and health endpoints report."""

    reader_id: str
    topic: str
    applied_seq: int
    last_seen_seq: int
    lag_seqs: int
    lag_s: float
    healthy: bool
    error: str | None
    waiting_for: int | None
    buffered_bytes: int
    applied_entries: int
    duplicates: int
    bootstraps: int


def _headers_traceparent(headers: Sequence[tuple[str, bytes]] | None) -> str | None:
    for name, value in headers or ():
        if name == "traceparent" and value:
            try:
                return value.decode("ascii")
            except UnicodeDecodeError:
                return None
    return None


class LogProbe(AsyncService):
    """Reads single message headers at chosen offsets (no consumer group)."""

    def __init__(
        self,
        topic: str,
        client_kwargs: Mapping[str, Any],
        *,
        timeout_ms: int = PROBE_TIMEOUT_MS_DEFAULT,
    ) -> None:
        self.topic = topic
        self._kwargs = dict(client_kwargs)
        self._timeout_ms = timeout_ms
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        if self._consumer is not None:
            return
        consumer = AIOKafkaConsumer(
            **self._kwargs,
            enable_auto_commit=False,
            auto_offset_reset="none",
            max_partition_fetch_bytes=1 << 20,
        )
        try:
            await consumer.start()
        except (KafkaError, OSError) as exc:
            await consumer.stop()
            raise translate_kafka_error(exc, "start probe consumer", topic=self.topic) from exc
        self._consumer = consumer

    async def stop(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()

    def _require(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise KafkaOperationError("the log probe is not started", topic=self.topic)
        return self._consumer

    async def bounds(self, partitions: int) -> tuple[dict[int, int], dict[int, int]]:
        """(log start offsets, end offsets) per partition."""
        consumer = self._require()
        tps = [TopicPartition(self.topic, p) for p in range(partitions)]
        try:
            begin = await consumer.beginning_offsets(tps)
            end = await consumer.end_offsets(tps)
        except (KafkaError, OSError) as exc:
            raise translate_kafka_error(exc, "list offsets", topic=self.topic) from exc
        return (
            {tp.partition: int(o) for tp, o in begin.items()},
            {tp.partition: int(o) for tp, o in end.items()},
        )

    async def header_at(self, partition: int, offset: int) -> Header | None:
        """The header of the message at ``offset`` (None: gone, absent or undecodable)."""
        consumer = self._require()
        tp = TopicPartition(self.topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, offset)
        deadline = time.monotonic() + self._timeout_ms / 1000
        while time.monotonic() < deadline:
            try:
                records = await consumer.getmany(tp, timeout_ms=200, max_records=1)
            except OffsetOutOfRangeError:
                return None
            except (KafkaError, OSError) as exc:
                raise translate_kafka_error(
                    exc, "probe", topic=self.topic, partition=partition, offset=offset
                ) from exc
            for record in records.get(tp, []):
                try:
                    return peek_header(record.value)
                except DecodeError:
                    return None
        return None

    async def last_seq(self, partitions: int) -> int:
        """The last sequence on the topic: max ``last_seq`` of each partition's last message."""
        begin, end = await self.bounds(partitions)
        last = 0
        for p in range(partitions):
            if end[p] > begin[p]:
                header = await self.header_at(p, end[p] - 1)
                if header is not None:
                    last = max(last, header.last_seq)
        return last

    async def first_seqs(
        self, begin: Mapping[int, int], end: Mapping[int, int]
    ) -> dict[int, int | None]:
        """First sequence of the message at each partition's log start (None when empty)."""
        out: dict[int, int | None] = {}
        for p, start in begin.items():
            out[p] = None
            if end.get(p, 0) > start:
                header = await self.header_at(p, start)
                out[p] = header.first_seq if header is not None else None
        return out


class Reader(AsyncService):
    """Keeps one replica up to date with the topic; see the module docstring."""

    def __init__(
        self,
        applier: Applier,
        *,
        topic: str,
        reader_id: str,
        client_kwargs: Mapping[str, Any],
        bootstrap: BootstrapHook | None = None,
        decoder: Decoder | None = None,
        gap_timeout_ms: int = GAP_TIMEOUT_MS_DEFAULT,
        apply_entries_max: int = APPLY_ENTRIES_MAX_DEFAULT,
        apply_linger_ms: int = APPLY_LINGER_MS_DEFAULT,
        partition_buffer_bytes_max: int = PARTITION_BUFFER_BYTES_MAX_DEFAULT,
        buffer_bytes_max: int = BUFFER_BYTES_MAX_DEFAULT,
        fetch_bytes_max: int = FETCH_BYTES_MAX_DEFAULT,
        fetch_records_max: int = FETCH_RECORDS_MAX_DEFAULT,
        poll_timeout_ms: int = POLL_TIMEOUT_MS_DEFAULT,
        fetch_max_wait_ms: int = FETCH_MAX_WAIT_MS_DEFAULT,
    ) -> None:
        self.topic = topic
        self.reader_id = reader_id
        self._applier = applier
        self._kwargs = dict(client_kwargs)
        self._fetch_max_wait_ms = fetch_max_wait_ms
        self._bootstrap = bootstrap
        self._decoder = decoder if decoder is not None else Decoder()
        self._gap_timeout_s = gap_timeout_ms / 1000
        self._apply_entries_max = apply_entries_max
        self._apply_linger_s = apply_linger_ms / 1000
        self._buffer_max = partition_buffer_bytes_max
        self._total_buffer_max = buffer_bytes_max
        self._fetch_bytes_max = fetch_bytes_max
        self._fetch_records_max = fetch_records_max
        self._poll_timeout_ms = poll_timeout_ms

        self._consumer: AIOKafkaConsumer | None = None
        self._probe = LogProbe(topic, client_kwargs)
        self._tps: list[TopicPartition] = []
        self._merger = SequenceMerger(0, 1)
        self._assemblers: dict[int, PartAssembler] = {}
        self._paused: set[int] = set()  # what the consumer has paused
        self._paused_partition: set[int] = set()  # over partition_buffer_bytes_max
        self._paused_total: set[int] = set()  # paused for buffer_bytes_max

        self._group: list[Batch] = []
        self._group_sources: list[Source] = []
        self._group_offsets: dict[int, int] = {}
        self._group_entries = 0
        self._group_since: float | None = None
        self._applying: asyncio.Task[None] | None = None
        self._uncommitted: dict[int, int] = {}
        self._stored_offsets: dict[int, int] = {}

        self._applied_seq = 0
        self._applied_ts_us = 0
        self._last_seen_seq = 0
        self._applied_entries_total = 0
        self._bootstrap_count = 0
        self._gap_seq: int | None = None
        self._gap_since = 0.0
        self._gap_overdue = False
        self._corrupt: DecodeError | None = None
        self._error: WalshipError | None = None
        self._started = False
        self._stop_requested = asyncio.Event()
        self._run_done = asyncio.Event()
        self._run_done.set()

    # --- lifecycle ------------------------------------------------------------

    @property
    def group_id(self) -> str:
        return group_id_for(self.topic, self.reader_id)

    @property
    def applied_seq(self) -> int:
        """The last sequence committed to the replica."""
        return self._applied_seq

    @property
    def partitions(self) -> int:
        return len(self._tps)

    async def start(self) -> None:
        if self._started:
            return
        description = await describe_topic(self._kwargs, self.topic)
        consumer = AIOKafkaConsumer(
            **{
                "fetch_max_wait_ms": self._fetch_max_wait_ms,
                "fetch_max_bytes": self._fetch_bytes_max,
                "max_partition_fetch_bytes": min(PARTITION_FETCH_BYTES_MAX, self._fetch_bytes_max),
                **self._kwargs,
            },
            group_id=self.group_id,
            enable_auto_commit=False,
            # Never jump silently: a deleted offset must surface (retention expired).
            auto_offset_reset="none",
        )
        try:
            await consumer.start()
        except (KafkaError, OSError) as exc:
            await consumer.stop()
            raise translate_kafka_error(exc, "start consumer", topic=self.topic) from exc
        self._consumer = consumer
        try:
            await self._probe.start()
            self._tps = [TopicPartition(self.topic, p) for p in range(description.partitions)]
            consumer.assign(self._tps)
            cp = await asyncio.to_thread(self._applier.checkpoint)
            await self._reset_to(cp, compare_committed=True)
        except BaseException:
            await self._close_clients()
            raise
        self._started = True
        _live_readers.add(self)
        # Export the event counters at 0, so dashboards see them before the first event.
        attrs = {"reader_id": self.reader_id}
        for counter in (_duplicates, _gaps, _bootstraps):
            counter.add(0, attrs)
        log.info(
            "reader %s started: topic %s, %d partitions, applied seq %d",
            self.reader_id,
            self.topic,
            len(self._tps),
            cp.applied_seq,
        )

    async def stop(self) -> None:
        """Finish the current apply, commit, and close (idempotent)."""
        self.request_stop()
        await self._run_done.wait()
        if self._started:
            self._started = False
            _live_readers.discard(self)
        await self._close_clients()

    async def _close_clients(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()
        await self._probe.stop()

    def request_stop(self) -> None:
        """Ask ``run`` to return after the current apply (SIGTERM handler)."""
        self._stop_requested.set()

    # --- health -----------------------------------------------------------------

    def healthy(self) -> tuple[bool, str]:
        if self._error is not None:
            return False, str(self._error)
        if not self._started:
            return False, "not started"
        return True, "ok"

    def ready(self, max_lag_seqs: int) -> tuple[bool, str]:
        ok, reason = self.healthy()
        if not ok:
            return ok, reason
        if self._gap_overdue and self._gap_seq is not None:
            return False, f"waiting for seq {self._gap_seq} longer than the gap timeout"
        lag = self.status().lag_seqs
        if lag > max_lag_seqs:
            return False, f"lag {lag} seqs exceeds {max_lag_seqs}"
        return True, "ok"

    def stored_offsets(self) -> dict[int, int]:
        """Per partition, the next offset the replica's checkpoint holds."""
        return dict(self._stored_offsets)

    def status(self) -> ReaderStatus:
        applied = self._applied_seq
        lag = max(0, self._last_seen_seq - applied)
        lag_s = 0.0
        if lag:
            oldest = self._merger.earliest_buffered_timestamp_us() or self._applied_ts_us
            if oldest:
                lag_s = max(0.0, time.time() - oldest / 1e6)
        return ReaderStatus(
            reader_id=self.reader_id,
            topic=self.topic,
            applied_seq=applied,
            last_seen_seq=max(self._last_seen_seq, applied),
            lag_seqs=lag,
            lag_s=lag_s,
            healthy=self._error is None,
            error=str(self._error) if self._error is not None else None,
            waiting_for=self._merger.waiting_for(),
            buffered_bytes=self._merger.buffered_bytes_total,
            applied_entries=self._applied_entries_total,
            duplicates=self._merger.duplicates,
            bootstraps=self._bootstrap_count,
        )

    # --- the loop -----------------------------------------------------------------

    async def last_topic_seq(self) -> int:
        """The last sequence currently on the topic (reads each partition's last header)."""
        return await self._probe.last_seq(len(self._tps))

    async def run(self, *, until_seq: int | None = None, until_caught_up: bool = False) -> None:
        """Apply until stopped, until ``until_seq``, or until the topic's last seq at start.

        Raises the error that stopped the reader (the reader is then unhealthy).
        """
        await self.start()
        target = until_seq
        if until_caught_up:
            last = await self.last_topic_seq()
            target = last if target is None else min(target, last)
            log.info("reading until seq %d (the last on the topic)", target)
        self._run_done.clear()
        try:
            while not self._stop_requested.is_set():
                if target is not None and self._applied_seq >= target:
                    break
                await self._step(target)
            await self._flush()
        except WalshipError as exc:
            self._error = exc
            log.error("reader %s stopped: %s", self.reader_id, exc)
            raise
        finally:
            await self._settle_apply()
            self._run_done.set()

    async def _step(self, target: int | None) -> None:
        records = await self._fetch()
        if self._applying is not None and self._applying.done():
            await self._finish_apply()
        fetched = 0
        for tp, messages in records.items():
            fetched += len(messages)
            await learn_dictionaries(
                self._decoder, (m.value for m in messages), self._kwargs, self.topic
            )
            self._ingest(tp.partition, messages)
        self._collect(target)
        now = time.monotonic()
        if self._corrupt is not None:
            await self._flush()  # what came before the corrupt message, then stop
        elif self._group or self._group_offsets:
            full = self._group_entries >= self._apply_entries_max
            due = (
                full
                or fetched == 0
                or (
                    self._group_since is not None
                    and now - self._group_since >= self._apply_linger_s
                )
                or (target is not None and self._merger.applied_seq >= target)
            )
            if self._applying is None:
                if due:
                    self._start_apply()
            elif full:
                # A full group waits for the apply in flight: fetching more now
                # would only grow the merger's buffers.
                await self._finish_apply()
                self._start_apply()
        if self._corrupt is not None:
            corrupt, self._corrupt = self._corrupt, None
            await self._recover(corrupt)
            return
        self._update_pauses()
        await self._check_gap(now)

    async def _fetch(self) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        consumer = self._require()
        try:
            records: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]
            timeout_ms = self._poll_timeout_ms
            if self._applying is not None:
                timeout_ms = min(timeout_ms, _POLL_WHILE_APPLYING_MS)
            records = await consumer.getmany(
                timeout_ms=timeout_ms, max_records=self._fetch_records_max
            )
            return records
        except OffsetOutOfRangeError as exc:
            where = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
            gone = ", ".join(f"partition {tp.partition} offset {o}" for tp, o in where.items())
            await self._flush()
            await self._recover(
                RetentionExpiredError(
                    f"the log no longer holds what the replica needs next ({gone or exc}); "
                    f"seqs from {self._applied_seq + 1} were deleted by retention",
                    topic=self.topic,
                    applied_seq=self._applied_seq,
                )
            )
            return {}
        except (KafkaError, OSError) as exc:
            err = translate_kafka_error(exc, "fetch", topic=self.topic)
            if not err.retriable:
                raise err from exc
            log.warning("fetch failed, retrying: %s", err)
            await asyncio.sleep(0.5)
            return {}

    def _ingest(self, partition: int, messages: Sequence[ConsumerRecord[bytes, bytes]]) -> None:
        merger = self._merger
        assembler = self._assemblers[partition]
        for msg in messages:
            value = msg.value
            if value is None:
                self._on_corrupt(partition, msg.offset, b"", DecodeError("message has no value"))
                return
            try:
                batch = self._decoder.decode(value)
                traceparent = _headers_traceparent(msg.headers)
                if traceparent is not None:
                    batch = dataclasses.replace(batch, traceparent=traceparent)
                whole = assembler.add(batch, msg.offset)
            except DecodeError as exc:
                self._on_corrupt(partition, msg.offset, value, exc)
                return
            self._last_seen_seq = max(self._last_seen_seq, batch.last_seq)
            # Never commit past a part still held: after a restart the transaction
            # could not be reassembled without it (another writer's message between
            # its parts is offered, and done, before the transaction completes).
            merger.hold(partition, assembler.first_offset)
            if whole is None:
                merger.skip(partition, msg.offset)  # held (see hold) or a stray part
                continue
            merger.offer(partition, msg.offset, whole.batch, first_offset=whole.first_offset)

    def _on_corrupt(self, partition: int, offset: int, value: bytes, exc: DecodeError) -> None:
        first: int | None = None
        last: int | None = None
        with contextlib.suppress(DecodeError):
            header = peek_header(value)
            first, last = header.first_seq, header.last_seq
        if (
            last is not None
            and last <= self._merger.applied_seq
            and not self._assemblers[partition].pending
        ):
            # It could only repeat what the replica holds: never needed, never applied.
            log.warning(
                "skipping undecodable message on %s partition %d offset %d: its seqs %d..%d "
                "are already applied (%s)",
                self.topic,
                partition,
                offset,
                first,
                last,
                exc.message,
            )
            self._merger.skip(partition, offset)
            return
        seqs = f"{first}..{last}" if first is not None else "unknown (header unreadable)"
        self._corrupt = DecodeError(
            f"undecodable message on the topic; it is not applied and the reader stops: "
            f"{exc.message}",
            topic=self.topic,
            partition=partition,
            offset=offset,
            seq=seqs,
            applied_seq=self._merger.applied_seq,
        )

    def _collect(self, target: int | None = None) -> None:
        room = self._apply_entries_max - self._group_entries
        if target is not None:
            if self._merger.applied_seq >= target:
                return
            # Stop at the batch that reaches the target rather than far beyond it.
            room = min(room, target - self._merger.applied_seq)
        if room <= 0 and self._group:
            return
        before = self._merger.duplicates
        ready: Ready = self._merger.take(max(room, 1))
        if ready.batches:
            self._discard_applied_parts()
        if self._merger.duplicates > before:
            _duplicates.add(self._merger.duplicates - before, {"reader_id": self.reader_id})
        if ready.batches or ready.offsets:
            if self._group_since is None:
                self._group_since = time.monotonic()
            self._group.extend(ready.batches)
            self._group_sources.extend(ready.sources)
            self._group_offsets.update(ready.offsets)
            self._group_entries += ready.entry_count

    def _discard_applied_parts(self) -> None:
        """Drop held parts of transactions the replica already applied (say an old epoch's
        parts whose transaction the next epoch resent), so they stop holding the commit."""
        applied = self._merger.applied_seq
        for partition, assembler in self._assemblers.items():
            if assembler.discard_through(applied):
                self._merger.hold(partition, assembler.first_offset)

    async def _flush(self) -> None:
        """Finish the apply in flight, apply the group, ack: nothing is left pending."""
        await self._finish_apply()
        if not self._group and not self._group_offsets:
            await self._commit()
            return
        self._start_apply()
        await self._finish_apply()

    def _start_apply(self) -> None:
        """Apply the current group in the background (only one apply at a time)."""
        assert self._applying is None, "one apply at a time: applies must stay in seq order"
        batches, sources, offsets = self._group, self._group_sources, self._group_offsets
        self._group, self._group_sources, self._group_offsets = [], [], {}
        self._group_entries = 0
        self._group_since = None
        self._applying = asyncio.create_task(
            self._apply_group(batches, sources, offsets, self._merger.writer),
            name=f"walship-apply-{self.reader_id}",
        )

    async def _finish_apply(self) -> None:
        """Wait for the apply in flight; raises what made it fail."""
        task, self._applying = self._applying, None
        if task is not None:
            await task

    async def _settle_apply(self) -> None:
        """On the way out: let an apply in flight end (its thread cannot be cancelled)."""
        task, self._applying = self._applying, None
        if task is not None:
            try:
                await asyncio.shield(task)
            except Exception as exc:  # the reader is already stopping with its own error
                log.error("apply in flight failed while the reader stopped: %s", exc)

    async def _apply_group(
        self,
        batches: list[Batch],
        sources: list[Source],
        offsets: dict[int, int],
        writer: WriterId | None,
    ) -> None:
        """Apply (data + seq + offsets + writer in one transaction), then ack."""
        spans = [self._start_span(b, s) for b, s in zip(batches, sources, strict=True)]
        started = time.perf_counter()
        try:
            await asyncio.to_thread(self._applier.apply, batches, offsets, writer)
        except BaseException as exc:
            for span in spans:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                span.end()
            raise
        elapsed_ms = (time.perf_counter() - started) * 1000
        for span in spans:
            span.end()
        attrs = {"reader_id": self.reader_id}
        if batches:
            entries = sum(b.entry_count for b in batches)
            self._applied_seq = batches[-1].last_seq
            self._applied_ts_us = batches[-1].txn_timestamps_us[-1]
            self._applied_entries_total += entries
            _applied_entries.add(entries, attrs)
            _applied_batches.add(len(batches), attrs)
            _apply_latency.record(elapsed_ms, attrs)
        self._stored_offsets.update(offsets)
        self._uncommitted.update(offsets)
        await self._commit()

    def _start_span(self, batch: Batch, source: Source) -> Span:
        return _tracer.start_span(
            "walship.apply",
            context=context_from_traceparent(batch.traceparent),
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "walship.topic": self.topic,
                "walship.reader_id": self.reader_id,
                "walship.first_seq": batch.first_seq,
                "walship.last_seq": batch.last_seq,
                "walship.entries": batch.entry_count,
                # The publish span's names too, so the two compare directly.
                "walship.partition": source.partition,
                "walship.offset": source.offset,
                "messaging.destination.partition.id": str(source.partition),
                "messaging.kafka.offset": source.offset,
            },
        )

    async def _commit(self) -> None:
        """Commit Kafka offsets (the ack); the local checkpoint already holds them."""
        if not self._uncommitted or self._consumer is None:
            return
        offsets = {TopicPartition(self.topic, p): o for p, o in self._uncommitted.items()}
        try:
            await self._consumer.commit(offsets)
        except (KafkaError, OSError) as exc:
            log.warning(
                "committing offsets to Kafka failed; the replica's checkpoint is "
                "authoritative, retrying with the next apply: %s",
                translate_kafka_error(exc, "commit", topic=self.topic),
            )
            return
        self._uncommitted.clear()

    def _update_pauses(self) -> None:
        """Pause partitions so the merger's buffers stay flat (see the module docstring)."""
        merger = self._merger
        for p in range(len(self._tps)):
            buffered = merger.buffered_bytes(p)
            if buffered > self._buffer_max:
                self._paused_partition.add(p)
            elif buffered <= self._buffer_max // 2:
                self._paused_partition.discard(p)
        total = merger.buffered_bytes_total
        if self._gap_overdue or total <= self._total_buffer_max // 2:
            # An overdue gap lifts the total bound (only the partition bound stays):
            # the missing seq may sit behind buffered data in any partition.
            self._paused_total.clear()
        elif total > self._total_buffer_max or self._paused_total:
            # Recomputed while above half: a gap opening must unpause where it may fill.
            self._paused_total = self._ahead_of_merge_point()
        self._apply_pauses(self._paused_partition | self._paused_total)

    def _ahead_of_merge_point(self) -> set[int]:
        """The partitions to pause while the total buffer is over its bound."""
        partitions = len(self._tps)
        waiting = self._merger.waiting_for()
        if waiting is None:
            # The next seq is buffered: applying drains the buffers, fetch nothing more.
            return set(range(partitions))
        # A gap: keep fetching where the missing seq may come from: partitions with
        # nothing buffered, the one it is routed to, and the one buffered least far ahead.
        heads = self._merger.buffered_heads()
        keep = {p for p in range(partitions) if p not in heads}
        keep.add(partition_for(waiting, partitions))
        if heads:
            keep.add(min(heads, key=lambda p: heads[p]))
        return set(range(partitions)) - keep

    def _apply_pauses(self, want: set[int]) -> None:
        if want == self._paused:
            return
        consumer = self._require()
        pause = [tp for tp in self._tps if tp.partition in want - self._paused]
        resume = [tp for tp in self._tps if tp.partition in self._paused - want]
        if pause:
            consumer.pause(*pause)
        if resume:
            consumer.resume(*resume)
        self._paused = set(want)

    def _resume_all(self) -> None:
        self._paused_partition.clear()
        self._paused_total.clear()
        if self._paused:
            self._require().resume(*[tp for tp in self._tps if tp.partition in self._paused])
            self._paused.clear()

    async def _check_gap(self, now: float) -> None:
        waiting = self._merger.waiting_for()
        if waiting is None:
            self._gap_seq = None
            self._gap_overdue = False
            return
        if waiting != self._gap_seq:
            self._gap_seq = waiting
            self._gap_since = now
            self._gap_overdue = False
            return
        if now - self._gap_since < self._gap_timeout_s:
            return
        # A paused partition may hold the missing sequence: fetch everything.
        self._resume_all()
        self._gap_since = now
        reason = await self._retention_reason()
        if reason is None:
            if not self._gap_overdue:
                _gaps.add(1, {"reader_id": self.reader_id})
                log.warning(
                    "reader %s waiting for seq %d (buffered up to %d); the log may still "
                    "deliver it (publisher behind or a partition unavailable)",
                    self.reader_id,
                    waiting,
                    self._last_seen_seq,
                )
            self._gap_overdue = True
            return
        _gaps.add(1, {"reader_id": self.reader_id})
        earliest = self._merger.earliest_buffered_seq()
        missing = f"{waiting}..{earliest - 1}" if earliest is not None else f"from {waiting}"
        await self._flush()
        await self._recover(RetentionExpiredError(reason, topic=self.topic, missing_seqs=missing))

    async def _retention_reason(self) -> str | None:
        consumer = self._require()
        begin, end = await self._probe.bounds(len(self._tps))
        positions: dict[int, int] = {}
        try:
            for tp in self._tps:
                positions[tp.partition] = int(await consumer.position(tp))
        except (KafkaError, OSError) as exc:
            raise translate_kafka_error(exc, "position", topic=self.topic) from exc
        if any(positions[p] < end[p] for p in positions):
            return None  # still fetching: the sequence may be in what is not read yet
        firsts = await self._probe.first_seqs(begin, end)
        return retention_gap(
            applied_seq=self._merger.applied_seq,
            next_offsets=positions,
            log_start_offsets=begin,
            log_end_offsets=end,
            first_seq_at_log_start=firsts,
        )

    async def _recover(self, error: WalshipError) -> None:
        """Bootstrap through the hook, or stop with ``error``."""
        if self._bootstrap is None:
            if isinstance(error, RetentionExpiredError):
                raise RetentionExpiredError(
                    f"{error.message}; no snapshot store is configured to bootstrap from: "
                    "set --snapshot-url (WALSHIP_SNAPSHOT_URL) to a store the writer "
                    "snapshots to",
                    **error.context,
                )
            raise error
        before = self._applied_seq
        log.warning("reader %s bootstrapping from a snapshot: %s", self.reader_id, error)
        _bootstraps.add(1, {"reader_id": self.reader_id})
        self._bootstrap_count += 1
        cp = await self._bootstrap(str(error))
        if cp is None:
            raise error
        cp = await asyncio.to_thread(self._applier.checkpoint)  # the replica is the truth
        if cp.applied_seq <= before:
            raise type(error)(
                f"{error.message}; the bootstrap found no snapshot past seq {before}",
                **error.context,
            )
        log.info("bootstrapped to seq %d; resuming from the snapshot's offsets", cp.applied_seq)
        await self._reset_to(cp, compare_committed=False)

    async def _reset_to(self, cp: Checkpoint, *, compare_committed: bool) -> None:
        """Forget everything in memory and read on from ``cp``."""
        consumer = self._require()
        self._merger = SequenceMerger(cp.applied_seq, len(self._tps), writer=cp.writer)
        self._assemblers = {tp.partition: PartAssembler() for tp in self._tps}
        self._group, self._group_sources, self._group_offsets = [], [], {}
        self._group_entries = 0
        self._group_since = None
        self._gap_seq = None
        self._gap_overdue = False
        self._applied_seq = cp.applied_seq
        self._applied_ts_us = cp.applied_timestamp_us
        self._stored_offsets = dict(cp.offsets)
        self._last_seen_seq = max(self._last_seen_seq, cp.applied_seq)
        self._resume_all()
        for tp in self._tps:
            local = cp.offsets.get(tp.partition)
            if compare_committed:
                committed = await self._committed(tp)
                if committed is not None and committed != local:
                    log.info(
                        "partition %d: the replica's checkpoint offset %s wins over Kafka's "
                        "committed offset %d",
                        tp.partition,
                        local if local is not None else "(none: from the beginning)",
                        committed,
                    )
            # No offset yet: the replica needs the partition from offset 0. Seeking
            # there (not to the log start) makes deleted history surface as
            # OffsetOutOfRange, i.e. retention expired, instead of a silent skip.
            consumer.seek(tp, local if local is not None else 0)
        # Make Kafka's ack match the replica (a bootstrap may have moved it).
        self._uncommitted = {p: o for p, o in cp.offsets.items() if p < len(self._tps)}
        await self._commit()

    async def _committed(self, tp: TopicPartition) -> int | None:
        try:
            value = await self._require().committed(tp)
        except (KafkaError, OSError) as exc:
            log.warning("reading Kafka's committed offset failed: %s", exc)
            return None
        return int(value) if value is not None else None

    def _require(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise KafkaOperationError("the reader is not started", topic=self.topic)
        return self._consumer
