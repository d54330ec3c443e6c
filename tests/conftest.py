"""Shared fixtures: the embedded cluster (or an external one) and temp dirs."""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Callable, Iterator

import pytest
from walship.shared.devcluster import DevCluster

EXTERNAL_BOOTSTRAP = os.environ.get("WALSHIP_TEST_BOOTSTRAP_SERVERS", "")


@pytest.fixture(scope="session")
def session_cluster() -> Iterator[DevCluster | None]:
    """One 3-broker embedded cluster for the whole run (None with an external one)."""
    if EXTERNAL_BOOTSTRAP:
        yield None
        return
    with DevCluster(3) as cluster:
        yield cluster


@pytest.fixture
def kafka_bootstrap(session_cluster: DevCluster | None) -> str:
    """Bootstrap servers: WALSHIP_TEST_BOOTSTRAP_SERVERS, or the embedded cluster."""
    return EXTERNAL_BOOTSTRAP or session_cluster.bootstrap_servers  # type: ignore[union-attr]


_topic_counter = itertools.count(1)


def _create_external_topic(bootstrap: str, topic: str, partitions: int) -> None:
    import asyncio

    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    async def create() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, partitions, 1)])
        finally:
            await admin.close()

    asyncio.run(create())


@pytest.fixture
def new_topic(session_cluster: DevCluster | None, kafka_bootstrap: str) -> Callable[..., str]:
    """Create a uniquely named topic with the given partition count; returns its name."""

    def make(partitions: int = 3, prefix: str = "t") -> str:
        name = f"{prefix}-{next(_topic_counter)}-{uuid.uuid4().hex[:8]}"
        if session_cluster is not None:
            session_cluster.create_topic(name, partitions)
        else:
            _create_external_topic(kafka_bootstrap, name, partitions)
        return name

    return make


@pytest.fixture
def devcluster() -> Iterator[DevCluster]:
    """A private embedded cluster for tests that take brokers down or truncate logs."""
    if EXTERNAL_BOOTSTRAP:
        pytest.skip("fault injection needs the embedded cluster")
    with DevCluster(3) as cluster:
        yield cluster
