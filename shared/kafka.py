"""Kafka adapters: client settings, error translation and topic administration.

Everything that touches aiokafka's exceptions goes through
:func:`translate_kafka_error` (or the :func:`kafka_errors` context manager), so
the rest of walship only sees :class:`KafkaUnavailableError` (retriable: wait
and try again) or :class:`KafkaOperationError` (retrying will not help).

Topic administration talks to the brokers with plain protocol requests rather
than ``AIOKafkaAdminClient``: its ``describe_topics`` asks for metadata with
auto-creation allowed (a describe would silently create a topic with the
broker's default partition count, which would scatter sequences), and its
``create_topics`` needs a controller the embedded cluster does not have.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka import errors as ak
from aiokafka.client import AIOKafkaClient
from aiokafka.protocol.admin import CreateTopicsRequest
from aiokafka.protocol.metadata import MetadataRequest
from walship.shared.errors import (
    KafkaOperationError,
    KafkaUnavailableError,
    TopicMismatchError,
    WalshipError,
)

if TYPE_CHECKING:
    from walship.shared.settings import KafkaConnection

log = logging.getLogger(__name__)

ADMIN_TIMEOUT_MS_DEFAULT = 15_000

# Errors after which an idempotent producer's sequence state no longer matches
# the broker's: the producer object must be recreated (and unacknowledged data
# resent), but nothing is wrong with the cluster or the data.
_PRODUCER_STATE_ERRORS: tuple[type[BaseException], ...] = (
    ak.OutOfOrderSequenceNumber,
    ak.DuplicateSequenceNumber,
    ak.UnknownProducerId,
    ak.InvalidProducerEpoch,
    ak.ProducerFenced,
    ak.ProducerClosed,
    ak.IllegalStateError,
)

# Transient conditions aiokafka does not flag ``retriable``.
_UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    ak.KafkaTimeoutError,
    ak.KafkaConnectionError,
    ak.NodeNotReadyError,
    ak.NoBrokersAvailable,
    ak.KafkaUnavailableError,
    ak.RequestTimedOutError,
    ak.BrokerNotAvailableError,
    ak.ReplicaNotAvailableError,
    ak.NotEnoughReplicasError,
    ak.NotEnoughReplicasAfterAppendError,
    ak.KafkaStorageError,
)

_UNSUPPORTED_ERRORS: tuple[type[BaseException], ...] = (
    ak.IncompatibleBrokerVersion,
    ak.UnsupportedVersionError,
    ak.UnrecognizedBrokerVersion,
)


def _name(exc: BaseException) -> str:
    text = str(exc)
    kind = type(exc).__name__
    if not text or text == kind:
        return kind
    # aiokafka's messages often start with the class name already.
    return text if text.startswith(kind) else f"{kind}: {text}"


def translate_kafka_error(exc: BaseException, what: str, **context: Any) -> WalshipError:
    """Turn an aiokafka (or socket/timeout) error into a walship error.

    ``what`` names the operation ("produce", "describe topic"...); ``context``
    says where (topic, partition...). Already translated errors pass through.
    """
    if isinstance(exc, WalshipError):
        return exc
    reason = _name(exc)
    if isinstance(exc, _PRODUCER_STATE_ERRORS):
        return KafkaUnavailableError(
            f"{what}: the producer's idempotence state was lost ({reason}); "
            "the producer must be recreated and unacknowledged messages resent",
            **context,
        )
    if isinstance(exc, (ak.MessageSizeTooLargeError, ak.RecordTooLargeError)):
        return KafkaOperationError(
            f"{what}: a message is larger than the broker or topic accepts ({reason}); "
            "lower message_bytes_max or raise the topic's max.message.bytes",
            **context,
        )
    if isinstance(exc, _UNSUPPORTED_ERRORS):
        return KafkaOperationError(
            f"{what}: the cluster does not support this request ({reason})", **context
        )
    if isinstance(exc, (TimeoutError, OSError, *_UNAVAILABLE_ERRORS)):
        return KafkaUnavailableError(f"{what}: Kafka is unavailable ({reason})", **context)
    if isinstance(exc, ak.KafkaError) and getattr(exc, "retriable", False):
        return KafkaUnavailableError(f"{what}: {reason}", **context)
    return KafkaOperationError(f"{what}: Kafka refused ({reason})", **context)


@contextlib.asynccontextmanager
async def kafka_errors(what: str, **context: Any) -> AsyncIterator[None]:
    """Translate aiokafka, timeout and socket errors raised inside the block."""
    try:
        yield
    except (ak.KafkaError, TimeoutError, OSError) as exc:
        raise translate_kafka_error(exc, what, **context) from exc


# -- client settings ---------------------------------------------------------


def client_kwargs(conn: KafkaConnection) -> dict[str, Any]:
    """aiokafka client keyword arguments (producer, consumer, admin) for ``conn``.

    TLS material becomes an ``ssl_context``; SASL credentials become aiokafka's
    ``sasl_plain_*`` pair (PLAIN and SCRAM alike); the settings model owns the
    mapping (``KafkaConnection.aiokafka_kwargs``), this is the Kafka-side name.
    """
    return conn.aiokafka_kwargs()


def _kwargs_of(conn: KafkaConnection | str | Mapping[str, Any]) -> dict[str, Any]:
    """Accept a KafkaConnection, a bootstrap string or ready-made client kwargs."""
    if isinstance(conn, str):
        return {"bootstrap_servers": conn}
    if isinstance(conn, Mapping):
        return dict(conn)
    return client_kwargs(conn)


# Keyword arguments that only the producer or consumer understands; the
# low-level client used for administration rejects them.
_CLIENT_KEYS = frozenset(
    {
        "bootstrap_servers",
        "client_id",
        "security_protocol",
        "ssl_context",
        "sasl_mechanism",
        "sasl_plain_username",
        "sasl_plain_password",
        "sasl_kerberos_service_name",
        "sasl_kerberos_domain_name",
        "sasl_oauth_token_provider",
        "connections_max_idle_ms",
        "retry_backoff_ms",
        "metadata_max_age_ms",
    }
)


def topic_configs(
    *,
    retention_ms: int | None = None,
    min_insync_replicas: int | None = None,
    max_message_bytes: int | None = None,
) -> dict[str, str]:
    """Kafka topic configuration entries for the settings that are set."""
    configs: dict[str, str] = {}
    if retention_ms is not None:
        configs["retention.ms"] = str(retention_ms)
    if min_insync_replicas is not None:
        configs["min.insync.replicas"] = str(min_insync_replicas)
    if max_message_bytes is not None:
        configs["max.message.bytes"] = str(max_message_bytes)
    return configs


# -- topic administration ----------------------------------------------------


@dataclass(frozen=True)
class TopicDescription:
    """What the cluster says about a topic. Mappings are keyed by partition."""

    topic: str
    partitions: int
    leaders: Mapping[int, int]  # -1 when a partition has no leader right now
    replicas: Mapping[int, list[int]] = field(default_factory=dict)
    isr: Mapping[int, list[int]] = field(default_factory=dict)
    beginning_offsets: Mapping[int, int] = field(default_factory=dict)
    end_offsets: Mapping[int, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "partitions": self.partitions,
            "leaders": {str(p): b for p, b in sorted(self.leaders.items())},
            "replicas": {str(p): r for p, r in sorted(self.replicas.items())},
            "isr": {str(p): r for p, r in sorted(self.isr.items())},
            "beginning_offsets": {str(p): o for p, o in sorted(self.beginning_offsets.items())},
            "end_offsets": {str(p): o for p, o in sorted(self.end_offsets.items())},
        }


@dataclass(frozen=True)
class _TopicMetadata:
    exists: bool
    partitions: list[dict[str, Any]]
    controller_id: int
    broker_ids: frozenset[int]


class _AdminSession:
    """A bootstrapped low-level client for a few admin requests."""

    def __init__(self, kwargs: Mapping[str, Any], timeout_ms: int) -> None:
        self._client = AIOKafkaClient(
            **{k: v for k, v in kwargs.items() if k in _CLIENT_KEYS},
            request_timeout_ms=timeout_ms,
        )

    async def __aenter__(self) -> _AdminSession:
        try:
            await self._client.bootstrap()
        except BaseException:
            await self._client.close()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._client.close()

    async def metadata(self, topic: str) -> _TopicMetadata:
        # Auto-creation off: looking at a topic must never create it.
        request = MetadataRequest([topic], allow_auto_topic_creation=False)
        response = await self._client.send(self._client.get_random_node(), request)
        obj = response.to_object()
        brokers = frozenset(int(b["node_id"]) for b in obj.get("brokers", []))
        controller = int(obj.get("controller_id", -1))
        for t in obj.get("topics", []):
            if t["topic"] != topic:
                continue
            code = int(t["error_code"])
            if code == ak.UnknownTopicOrPartitionError.errno:
                return _TopicMetadata(False, [], controller, brokers)
            if code != 0:
                raise ak.for_code(code)()
            return _TopicMetadata(True, list(t["partitions"]), controller, brokers)
        return _TopicMetadata(False, [], controller, brokers)

    async def create(
        self,
        topic: str,
        partitions: int,
        replication_factor: int,
        configs: Mapping[str, str],
        controller_id: int,
        broker_ids: frozenset[int],
        timeout_ms: int,
    ) -> None:
        request = CreateTopicsRequest(
            create_topic_requests=[
                (topic, partitions, replication_factor, [], list(configs.items()))
            ],
            timeout=timeout_ms,
            validate_only=False,
        )
        node = controller_id if controller_id in broker_ids else self._client.get_random_node()
        response = await self._client.send(node, request)
        for result in response.to_object().get("topic_errors", []):
            code = int(result["error_code"])
            if code in (0, ak.TopicAlreadyExistsError.errno):
                continue
            message = result.get("error_message") or ""
            error = ak.for_code(code)(message) if message else ak.for_code(code)()
            raise error


def _unsupported_create(topic: str, partitions: int, exc: BaseException) -> KafkaOperationError:
    return KafkaOperationError(
        f"cannot create topic {topic!r}: the cluster does not support CreateTopics "
        f"({_name(exc)}); create it yourself with {partitions} partitions "
        "(e.g. kafka-topics.sh --create, or DevCluster.create_topic for the embedded cluster) "
        "and run again",
        topic=topic,
        partitions=partitions,
    )


async def ensure_topic(
    conn: KafkaConnection | str | Mapping[str, Any],
    topic: str,
    partitions: int,
    replication_factor: int,
    *,
    create: bool,
    configs: Mapping[str, str] | None = None,
    timeout_ms: int = ADMIN_TIMEOUT_MS_DEFAULT,
) -> int:
    """Make sure ``topic`` exists with ``partitions`` partitions; return the count.

    Creates it (with ``configs`` such as retention.ms, min.insync.replicas,
    max.message.bytes) when it is missing and ``create`` is true. An existing
    topic with another partition count raises :class:`TopicMismatchError`:
    the partition of every sequence is a function of the count, so readers
    would look for sequences in the wrong place. A cluster without CreateTopics
    (the embedded one) raises :class:`KafkaOperationError` saying to create the
    topic first.
    """
    if partitions < 1:
        raise KafkaOperationError("a topic needs at least one partition", topic=topic)
    kwargs = _kwargs_of(conn)
    async with kafka_errors("ensure topic", topic=topic), _AdminSession(kwargs, timeout_ms) as s:
        meta = await s.metadata(topic)
        if not meta.exists:
            if not create:
                raise KafkaOperationError(
                    f"topic {topic!r} does not exist and creating it is not allowed; "
                    f"create it with {partitions} partitions (walship topic create)",
                    topic=topic,
                )
            try:
                await s.create(
                    topic,
                    partitions,
                    replication_factor,
                    configs or {},
                    meta.controller_id,
                    meta.broker_ids,
                    timeout_ms,
                )
            except _UNSUPPORTED_ERRORS as exc:
                raise _unsupported_create(topic, partitions, exc) from exc
            except ak.InvalidReplicationFactorError as exc:
                raise KafkaOperationError(
                    f"cannot create topic {topic!r}: replication factor "
                    f"{replication_factor} is invalid for this cluster ({_name(exc)})",
                    topic=topic,
                    replication_factor=replication_factor,
                ) from exc
            meta = await _wait_for_topic(s, topic, timeout_ms)
        actual = len(meta.partitions)
        if actual != partitions:
            raise TopicMismatchError(
                f"topic {topic!r} has {actual} partitions but this stream uses {partitions}: "
                "the partition of each sequence is derived from the partition count, so "
                "readers would look for sequences in the wrong partitions; use the "
                "topic's count or a new topic",
                topic=topic,
                expected=partitions,
                actual=actual,
            )
        return actual


async def _wait_for_topic(s: _AdminSession, topic: str, timeout_ms: int) -> _TopicMetadata:
    """Metadata of a just-created topic (brokers learn about it asynchronously)."""
    deadline = time.monotonic() + timeout_ms / 1000
    while True:
        meta = await s.metadata(topic)
        if meta.exists and meta.partitions:
            return meta
        if time.monotonic() > deadline:
            raise KafkaUnavailableError(
                "topic was created but does not appear in the metadata", topic=topic
            )
        await asyncio.sleep(0.1)


async def describe_topic(
    conn: KafkaConnection | str | Mapping[str, Any],
    topic: str,
    *,
    timeout_ms: int = ADMIN_TIMEOUT_MS_DEFAULT,
) -> TopicDescription:
    """Partitions, leaders, replicas and beginning/end offsets of ``topic``.

    Raises :class:`KafkaOperationError` when the topic does not exist (it is
    never created by looking at it).
    """
    kwargs = _kwargs_of(conn)
    async with kafka_errors("describe topic", topic=topic):
        async with _AdminSession(kwargs, timeout_ms) as s:
            meta = await s.metadata(topic)
        if not meta.exists:
            raise KafkaOperationError(f"topic {topic!r} does not exist", topic=topic)
        parts = sorted(meta.partitions, key=lambda p: int(p["partition"]))
        tps = [TopicPartition(topic, int(p["partition"])) for p in parts]
        consumer = AIOKafkaConsumer(
            **{k: v for k, v in kwargs.items() if k in _CLIENT_KEYS},
            request_timeout_ms=timeout_ms,
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            beginning = await consumer.beginning_offsets(tps)
            end = await consumer.end_offsets(tps)
        finally:
            await consumer.stop()
    return TopicDescription(
        topic=topic,
        partitions=len(parts),
        leaders={int(p["partition"]): int(p["leader"]) for p in parts},
        replicas={int(p["partition"]): list(p["replicas"]) for p in parts},
        isr={int(p["partition"]): list(p["isr"]) for p in parts},
        beginning_offsets={tp.partition: int(o) for tp, o in beginning.items()},
        end_offsets={tp.partition: int(o) for tp, o in end.items()},
    )


# -- producers -----------------------------------------------------------------

PRODUCER_CLOSE_TIMEOUT_S = 5.0


async def abort_producer(producer: Any, *, timeout_s: float = PRODUCER_CLOSE_TIMEOUT_S) -> None:
    """Close an aiokafka producer now, failing whatever it still holds.

    ``AIOKafkaProducer.stop()`` first waits until every buffered message is
    delivered, which never happens while the cluster is down. Here the sender
    task is cancelled and the buffered messages fail with ``ProducerClosed``
    before stopping; the caller resends them through a new producer.
    Never raises (a producer being thrown away has nothing more to say).
    """
    sender = getattr(producer, "_sender", None)
    task = getattr(sender, "sender_task", None)
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
    accumulator = getattr(producer, "_message_accumulator", None)
    if accumulator is not None:
        with contextlib.suppress(Exception):
            batches = [b for q in accumulator._batches.values() for b in q]
            batches += list(accumulator._pending_batches)
            accumulator.fail_all(ak.ProducerClosed())
            # Nobody waits on these internal futures any more: mark their
            # exceptions retrieved so asyncio does not log each one.
            for b in batches:
                for fut in (b.future, getattr(b, "_drain_waiter", None)):
                    if fut is not None and fut.done() and not fut.cancelled():
                        fut.exception()
    # Nothing is left to deliver; a stuck close only leaks sockets until exit.
    with contextlib.suppress(Exception):
        await asyncio.wait_for(producer.stop(), timeout_s)


async def ensure_side_topic(client_kwargs: Mapping[str, Any], name: str) -> None:
    """Create a small compacted side topic (heartbeats, dictionaries) where allowed.

    One partition, latest value per key. Clusters without CreateTopics (the
    embedded one) or with too few brokers for a replication factor of 3 fall
    back to 1, then to the broker's auto-creation on produce. Never raises for
    a topic that already exists, whatever its partition count.
    """
    try:
        await describe_topic(client_kwargs, name)
        return
    except KafkaOperationError:
        pass  # missing: create it
    except WalshipError as exc:
        log.warning("cannot check the side topic %s: %s", name, exc)
        return
    reason: WalshipError | None = None
    for replication_factor in (3, 1):
        try:
            await ensure_topic(
                client_kwargs,
                name,
                1,
                replication_factor,
                create=True,
                configs={"cleanup.policy": "compact"},
            )
            return
        except TopicMismatchError:
            return  # it appeared meanwhile
        except WalshipError as exc:
            reason = exc
    log.info("side topic %s not created (%s); relying on auto-creation", name, reason)
