"""``walship bench``: the performance report (table + JSON) on the embedded cluster.

See docs/performance.md for what each section measures and the latest figures.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from walship.shared.bench.report import checks_for, render_table, write_json
from walship.shared.bench.runner import SECTIONS, BenchConfig, run_bench
from walship.shared.errors import WalshipError


class RatioBelowMinimumError(WalshipError):
    """``--min-ratio``: walship/naive fell below the floor (a regression in CI)."""


def _sections(value: str | None) -> tuple[str, ...]:
    if not value:
        return SECTIONS
    names = tuple(s.strip() for s in value.split(",") if s.strip())
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise click.BadParameter(
            f"unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}",
            param_hint="--sections",
        )
    return names


@click.command("bench")
@click.option("--quick", is_flag=True, help="Small sizes (under a minute), for CI.")
@click.option(
    "--entries",
    type=click.IntRange(min=10),
    default=None,
    help="End-to-end entries [1,000,000; quick 40,000].",
)
@click.option(
    "--naive-entries",
    type=click.IntRange(min=10),
    default=None,
    help="Entries through the naive pipeline [50,000; quick 4,000].",
)
@click.option(
    "--keys",
    type=click.IntRange(min=1),
    default=None,
    help="Key space of the generated load [= --entries].",
)
@click.option(
    "--latency-rate",
    type=click.IntRange(min=10),
    default=None,
    help="Offered entries/s in the latency run [10,000].",
)
@click.option(
    "--latency-seconds",
    type=click.FloatRange(min=1),
    default=None,
    help="Length of the latency run [20; quick 4].",
)
@click.option(
    "--latency-apply-linger-ms",
    type=click.IntRange(min=0),
    default=None,
    help="Reader apply_linger_ms in the latency run [the reader's default].",
)
@click.option(
    "--fanout-entries",
    type=click.IntRange(min=10),
    default=None,
    help="Backlog each fan-out reader reads [300,000; quick 20,000].",
)
@click.option(
    "--snapshot-keys",
    type=click.IntRange(min=1),
    default=None,
    help="Keys snapshotted and restored [1,000,000; quick 50,000].",
)
@click.option(
    "--writer",
    "writer_kind",
    type=click.Choice(["wal", "state"]),
    default="wal",
    show_default=True,
    help="wal: the WalWriter an application embeds; state: the reference Writer (WAL + state.db).",
)
@click.option(
    "--profile",
    "profile_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Run every worker under py-spy; raw profiles and top-frame summaries go here.",
)
@click.option(
    "--sections",
    default=None,
    metavar="A,B,...",
    help=f"Run only these sections ({', '.join(SECTIONS)}).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("bench.json"),
    show_default=True,
    help="JSON results file.",
)
@click.option(
    "--min-ratio",
    type=click.FloatRange(min=0),
    default=None,
    help="Exit 1 when walship/naive (same run) is below this.",
)
@click.option(
    "--work-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where WALs, replicas and logs go [a temp dir, removed after].",
)
def bench_cmd(
    quick: bool,
    entries: int | None,
    naive_entries: int | None,
    keys: int | None,
    latency_rate: int | None,
    latency_seconds: float | None,
    latency_apply_linger_ms: int | None,
    fanout_entries: int | None,
    snapshot_keys: int | None,
    writer_kind: str,
    profile_dir: Path | None,
    sections: str | None,
    out: Path,
    min_ratio: float | None,
    work_dir: Path | None,
) -> None:
    """Measure walship on the embedded 3-broker cluster; print a table, write JSON.

    Sections: codec, end-to-end (writer -> publisher -> reader, separate
    processes), transport ceiling (raw aiokafka, same messages), naive
    pipeline, latency at a fixed load, fan-out (1, 2, 4 readers), snapshot
    create/restore, and peak RSS. Ratios are measured in the same run.
    """
    chosen = _sections(sections)
    if min_ratio is not None and not {"e2e", "naive"} <= set(chosen):
        raise click.BadParameter("needs the e2e and naive sections", param_hint="--min-ratio")
    overrides: dict[str, Any] = {
        k: v
        for k, v in {
            "entries": entries,
            "naive_entries": naive_entries,
            "latency_rate": latency_rate,
            "latency_s": latency_seconds,
            "latency_apply_linger_ms": latency_apply_linger_ms,
            "fanout_entries": fanout_entries,
            "snapshot_keys": snapshot_keys,
        }.items()
        if v is not None
    }
    overrides["sections"] = chosen
    overrides["writer_kind"] = writer_kind
    overrides["profile_dir"] = profile_dir
    temp = work_dir is None
    root = Path(tempfile.mkdtemp(prefix="walship-bench-")) if work_dir is None else work_dir
    overrides["work_dir"] = root
    config = BenchConfig.quick_config(**overrides) if quick else BenchConfig(**overrides)
    config.keys = keys if keys is not None else config.entries
    console = Console(stderr=True)
    try:
        results = run_bench(config, progress=lambda msg: console.log(msg))
    finally:
        if temp:
            shutil.rmtree(root, ignore_errors=True)
    checks = checks_for(results)
    write_json(out, results, checks)
    title = "walship bench" + (" --quick" if quick else "")
    Console().print(render_table(results, checks, title))
    click.echo(f"results: {out}")
    if min_ratio is not None:
        ratio = results.get("naive", {}).get("ratio")
        if ratio is None or ratio < min_ratio:
            raise RatioBelowMinimumError(
                f"walship/naive ratio {ratio} is below --min-ratio {min_ratio}",
                ratio=ratio,
                min_ratio=min_ratio,
            )
