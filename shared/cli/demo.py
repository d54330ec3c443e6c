"""``walship demo``: the whole system on one machine, ending with proof.

An embedded 3-broker cluster runs in this process; a writer under load, its
publisher and two readers run as real ``walship`` processes. Midway a snapshot
is taken, the log before it is deleted (as retention would), and a second
reader joins late: it must bootstrap from the snapshot. A live table shows
every process's position and lag. At the end the digests of both replicas must
equal the writer's; the exit code says whether they did.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
from rich.console import Console
from rich.live import Live
from rich.table import Table
from walship.consumer.heartbeat import readers_topic
from walship.consumer.replica import Replica
from walship.producer.position import PublishedPosition
from walship.shared.devcluster import DevCluster
from walship.shared.errors import ReplicaError, WalshipError
from walship.shared.store import digest_file

TOPIC = "demo"
PARTITIONS = 6


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path


@dataclass
class _Demo:
    work: Path
    bootstrap: str
    console: Console
    cluster: DevCluster
    procs: dict[str, _Proc] = field(default_factory=dict)

    def truncate(self, offsets: dict[str, int]) -> None:
        """Move each partition's log start to ``offsets`` (what retention does)."""
        for partition, offset in offsets.items():
            self.cluster.truncate(TOPIC, int(partition), int(offset))

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            WALSHIP_KAFKA__BOOTSTRAP_SERVERS=self.bootstrap,
            WALSHIP_TOPIC__NAME=TOPIC,
            WALSHIP_TOPIC__PARTITIONS=str(PARTITIONS),
            WALSHIP_SNAPSHOT_URL=(self.work / "snapshots").as_uri(),
        )
        return env

    def spawn(self, name: str, *args: str) -> _Proc:
        log = self.work / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", "walship.shared.cli.main", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        proc = _Proc(name, popen, log)
        self.procs[name] = proc
        return proc

    def run(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "walship.shared.cli.main", *args],
            capture_output=True,
            env=self.env,
            check=False,
        )
        if done.returncode != 0:
            raise WalshipError(
                f"`walship {' '.join(args)}` failed: {done.stderr.decode().strip()[-500:]}"
            )
        return done.stdout.decode()

    def check_alive(self) -> None:
        for proc in self.procs.values():
            code = proc.popen.poll()
            if code not in (None, 0):
                tail = proc.log.read_text(errors="replace")[-1500:]
                raise WalshipError(f"{proc.name} exited with {code}; its log ends:\n{tail}")

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()


def _applied(path: Path) -> int:
    if not path.exists():
        return 0
    try:
        with Replica(path) as replica:
            return replica.applied_seq
    except ReplicaError:
        return 0  # being created or swapped in by a bootstrap


def _view(demo: _Demo, phase: str, entries: int, started: float) -> Table:
    writer_seq = _applied(demo.work / "writer" / "state.db")
    published = PublishedPosition.load(demo.work / "writer").seq
    table = Table(title=f"walship demo: {phase}  ({time.monotonic() - started:4.0f} s)")
    for column in ("process", "position (seq)", "lag (seqs)", "progress"):
        table.add_column(column, justify="right" if column != "process" else "left")
    rows = [("writer", writer_seq), ("publisher", published)]
    for name in ("reader-1", "reader-2"):
        if name in demo.procs:
            rows.append((name, _applied(demo.work / name / "state.db")))
    for name, seq in rows:
        lag = "" if name == "writer" else f"{max(writer_seq - seq, 0):,}"
        bar = "#" * int(30 * seq / max(entries, 1))
        table.add_row(name, f"{seq:,}", lag, f"{bar:<30}")
    return table


async def _wait(
    demo: _Demo, live: Live, phase: str, entries: int, started: float, until: float, done: object
) -> None:
    """Refresh the view until ``done()`` is true or ``until`` passes."""
    assert callable(done)
    while not done():
        demo.check_alive()
        if time.monotonic() > until:
            raise WalshipError(f"demo timed out while {phase}")
        live.update(_view(demo, phase, entries, started))
        await asyncio.sleep(0.25)
    live.update(_view(demo, phase, entries, started))


async def _run(demo: _Demo, entries: int, rate: int, timeout_s: float) -> bool:
    started = time.monotonic()
    deadline = started + timeout_s
    w = demo.work / "writer"
    demo.spawn(
        "writer",
        "writer",
        "load",
        "--data-dir",
        str(w),
        "--entries",
        str(entries),
        "--rate",
        str(rate),
        "--keys",
        "20000",
        "--delete-ratio",
        "0.05",
    )
    while not (w / "identity.json").exists():  # the publisher stamps the writer's identity
        demo.check_alive()
        if time.monotonic() > deadline:
            raise WalshipError("the writer did not start")
        await asyncio.sleep(0.05)
    demo.spawn("publisher", "producer", "run", "--data-dir", str(w))
    demo.spawn(
        "reader-1",
        "consumer",
        "run",
        "--data-dir",
        str(demo.work / "reader-1"),
        "--reader-id",
        "reader-1",
    )

    with Live(console=demo.console, refresh_per_second=4, transient=False) as live:
        await _wait(
            demo,
            live,
            "writing; reader-1 follows",
            entries,
            started,
            deadline,
            lambda: _applied(w / "state.db") >= entries // 3,
        )

        # A snapshot, then retention: delete the log up to where the snapshot
        # lets a reader continue. A reader joining now cannot start from offset 0.
        manifest = json.loads(demo.run("snapshot", "create", "--data-dir", str(w), "--json"))
        demo.truncate(manifest["offsets"])
        live.console.print(
            f"snapshot at seq {manifest['seq']:,} ({manifest['keys']:,} keys); "
            "log before it deleted; reader-2 joins and must bootstrap"
        )
        demo.spawn(
            "reader-2",
            "consumer",
            "run",
            "--data-dir",
            str(demo.work / "reader-2"),
            "--reader-id",
            "reader-2",
        )

        await _wait(
            demo,
            live,
            "writing; reader-2 bootstrapped",
            entries,
            started,
            deadline,
            lambda: demo.procs["writer"].popen.poll() == 0,
        )
        last = _applied(w / "state.db")
        await _wait(
            demo,
            live,
            "catching up",
            entries,
            started,
            deadline,
            lambda: all(
                _applied(demo.work / r / "state.db") >= last for r in ("reader-1", "reader-2")
            ),
        )
    demo.stop_all()

    digests = {
        name: digest_file(demo.work / name / "state.db")
        for name in ("writer", "reader-1", "reader-2")
    }
    demo.console.print()
    table = Table(title="final check: every replica equals the writer")
    for column in ("store", "seq", "keys", "bootstraps", "sha256"):
        table.add_column(column, overflow="fold")
    for name, d in digests.items():
        log = demo.work / f"{name}.log"
        boots = log.read_text(errors="replace").count("now holds snapshot") if log.exists() else 0
        table.add_row(name, f"{d.seq:,}", f"{d.keys:,}", str(boots), d.sha256)
    demo.console.print(table)
    reference = digests["writer"]
    return all(d == reference for d in digests.values())


@click.command("demo")
@click.option("--entries", default=150_000, show_default=True, help="Entries the writer appends.")
@click.option("--rate", default=5_000, show_default=True, help="Writer entries per second.")
@click.option("--timeout", "timeout_s", default=170.0, show_default=True, help="Give up after.")
@click.option("--work-dir", type=click.Path(path_type=Path), help="Keep data and logs here.")
def demo_cmd(entries: int, rate: int, timeout_s: float, work_dir: Path | None) -> None:
    """Embedded cluster, a writer, two readers (one bootstraps), live lag, verified equal."""
    console = Console()
    keep = work_dir is not None
    work = work_dir or Path(tempfile.mkdtemp(prefix="walship-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    with DevCluster(3) as cluster:
        cluster.create_topic(TOPIC, PARTITIONS)
        cluster.create_topic(readers_topic(TOPIC), 1)
        console.print(f"embedded cluster: {cluster.bootstrap_servers}; data and logs in {work}")
        demo = _Demo(work, cluster.bootstrap_servers, console, cluster)
        try:
            equal = asyncio.run(_run(demo, entries, rate, timeout_s))
        finally:
            demo.stop_all()
    if equal:
        console.print("[bold green]PASS[/]: both replicas equal the writer, byte for byte.")
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
        return
    console.print(f"[bold red]FAIL[/]: replicas differ from the writer; logs kept in {work}")
    raise SystemExit(1)
