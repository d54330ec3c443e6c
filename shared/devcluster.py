"""The embedded Kafka-protocol dev cluster, for tests, the demo and benchmarks.

No Apache Kafka broker can be installed everywhere walship is developed, so this
drives librdkafka's mock cluster through ctypes: real loopback TCP listeners
speaking the Kafka protocol, several brokers, in this process. It uses the
librdkafka bundled in the ``confluent-kafka`` wheel (the ``dev`` extra); the
product itself never needs it.

Limits of the mock cluster worth knowing: no CreateTopics/DeleteRecords/
ListGroups through the client API (topics are created here), transactions are
not usable, and each partition keeps about 5 MB (older data is evicted, which
moves the log start offset like ``retention.bytes`` would).
"""

from __future__ import annotations

import ctypes
import glob
import os
import threading
from types import TracebackType

from walship.shared.errors import ConfigError, KafkaOperationError

_RD_KAFKA_PRODUCER = 0


def _find_librdkafka() -> str:
    try:
        import confluent_kafka
    except ImportError as exc:
        raise ConfigError(
            "the embedded cluster needs confluent-kafka (pip install 'walship[dev]')"
        ) from exc
    site = os.path.dirname(os.path.dirname(confluent_kafka.__file__))
    candidates = sorted(glob.glob(os.path.join(site, "confluent_kafka.libs", "librdkafka*.so*")))
    if not candidates:
        raise ConfigError(f"no bundled librdkafka found beside {confluent_kafka.__file__}")
    return candidates[0]


_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()


def _load() -> ctypes.CDLL:
    global _lib
    with _lib_lock:
        if _lib is None:
            lib = ctypes.CDLL(_find_librdkafka())
            vp, cp, i = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
            lib.rd_kafka_conf_new.restype = vp
            lib.rd_kafka_conf_set.argtypes = [vp, cp, cp, cp, ctypes.c_size_t]
            lib.rd_kafka_conf_set.restype = i
            lib.rd_kafka_new.argtypes = [i, vp, cp, ctypes.c_size_t]
            lib.rd_kafka_new.restype = vp
            lib.rd_kafka_destroy.argtypes = [vp]
            lib.rd_kafka_mock_cluster_new.argtypes = [vp, i]
            lib.rd_kafka_mock_cluster_new.restype = vp
            lib.rd_kafka_mock_cluster_destroy.argtypes = [vp]
            lib.rd_kafka_mock_cluster_bootstraps.argtypes = [vp]
            lib.rd_kafka_mock_cluster_bootstraps.restype = cp
            lib.rd_kafka_mock_topic_create.argtypes = [vp, cp, i, i]
            lib.rd_kafka_mock_topic_create.restype = i
            lib.rd_kafka_mock_partition_delete_records.argtypes = [
                vp,
                cp,
                ctypes.c_int32,
                ctypes.c_int64,
            ]
            lib.rd_kafka_mock_partition_delete_records.restype = i
            lib.rd_kafka_mock_broker_set_down.argtypes = [vp, ctypes.c_int32]
            lib.rd_kafka_mock_broker_set_down.restype = i
            lib.rd_kafka_mock_broker_set_up.argtypes = [vp, ctypes.c_int32]
            lib.rd_kafka_mock_broker_set_up.restype = i
            lib.rd_kafka_mock_partition_set_leader.argtypes = [
                vp,
                cp,
                ctypes.c_int32,
                ctypes.c_int32,
            ]
            lib.rd_kafka_mock_partition_set_leader.restype = i
            lib.rd_kafka_mock_set_controller_id.argtypes = [vp, ctypes.c_int32]
            lib.rd_kafka_mock_set_controller_id.restype = i
            lib.rd_kafka_err2str.argtypes = [i]
            lib.rd_kafka_err2str.restype = cp
            _lib = lib
        return _lib


class DevCluster:
    """An N-broker Kafka-protocol cluster on loopback, in this process.

    Broker ids are 1..N. Use ``start()``/``stop()`` or ``with DevCluster(3) as c:``.
    ``stop()`` is idempotent.
    """

    def __init__(self, brokers: int = 3) -> None:
        if brokers < 1:
            raise ConfigError("a dev cluster needs at least one broker", brokers=brokers)
        self.broker_count = brokers
        self._rk: int | None = None
        self._mc: int | None = None
        self._bootstrap = ""
        self._topics: dict[str, int] = {}

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> DevCluster:
        if self._mc is not None:
            return self
        lib = _load()
        conf = lib.rd_kafka_conf_new()
        errstr = ctypes.create_string_buffer(512)
        # Keep the mock cluster's own client quiet.
        lib.rd_kafka_conf_set(conf, b"log_level", b"0", errstr, len(errstr))
        rk = lib.rd_kafka_new(_RD_KAFKA_PRODUCER, conf, errstr, len(errstr))
        if not rk:
            raise KafkaOperationError(f"cannot create librdkafka handle: {errstr.value.decode()}")
        mc = lib.rd_kafka_mock_cluster_new(rk, self.broker_count)
        if not mc:
            lib.rd_kafka_destroy(rk)
            raise KafkaOperationError("cannot create the mock cluster")
        self._rk, self._mc = rk, mc
        self._bootstrap = lib.rd_kafka_mock_cluster_bootstraps(mc).decode()
        return self

    def stop(self) -> None:
        if self._mc is None:
            return
        lib = _load()
        lib.rd_kafka_mock_cluster_destroy(self._mc)
        lib.rd_kafka_destroy(self._rk)
        self._mc = self._rk = None

    def __enter__(self) -> DevCluster:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- facts --------------------------------------------------------------------

    @property
    def bootstrap_servers(self) -> str:
        self._require()
        return self._bootstrap

    @property
    def broker_ids(self) -> list[int]:
        return list(range(1, self.broker_count + 1))

    # -- controls -------------------------------------------------------------

    def create_topic(self, topic: str, partitions: int, replication_factor: int = 1) -> None:
        """Create a topic (the mock cluster's stand-in for CreateTopics)."""
        mc = self._require()
        if partitions < 1:
            raise ConfigError("partitions must be >= 1", topic=topic, partitions=partitions)
        rf = min(replication_factor, self.broker_count)
        err = _load().rd_kafka_mock_topic_create(mc, topic.encode(), partitions, rf)
        self._check(err, "create topic", topic=topic)
        self._topics[topic] = partitions

    def truncate(self, topic: str, partition: int, offset: int) -> None:
        """Move a partition's log start offset to ``offset`` (simulates retention)."""
        mc = self._require()
        err = _load().rd_kafka_mock_partition_delete_records(mc, topic.encode(), partition, offset)
        self._check(err, "delete records", topic=topic, partition=partition, offset=offset)

    def broker_down(self, broker_id: int) -> None:
        err = _load().rd_kafka_mock_broker_set_down(self._require(), broker_id)
        self._check(err, "set broker down", broker=broker_id)

    def broker_up(self, broker_id: int) -> None:
        err = _load().rd_kafka_mock_broker_set_up(self._require(), broker_id)
        self._check(err, "set broker up", broker=broker_id)

    def set_leader(self, topic: str, partition: int, broker_id: int) -> None:
        """Move a partition's leadership to ``broker_id``."""
        mc = self._require()
        err = _load().rd_kafka_mock_partition_set_leader(mc, topic.encode(), partition, broker_id)
        self._check(err, "set leader", topic=topic, partition=partition, broker=broker_id)

    def set_controller(self, broker_id: int) -> None:
        err = _load().rd_kafka_mock_set_controller_id(self._require(), broker_id)
        self._check(err, "set controller", broker=broker_id)

    # -- internals ------------------------------------------------------------

    def _require(self) -> int:
        if self._mc is None:
            raise KafkaOperationError("the dev cluster is not running")
        return self._mc

    @staticmethod
    def _check(err: int, what: str, **context: object) -> None:
        if err != 0:
            reason = _load().rd_kafka_err2str(err).decode()
            raise KafkaOperationError(f"dev cluster: {what} failed: {reason}", **context)
