"""The publisher: tails the WAL and ships whole transactions to Kafka.

It runs in the writer's process or as a sidecar on the same data directory
(``walship producer run --data-dir D``). The loop:

1. read dense transactions from the WAL after the last one handed to Kafka;
2. batch them by size (``batch_bytes_max``) and time (``linger_ms``);
3. encode each batch into messages (whole transactions, or ordered parts of a
   transaction too large for one message), key = the message's first sequence,
   partition = ``partition_for(routing_seq, partitions)``;
4. send with an idempotent producer (``acks="all"``), keeping up to
   ``in_flight_bytes_max`` bytes unacknowledged;
5. fold acknowledgements (out of order across partitions) into the contiguous
   published prefix and record it durably in ``published.json``;
6. once caught up (nothing in flight, the whole WAL acknowledged), record the
   partitions' end offsets there too (``AckTracker.caught_up_at`` says why
   that is safe), so that writer snapshots of an idle stream still connect
   with a log whose retention passed the last message of the prefix.

When Kafka is slow or down, the WAL keeps growing and the publisher waits and
retries with exponential backoff. Any failed send throws the producer away (an
idempotent producer whose sequence numbers are out of step refuses everything
after) and resends from the acknowledged prefix: duplicates are harmless,
readers merge by sequence. Only errors that retrying cannot fix (authorization,
a topic with another partition count, a broker that refuses the message size)
end :meth:`Publisher.run`.

Releasing the WAL is the writer's decision, not the publisher's:
``WalWriter.release_through(seq)`` may be called with
``seq <= publisher.published_seq`` (durably recorded as acknowledged), and,
when a snapshot store is used, also ``seq <= `` the newest snapshot's sequence,
so that readers whose Kafka data expired can still bootstrap and catch up.
A sidecar's writer reads the same number from ``published.json``
(:class:`~walship.producer.position.PublishedPosition`).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from walship.producer.batching import (
    AckTracker,
    Backoff,
    BatchAccumulator,
    PendingBatch,
    message_ends,
)
from walship.producer.identity import IDENTITY_NAME, WriterIdentity
from walship.producer.position import PublishedPosition
from walship.shared import telemetry
from walship.shared.codec import (
    MESSAGE_BYTES_MAX_DEFAULT,
    EncodedMessage,
    Encoder,
    ZstdDictionary,
    partition_for,
)
from walship.shared.crypto import Keyring
from walship.shared.dictionaries import DictionaryTrainer, load_dictionaries, publish_dictionary
from walship.shared.errors import (
    ConfigError,
    KafkaUnavailableError,
    WalshipError,
    translate_os_error,
)
from walship.shared.kafka import (
    abort_producer,
    describe_topic,
    ensure_topic,
    kafka_errors,
    translate_kafka_error,
)
from walship.shared.lifecycle import AsyncService
from walship.shared.model import Transaction, WriterId

log = logging.getLogger(__name__)

SEQ_HEADER = "walship-seq"
# While idle, end offsets are read again now and then: a message a discarded
# producer still had on the wire may land after the first read.
END_OFFSETS_REFRESH_S = 60.0
# Trace contexts of other transactions in a message, linked from its span.
_SPAN_LINKS_MAX = 16

ProducerFactory = Callable[[dict[str, Any]], Any]

_meter = metrics.get_meter("walship.publisher")
_entries = _meter.create_counter(
    "walship.publish.entries", unit="{entry}", description="WAL entries acknowledged by Kafka"
)
_bytes = _meter.create_counter(
    "walship.publish.bytes", unit="By", description="Message bytes acknowledged by Kafka"
)
# Explicit buckets: the SDK's defaults (0..10000) suit milliseconds, not these.
_SIZE_BUCKETS_BYTES = [float(256 << (2 * i)) for i in range(8)]  # 256 B .. 4 MiB
_RATIO_BUCKETS = [1, 1.5, 2, 3, 4, 6, 8, 12, 16, 32, 64]
_LATENCY_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
_message_size = _meter.create_histogram(
    "walship.publish.message.size",
    unit="By",
    description="Size of each produced message",
    explicit_bucket_boundaries_advisory=_SIZE_BUCKETS_BYTES,
)
_compression = _meter.create_histogram(
    "walship.publish.compression.ratio",
    unit="1",
    description="Uncompressed body bytes / message bytes, per message",
    explicit_bucket_boundaries_advisory=_RATIO_BUCKETS,
)
_latency = _meter.create_histogram(
    "walship.publish.latency",
    unit="s",
    description="From send to Kafka's acknowledgement",
    explicit_bucket_boundaries_advisory=_LATENCY_BUCKETS_S,
)
_retries = _meter.create_counter(
    "walship.publish.retries", unit="{retry}", description="Producer recreations after failures"
)
_live: weakref.WeakSet[Publisher] = weakref.WeakSet()


def _observe_backlog(options: CallbackOptions) -> Iterable[Observation]:
    for p in list(_live):
        yield Observation(p.backlog, {"walship.topic": p.topic})


_meter.create_observable_gauge(
    "walship.publish.backlog",
    callbacks=[_observe_backlog],
    unit="{entry}",
    description="Durable WAL entries not yet acknowledged by Kafka",
)


class _ByteBudget:
    """Bytes sent but not yet acknowledged; ``acquire`` waits below the limit.

    One message larger than the limit still goes out alone, or it never would.
    """

    def __init__(self, limit: int, wake: asyncio.Event) -> None:
        self.limit = limit
        self.used = 0
        self._wake = wake

    def available(self, n: int) -> bool:
        return self.used == 0 or self.used + n <= self.limit

    def take(self, n: int) -> None:
        self.used += n

    def release(self, n: int) -> None:
        self.used -= n
        self._wake.set()


class Publisher(AsyncService):
    """Ships the WAL in ``data_dir`` to ``topic``; see the module docstring.

    ``producer_kwargs`` are aiokafka client settings (bootstrap servers, TLS,
    SASL, timeouts); idempotence, ``acks="all"`` and no Kafka compression are
    enforced. ``writer_id`` stamps the batches; a sidecar leaves it None and
    the identity is read from the data directory (only writers bump epochs).
    ``reader`` lets an in-process writer share its WAL reader (anything with
    ``read_from``, ``wait_for`` and ``last_seq``). ``producer_factory`` and
    ``tracer_provider`` exist for tests and embedding.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        topic: str,
        partitions: int,
        producer_kwargs: Mapping[str, Any],
        linger_ms: float = 5,
        batch_bytes_max: int = 512 << 10,
        message_bytes_max: int = MESSAGE_BYTES_MAX_DEFAULT,
        in_flight_bytes_max: int = 32 << 20,
        writer_id: WriterId | None = None,
        reader: Any | None = None,
        zstd_level: int = 3,
        dictionary: ZstdDictionary | None = None,
        train_dictionary: bool = False,
        dictionary_bytes: int = 16384,
        dictionary_sample_bytes: int = 1 << 20,
        keyring: Keyring | None = None,
        create_topic: bool = False,
        replication_factor: int = 3,
        topic_configs: Mapping[str, str] | None = None,
        position_interval_ms: float = 100,
        retry_backoff_ms: float = 100,
        retry_backoff_max_ms: float = 10_000,
        ack_timeout_ms: float = 30_000,
        drain_timeout_ms: float = 10_000,
        on_published: Callable[[int], None] | None = None,
        producer_factory: ProducerFactory | None = None,
        tracer_provider: trace.TracerProvider | None = None,
    ) -> None:
        if partitions < 1:
            raise ConfigError("partitions must be >= 1", partitions=partitions)
        for name, value in (
            ("batch_bytes_max", batch_bytes_max),
            ("message_bytes_max", message_bytes_max),
            ("in_flight_bytes_max", in_flight_bytes_max),
        ):
            if value < 1:
                raise ConfigError(f"{name} must be >= 1", **{name: value})
        self.data_dir = Path(data_dir)
        self.topic = topic
        self.partitions = partitions
        self._producer_kwargs = self._checked_producer_kwargs(producer_kwargs, message_bytes_max)
        self._admin_kwargs = dict(producer_kwargs)
        self.linger_ms = linger_ms
        self.batch_bytes_max = batch_bytes_max
        self.message_bytes_max = message_bytes_max
        self.in_flight_bytes_max = in_flight_bytes_max
        self._writer_id = writer_id
        # None: the identity was given; else the identity file's last mtime seen.
        self._identity_mtime_ns: int | None = None
        self._reader = reader
        self._owns_reader = False
        self._zstd_level = zstd_level
        self._dictionary = dictionary
        # Payloads are encrypted with keyring.current_id when set (docs/wire-format.md).
        self._keyring = keyring
        # Trains a zstd dictionary on the first transactions, then ships and uses it.
        self._trainer: DictionaryTrainer | None = None
        if train_dictionary and dictionary is None:
            self._trainer = DictionaryTrainer(
                dict_bytes=dictionary_bytes, sample_bytes=dictionary_sample_bytes
            )
        self._create_topic = create_topic
        self._replication_factor = replication_factor
        self._topic_configs = dict(topic_configs or {})
        self._position_interval_s = position_interval_ms / 1000
        self._ack_timeout_s = ack_timeout_ms / 1000
        self._drain_timeout_s = drain_timeout_ms / 1000
        self._on_published = on_published
        self._producer_factory: ProducerFactory = producer_factory or (
            lambda kw: AIOKafkaProducer(**kw)
        )
        self._tracer = (
            tracer_provider.get_tracer(__name__) if tracer_provider else trace.get_tracer(__name__)
        )
        self._backoff = Backoff(base_ms=retry_backoff_ms, max_ms=retry_backoff_max_ms)

        self._position: PublishedPosition | None = None
        self._tracker = AckTracker()
        self._acc = BatchAccumulator(batch_bytes_max=batch_bytes_max, linger_ms=linger_ms)
        self._encoder: Encoder | None = None
        self._producer: Any | None = None
        self._generation = 0
        self._wake = asyncio.Event()
        self._budget = _ByteBudget(in_flight_bytes_max, self._wake)
        self._failure: WalshipError | None = None
        self._last_progress = time.monotonic()
        self._topic_checked = False
        self._started = False
        self._stopping = asyncio.Event()
        self._run_task: asyncio.Task[None] | None = None
        self._saver: asyncio.Task[None] | None = None
        self._saver_stop = asyncio.Event()
        self._save_lock = asyncio.Lock()
        self.retries = 0
        self._fatal: WalshipError | None = None
        self._last_error: str | None = None
        # (acked_seq, sent_count) when end offsets were last read, and when.
        self._ends_read_for: tuple[int, int] | None = None
        self._ends_read_at = 0.0

    # -- configuration ---------------------------------------------------------

    @staticmethod
    def _checked_producer_kwargs(
        given: Mapping[str, Any], message_bytes_max: int
    ) -> dict[str, Any]:
        fixed: dict[str, Any] = {
            "enable_idempotence": True,
            "acks": "all",
            "compression_type": None,
        }
        for key, value in fixed.items():
            if key in given and given[key] != value and not (key == "acks" and given[key] == -1):
                raise ConfigError(
                    f"producer setting {key}={given[key]!r} is not allowed: walship needs "
                    f"{key}={value!r} (no loss, no duplicates per send, its own compression)",
                    setting=key,
                )
        kwargs = dict(given)
        kwargs.update(fixed)
        # One Kafka record batch per partition stays within the broker's message
        # limit; a single larger record still goes alone.
        kwargs.setdefault("max_batch_size", message_bytes_max)
        kwargs.setdefault("max_request_size", message_bytes_max + (64 << 10))
        kwargs.setdefault("linger_ms", 0)
        return kwargs

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Load the durable position, the writer identity and the WAL reader."""
        if self._started:
            return
        self._position = await asyncio.to_thread(PublishedPosition.load, self.data_dir)
        self._tracker = AckTracker(self._position.seq, self._position.offsets)
        if self._writer_id is None or self._identity_mtime_ns is not None:
            await self._wait_for_writer()
            self._identity_mtime_ns = -1
            self._refresh_identity()
        elif self._encoder is None:
            self._encoder = self._make_encoder(self._writer_id)
        if self._reader is None:
            from walship.producer.wal import WalReader

            self._reader = WalReader(self.data_dir / "wal")
            self._owns_reader = True
        self._skip_released()
        if self._trainer is not None:
            await self._reuse_dictionary()
        self._stopping.clear()
        self._started = True
        _live.add(self)
        # Export the retry counter at 0, so a dashboard sees it before the first retry.
        _retries.add(0, {"walship.topic": self.topic})

    async def _wait_for_writer(self) -> None:
        """A sidecar may start before its writer ever ran: wait for the identity.

        Exiting instead would make container restarts the way to order start-up.
        """
        path = self.data_dir / IDENTITY_NAME
        if path.exists():
            return
        log.info("waiting for the writer to create %s", path)
        while not path.exists():
            if self._stopping.is_set():
                return  # _refresh_identity then reports the missing identity
            await asyncio.sleep(0.1)

    async def _reuse_dictionary(self) -> None:
        """A restarted publisher keeps using the stream's newest shipped dictionary."""
        try:
            shipped = await load_dictionaries(self._admin_kwargs, self.topic)
        except WalshipError as exc:
            log.warning("cannot read shipped dictionaries (will train anew): %s", exc)
            return
        if shipped:
            self._use_dictionary(list(shipped.values())[-1])

    def _use_dictionary(self, d: ZstdDictionary) -> None:
        self._trainer = None
        self._dictionary = d
        if self._writer_id is not None:
            self._encoder = self._make_encoder(self._writer_id)
        log.info("compressing with zstd dictionary %d (%d bytes)", d.dict_id, len(d.data))

    async def _train_dictionary(self, txns: Sequence[Transaction]) -> None:
        """Collect samples; once there are enough, train, ship, then use the dictionary.

        It is used only after Kafka acknowledged it on ``<topic>.dicts``, so a
        reader that meets its id can always load it.
        """
        trainer = self._trainer
        assert trainer is not None
        trainer.add(txns)
        if not trainer.ready:
            return
        try:
            d = await asyncio.to_thread(trainer.train)
        except ValueError as exc:
            log.warning("no zstd dictionary (compressing without one): %s", exc)
            self._trainer = None
            return
        await publish_dictionary(self._admin_kwargs, self.topic, d)
        self._use_dictionary(d)

    def _make_encoder(self, writer_id: WriterId) -> Encoder:
        return Encoder(
            writer_id,
            message_bytes_max=self.message_bytes_max,
            level=self._zstd_level,
            dictionary=self._dictionary,
            keyring=self._keyring,
        )

    def _refresh_identity(self) -> None:
        """A sidecar follows the writer's identity file (a restarted writer bumps its epoch).

        Batches carry the newest epoch the publisher has seen; readers compare
        content, not epochs, for duplicates, so a resend under a newer epoch is
        still a duplicate.
        """
        if self._identity_mtime_ns is None:
            return  # given by the embedding writer
        path = self.data_dir / IDENTITY_NAME
        try:
            mtime_ns = path.stat().st_mtime_ns
        except FileNotFoundError:
            mtime_ns = 0  # WriterIdentity.load reports the missing file
        except OSError as exc:
            raise translate_os_error(exc, "reading the writer identity", path) from exc
        if mtime_ns == self._identity_mtime_ns:
            return
        writer_id = WriterIdentity.load(self.data_dir)
        self._identity_mtime_ns = mtime_ns
        if writer_id != self._writer_id or self._encoder is None:
            if self._writer_id is not None:
                log.info("writer identity changed: epoch %d", writer_id.epoch)
            self._writer_id = writer_id
            self._encoder = self._make_encoder(writer_id)

    def _skip_released(self) -> None:
        """Without a position file, start at the oldest entry the WAL still holds.

        The writer releases entries only once they are published, so a WAL that
        starts after seq 1 while ``published.json`` is missing (deleted by hand)
        has published everything before its first entry. With a position file,
        a WAL that starts beyond it lost unpublished entries: that is an error
        ``read_from`` reports, never something to skip.
        """
        assert self._position is not None and self._reader is not None
        first = getattr(self._reader, "first_seq", None)
        if self._position.seq == 0 and isinstance(first, int) and first > 1:
            log.warning(
                "no %s in %s: publishing from the WAL's oldest entry, seq %d",
                self._position.path.name,
                self.data_dir,
                first,
            )
            self._tracker = AckTracker(first - 1, {})

    async def stop(self) -> None:
        """Stop :meth:`run` (waiting a bounded time for in-flight acks) and save the position."""
        if not self._started:
            return
        self._stopping.set()
        self._wake.set()
        task = self._run_task
        if task is not None and not task.done() and task is not asyncio.current_task():
            try:
                await asyncio.wait_for(asyncio.shield(task), self._drain_timeout_s + 5)
            except (TimeoutError, asyncio.CancelledError):
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            except WalshipError:
                pass  # run() reports its own failure to whoever awaits it
        await self._close_producer()
        await self._save_position()
        if self._owns_reader and self._reader is not None:
            self._reader.close()
            self._reader = None
            self._owns_reader = False
        self._started = False
        _live.discard(self)

    def request_stop(self) -> None:
        """Ask :meth:`run` to finish (safe from a signal handler); :meth:`stop` completes it."""
        self._stopping.set()
        self._wake.set()

    def health(self) -> tuple[bool, str]:
        """Liveness: False once :meth:`run` ended with an error retrying cannot fix."""
        if self._fatal is not None:
            return False, str(self._fatal)
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        """Readiness: a producer is connected and the last sends did not fail."""
        if self._producer is None:
            return False, self._last_error or "not connected to Kafka"
        return True, f"published through seq {self.acked_seq}, backlog {self.backlog}"

    # -- state -----------------------------------------------------------------

    @property
    def published_seq(self) -> int:
        """Last sequence durably recorded as acknowledged by Kafka (safe for release_through)."""
        return self._position.seq if self._position is not None else 0

    @property
    def acked_seq(self) -> int:
        """Last sequence of the contiguous acknowledged prefix (may be ahead of the file)."""
        return self._tracker.acked_seq

    @property
    def offsets(self) -> dict[int, int]:
        """Per partition, the offset after the last acknowledged message of the prefix."""
        return self._tracker.offsets

    @property
    def backlog(self) -> int:
        """Durable WAL entries not yet acknowledged by Kafka."""
        if self._reader is None:
            return 0
        return max(0, int(self._reader.last_seq) - self._tracker.acked_seq)

    # -- the loop --------------------------------------------------------------

    async def run(self, *, until_caught_up: bool = False) -> None:
        """Publish until :meth:`stop` (or, with ``until_caught_up``, until every
        durable WAL entry is acknowledged). Raises only non-retriable errors."""
        await self.start()
        self._run_task = asyncio.current_task()
        self._saver_stop.clear()
        self._saver = asyncio.create_task(self._save_loop(), name="walship-position-saver")
        try:
            while not self._stopping.is_set():
                try:
                    await self._connect()
                    if await self._pump(until_caught_up):
                        break
                except WalshipError as exc:
                    if not exc.retriable:
                        self._fatal = exc
                        raise
                    self._last_error = str(exc)
                    self.retries += 1
                    _retries.add(1, {"walship.topic": self.topic})
                    delay = self._backoff.next_delay_s()
                    log.warning("publishing paused: %s; retrying in %.2f s", exc, delay)
                    await self._discard_producer()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), delay)
            if self._producer is not None and self._failure is None:
                await self._drain()
                if until_caught_up:  # a snapshot taken next gets offsets that connect
                    await self._record_end_offsets()
        finally:
            # Never cancelled mid-save (the thread would go on writing): asked to end.
            self._saver_stop.set()
            await self._saver
            self._saver = None
            await self._save_position()
            self._run_task = None

    async def _connect(self) -> None:
        if not self._topic_checked:
            await ensure_topic(
                self._admin_kwargs,
                self.topic,
                self.partitions,
                self._replication_factor,
                create=self._create_topic,
                configs=self._topic_configs,
            )
            self._topic_checked = True
        if self._producer is not None:
            return
        producer = self._producer_factory(dict(self._producer_kwargs))
        try:
            async with kafka_errors("start producer", topic=self.topic):
                await producer.start()
        except BaseException:
            await abort_producer(producer)
            raise
        self._producer = producer
        self._generation += 1
        self._failure = None
        self._budget = _ByteBudget(self.in_flight_bytes_max, self._wake)
        self._last_progress = time.monotonic()
        next_seq = self._tracker.reset()
        self._acc.reset(next_seq)
        log.info("publishing %s from seq %d", self.topic, next_seq)

    async def _pump(self, until_caught_up: bool) -> bool:
        """Read, batch and send until stopped; True when caught up (if asked)."""
        assert self._reader is not None
        reader = self._reader
        next_seq = self._tracker.sent_seq + 1
        while not self._stopping.is_set():
            self._check_health()
            now_ms = time.monotonic() * 1000
            if self._acc.ready(now_ms):
                await self._send_batch(self._acc.take())
                continue
            items: Sequence[tuple[Any, str | None]] = []
            if int(reader.last_seq) >= next_seq:
                items = reader.read_from(next_seq, max_bytes=self._acc.room_bytes)
                if not items and not self._acc.empty:
                    # The next transaction does not fit in what is left.
                    await self._send_batch(self._acc.take())
                    continue
            if items:
                for txn, traceparent in items:
                    if not self._acc.fits(txn):
                        await self._send_batch(self._acc.take())
                    self._acc.add(txn, traceparent, now_ms)
                    next_seq = txn.last_seq + 1
                continue
            due = self._acc.due_ms()
            if due is None:
                caught_up = (
                    self._tracker.in_flight == 0 and self._tracker.acked_seq >= reader.last_seq
                )
                if until_caught_up and caught_up:
                    return True
                timeout_s = 1.0
            else:
                timeout_s = max(0.0, (due - now_ms) / 1000)
            if self._tracker.in_flight:
                # Wake up in time for the acknowledgement watchdog.
                watchdog_s = self._last_progress + self._ack_timeout_s - time.monotonic()
                timeout_s = min(timeout_s, max(0.01, watchdog_s))
            await self._wait(reader.wait_for(next_seq, timeout_s), timeout_s)
        return False

    def _check_health(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._tracker.in_flight and time.monotonic() - self._last_progress > self._ack_timeout_s:
            raise KafkaUnavailableError(
                f"no acknowledgement from Kafka for {self._ack_timeout_s:.0f} s",
                topic=self.topic,
                in_flight=self._tracker.in_flight,
            )

    async def _wait(self, awaitable: Any, timeout_s: float) -> None:
        """Wait for ``awaitable``, a delivery/stop wake-up, or the timeout."""
        self._wake.clear()
        data = asyncio.ensure_future(awaitable)
        woken = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait(
                {data, woken}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for f in (data, woken):
                if not f.done():
                    f.cancel()
            await asyncio.gather(data, woken, return_exceptions=True)
        if data.done() and not data.cancelled() and data.exception() is not None:
            raise data.exception()  # type: ignore[misc]

    # -- sending ---------------------------------------------------------------

    async def _send_batch(self, batch: PendingBatch) -> None:
        self._refresh_identity()
        if self._trainer is not None:
            await self._train_dictionary(batch.txns)
        assert self._encoder is not None
        messages = self._encoder.encode(batch.txns)
        ends = message_ends(batch.txns)
        starts = [t.first_seq for t in batch.txns]
        for i, msg in enumerate(messages):
            # A part ending on a transaction's last seq may still be followed by
            # the rest of that entry's value: the transaction ends with the last one.
            continued = i + 1 < len(messages) and messages[i + 1].first_seq <= msg.last_seq
            ends_txn = msg.last_seq in ends and not continued
            await self._send(msg, ends_txn, _traceparents_of(msg, starts, batch))
        # Let the producer's sender, acknowledgements and (in-process) the
        # writer run: with budget and data at hand nothing else would yield.
        await asyncio.sleep(0)

    async def _send(self, msg: EncodedMessage, ends_txn: bool, traceparents: list[str]) -> None:
        size = len(msg.value)
        while not self._budget.available(size):
            self._check_health()
            if self._stopping.is_set():
                raise KafkaUnavailableError("stopping while waiting for acknowledgements")
            await self._wait(asyncio.sleep(self._ack_timeout_s), self._ack_timeout_s)
        self._check_health()
        partition = partition_for(msg.routing_seq, self.partitions)
        # No trace context: a root span, never a child of whatever is current.
        parent = telemetry.context_from_traceparent(traceparents[0] if traceparents else None)
        links = [
            trace.Link(sc)
            for sc in (
                trace.get_current_span(telemetry.context_from_traceparent(tp)).get_span_context()
                for tp in traceparents[1:_SPAN_LINKS_MAX]
            )
            if sc.is_valid
        ]
        span = self._tracer.start_span(
            "walship.publish",
            context=parent,
            kind=trace.SpanKind.PRODUCER,
            links=links,
            attributes={
                "messaging.system": "kafka",
                "messaging.destination.name": self.topic,
                "walship.first_seq": msg.first_seq,
                "walship.last_seq": msg.last_seq,
                "walship.entries": msg.entry_count,
                "walship.bytes": size,
                "walship.body_bytes": msg.body_bytes,
                "walship.partition": partition,
            },
        )
        headers = telemetry.inject_headers(trace.set_span_in_context(span))
        headers.append((SEQ_HEADER, f"{msg.first_seq}-{msg.last_seq}".encode()))
        producer = self._producer
        assert producer is not None
        budget = self._budget
        budget.take(size)
        try:
            async with kafka_errors("produce", topic=self.topic, partition=partition):
                fut = await producer.send(
                    self.topic, msg.value, key=msg.key, partition=partition, headers=headers
                )
        except BaseException as exc:
            budget.release(size)
            span.record_exception(exc)
            span.set_status(trace.StatusCode.ERROR)
            span.end()
            raise
        if self._tracker.in_flight == 0:
            self._last_progress = time.monotonic()
        msg_id = self._tracker.sent(msg.first_seq, msg.last_seq, partition, ends_txn=ends_txn)
        fut.add_done_callback(
            partial(
                self._delivered,
                self._generation,
                msg_id,
                budget,
                msg,
                partition,
                span,
                time.monotonic(),
            )
        )

    def _delivered(
        self,
        generation: int,
        msg_id: int,
        budget: _ByteBudget,
        msg: EncodedMessage,
        partition: int,
        span: trace.Span,
        sent_at: float,
        fut: asyncio.Future[Any],
    ) -> None:
        size = len(msg.value)
        budget.release(size)
        exc = asyncio.CancelledError() if fut.cancelled() else fut.exception()
        if exc is not None:
            span.record_exception(exc)
            span.set_status(trace.StatusCode.ERROR)
            span.end()
            if generation == self._generation and self._failure is None:
                self._failure = translate_kafka_error(
                    exc, "produce", topic=self.topic, partition=partition, seq=msg.first_seq
                )
            return
        offset = int(fut.result().offset)
        span.set_attribute("walship.offset", offset)
        span.end()
        if generation != self._generation:
            return  # a discarded producer's late acknowledgement: resent anyway
        attrs = {"walship.topic": self.topic}
        _entries.add(msg.entry_count, attrs)
        _bytes.add(size, attrs)
        _message_size.record(size, attrs)
        _compression.record(msg.body_bytes / size if size else 1.0, attrs)
        _latency.record(time.monotonic() - sent_at, attrs)
        self._last_progress = time.monotonic()
        if self._tracker.acked(msg_id, offset):
            self._backoff.reset()

    async def _drain(self) -> None:
        """On a clean stop: give in-flight messages a bounded time to be acknowledged."""
        deadline = time.monotonic() + self._drain_timeout_s
        while self._tracker.in_flight and self._failure is None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            await self._wait(asyncio.sleep(left), left)

    # -- producer objects ------------------------------------------------------

    async def _discard_producer(self) -> None:
        """Throw the producer away; unacknowledged messages are resent by the next one."""
        producer, self._producer = self._producer, None
        self._generation += 1
        self._failure = None
        next_seq = self._tracker.reset()
        self._acc.reset(next_seq)
        if producer is not None:
            await abort_producer(producer)

    async def _close_producer(self) -> None:
        producer, self._producer = self._producer, None
        self._generation += 1
        if producer is not None:
            await abort_producer(producer)

    # -- the durable position --------------------------------------------------

    async def _save_loop(self) -> None:
        while not self._saver_stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._saver_stop.wait(), self._position_interval_s)
            try:
                await self._save_position()
                if await self._record_end_offsets():
                    await self._save_position()
            except WalshipError as exc:
                # Kept in memory; the next save tries again (and stop() reports it).
                log.error("cannot save the published position: %s", exc)

    async def _record_end_offsets(self) -> bool:
        """Caught up: read the partitions' end offsets into the tracker (True if one moved).

        See ``AckTracker.caught_up_at``: offsets otherwise move only with the
        acknowledged prefix, and messages of a crashed session can sit past them
        until retention deletes past them on an idle stream. Read once per idle
        period (and again every ``END_OFFSETS_REFRESH_S``); the tracker ignores
        the answer if anything was sent while it was on its way.
        """
        tracker, reader = self._tracker, self._reader
        if reader is None or self._producer is None:
            return False
        wal_last_seq = int(reader.last_seq)
        if not tracker.caught_up(wal_last_seq):
            return False
        key = (tracker.acked_seq, tracker.sent_count)
        now = time.monotonic()
        if key == self._ends_read_for and now - self._ends_read_at < END_OFFSETS_REFRESH_S:
            return False
        try:
            description = await describe_topic(self._admin_kwargs, self.topic)
        except WalshipError as exc:
            log.debug("reading end offsets failed (retried when idle again): %s", exc)
            return False
        self._ends_read_for, self._ends_read_at = key, now
        ends = {p: o for p, o in description.end_offsets.items() if p < self.partitions}
        return tracker is self._tracker and tracker.caught_up_at(
            ends, wal_last_seq=wal_last_seq, sent_count=key[1]
        )

    async def _save_position(self) -> None:
        """Record the acknowledged prefix durably (fsync in a thread, one save at a time)."""
        async with self._save_lock:
            position = self._position
            if position is None:
                return
            seq, offsets = self._tracker.acked_seq, self._tracker.offsets
            saved = position.offsets
            moved = any(o > saved.get(p, 0) for p, o in offsets.items())
            if seq <= position.seq and not moved:
                return
            advanced = seq > position.seq
            # Shielded: a cancelled caller must not leave a save running unlocked.
            await asyncio.shield(asyncio.to_thread(position.save, seq, offsets))
        if advanced and self._on_published is not None:
            self._on_published(seq)


def _traceparents_of(msg: EncodedMessage, starts: list[int], batch: PendingBatch) -> list[str]:
    """Trace contexts of the transactions in ``msg`` (the first becomes the parent)."""
    i = bisect.bisect_right(starts, msg.first_seq) - 1
    j = bisect.bisect_right(starts, msg.last_seq)
    return [tp for tp in batch.traceparents[max(i, 0) : j] if tp]
