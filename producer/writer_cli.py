"""``walship writer load``: drive a reference Writer with generated load (thin over loadgen)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import click
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from walship.producer.loadgen import LoadResult, run_load
from walship.producer.wal import FsyncPolicy
from walship.producer.writer import Writer
from walship.shared.cli.options import config_option, data_dir_option, settings_from


@click.group("writer")
def writer_group() -> None:
    """The reference writer: WAL plus state.db in a data directory."""


@writer_group.command("load")
@data_dir_option
@config_option
@click.option("--entries", type=click.IntRange(min=0), required=True, help="Entries to append.")
@click.option(
    "--keys",
    type=click.IntRange(min=1),
    default=100_000,
    show_default=True,
    help="Key space size (16-byte keys).",
)
@click.option("--value-bytes", type=click.IntRange(min=0), default=100, show_default=True)
@click.option(
    "--txn-entries",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Entries per transaction.",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Entries per second (default: as fast as possible).",
)
@click.option("--delete-ratio", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True)
@click.option("--seed", type=int, default=1, show_default=True, help="Same seed, same data.")
@click.option(
    "--fsync",
    type=click.Choice([p.value for p in FsyncPolicy]),
    default=None,
    help="WAL fsync policy (default: the producer.fsync setting).",
)
@click.option("--json", "as_json", is_flag=True, default=False, help="Print the result as JSON.")
def load_cmd(
    data_dir: Path | None,
    config: Path | None,
    entries: int,
    keys: int,
    value_bytes: int,
    txn_entries: int,
    rate: float | None,
    delete_ratio: float,
    seed: int,
    fsync: str | None,
    as_json: bool,
) -> None:
    """Append generated transactions to the writer in --data-dir (deterministic per --seed)."""
    settings = settings_from(data_dir=data_dir, config=config, producer__fsync=fsync)
    p = settings.producer
    writer = Writer(
        settings.data_dir,
        fsync=FsyncPolicy(p.fsync),
        fsync_interval_ms=p.fsync_interval_ms,
        segment_bytes_max=p.segment_bytes_max,
        wal_bytes_max=p.wal_bytes_max,
        wal_release=p.wal_release,
    )

    async def go(progress: Progress) -> LoadResult:
        task = progress.add_task("appending", total=entries)
        async with writer:
            return await run_load(
                writer,
                entries=entries,
                keys=keys,
                value_bytes=value_bytes,
                txn_entries=txn_entries,
                rate_per_s=rate,
                delete_ratio=delete_ratio,
                seed=seed,
                progress=lambda done, _total: progress.update(task, completed=done),
            )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,}/{task.total:,}"),
        TimeRemainingColumn(),
    )
    from walship.shared.telemetry import setup_telemetry

    # Appends are the roots of the batches' traces; shutdown flushes their spans.
    telemetry = setup_telemetry(f"{settings.telemetry.service_name}-writer")
    try:
        with Progress(*columns, transient=True, disable=as_json) as progress:
            result = asyncio.run(go(progress))
    finally:
        telemetry.flush()
    summary = {
        "entries": result.entries,
        "txns": result.txns,
        "first_seq": result.first_seq,
        "last_seq": result.last_seq,
        "elapsed_s": round(result.elapsed_s, 3),
        "entries_per_s": round(result.entries_per_s),
    }
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(
            f"appended {result.entries:,} entries in {result.txns:,} txns "
            f"(seq {result.first_seq}..{result.last_seq}) in {result.elapsed_s:.2f}s: "
            f"{result.entries_per_s:,.0f} entries/s"
        )
