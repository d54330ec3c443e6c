"""``walship snapshot``: create, list, verify, retain and restore snapshots."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
from walship.shared.cli.options import (
    data_dir_option,
    json_option,
    kafka_options,
    settings_from,
    snapshot_options,
)
from walship.shared.errors import ConfigError, KafkaUnavailableError, SnapshotCorruptError
from walship.shared.settings import WalshipSettings
from walship.shared.snapshot import Manifest, SnapshotStore, open_store
from walship.shared.snapshot.progress import make_progress

log = logging.getLogger(__name__)
T = TypeVar("T")


def _store(settings: WalshipSettings) -> SnapshotStore:
    if not settings.snapshot_url:
        raise ConfigError(
            "no snapshot store: pass --snapshot-url file:///dir or kafka://topic "
            "(or set WALSHIP_SNAPSHOT_URL)"
        )
    from walship.shared.kafka import client_kwargs

    return open_store(
        settings.snapshot_url,
        client_kwargs(settings.kafka),
        replication_factor=settings.topic.replication_factor,
    )


def _run(settings: WalshipSettings, body: Callable[[SnapshotStore], Awaitable[T]]) -> T:
    async def main() -> T:
        store = _store(settings)
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(main())


def _when(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, tz=UTC).isoformat(timespec="seconds")


def _summary(m: Manifest) -> dict[str, Any]:
    return {
        "snapshot_id": m.snapshot_id,
        "seq": m.seq,
        "created_at": _when(m.created_at_us),
        "source": m.source,
        "topic": m.topic,
        "keys": m.keys,
        "bytes": m.total_bytes,
        "chunks": len(m.chunks),
        "offsets": {str(p): o for p, o in sorted(m.offsets.items())},
        "digest": m.digest,
    }


async def _partitions(settings: WalshipSettings) -> int:
    """The topic's real partition count (a snapshot is only usable with it)."""
    from walship.shared.kafka import client_kwargs, describe_topic

    try:
        desc = await describe_topic(
            client_kwargs(settings.kafka), settings.topic.name, timeout_ms=5000
        )
    except KafkaUnavailableError as exc:
        log.warning(
            "Kafka unreachable (%s); using the configured partition count %d",
            exc,
            settings.topic.partitions,
        )
        return settings.topic.partitions
    return desc.partitions


@click.group("snapshot")
def snapshot_group() -> None:
    """Snapshots: full state at a seq plus the offsets to continue from."""


@snapshot_group.command("create")
@kafka_options
@snapshot_options
@data_dir_option
@click.option(
    "--replica",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Snapshot a caught-up replica file instead of the writer's data dir.",
)
@click.option("--keep", type=int, default=None, help="Then keep only the newest K snapshots.")
@click.option("--chunk-keys", type=int, default=20_000, show_default=True, help="Keys per chunk.")
@json_option
def create_cmd(
    replica: Path | None, keep: int | None, chunk_keys: int, as_json: bool, **flags: Any
) -> None:
    """Snapshot the writer's state.db (--data-dir) or a replica (--replica).

    Writes do not stop: the state is read in one consistent transaction.
    """
    settings = settings_from(**flags)
    if keep is not None and keep < 1:
        raise click.BadParameter("--keep must be >= 1")

    async def body(store: SnapshotStore) -> Manifest:
        from walship.shared.snapshot.create import create_from_data_dir, create_snapshot
        from walship.shared.store import ReplicaStore

        partitions = await _partitions(settings)
        progress = make_progress("snapshot create")
        if replica is not None:
            with ReplicaStore(replica) as rs:
                m = await create_snapshot(
                    rs,
                    store,
                    topic=settings.topic.name,
                    partitions=partitions,
                    chunk_keys=chunk_keys,
                    progress=progress,
                    keyring=settings.keyring(),
                )
        else:
            m = await create_from_data_dir(
                settings.data_dir,
                store,
                topic=settings.topic.name,
                partitions=partitions,
                chunk_keys=chunk_keys,
                progress=progress,
                keyring=settings.keyring(),
            )
        if keep is not None:
            await store.retain(keep)
        return m

    m = _run(settings, body)
    if as_json:
        click.echo(json.dumps(_summary(m), indent=2))
    else:
        click.echo(
            f"snapshot {m.snapshot_id}: seq {m.seq}, {m.keys} keys, {m.total_bytes} bytes "
            f"in {len(m.chunks)} chunks"
        )


@snapshot_group.command("list")
@kafka_options
@snapshot_options
@json_option
def list_cmd(as_json: bool, **flags: Any) -> None:
    """List complete snapshots, newest first."""
    settings = settings_from(**flags)
    manifests = _run(settings, lambda s: s.list_manifests())
    if as_json:
        click.echo(json.dumps([_summary(m) for m in manifests], indent=2))
        return
    if not manifests:
        click.echo("no snapshots")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("snapshot id", "seq", "created (UTC)", "source", "keys", "bytes", "chunks")
    for m in manifests:
        table.add_row(
            m.snapshot_id,
            str(m.seq),
            _when(m.created_at_us),
            m.source,
            f"{m.keys:,}",
            f"{m.total_bytes:,}",
            str(len(m.chunks)),
        )
    Console().print(table)


@snapshot_group.command("verify")
@click.argument("snapshot_id", required=False)
@click.option("--all", "verify_all", is_flag=True, help="Verify every snapshot.")
@kafka_options
@snapshot_options
@json_option
@click.pass_context
def verify_cmd(
    ctx: click.Context, /, snapshot_id: str | None, verify_all: bool, as_json: bool, **flags: Any
) -> None:
    """Check every chunk's CRC32C and the state digest (default: the newest snapshot).

    Exit code 0 when everything verifies, 1 otherwise.
    """
    from walship.shared.snapshot.base import VerifyReport, verify_snapshot
    from walship.shared.snapshot.restore import find_snapshot

    settings = settings_from(**flags)

    async def body(store: SnapshotStore) -> list[VerifyReport]:
        if verify_all:
            targets = await store.list_manifests()
        else:
            targets = [await find_snapshot(store, snapshot_id)]
        reports = []
        for m in targets:
            try:
                reports.append(
                    await verify_snapshot(
                        store, m, raise_on_error=False, keyring=settings.keyring()
                    )
                )
            except SnapshotCorruptError as exc:
                reports.append(VerifyReport(m.snapshot_id, problems=[str(exc)]))
        return reports

    reports = _run(settings, body)
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "snapshot_id": r.snapshot_id,
                        "ok": r.ok,
                        "chunks": r.chunks,
                        "keys": r.keys,
                        "problems": r.problems,
                    }
                    for r in reports
                ],
                indent=2,
            )
        )
    else:
        for r in reports:
            if r.ok:
                click.echo(
                    f"{r.snapshot_id}: ok ({r.chunks} chunks, {r.keys} keys, digest matches)"
                )
            else:
                click.echo(f"{r.snapshot_id}: CORRUPT")
                for p in r.problems:
                    click.echo(f"  {p}")
    if not all(r.ok for r in reports):
        ctx.exit(1)


@snapshot_group.command("retain")
@click.option("--keep", type=int, required=True, help="Keep the newest K snapshots.")
@kafka_options
@snapshot_options
def retain_cmd(keep: int, **flags: Any) -> None:
    """Delete all but the newest K snapshots (and leftovers of crashed creates)."""
    if keep < 1:
        raise click.BadParameter("--keep must be >= 1")
    settings = settings_from(**flags)
    deleted = _run(settings, lambda s: s.retain(keep))
    click.echo(
        f"deleted {len(deleted)} snapshot(s)" + (": " + ", ".join(deleted) if deleted else "")
    )


@snapshot_group.command("restore")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The replica file to build.",
)
@click.option("--to-seq", type=int, default=None, help="Restore the state as of this seq.")
@click.option(
    "--to-time",
    default=None,
    metavar="TIME",
    help="Restore the state as of this time: ISO 8601 (naive = UTC) or epoch seconds.",
)
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@click.option("--dry-run", is_flag=True, help="Print the plan, change nothing.")
@kafka_options
@snapshot_options
def restore_cmd(
    out: Path,
    to_seq: int | None,
    to_time: str | None,
    force: bool,
    dry_run: bool,
    **flags: Any,
) -> None:
    """Build a replica as of a seq or a time: newest snapshot before it + the log."""
    from walship.consumer.bootstrap import kafka_log_inspector
    from walship.shared.kafka import client_kwargs
    from walship.shared.snapshot.restore import (
        RestoreTarget,
        parse_time_us,
        plan_restore,
        restore,
    )

    settings = settings_from(**flags)
    target = RestoreTarget(
        to_seq=to_seq, to_time_us=parse_time_us(to_time) if to_time is not None else None
    )
    if out.exists() and not force and not dry_run:
        raise ConfigError(f"{out} exists; pass --force to overwrite it", path=str(out))
    kwargs = client_kwargs(settings.kafka)
    topic = settings.topic.name

    async def body(store: SnapshotStore) -> str:
        plan = await plan_restore(
            store, topic=topic, target=target, inspect_log=kafka_log_inspector(topic, kwargs)
        )
        for line in plan.describe():
            click.echo(line)
        if dry_run:
            return "dry run: nothing written"
        digest = await restore(
            plan,
            out,
            snapshot_store=store,
            client_kwargs=kwargs,
            force=force,
            progress=make_progress("restore: replay"),
            keyring=settings.keyring(),
        )
        return f"restored {out}: seq {digest.seq}, {digest.keys} keys, sha256 {digest.sha256}"

    click.echo(_run(settings, body))
