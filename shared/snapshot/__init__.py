"""Snapshots: full state at a sequence plus the Kafka offsets to continue from.

``format`` (pure) defines chunks and manifests; stores (``file://``, ``kafka://``)
move their bytes; ``create`` writes snapshots; ``restore`` rebuilds a replica as
of a sequence or a time; ``walship.consumer.bootstrap`` loads one into a reader.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from walship.shared.errors import ConfigError
from walship.shared.snapshot.base import SnapshotStore, VerifyReport, verify_snapshot
from walship.shared.snapshot.file_store import FileSnapshotStore
from walship.shared.snapshot.format import ChunkInfo, Manifest
from walship.shared.snapshot.kafka_store import KafkaSnapshotStore

__all__ = [
    "ChunkInfo",
    "FileSnapshotStore",
    "KafkaSnapshotStore",
    "Manifest",
    "SnapshotStore",
    "VerifyReport",
    "open_store",
    "verify_snapshot",
]


def open_store(
    url: str,
    kafka: Mapping[str, Any] | str | None = None,
    *,
    replication_factor: int | None = None,
) -> SnapshotStore:
    """The store behind ``url``: ``file:///path`` or ``kafka://<topic>``.

    ``kafka`` is the aiokafka client kwargs (``walship.shared.kafka.client_kwargs``)
    or a bootstrap string; only Kafka stores need it. With ``replication_factor``
    a missing snapshot topic is created (1 partition, retention.ms=-1).
    """
    if url.startswith("file:"):
        return FileSnapshotStore.from_url(url)
    if url.startswith("kafka:"):
        if kafka is None:
            raise ConfigError("a kafka:// snapshot URL needs Kafka connection settings")
        return KafkaSnapshotStore.from_url(url, kafka, replication_factor=replication_factor)
    if "://" not in url:
        raise ConfigError(
            "snapshot URL needs a scheme: file:///path or kafka://<topic>", snapshot_url=url
        )
    raise ConfigError(
        "unsupported snapshot URL scheme (use file:///path or kafka://<topic>)", snapshot_url=url
    )
