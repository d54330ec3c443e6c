"""The chaos run: the embedded cluster in this process, walship processes around it.

Layout of the work directory::

    writer/        the writer's data dir (WAL, state.db, identity, published.json)
    reader-N/      each reader's data dir (state.db = the replica)
    snapshots/     the file:// snapshot store
    logs/          one log per process (stdout + stderr, appended across restarts)

Phases: start (cluster, topics, writer under load, publisher, readers) ->
faults for ``duration_s`` (seeded, see ``plan``) plus periodic snapshots and a
lag poll -> quiesce (faults off, every broker up) -> catch up (the writer
replays its WAL into state.db, ``producer run --until-caught-up``, a final
snapshot, ``consumer run --until-seq <last>`` per reader) -> verify (WAL dense,
durable seq never went back, every digest equals the writer's).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from walship.shared.chaos.faults import (
    CORRUPT_KINDS,
    RawProducer,
    bad_crc_message,
    check_undecodable,
    garbage_message,
)
from walship.shared.chaos.plan import (
    ChaosConfig,
    ChaosReport,
    Check,
    ExitRecord,
    FaultKind,
    FaultPlan,
    WriterProfile,
    choose_writer_profile,
    dense_check,
    digest_checks,
    exit_expected,
)
from walship.shared.chaos.procs import ManagedProcess, run_once, walship_argv
from walship.shared.devcluster import DevCluster
from walship.shared.errors import WalshipError

_ENTRIES_FOREVER = 1_000_000_000
_SNAPSHOT_TIMEOUT_S = 90.0
_LAG_POLL_S = 2.0
_SEQ_MAX = 2**63
_BOOTSTRAP_DONE = "now holds snapshot"


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment without WALSHIP_*/OTEL_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WALSHIP_", "OTEL_"))}
    env.update(extra)
    return env


class ChaosRun:
    def __init__(self, cfg: ChaosConfig, *, command: str, echo: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.echo_line = echo
        self.rng = random.Random(cfg.seed)
        self.plan = FaultPlan(self.rng, cfg.faults, cfg.fault_interval_s)
        # Separate streams, so restarts that happen at timing-dependent moments
        # do not shift the fault schedule drawn from ``rng``.
        self._profile_rng = random.Random(f"{cfg.seed}-writer-profiles")
        self._corrupt_rng = random.Random(f"{cfg.seed}-corrupt-bytes")
        self.work = Path(cfg.work_dir) if cfg.work_dir else Path(tempfile.mkdtemp("-walship-chaos"))
        self.writer_dir = self.work / "writer"
        self.snapshot_dir = self.work / "snapshots"
        self.log_dir = self.work / "logs"
        self.reader_names = [f"reader-{i}" for i in range(1, cfg.readers + 1)]
        self.report = ChaosReport(
            command=command, seed=cfg.seed, duration_s=cfg.duration_s, work_dir=str(self.work)
        )
        self.cluster = DevCluster(cfg.brokers)
        self.t0 = time.monotonic()
        self.env: dict[str, str] = {}
        self.client_kwargs: dict[str, Any] = {}
        self.writer: ManagedProcess | None = None
        self.publisher: ManagedProcess | None = None
        self.readers: dict[str, ManagedProcess] = {}
        self._raw: RawProducer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._down: set[int] = set()
        self._snapshot_lock = asyncio.Lock()
        self._last_snapshot_at = 0.0
        self._pending_corrupt: list[tuple[int, int]] = []  # (partition, offset) to cover
        self._corrupt_injected = 0
        self._durable_seen = 0
        self._applied_seen: dict[str, int] = {}
        self._wal_samples: list[tuple[float, int]] = []  # (wall clock s, WAL last seq)

    # --- helpers ------------------------------------------------------------------

    def echo(self, message: str) -> None:
        self.echo_line(f"[{time.monotonic() - self.t0:7.1f}s] {message}")

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _fault_failed(self, kind: str, exc: BaseException | str) -> None:
        text = f"{kind}: {exc}"
        self.report.fault_failures.append(text)
        self.echo(f"fault action failed: {text}")

    def _on_exit(self, record: ExitRecord) -> None:
        self.report.exits.append(record)
        tag = "expected" if record.expected else "UNEXPECTED"
        self.echo(f"{record.process} exited {record.code} [{tag}]: {record.reason}")

    def _expected(self, role: str, reason: str) -> bool:
        return exit_expected(role, reason, corrupt_injected=self._corrupt_injected > 0)

    def _wal_last_seq(self) -> int:
        from walship.producer.wal import WalReader

        wal_dir = self.writer_dir / "wal"
        if not wal_dir.is_dir():
            return 0
        with WalReader(wal_dir) as reader:
            return reader.last_seq

    def _published(self) -> tuple[int, dict[int, int]]:
        from walship.producer.position import PublishedPosition

        position = PublishedPosition.load(self.writer_dir)
        return position.seq, position.offsets

    def _process(
        self, name: str, role: str, argv: Callable[[], list[str]], restart_s: float = 1.5
    ) -> ManagedProcess:
        return ManagedProcess(
            name,
            role,
            argv,
            env=self.env,
            log_path=self.log_dir / f"{name}.log",
            clock_start=self.t0,
            on_exit=self._on_exit,
            expected=self._expected,
            auto_restart_s=restart_s,
        )

    def _writer_argv(self) -> list[str]:
        profile: WriterProfile = choose_writer_profile(self._profile_rng, self.cfg.rate_per_s)
        counts = self.report.writer_profiles
        counts[profile.name] = counts.get(profile.name, 0) + 1
        incarnation = sum(counts.values())
        return walship_argv(
            "writer",
            "load",
            "--data-dir",
            str(self.writer_dir),
            "--entries",
            str(_ENTRIES_FOREVER),
            "--keys",
            str(self.cfg.keys),
            "--seed",
            str(self.cfg.seed * 1000 + incarnation),
            "--json",
            *profile.args(),
        )

    # --- setup ----------------------------------------------------------------------

    async def _setup(self) -> None:
        cfg = self.cfg
        for d in (self.writer_dir, self.snapshot_dir, self.log_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.cluster.start()
        self.cluster.create_topic(cfg.topic, cfg.partitions, min(3, cfg.brokers))
        self.cluster.create_topic(f"{cfg.topic}.readers", 1, min(3, cfg.brokers))
        bootstrap = self.cluster.bootstrap_servers
        self.client_kwargs = {"bootstrap_servers": bootstrap}
        self.env = _clean_env(
            {
                "WALSHIP_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
                "WALSHIP_TOPIC__NAME": cfg.topic,
                "WALSHIP_TOPIC__PARTITIONS": str(cfg.partitions),
                "WALSHIP_TOPIC__REPLICATION_FACTOR": str(min(3, cfg.brokers)),
                "WALSHIP_SNAPSHOT_URL": self.snapshot_dir.resolve().as_uri(),
                "WALSHIP_CONSUMER__GAP_TIMEOUT_MS": str(cfg.gap_timeout_ms),
                "WALSHIP_CONSUMER__HEARTBEAT_INTERVAL_MS": "1000",
                "OTEL_TRACES_EXPORTER": "none",
                "OTEL_METRICS_EXPORTER": "none",
                "PYTHONUNBUFFERED": "1",
            }
        )
        self.echo(f"cluster {bootstrap}, topic {cfg.topic} ({cfg.partitions} partitions)")
        self.writer = self._process("writer", "writer", self._writer_argv)
        self.publisher = self._process(
            "publisher",
            "publisher",
            lambda: walship_argv("producer", "run", "--data-dir", str(self.writer_dir)),
        )
        for name in self.reader_names:
            data_dir = str(self.work / name)
            self.readers[name] = self._process(
                name,
                "reader",
                lambda d=data_dir, n=name: walship_argv(  # type: ignore[misc]
                    "consumer", "run", "--data-dir", d, "--reader-id", n
                ),
                restart_s=2.0,
            )
        self._raw = RawProducer(self.client_kwargs, cfg.topic)

    def _all(self) -> list[ManagedProcess]:
        procs = [p for p in (self.writer, self.publisher) if p is not None]
        return procs + list(self.readers.values())

    # --- snapshots ------------------------------------------------------------------

    async def snapshot(self, *, replica: Path | None = None) -> dict[str, Any] | None:
        """``walship snapshot create`` from the writer (or a stopped reader's replica)."""
        args = ["snapshot", "create", "--keep", "8", "--json"]
        args += ["--replica", str(replica)] if replica else ["--data-dir", str(self.writer_dir)]
        async with self._snapshot_lock:
            code, out = await run_once(
                walship_argv(*args),
                env=self.env,
                log_path=self.log_dir / "snapshots.log",
                timeout_s=_SNAPSHOT_TIMEOUT_S,
            )
            if code != 0:
                self._fault_failed(
                    "snapshot", f"snapshot create exited {code} (logs/snapshots.log)"
                )
                return None
            doc: dict[str, Any] = json.loads(out)
            self.report.snapshots += 1
            self._last_snapshot_at = time.monotonic()
            offsets = {int(p): int(o) for p, o in doc.get("offsets", {}).items()}
            if replica is None:
                covered = [(p, o) for p, o in self._pending_corrupt if offsets.get(p, 0) > o]
                self._pending_corrupt = [c for c in self._pending_corrupt if c not in covered]
            source = replica.parent.name if replica else "writer"
            self.echo(f"snapshot from {source} at seq {doc.get('seq')}")
            return doc

    async def _snapshot_loop(self) -> None:
        """Periodic writer snapshots, and one as soon as a corrupt message can be covered."""
        while True:
            await asyncio.sleep(1.0)
            due = time.monotonic() - self._last_snapshot_at >= self.cfg.snapshot_every_s
            coverable = False
            if self._pending_corrupt:
                _seq, offsets = await asyncio.to_thread(self._published)
                coverable = any(offsets.get(p, 0) > o for p, o in self._pending_corrupt)
            if due or coverable:
                try:
                    await self.snapshot()
                except (WalshipError, OSError, ValueError) as exc:
                    self._fault_failed("snapshot", exc)

    # --- lag --------------------------------------------------------------------------

    async def _lag_loop(self) -> None:
        """Follow every reader heartbeat (all of them, in order, not just the latest):
        lag = the WAL's durable last seq - the reader's applied seq; a reader whose
        applied seq goes down from one heartbeat to the next moved its replica back in
        time. Also checks that the WAL's durable marker never goes back."""
        from aiokafka import AIOKafkaConsumer, TopicPartition
        from aiokafka.errors import KafkaError
        from walship.consumer.heartbeat import Heartbeat, readers_topic

        tp = TopicPartition(readers_topic(self.cfg.topic), 0)
        consumer = AIOKafkaConsumer(
            **self.client_kwargs, enable_auto_commit=False, auto_offset_reset="earliest"
        )
        await consumer.start()
        try:
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            while True:
                try:
                    batches = await consumer.getmany(tp, timeout_ms=int(_LAG_POLL_S * 1000))
                except KafkaError:
                    await asyncio.sleep(_LAG_POLL_S)  # a broker is down on purpose
                    continue
                wal_last = await asyncio.to_thread(self._wal_last_seq)
                self._note_durable(wal_last)
                self._wal_samples.append((time.time(), wal_last))
                for record in batches.get(tp, []):
                    try:
                        beat = Heartbeat.from_json(record.value or b"")
                    except ValueError:
                        continue
                    # The WAL's last seq sampled at or just before the heartbeat: the
                    # lag is then understated by at most one poll's worth of writes.
                    i = bisect.bisect_right(self._wal_samples, (beat.ts, _SEQ_MAX)) - 1
                    wal_then = self._wal_samples[max(0, i)][1]
                    self._note_heartbeat(beat.reader_id, beat.applied_seq, wal_then, beat.running)
        finally:
            await consumer.stop()

    def _note_durable(self, wal_last: int) -> None:
        if wal_last < self._durable_seen:
            self.report.durable_regressions += 1
            self.echo(f"DURABLE SEQ WENT BACK: {self._durable_seen} -> {wal_last}")
        self._durable_seen = max(self._durable_seen, wal_last)

    def _note_heartbeat(self, name: str, applied: int, wal_last: int, running: bool) -> None:
        report = self.report
        seen = self._applied_seen.get(name, 0)
        if applied < seen and not any(
            r.startswith(f"{name}: {seen} ->") for r in report.applied_regressions
        ):  # one entry per drop below a high-water mark, not one per heartbeat
            report.applied_regressions.append(f"{name}: {seen} -> {applied}")
            self.echo(f"REPLICA WENT BACK: {name} from seq {seen} to {applied}")
        self._applied_seen[name] = max(seen, applied)
        if running:
            lag = max(0, wal_last - applied)
            report.max_lag_by_reader[name] = max(report.max_lag_by_reader.get(name, 0), lag)
            report.max_lag_seqs = max(report.max_lag_seqs, lag)

    # --- faults -----------------------------------------------------------------------

    async def _fault_loop(self, deadline: float) -> None:
        while True:
            pause, kind = self.plan.next()
            if time.monotonic() + pause >= deadline:
                await asyncio.sleep(max(0.0, deadline - time.monotonic()))
                return
            await asyncio.sleep(pause)
            self.report.count_fault(kind)
            try:
                await self._inject(kind)
            except (WalshipError, OSError, ValueError) as exc:
                self._fault_failed(kind.value, exc)

    async def _inject(self, kind: FaultKind) -> None:
        rng = self.rng
        if kind is FaultKind.WRITER_KILL:
            await self._kill_and_restart(self._require(self.writer), rng.uniform(0.2, 3.0))
        elif kind is FaultKind.PUBLISHER_KILL:
            await self._kill_and_restart(self._require(self.publisher), rng.uniform(0.2, 3.0))
        elif kind is FaultKind.READER_KILL:
            name = rng.choice(self.reader_names)
            snapshot_replica = rng.random() < 0.3
            reader = self.readers[name]
            await reader.kill()
            self.echo(f"fault: SIGKILL {name}")
            replica = self.work / name / "state.db"
            if snapshot_replica and replica.exists():
                await self.snapshot(replica=replica)  # a consistent replica, nobody writing
            self._spawn(reader.start_after(rng.uniform(0.2, 4.0)))
        elif kind is FaultKind.BROKER_DOWN:
            await self._broker_down()
        elif kind is FaultKind.LEADER_MOVE:
            up = [b for b in self.cluster.broker_ids if b not in self._down]
            moves = []
            for p in rng.sample(range(self.cfg.partitions), min(3, self.cfg.partitions)):
                broker = rng.choice(up)
                self.cluster.set_leader(self.cfg.topic, p, broker)
                moves.append(f"p{p}->{broker}")
            self.echo(f"fault: leaders moved {' '.join(moves)}")
        elif kind is FaultKind.RETENTION:
            await self._retention()
        elif kind is FaultKind.CORRUPT:
            await self._corrupt()

    @staticmethod
    def _require(proc: ManagedProcess | None) -> ManagedProcess:
        if proc is None:
            raise WalshipError("the chaos run is not set up")
        return proc

    async def _kill_and_restart(self, proc: ManagedProcess, delay_s: float) -> None:
        was_running = await proc.kill()
        self.echo(f"fault: SIGKILL {proc.name}" + ("" if was_running else " (was not running)"))
        self._spawn(proc.start_after(delay_s))

    async def _broker_down(self) -> None:
        rng = self.rng
        candidates = [b for b in self.cluster.broker_ids if b not in self._down]
        if len(candidates) <= 1:
            return
        broker = rng.choice(candidates)
        failover = rng.random() < 0.5
        down_s = rng.uniform(2.0, 8.0)
        self.cluster.broker_down(broker)
        self._down.add(broker)
        if failover:
            others = [b for b in candidates if b != broker]
            for p in range(self.cfg.partitions):
                self.cluster.set_leader(self.cfg.topic, p, rng.choice(others))
        self.echo(
            f"fault: broker {broker} down for {down_s:.1f}s"
            + (" (leaders failed over)" if failover else "")
        )

        async def later() -> None:
            await asyncio.sleep(down_s)
            self.cluster.broker_up(broker)
            self._down.discard(broker)
            self.echo(f"broker {broker} up")

        self._spawn(later())

    async def _retention(self) -> None:
        """Stop a reader, snapshot the writer, delete every partition's log up to the
        snapshot's offsets (so the snapshot still connects), restart the reader: if it
        was behind, it must bootstrap."""
        rng = self.rng
        name = rng.choice(self.reader_names)
        reader = self.readers[name]
        await reader.kill()
        try:
            doc = await self.snapshot()
            if doc is None:
                return
            cut = []
            for p_text, offset in sorted(doc.get("offsets", {}).items()):
                p, o = int(p_text), int(offset)
                if o > 0:
                    self.cluster.truncate(self.cfg.topic, p, o)
                    cut.append(f"p{p}@{o}")
            self.echo(f"fault: retention (stopped {name}) log start -> {' '.join(cut) or 'none'}")
        finally:
            self._spawn(reader.start_after(rng.uniform(0.5, 2.0)))

    async def _corrupt(self) -> None:
        from walship.producer.identity import WriterIdentity

        rng = self.rng
        flavor = rng.choice(CORRUPT_KINDS)
        partition = rng.randrange(self.cfg.partitions)
        next_seq = await asyncio.to_thread(self._wal_last_seq) + 1
        if flavor == "garbage":
            value = garbage_message(self._corrupt_rng)
        else:
            writer = await asyncio.to_thread(WriterIdentity.load, self.writer_dir)
            value = bad_crc_message(writer, next_seq, self._corrupt_rng)
        check_undecodable(value)
        raw = self._raw
        if raw is None:
            raise WalshipError("the chaos run is not set up")
        # Counted before the send: a reader may see it before the ack comes back.
        self._corrupt_injected += 1
        offset = await asyncio.wait_for(raw.send(partition, next_seq, value), 30.0)
        self._pending_corrupt.append((partition, offset))
        self.echo(f"fault: corrupt message ({flavor}) at partition {partition} offset {offset}")

    # --- the end ---------------------------------------------------------------------

    async def _quiesce(self) -> None:
        """Faults off: pending restarts and broker outages run out, every broker up."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        for broker in sorted(self._down):
            self.cluster.broker_up(broker)
        self._down.clear()
        self.echo("faults stopped; every broker up")

    async def _catch_up(self) -> tuple[int, dict[str, int]]:
        """Stop the processes and run each to completion; (last seq, reader exit codes)."""
        cfg = self.cfg
        writer, publisher = self._require(self.writer), self._require(self.publisher)
        await writer.stop()
        # A writer start replays WAL records missing from state.db (a SIGKILL between
        # the WAL fsync and the state commit), then stops: state.db == the WAL.
        code, _ = await run_once(
            walship_argv("writer", "load", "--data-dir", str(self.writer_dir), "--entries", "0"),
            env=self.env,
            log_path=self.log_dir / "writer.log",
            timeout_s=120,
        )
        checks = self.report.checks
        checks.append(Check("writer restarts cleanly", code == 0, f"writer load exit {code}"))
        last_seq = await asyncio.to_thread(self._wal_last_seq)
        self.echo(f"writer stopped at seq {last_seq}; publishing the rest")
        await publisher.stop()
        code, _ = await run_once(
            walship_argv(
                "producer", "run", "--data-dir", str(self.writer_dir), "--until-caught-up"
            ),
            env=self.env,
            log_path=self.log_dir / "publisher.log",
            timeout_s=cfg.catch_up_timeout_s,
        )
        published, _offsets = await asyncio.to_thread(self._published)
        checks.append(
            Check(
                "publisher caught up",
                code == 0 and published == last_seq,
                f"producer run --until-caught-up exit {code}, published seq {published}",
            )
        )
        # The writer's regular snapshot after the last write: it also covers every
        # corrupt message (the publisher's offsets are past them all by now).
        await self.snapshot()
        self.echo(f"readers catching up to seq {last_seq}")
        for reader in self.readers.values():
            await reader.stop()

        async def finish(name: str) -> tuple[str, int]:
            code, _ = await run_once(
                walship_argv(
                    "consumer",
                    "run",
                    "--data-dir",
                    str(self.work / name),
                    "--reader-id",
                    name,
                    "--until-seq",
                    str(last_seq),
                ),
                env=self.env,
                log_path=self.log_dir / f"{name}.log",
                timeout_s=cfg.catch_up_timeout_s,
            )
            return name, code

        results = await asyncio.gather(*(finish(n) for n in self.reader_names))
        return last_seq, dict(results)

    async def _digest(self, args: list[str]) -> dict[str, Any] | None:
        code, out = await run_once(
            walship_argv("digest", *args),
            env=self.env,
            log_path=self.log_dir / "digests.log",
            timeout_s=120,
        )
        if code != 0:
            return None
        doc: dict[str, Any] = json.loads(out)
        return doc

    def _wal_facts(self) -> tuple[bool, int, str]:
        from walship.producer.wal import WalReader

        def spans() -> Any:
            with WalReader(self.writer_dir / "wal") as reader:
                seq = 1
                while True:
                    txns = reader.read_from(seq, max_bytes=8 << 20)
                    if not txns:
                        return
                    for txn, _tp in txns:
                        yield txn.first_seq, len(txn)
                    seq = txns[-1][0].last_seq + 1

        return dense_check(spans())

    async def _verify(self, last_seq: int, reader_codes: dict[str, int]) -> None:
        report = self.report
        checks = report.checks
        dense, entries, detail = await asyncio.to_thread(self._wal_facts)
        report.entries_written = entries
        report.last_seq = last_seq
        checks.append(
            Check("WAL dense", dense and entries == last_seq, f"{detail}; {entries} entries")
        )
        checks.append(
            Check(
                "durable seq never went back",
                report.durable_regressions == 0,
                f"{report.durable_regressions} regressions of the WAL's durable marker",
            )
        )
        checks.append(
            Check(
                "replica applied seq never went back",
                not report.applied_regressions,
                "per reader heartbeats: " + ("; ".join(report.applied_regressions) or "monotonic"),
            )
        )
        for name, code in reader_codes.items():
            checks.append(
                Check(f"{name} caught up", code == 0, f"consumer run --until-seq exit {code}")
            )
        writer = await self._digest(["--data-dir", str(self.writer_dir)]) or {}
        replicas: dict[str, dict[str, Any] | None] = {}
        for name in self.reader_names:
            replicas[name] = await self._digest(["--db", str(self.work / name / "state.db")])
        report.digests = {"writer": writer} | {n: d or {} for n, d in replicas.items()}
        digest_ok = digest_checks(writer, replicas, last_seq)
        checks.extend(digest_ok)
        if all(c.ok for c in digest_ok):
            report.entries_verified = entries
        unexpected = [e for e in report.exits if not e.expected]
        checks.append(
            Check(
                "no unexpected process exits",
                not unexpected,
                f"{len(report.exits)} exits on their own, {len(unexpected)} unexpected"
                + (f": {unexpected[0].process}: {unexpected[0].reason}" if unexpected else ""),
            )
        )

    def _count_bootstraps(self) -> None:
        for name in self.reader_names:
            path = self.log_dir / f"{name}.log"
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except FileNotFoundError:
                text = ""
            self.report.bootstraps[name] = text.count(_BOOTSTRAP_DONE)

    async def run(self) -> ChaosReport:
        report = self.report
        background: list[asyncio.Task[None]] = []
        try:
            await self._setup()
            for proc in self._all():
                await proc.start()
            self.echo(f"writer, publisher and {len(self.readers)} readers started")
            self._last_snapshot_at = time.monotonic()
            background = [
                asyncio.create_task(self._snapshot_loop()),
                asyncio.create_task(self._lag_loop()),
            ]
            await self._fault_loop(time.monotonic() + self.cfg.duration_s)
            for task in background:
                task.cancel()
            for result in await asyncio.gather(*background, return_exceptions=True):
                if isinstance(result, Exception):  # a monitor died: its figures are partial
                    self._fault_failed("monitor", result)
            background = []
            await self._quiesce()
            last_seq, codes = await self._catch_up()
            await self._verify(last_seq, codes)
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            for proc in self._all():
                report.restarts[proc.name] = proc.restarts
                await proc.stop(timeout_s=10)
            if self._raw is not None:
                with contextlib.suppress(Exception):
                    await self._raw.stop()
            self.cluster.stop()
            self._count_bootstraps()
            report.elapsed_s = time.monotonic() - self.t0
        if report.passed and not self.cfg.keep_work_dir and self.cfg.work_dir is None:
            shutil.rmtree(self.work, ignore_errors=True)
        return report


async def run_chaos(cfg: ChaosConfig, *, command: str, echo: Callable[[str], None]) -> ChaosReport:
    """One chaos run: ``asyncio.run(run_chaos(cfg, command=..., echo=print))``."""
    return await ChaosRun(cfg, command=command, echo=echo).run()
