"""``walship devcluster``: the embedded Kafka-protocol cluster as a process.

The first line on stdout is the bootstrap servers, alone, so scripts can do
``read -r BOOTSTRAP < <(walship devcluster ...)``; everything else goes to
stderr. The cluster stays up until SIGINT or SIGTERM, then exits 0.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType

import click
from walship.shared.cli.options import config_option, settings_from
from walship.shared.devcluster import DevCluster
from walship.shared.settings import check_topic_name


def pair_topics(topics: tuple[str, ...], partitions: tuple[int, ...]) -> list[tuple[str, int]]:
    """Pair --topic and --partitions flags: one count for all, or one per topic."""
    if len(partitions) == 1:
        counts = [partitions[0]] * len(topics)
    elif len(partitions) == len(topics):
        counts = list(partitions)
    else:
        raise click.UsageError(
            f"give one --partitions for all topics or one per --topic "
            f"(got {len(topics)} topics, {len(partitions)} counts)"
        )
    pairs: list[tuple[str, int]] = []
    for topic, count in zip(topics, counts, strict=True):
        try:
            check_topic_name(topic)
        except ValueError as exc:
            raise click.BadParameter(f"{topic!r}: {exc}", param_hint="--topic") from None
        if count < 1:
            raise click.BadParameter(f"{count} (must be >= 1)", param_hint="--partitions")
        pairs.append((topic, count))
    return pairs


@click.command("devcluster")
@click.option("--brokers", type=click.IntRange(1, 32), default=3, show_default=True)
@click.option(
    "--topic",
    "topics",
    multiple=True,
    help="Topic to create (repeatable). Default: the configured topic.",
)
@click.option(
    "--partitions",
    type=int,
    multiple=True,
    help="Partitions: once for all topics, or once per --topic. Default: the configured count.",
)
@click.option(
    "--replication-factor",
    type=click.IntRange(1),
    default=None,
    help="Replicas per partition (capped at --brokers). Default: min(3, brokers).",
)
@config_option
def devcluster_cmd(
    brokers: int,
    topics: tuple[str, ...],
    partitions: tuple[int, ...],
    replication_factor: int | None,
    config: Path | None,
) -> None:
    """Run the embedded Kafka-protocol dev cluster until Ctrl-C or SIGTERM.

    Prints the bootstrap servers as the first line of stdout.
    """
    if not topics or not partitions:
        settings = settings_from(config=config)
        topics = topics or (settings.topic.name,)
        partitions = partitions or (settings.topic.partitions,)
    pairs = pair_topics(topics, partitions)
    rf = replication_factor or min(3, brokers)

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    cluster = DevCluster(brokers)
    try:
        cluster.start()
        for topic, count in pairs:
            cluster.create_topic(topic, count, rf)
        click.echo(cluster.bootstrap_servers)
        sys.stdout.flush()
        described = ", ".join(f"{t} ({p} partitions)" for t, p in pairs)
        click.echo(
            f"dev cluster: {brokers} brokers, topics {described}, replication factor "
            f"{min(rf, brokers)}; Ctrl-C or SIGTERM stops it",
            err=True,
        )
        # A timed wait keeps the main thread responsive to signals.
        while not stop.wait(0.5):
            pass
    finally:
        cluster.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    click.echo("dev cluster stopped", err=True)
