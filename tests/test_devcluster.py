"""Each dev-cluster control is observed by a real aiokafka client."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from walship.shared.devcluster import DevCluster
from walship.shared.errors import ConfigError, KafkaOperationError

pytestmark = pytest.mark.kafka


async def _produce(bootstrap: str, topic: str, partition: int, n: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        for i in range(n):
            await producer.send_and_wait(topic, b"v%d" % i, partition=partition)
    finally:
        await producer.stop()


async def test_produce_consume_and_truncate(devcluster: DevCluster) -> None:
    devcluster.create_topic("t", 2)
    await _produce(devcluster.bootstrap_servers, "t", 0, 20)
    consumer = AIOKafkaConsumer(bootstrap_servers=devcluster.bootstrap_servers)
    await consumer.start()
    try:
        tp = TopicPartition("t", 0)
        assert (await consumer.beginning_offsets([tp]))[tp] == 0
        assert (await consumer.end_offsets([tp]))[tp] == 20
        devcluster.truncate("t", 0, 12)
        assert (await consumer.beginning_offsets([tp]))[tp] == 12
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        batch = await consumer.getmany(tp, timeout_ms=5000)
        first = batch[tp][0]
        assert first.offset == 12 and first.value == b"v12"
    finally:
        await consumer.stop()


async def test_leader_move_and_broker_down_up(devcluster: DevCluster) -> None:
    devcluster.create_topic("t", 1)
    devcluster.set_leader("t", 0, 2)
    await _produce(devcluster.bootstrap_servers, "t", 0, 3)
    devcluster.broker_down(2)
    devcluster.set_leader("t", 0, 3)
    # The partition is served by broker 3 now: producing still works.
    await _produce(devcluster.bootstrap_servers, "t", 0, 2)
    devcluster.broker_up(2)
    consumer = AIOKafkaConsumer(bootstrap_servers=devcluster.bootstrap_servers)
    await consumer.start()
    try:
        tp = TopicPartition("t", 0)
        assert (await consumer.end_offsets([tp]))[tp] == 5
        topics = await consumer.topics()
        assert "t" in topics
    finally:
        await consumer.stop()


async def test_all_brokers_down_refuses_then_recovers(devcluster: DevCluster) -> None:
    devcluster.create_topic("t", 1)
    for b in devcluster.broker_ids:
        devcluster.broker_down(b)
    producer = AIOKafkaProducer(
        bootstrap_servers=devcluster.bootstrap_servers, request_timeout_ms=1500
    )
    with pytest.raises((KafkaError, asyncio.TimeoutError)):
        await asyncio.wait_for(producer.start(), timeout=5)
    await producer.stop()
    for b in devcluster.broker_ids:
        devcluster.broker_up(b)
    await _produce(devcluster.bootstrap_servers, "t", 0, 1)


def test_invalid_controls_raise_walship_errors() -> None:
    with pytest.raises(ConfigError):
        DevCluster(0)
    cluster = DevCluster(1)
    with pytest.raises(KafkaOperationError, match="not running"):
        cluster.create_topic("t", 1)
    with cluster, pytest.raises(ConfigError):
        cluster.create_topic("t", 0)
    cluster.stop()  # idempotent
