"""``walship chaos``: real walship processes, seeded faults, then a byte-for-byte check.

See :mod:`walship.shared.chaos` and docs/reliability.md ("Chaos suite").
Exit code 0 only when the run PASSes; 1 when it FAILs (the work directory is
kept for investigation and named in the report).
"""

from __future__ import annotations

import asyncio
import json
import logging
import shlex
import sys
from pathlib import Path

import click
from walship.shared.chaos import ChaosConfig, run_chaos
from walship.shared.chaos.plan import FaultKind

EXIT_FAIL = 1


@click.command("chaos")
@click.option(
    "--duration",
    type=click.FloatRange(min=1),
    default=300.0,
    show_default=True,
    help="Seconds of fault injection (catching up and verifying come after).",
)
@click.option("--seed", type=int, default=1, show_default=True, help="Seed of every random choice.")
@click.option("--readers", type=click.IntRange(1, 16), default=3, show_default=True)
@click.option("--partitions", type=click.IntRange(1, 64), default=6, show_default=True)
@click.option(
    "--rate",
    type=click.FloatRange(min=1),
    default=400.0,
    show_default=True,
    help="Writer load in entries per second.",
)
@click.option(
    "--fault",
    "faults",
    type=click.Choice([k.value for k in FaultKind]),
    multiple=True,
    help="Only these fault kinds (repeatable). Default: all.",
)
@click.option(
    "--work-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where data dirs, snapshots and logs go (default: a temporary dir, removed on PASS).",
)
@click.option("--keep", is_flag=True, default=False, help="Keep the work dir even on PASS.")
@click.option("--json", "as_json", is_flag=True, default=False, help="Print the report as JSON.")
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the JSON report to this file.",
)
@click.option("--quiet", is_flag=True, default=False, help="No event log on stderr.")
def chaos_cmd(
    duration: float,
    seed: int,
    readers: int,
    partitions: int,
    rate: float,
    faults: tuple[str, ...],
    work_dir: Path | None,
    keep: bool,
    as_json: bool,
    report_path: Path | None,
    quiet: bool,
) -> None:
    """Run a writer, a publisher and readers as real processes on the embedded
    cluster while a seeded scheduler kills them, takes brokers down, moves leaders,
    deletes log prefixes (retention) and injects corrupt messages; then catch up and
    compare every replica's digest with the writer's. Exit 0 only on PASS."""
    cfg = ChaosConfig(
        duration_s=duration,
        seed=seed,
        readers=readers,
        partitions=partitions,
        rate_per_s=rate,
        faults=tuple(FaultKind(f) for f in faults) or tuple(FaultKind),
        work_dir=work_dir,
        keep_work_dir=keep,
    )
    command = "walship " + " ".join(shlex.quote(a) for a in sys.argv[1:])

    def echo(line: str) -> None:
        if not quiet:
            click.echo(line, err=True)

    # The run's own Kafka clients (heartbeat reads, corrupt messages) meet brokers that
    # are down on purpose; their connection errors are noise here.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    report = asyncio.run(run_chaos(cfg, command=command, echo=echo))
    doc = report.to_json()
    if report_path is not None:
        report_path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(report.render())
    if not report.passed:
        sys.exit(EXIT_FAIL)
