"""shared/kafka.py: error translation, topic provisioning and description."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka import errors as ak
from walship.shared.errors import (
    KafkaOperationError,
    KafkaUnavailableError,
    TopicMismatchError,
    WalError,
)
from walship.shared.kafka import (
    abort_producer,
    describe_topic,
    ensure_topic,
    kafka_errors,
    topic_configs,
    translate_kafka_error,
)


@pytest.mark.parametrize(
    ("exc", "retriable", "text"),
    [
        (ak.KafkaConnectionError("refused"), True, "unavailable"),
        (ak.KafkaTimeoutError(), True, "unavailable"),
        (ak.NotLeaderForPartitionError(), True, "NotLeaderForPartition"),
        (ak.NotEnoughReplicasError(), True, "unavailable"),
        (TimeoutError(), True, "unavailable"),
        (ConnectionRefusedError(111, "refused"), True, "unavailable"),
        (ak.OutOfOrderSequenceNumber(), True, "recreated"),
        (ak.UnknownProducerId(), True, "recreated"),
        (ak.ProducerClosed(), True, "recreated"),
        (ak.MessageSizeTooLargeError(), False, "max.message.bytes"),
        (ak.TopicAuthorizationFailedError(), False, "refused"),
        (ak.IncompatibleBrokerVersion("no"), False, "does not support"),
    ],
)
def test_translation_keeps_retriability(exc: BaseException, retriable: bool, text: str) -> None:
    err = translate_kafka_error(exc, "produce", topic="t", partition=2)
    assert err.retriable is retriable
    assert isinstance(err, KafkaUnavailableError if retriable else KafkaOperationError)
    assert text in str(err)
    assert "topic=t" in str(err) and "partition=2" in str(err)


def test_translation_passes_walship_errors_through() -> None:
    original = WalError("disk")
    assert translate_kafka_error(original, "x") is original


async def test_kafka_errors_context_manager_translates_once() -> None:
    with pytest.raises(KafkaUnavailableError) as info:
        async with kafka_errors("describe topic", topic="t"):
            raise ak.NodeNotReadyError()
    assert isinstance(info.value.__cause__, ak.NodeNotReadyError)
    with pytest.raises(KafkaOperationError, match="nothing"):
        async with kafka_errors("describe topic"):
            raise KafkaOperationError("nothing")  # ours: untouched


def test_topic_configs_only_set_values() -> None:
    assert topic_configs() == {}
    assert topic_configs(retention_ms=60_000, min_insync_replicas=2, max_message_bytes=1 << 20) == {
        "retention.ms": "60000",
        "min.insync.replicas": "2",
        "max.message.bytes": "1048576",
    }


async def test_unreachable_cluster_is_retriable() -> None:
    with pytest.raises(KafkaUnavailableError):
        await describe_topic("127.0.0.1:1", "t", timeout_ms=1_000)


@pytest.mark.kafka
async def test_ensure_existing_topic(kafka_bootstrap: str, new_topic: Callable[..., str]) -> None:
    topic = new_topic(4)
    assert await ensure_topic(kafka_bootstrap, topic, 4, 1, create=False) == 4
    assert await ensure_topic(kafka_bootstrap, topic, 4, 1, create=True) == 4


@pytest.mark.kafka
async def test_partition_count_mismatch(
    kafka_bootstrap: str, new_topic: Callable[..., str]
) -> None:
    topic = new_topic(4)
    with pytest.raises(TopicMismatchError) as info:
        await ensure_topic(kafka_bootstrap, topic, 6, 1, create=True)
    err = info.value
    assert err.context == {"topic": topic, "expected": 6, "actual": 4}
    assert "4 partitions" in str(err) and "uses 6" in str(err) and "wrong partitions" in str(err)


@pytest.mark.kafka
async def test_missing_topic_not_created_by_looking(
    kafka_bootstrap: str, new_topic: Callable[..., str]
) -> None:
    topic = new_topic(1) + "-missing"
    with pytest.raises(KafkaOperationError, match="does not exist and creating it is not allowed"):
        await ensure_topic(kafka_bootstrap, topic, 3, 1, create=False)
    with pytest.raises(KafkaOperationError, match="does not exist"):
        await describe_topic(kafka_bootstrap, topic)
    # Still missing: neither call auto-created it.
    with pytest.raises(KafkaOperationError, match="does not exist"):
        await describe_topic(kafka_bootstrap, topic)


@pytest.mark.kafka
async def test_create_on_cluster_without_create_topics(
    kafka_bootstrap: str, new_topic: Callable[..., str]
) -> None:
    topic = new_topic(1) + "-new"
    if os.environ.get("WALSHIP_TEST_BOOTSTRAP_SERVERS"):
        # A real cluster creates it, with the configs.
        configs = topic_configs(retention_ms=3_600_000)
        assert await ensure_topic(kafka_bootstrap, topic, 3, 1, create=True, configs=configs) == 3
        return
    with pytest.raises(KafkaOperationError) as info:
        await ensure_topic(kafka_bootstrap, topic, 3, 1, create=True)
    message = str(info.value)
    assert "does not support CreateTopics" in message
    assert "create it yourself with 3 partitions" in message
    assert not info.value.retriable


@pytest.mark.kafka
async def test_describe_topic(kafka_bootstrap: str, new_topic: Callable[..., str]) -> None:
    topic = new_topic(3)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        for i in range(5):
            await producer.send_and_wait(topic, b"x", partition=i % 2)
    finally:
        await producer.stop()
    d = await describe_topic(kafka_bootstrap, topic)
    assert d.partitions == 3
    assert set(d.leaders) == {0, 1, 2} and all(b >= 0 for b in d.leaders.values())
    assert d.beginning_offsets == {0: 0, 1: 0, 2: 0}
    assert d.end_offsets == {0: 3, 1: 2, 2: 0}
    js = d.to_json()
    assert js["end_offsets"] == {"0": 3, "1": 2, "2": 0}


async def test_abort_producer_never_waits_for_a_dead_cluster() -> None:
    producer = AIOKafkaProducer(bootstrap_servers="127.0.0.1:1", request_timeout_ms=1_000)
    with pytest.raises(ak.KafkaConnectionError):
        await producer.start()
    await asyncio.wait_for(abort_producer(producer), 10)


# -- walship topic create|describe ---------------------------------------------


@pytest.mark.kafka
def test_topic_cli(kafka_bootstrap: str, new_topic: Callable[..., str]) -> None:
    import json

    from click.testing import CliRunner
    from walship.shared.cli.main import main

    topic = new_topic(3)
    runner = CliRunner()
    base = ["--bootstrap-servers", kafka_bootstrap, "--topic", topic]
    described = runner.invoke(main, ["topic", "describe", *base, "--json"])
    assert described.exit_code == 0, described.output
    assert json.loads(described.output)["partitions"] == 3
    table = runner.invoke(main, ["topic", "describe", *base])
    assert table.exit_code == 0 and "beginning" in table.output
    created = runner.invoke(main, ["topic", "create", *base, "--partitions", "3"])
    assert created.exit_code == 0, created.output
    assert f"topic {topic}: ready with 3 partitions" in created.output
    wrong = runner.invoke(main, ["topic", "create", *base, "--partitions", "5"])
    assert wrong.exit_code == 1
    assert "has 3 partitions but this stream uses 5" in wrong.output
    missing = runner.invoke(
        main,
        [
            "topic",
            "describe",
            "--bootstrap-servers",
            kafka_bootstrap,
            "--topic",
            topic + "-missing",
        ],
    )
    assert missing.exit_code == 1 and "does not exist" in missing.output
