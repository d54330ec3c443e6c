"""``walship producer run`` and ``walship topic create|describe``.

Settings come from flags > environment > TOML file > defaults
(:func:`walship.shared.cli.options.settings_from`); this module only translates
them into plain arguments for :class:`Publisher` and the topic helpers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from walship.producer.publisher import Publisher
from walship.shared.cli.options import (
    data_dir_option,
    json_option,
    kafka_options,
    settings_from,
)
from walship.shared.kafka import TopicDescription, describe_topic, ensure_topic, topic_configs
from walship.shared.settings import WalshipSettings

if TYPE_CHECKING:
    from walship.shared.snapshot.create import SnapshotScheduler


def _topic_configs(settings: WalshipSettings) -> dict[str, str]:
    t = settings.topic
    return topic_configs(
        retention_ms=t.retention_ms,
        min_insync_replicas=t.min_insync_replicas,
        max_message_bytes=t.max_message_bytes,
    )


def publisher_from_settings(settings: WalshipSettings, **overrides: Any) -> Publisher:
    """A Publisher configured from settings (keyword overrides win)."""
    p = settings.producer
    kwargs: dict[str, Any] = {
        "topic": settings.topic.name,
        "partitions": settings.topic.partitions,
        "producer_kwargs": settings.kafka.aiokafka_kwargs(),
        "linger_ms": p.linger_ms,
        "batch_bytes_max": p.batch_bytes_max,
        "message_bytes_max": p.message_bytes_max,
        "in_flight_bytes_max": p.in_flight_bytes_max,
        "train_dictionary": p.zstd_dictionary,
        "dictionary_bytes": p.dictionary_bytes,
        "dictionary_sample_bytes": p.dictionary_sample_bytes,
        "keyring": settings.keyring(),
        "create_topic": p.auto_create_topic,
        "replication_factor": settings.topic.replication_factor,
        "topic_configs": _topic_configs(settings),
    }
    kwargs.update(overrides)
    return Publisher(settings.data_dir, **kwargs)


def writer_snapshot_scheduler(settings: WalshipSettings) -> SnapshotScheduler | None:
    """Periodic snapshots of the writer's state beside the publisher, when configured."""
    p = settings.producer
    if not settings.snapshot_url or (p.snapshot_every_seqs is None and p.snapshot_every_s is None):
        return None
    from walship.shared.snapshot import open_store
    from walship.shared.snapshot.create import SchedulePolicy, SnapshotScheduler

    store = open_store(
        settings.snapshot_url,
        settings.kafka.aiokafka_kwargs(),
        replication_factor=settings.topic.replication_factor,
    )
    policy = SchedulePolicy(
        every_seqs=p.snapshot_every_seqs,
        every_s=None if p.snapshot_every_s is None else float(p.snapshot_every_s),
        keep=settings.snapshot_keep,
    )
    return SnapshotScheduler.for_data_dir(
        settings.data_dir,
        store,
        topic=settings.topic.name,
        partitions=settings.topic.partitions,
        policy=policy,
        keyring=settings.keyring(),
    )


async def _run_publisher(settings: WalshipSettings, until_caught_up: bool) -> int:
    from walship.shared.health import HealthServer

    publisher = publisher_from_settings(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, publisher.request_stop)
    try:
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(publisher)
            scheduler = writer_snapshot_scheduler(settings)
            if scheduler is not None:
                await stack.enter_async_context(scheduler)
            port = settings.producer.http_port
            if port is not None:
                server = HealthServer(port, health=publisher.health, ready=publisher.ready)
                await stack.enter_async_context(server)
            await publisher.run(until_caught_up=until_caught_up)
        return publisher.published_seq
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


@click.group("producer")
def producer_group() -> None:
    """Publish a writer's WAL to Kafka."""


@producer_group.command("run")
@kafka_options
@data_dir_option
@click.option(
    "--until-caught-up",
    is_flag=True,
    default=False,
    help="Exit 0 once every durable WAL entry is acknowledged by Kafka.",
)
def producer_run(
    bootstrap_servers: str | None,
    topic: str | None,
    partitions: int | None,
    config: Path | None,
    data_dir: Path | None,
    until_caught_up: bool,
) -> None:
    """Tail the WAL in --data-dir and publish it (beside the writer, on the same directory).

    Resumes after the durable position in <data-dir>/published.json; waits and
    retries while Kafka is unavailable (the WAL keeps growing). Stops cleanly
    on SIGINT/SIGTERM.
    """
    from walship.shared.telemetry import setup_telemetry

    settings = settings_from(
        bootstrap_servers=bootstrap_servers,
        topic=topic,
        partitions=partitions,
        config=config,
        data_dir=data_dir,
    )
    telemetry = setup_telemetry(f"{settings.telemetry.service_name}-producer")
    try:
        seq = asyncio.run(_run_publisher(settings, until_caught_up))
    finally:
        telemetry.flush()
    if until_caught_up:
        click.echo(f"caught up: published through seq {seq}")


@click.group("topic")
def topic_group() -> None:
    """Create or describe the stream's Kafka topic."""


@topic_group.command("create")
@kafka_options
@click.option(
    "--replication-factor",
    type=int,
    default=None,
    help="Replicas per partition [env: WALSHIP_TOPIC__REPLICATION_FACTOR].",
)
def topic_create(
    bootstrap_servers: str | None,
    topic: str | None,
    partitions: int | None,
    config: Path | None,
    replication_factor: int | None,
) -> None:
    """Create the topic with the topic settings, or check an existing one's partition count."""
    settings = settings_from(
        bootstrap_servers=bootstrap_servers,
        topic=topic,
        partitions=partitions,
        config=config,
        replication_factor=replication_factor,
    )
    t = settings.topic
    count = asyncio.run(
        ensure_topic(
            settings.kafka,
            t.name,
            t.partitions,
            t.replication_factor,
            create=True,
            configs=_topic_configs(settings),
        )
    )
    click.echo(f"topic {t.name}: ready with {count} partitions")


def _print_description(d: TopicDescription) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"topic {d.topic} ({d.partitions} partitions)")
    for column in ("partition", "leader", "replicas", "isr", "beginning", "end", "messages"):
        table.add_column(column, justify="right")
    for p in range(d.partitions):
        begin, end = d.beginning_offsets.get(p, 0), d.end_offsets.get(p, 0)
        leader = d.leaders.get(p, -1)
        table.add_row(
            str(p),
            str(leader) if leader >= 0 else "none",
            ",".join(map(str, d.replicas.get(p, []))),
            ",".join(map(str, d.isr.get(p, []))),
            str(begin),
            str(end),
            str(end - begin),
        )
    Console().print(table)


@topic_group.command("describe")
@kafka_options
@json_option
def topic_describe(
    bootstrap_servers: str | None,
    topic: str | None,
    partitions: int | None,
    config: Path | None,
    as_json: bool,
) -> None:
    """Partitions, leaders, replicas and beginning/end offsets of the topic."""
    settings = settings_from(
        bootstrap_servers=bootstrap_servers, topic=topic, partitions=partitions, config=config
    )
    d = asyncio.run(describe_topic(settings.kafka, settings.topic.name))
    if as_json:
        click.echo(json.dumps(d.to_json(), indent=2))
    else:
        _print_description(d)
