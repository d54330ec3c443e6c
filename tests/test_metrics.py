"""Publisher and reader metrics, scraped from /metrics (Prometheus text) like Kubernetes does.

Counters are process-wide, so every check selects its series by the test's own
topic or reader id, and the bootstrap test compares snapshot counters before
and after.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from walship.consumer.applier import SqliteApplier
from walship.consumer.reader import Reader
from walship.producer.publisher import Publisher
from walship.producer.writer import Writer
from walship.shared.health import HealthServer
from walship.shared.model import Op
from walship.shared.telemetry import setup_telemetry

pytestmark = pytest.mark.kafka

TXNS = 60
TXN_ENTRIES = 10
ENTRIES = TXNS * TXN_ENTRIES

Samples = list[tuple[str, dict[str, str], float]]


@pytest.fixture
async def metrics_port() -> AsyncIterator[int]:
    setup_telemetry("walship-test")
    async with HealthServer(0, host="127.0.0.1") as server:
        yield server.port


async def scrape(port: int) -> Samples:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
    await writer.drain()
    response = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    ]


def value(samples: Samples, name: str, **labels: str) -> float:
    """The one sample named ``name`` whose labels include ``labels``."""
    found = [v for n, lb, v in samples if n == name and labels.items() <= lb.items()]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
    return found[0]


async def write(data_dir: Path, txns: int, first_txn: int = 0) -> int:
    """Append compressible transactions; returns the writer's last seq."""
    async with Writer(data_dir) as writer:
        for t in range(first_txn, first_txn + txns):
            ops = [(Op.PUT, b"key-%05d" % (t * 7 + i), b"value %d " % t * 12) for i in range(10)]
            await writer.append(ops)
        return writer.last_seq


def make_reader(path: Path, servers: str, topic: str, reader_id: str) -> Reader:
    return Reader(
        SqliteApplier(path),
        topic=topic,
        reader_id=reader_id,
        client_kwargs={"bootstrap_servers": servers},
    )


async def test_publisher_and_reader_metrics(
    metrics_port: int, kafka_bootstrap: str, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    topic = new_topic(3)
    data_dir = tmp_path / "writer"
    assert await write(data_dir, TXNS) == ENTRIES
    t = {"walship_topic": topic}

    async with Publisher(
        data_dir,
        topic=topic,
        partitions=3,
        producer_kwargs={"bootstrap_servers": kafka_bootstrap},
        message_bytes_max=4096,
    ) as publisher:
        before = await scrape(metrics_port)
        assert value(before, "walship_publish_backlog", **t) == ENTRIES
        assert value(before, "walship_publish_retries_total", **t) == 0
        await asyncio.wait_for(publisher.run(until_caught_up=True), 60)
        after = await scrape(metrics_port)

    assert value(after, "walship_publish_entries_total", **t) == ENTRIES
    assert value(after, "walship_publish_backlog", **t) == 0
    assert value(after, "walship_publish_retries_total", **t) == 0
    messages = value(after, "walship_publish_message_size_bytes_count", **t)
    assert messages >= 3  # 4 KiB messages: the batch was cut into several
    sent_bytes = value(after, "walship_publish_bytes_total", **t)
    assert value(after, "walship_publish_message_size_bytes_sum", **t) == sent_bytes
    assert sent_bytes / messages <= 4096
    assert value(after, "walship_publish_compression_ratio_count", **t) == messages
    ratio = value(after, "walship_publish_compression_ratio_sum", **t) / messages
    assert ratio > 2, "repetitive values compress"
    assert value(after, "walship_publish_latency_seconds_count", **t) == messages
    latency_s = value(after, "walship_publish_latency_seconds_sum", **t) / messages
    assert 0 < latency_s < 10
    # Buckets fit for seconds (the SDK's default ones start at 5).
    assert value(after, "walship_publish_latency_seconds_bucket", le="0.01", **t) >= 0
    assert value(after, "walship_publish_latency_seconds_bucket", le="+Inf", **t) == messages

    reader_id = f"metrics-{topic}"
    r = {"reader_id": reader_id}
    async with make_reader(tmp_path / "r.db", kafka_bootstrap, topic, reader_id) as reader:
        # Halfway: the reader has fetched everything but applied only part of it.
        await asyncio.wait_for(reader.run(until_seq=ENTRIES // 2), 60)
        half = await scrape(metrics_port)
        applied = reader.applied_seq
        assert ENTRIES // 2 <= applied < ENTRIES
        assert value(half, "walship_reader_applied_entries_total", **r) == applied
        assert value(half, "walship_reader_lag_seqs", topic=topic, **r) == ENTRIES - applied
        assert value(half, "walship_reader_lag_seconds", topic=topic, **r) > 0
        await asyncio.wait_for(reader.run(until_seq=ENTRIES), 60)
        done = await scrape(metrics_port)

    assert value(done, "walship_reader_applied_entries_total", **r) == ENTRIES
    # Nothing was resent, so every message was applied as one batch.
    assert value(done, "walship_reader_applied_batches_total", **r) == messages
    assert value(done, "walship_reader_lag_seqs", topic=topic, **r) == 0
    assert value(done, "walship_reader_lag_seconds", topic=topic, **r) == 0
    assert value(done, "walship_reader_duplicates_skipped_total", **r) == 0
    assert value(done, "walship_reader_gaps_waited_total", **r) == 0
    assert value(done, "walship_reader_bootstraps_total", **r) == 0
    groups = value(done, "walship_reader_apply_latency_milliseconds_count", **r)
    assert 2 <= groups <= messages
    assert value(done, "walship_reader_apply_latency_milliseconds_sum", **r) > 0


def _snapshot_counters(samples: Samples) -> Mapping[str, float]:
    return {
        name: sum(v for n, lb, v in samples if n == name and lb.get("operation") == "bootstrap")
        for name in ("walship_snapshot_keys_total", "walship_snapshot_bytes_total")
    }


async def test_bootstrap_metrics(metrics_port: int, devcluster: object, tmp_path: Path) -> None:
    from walship.consumer.bootstrap import Bootstrapper, kafka_log_inspector
    from walship.shared.devcluster import DevCluster
    from walship.shared.snapshot import FileSnapshotStore
    from walship.shared.snapshot.create import create_from_data_dir
    from walship.shared.snapshot.progress import NullProgress

    assert isinstance(devcluster, DevCluster)
    servers, topic = devcluster.bootstrap_servers, "metrics-bootstrap"
    devcluster.create_topic(topic, 3)
    data_dir = tmp_path / "writer"
    snaps = FileSnapshotStore(tmp_path / "snaps")

    async def publish() -> None:
        async with Publisher(
            data_dir, topic=topic, partitions=3, producer_kwargs={"bootstrap_servers": servers}
        ) as publisher:
            await asyncio.wait_for(publisher.run(until_caught_up=True), 60)

    await write(data_dir, 30)
    await publish()
    manifest = await create_from_data_dir(data_dir, snaps, topic=topic, partitions=3)
    final = await write(data_dir, 10, first_txn=30)
    await publish()
    # Retention deletes everything the snapshot covers.
    for p in range(3):
        devcluster.truncate(topic, p, manifest.offsets.get(p, 0))

    before = _snapshot_counters(await scrape(metrics_port))
    applier = SqliteApplier(tmp_path / "r.db")
    bootstrapper = Bootstrapper.for_applier(
        applier,
        snaps,
        topic=topic,
        inspect_log=kafka_log_inspector(topic, {"bootstrap_servers": servers}),
        progress=NullProgress,
    )
    reader_id = "metrics-bootstrap"
    async with Reader(
        applier,
        topic=topic,
        reader_id=reader_id,
        client_kwargs={"bootstrap_servers": servers},
        bootstrap=bootstrapper,
        gap_timeout_ms=1000,
    ) as reader:
        await asyncio.wait_for(reader.run(until_seq=final), 60)
        samples = await scrape(metrics_port)
    after = _snapshot_counters(samples)
    r = {"reader_id": reader_id}
    assert value(samples, "walship_reader_bootstraps_total", **r) == 1
    # Bootstrap progress: every key and byte of the snapshot was counted.
    assert after["walship_snapshot_keys_total"] - before["walship_snapshot_keys_total"] == (
        manifest.keys
    )
    assert after["walship_snapshot_bytes_total"] > before["walship_snapshot_bytes_total"]
    # Only what came after the snapshot was applied from the log.
    assert value(samples, "walship_reader_applied_entries_total", **r) == final - manifest.seq
    assert value(samples, "walship_reader_lag_seqs", topic=topic, **r) == 0
