"""``walship consumer run`` (keep a replica up to date) and ``walship status``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text
from walship.shared.cli.options import (
    data_dir_option,
    json_option,
    kafka_options,
    settings_from,
    snapshot_options,
)
from walship.shared.errors import ConfigError, WalshipError
from walship.shared.settings import WalshipSettings

if TYPE_CHECKING:
    from walship.consumer.applier import SqliteApplier
    from walship.consumer.reader import Reader

log = logging.getLogger(__name__)

STATUS_WATCH_INTERVAL_S = 2.0


@click.group("consumer")
def consumer_group() -> None:
    """Run a reader: keep a SQLite replica up to date with the topic."""


@consumer_group.command("run")
@kafka_options
@snapshot_options
@data_dir_option
@click.option(
    "--reader-id",
    default=None,
    help="This reader's id; its consumer group is walship.<topic>.<reader-id> "
    "[env: WALSHIP_CONSUMER__READER_ID].",
)
@click.option("--until-seq", type=int, default=None, help="Exit 0 once this seq is applied.")
@click.option(
    "--until-caught-up",
    is_flag=True,
    default=False,
    help="Exit 0 once the last seq on the topic (at start) is applied.",
)
def run_cmd(until_seq: int | None, until_caught_up: bool, **flags: Any) -> None:
    """Apply the topic to <data-dir>/state.db until stopped (SIGTERM finishes the
    current apply and commits)."""
    if until_seq is not None and until_caught_up:
        raise ConfigError("use --until-seq or --until-caught-up, not both")
    settings = settings_from(**flags)
    asyncio.run(run_reader(settings, until_seq=until_seq, until_caught_up=until_caught_up))


RETRY_BACKOFF_S_MIN = 0.5
RETRY_BACKOFF_S_MAX = 30.0


class Backoff:
    """Capped exponential delays: ``min_s``, twice that, ... up to ``max_s`` (pure)."""

    def __init__(self, min_s: float = RETRY_BACKOFF_S_MIN, max_s: float = RETRY_BACKOFF_S_MAX):
        self._min_s = min_s
        self._max_s = max_s
        self._next_s = min_s

    def next_delay_s(self) -> float:
        delay = self._next_s
        self._next_s = min(self._max_s, self._next_s * 2)
        return delay

    def reset(self) -> None:
        self._next_s = self._min_s


async def run_reader(
    settings: WalshipSettings, *, until_seq: int | None = None, until_caught_up: bool = False
) -> None:
    """Run one reader with heartbeats, health endpoints and bootstrap as configured.

    A service waits out Kafka: start-up and the run are retried on errors flagged
    ``retriable`` (Kafka unreachable, say), with capped exponential backoff, until
    they succeed or SIGTERM/SIGINT arrives; every retry is logged once with its
    reason. Each attempt resumes from the replica's checkpoint. Other errors end
    the reader (exit 1 with their message).
    """
    from walship.consumer.applier import SqliteApplier
    from walship.shared.telemetry import setup_telemetry

    cfg = settings.consumer
    telemetry = setup_telemetry(
        f"{settings.telemetry.service_name}-reader", instance_id=cfg.reader_id
    )
    data_dir = Path(settings.data_dir)
    try:
        await asyncio.to_thread(data_dir.mkdir, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the data dir: {exc}", path=str(data_dir)) from exc
    applier = SqliteApplier(data_dir / "state.db", synchronous=cfg.replica_synchronous)
    attempt = _Attempt(settings, applier, until_seq=until_seq, until_caught_up=until_caught_up)
    stopping = asyncio.Event()

    def on_signal() -> None:
        stopping.set()
        attempt.request_stop()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    backoff = Backoff()
    try:
        while not stopping.is_set():
            try:
                await _until_stopped(attempt, stopping)
                break
            except WalshipError as exc:
                if not exc.retriable or stopping.is_set():
                    raise
                if attempt.started:
                    backoff.reset()  # it ran: start the backoff over
                delay = backoff.next_delay_s()
                log.warning(
                    "reader %s: %s; retrying in %.1f s (retriable)", cfg.reader_id, exc, delay
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), delay)
        log.info("reader %s stopped at seq %d", cfg.reader_id, attempt.applied_seq)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        applier.close()
        telemetry.flush()


async def _until_stopped(attempt: _Attempt, stopping: asyncio.Event) -> None:
    """Run one attempt; a stop request before the reader has started cancels it (a
    start-up waiting on Kafka has nothing to finish), after that it ends the run
    after the current apply."""
    task = asyncio.create_task(attempt.run(), name="walship-reader-attempt")
    stop_wait = asyncio.create_task(stopping.wait())
    try:
        await asyncio.wait({task, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done() and not attempt.started:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return
        await task
    finally:
        stop_wait.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class _Attempt:
    """One start-and-run of the reader with its heartbeat, snapshots and health server."""

    def __init__(
        self,
        settings: WalshipSettings,
        applier: SqliteApplier,
        *,
        until_seq: int | None,
        until_caught_up: bool,
    ) -> None:
        self._settings = settings
        self._applier = applier
        self._until_seq = until_seq
        self._until_caught_up = until_caught_up
        self._reader: Reader | None = None
        self.started = False
        self.applied_seq = 0

    def request_stop(self) -> None:
        if self._reader is not None:
            self._reader.request_stop()

    async def run(self) -> None:
        from walship.consumer.reader import BootstrapHook, Reader
        from walship.shared.codec import Decoder
        from walship.shared.kafka import client_kwargs

        settings, applier = self._settings, self._applier
        cfg = settings.consumer
        topic = settings.topic.name
        kwargs = client_kwargs(settings.kafka)
        self.started = False
        hook: BootstrapHook | None = None
        if settings.snapshot_url and cfg.bootstrap_policy != "never":
            from walship.consumer.bootstrap import Bootstrapper, kafka_log_inspector
            from walship.shared.snapshot import open_store

            bootstrapper = Bootstrapper.for_applier(
                applier,
                open_store(settings.snapshot_url, kwargs),
                topic=topic,
                inspect_log=kafka_log_inspector(topic, kwargs),
                policy=cfg.bootstrap_policy,
                synchronous=cfg.replica_synchronous,
                keyring=settings.keyring(),
            )
            await bootstrapper.prepare()
            hook = bootstrapper
        reader = Reader(
            applier,
            topic=topic,
            reader_id=cfg.reader_id,
            client_kwargs=kwargs,
            bootstrap=hook,
            decoder=Decoder(keyring=settings.keyring()),
            gap_timeout_ms=cfg.gap_timeout_ms,
            apply_entries_max=cfg.apply_entries_max,
            apply_linger_ms=cfg.apply_linger_ms,
            fetch_max_wait_ms=cfg.fetch_max_wait_ms,
            buffer_bytes_max=cfg.buffer_bytes_max,
            fetch_bytes_max=cfg.fetch_bytes_max,
        )
        self._reader = reader
        try:
            async with reader:
                self.started = True
                await self._serve(reader, kwargs)
        finally:
            self.applied_seq = max(self.applied_seq, reader.applied_seq)
            self._reader = None

    async def _serve(self, reader: Reader, kwargs: dict[str, Any]) -> None:
        from walship.consumer.heartbeat import HeartbeatPublisher

        settings = self._settings
        cfg = settings.consumer
        topic = settings.topic.name
        data_dir = Path(settings.data_dir)
        heartbeat = HeartbeatPublisher(
            reader.status,
            topic=topic,
            client_kwargs=kwargs,
            interval_ms=cfg.heartbeat_interval_ms,
            offsets=reader.stored_offsets,
        )
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(heartbeat)
            if settings.snapshot_url and cfg.snapshot_every_seqs is not None:
                from walship.shared.snapshot import open_store
                from walship.shared.snapshot.create import SchedulePolicy, SnapshotScheduler

                # Replica snapshots: every N sequences applied, no timer.
                scheduler = SnapshotScheduler.for_replica(
                    data_dir / "state.db",
                    open_store(settings.snapshot_url, kwargs),
                    topic=topic,
                    partitions=settings.topic.partitions,
                    policy=SchedulePolicy(
                        every_seqs=cfg.snapshot_every_seqs,
                        every_s=None,
                        keep=settings.snapshot_keep,
                    ),
                    keyring=settings.keyring(),
                )
                await stack.enter_async_context(scheduler)
            if cfg.http_port is not None:
                from walship.shared.health import HealthServer

                await stack.enter_async_context(
                    HealthServer(
                        cfg.http_port,
                        health=reader.healthy,
                        ready=lambda: reader.ready(cfg.ready_lag_seqs),
                    )
                )
            await reader.run(until_seq=self._until_seq, until_caught_up=self._until_caught_up)


# --- status ---------------------------------------------------------------------


@click.command("status")
@kafka_options
@data_dir_option
@json_option
@click.option("--watch", is_flag=True, default=False, help="Redraw in place every 2 s.")
def status_cmd(as_json: bool, watch: bool, **flags: Any) -> None:
    """Readers' applied seq, lag (seqs and seconds), heartbeat age and warnings.

    With --data-dir of the writer, also its last seq, published seq and WAL backlog.
    """
    data_dir_given = flags.get("data_dir") is not None
    settings = settings_from(**flags)
    writer_dir = Path(settings.data_dir) if data_dir_given else None
    if watch and as_json:
        raise ConfigError("--watch redraws a table; use it without --json")
    if not watch:
        doc = asyncio.run(collect_status(settings, writer_dir))
        if as_json:
            click.echo(json.dumps(doc, indent=2, sort_keys=True))
        else:
            Console().print(render_status(doc))
        return
    asyncio.run(_watch(settings, writer_dir))


async def _watch(settings: WalshipSettings, writer_dir: Path | None) -> None:
    with Live(Text("reading status..."), auto_refresh=False, screen=False) as live:
        while True:
            try:
                live.update(render_status(await collect_status(settings, writer_dir)))
            except WalshipError as exc:
                live.update(Text(f"status unavailable: {exc}", style="red"))
            live.refresh()
            await asyncio.sleep(STATUS_WATCH_INTERVAL_S)


def _writer_position(writer_dir: Path) -> tuple[int | None, int | None]:
    """(the writer's last durable seq, the publisher's published seq) from its data dir."""
    from walship.producer.position import PublishedPosition

    writer_seq: int | None = None
    wal_dir = writer_dir / "wal"
    if wal_dir.is_dir():
        from walship.producer.wal import WalReader

        with WalReader(wal_dir) as wal:
            writer_seq = wal.last_seq
    published = PublishedPosition.load(writer_dir).seq
    return writer_seq, published


async def collect_status(settings: WalshipSettings, writer_dir: Path | None) -> dict[str, Any]:
    """The ``status --json`` document (see ``heartbeat.status_document``)."""
    from walship.consumer.heartbeat import TopicState, read_heartbeats, status_document
    from walship.consumer.reader import LogProbe
    from walship.shared.kafka import client_kwargs, describe_topic

    topic = settings.topic.name
    kwargs = client_kwargs(settings.kafka)
    description = await describe_topic(kwargs, topic)
    async with LogProbe(topic, kwargs) as probe:
        last_seq = await probe.last_seq(description.partitions)
    heartbeats = await read_heartbeats(kwargs, topic)
    writer_seq = published_seq = None
    if writer_dir is not None:
        writer_seq, published_seq = await asyncio.to_thread(_writer_position, writer_dir)
    state = TopicState(
        topic=topic,
        partitions=description.partitions,
        log_start_offsets=description.beginning_offsets,
        end_offsets=description.end_offsets,
        last_seq=last_seq,
        writer_seq=writer_seq,
        published_seq=published_seq,
    )
    return status_document(heartbeats, state, time.time())


def render_status(doc: dict[str, Any]) -> Group:
    """A rich renderable of the status document."""
    writer = doc["writer"]
    head = Text.assemble(
        ("topic ", "bold"),
        f"{doc['topic']} ({doc['partitions']} partitions), last seq on topic {doc['last_seq']}",
    )
    parts: list[Any] = [head]
    if writer["last_seq"] is not None or writer["published_seq"] is not None:
        parts.append(
            Text(
                f"writer: last seq {writer['last_seq']}, published {writer['published_seq']}, "
                f"WAL backlog {writer['wal_backlog_seqs']} seqs"
            )
        )
    table = Table(show_lines=False)
    for column in ("reader", "host", "applied seq", "lag seqs", "lag s", "heartbeat", "state"):
        table.add_column(
            column, justify="right" if column.startswith(("applied", "lag")) else "left"
        )
    for row in doc["readers"]:
        state = Text("ok", style="green")
        if row["warnings"]:
            state = Text(
                "; ".join(row["warnings"]), style="red" if not row["healthy"] else "yellow"
            )
        table.add_row(
            row["reader_id"],
            row["host"],
            str(row["applied_seq"]),
            str(row["lag_seqs"]),
            f"{row['lag_s']:.1f}",
            f"{row['heartbeat_age_s']:.0f}s ago",
            state,
        )
    if not doc["readers"]:
        parts.append(Text("no reader heartbeats on the topic yet", style="yellow"))
    else:
        parts.append(table)
    return Group(*parts)
