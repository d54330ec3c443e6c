"""The orchestrator: one embedded cluster, the sections in order, the results dict.

Sections (names usable with ``--sections``):
``codec``, ``e2e`` (end-to-end; also the RSS of writer/publisher/reader),
``transport`` (needs e2e: it replays e2e's message layout), ``naive``,
``latency``, ``fanout`` (also the reader's RSS on a backlog), ``bootstrap``.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from walship.shared.bench import latency as latency_mod
from walship.shared.bench.procs import BenchError, Workers
from walship.shared.bench.worker import cpu_s
from walship.shared.bench.workload import PARTITIONS, TXN_ENTRIES, payload_mb
from walship.shared.devcluster import DevCluster

SECTIONS = ("codec", "e2e", "transport", "naive", "latency", "fanout", "bootstrap")
_MB = 1e6
_RSS_MB = 1 << 20  # RSS figures are MiB, like ps and top


@dataclass
class BenchConfig:
    entries: int = 1_000_000
    naive_entries: int = 50_000
    keys: int = 1_000_000
    latency_rate: int = 10_000
    latency_s: float = 20.0
    latency_warmup_s: float = 2.0
    # None: the reader's default; the latency run reports which value it used.
    latency_apply_linger_ms: int | None = None
    # Extra aiokafka consumer settings for the latency run's reader (e.g. fetch_max_wait_ms).
    # The embedded broker holds every fetch for fetch.max.wait.ms even when data
    # arrives (a Kafka broker answers at once), so the latency run asks for a
    # short wait to measure walship rather than that quirk (docs/performance.md).
    latency_reader_client: dict[str, Any] = field(default_factory=lambda: {"fetch_max_wait_ms": 5})
    fanout_entries: int = 300_000
    fanout_readers: tuple[int, ...] = (1, 2, 4)
    snapshot_keys: int = 1_000_000
    codec_entries: int = 200_000
    # "wal": WalWriter (what an application embeds); "state": the reference
    # Writer, which also applies every group commit to its own state.db.
    writer_kind: str = "wal"
    profile_dir: Path | None = None
    # What the transport run replays of e2e's messages (the cluster keeps ~60 MB on 12 partitions).
    transport_bytes_max: int = 24 << 20
    partitions: int = PARTITIONS
    brokers: int = 3
    sections: tuple[str, ...] = SECTIONS
    quick: bool = False
    work_dir: Path = field(default_factory=lambda: Path("bench-work"))

    @classmethod
    def quick_config(cls, **overrides: Any) -> BenchConfig:
        """Small sizes for CI (well under a minute); compare ratios, not absolute rates."""
        base: dict[str, Any] = {
            "entries": 40_000,
            "naive_entries": 4_000,
            "keys": 40_000,
            "latency_s": 4.0,
            "latency_warmup_s": 1.0,
            "fanout_entries": 20_000,
            "fanout_readers": (1, 2),
            "snapshot_keys": 50_000,
            "codec_entries": 20_000,
            "quick": True,
        }
        base.update(overrides)
        return cls(**base)


Progress = Callable[[str], None]


def _rate(count: float, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else 0.0


class BenchRunner:
    def __init__(self, config: BenchConfig, progress: Progress | None = None) -> None:
        self.config = config
        self.progress: Progress = progress or (lambda _msg: None)
        self.results: dict[str, Any] = {}
        self._cluster: DevCluster | None = None
        self._layout_path: Path | None = None
        self._e2e_elapsed_s: float | None = None
        self._run_id = uuid.uuid4().hex[:8]

    @property
    def bootstrap(self) -> str:
        assert self._cluster is not None
        return self._cluster.bootstrap_servers

    def _topic(self, name: str) -> str:
        assert self._cluster is not None
        topic = f"bench-{name}-{self._run_id}"
        self._cluster.create_topic(topic, self.config.partitions, replication_factor=3)
        return topic

    def _dir(self, name: str) -> Path:
        path = self.config.work_dir / self._run_id / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _workers(self, name: str) -> Workers:
        return Workers(self._dir(name) / "logs", profile_dir=self.config.profile_dir)

    async def run(self) -> dict[str, Any]:
        cfg = self.config
        unknown = set(cfg.sections) - set(SECTIONS)
        if unknown:
            raise BenchError(f"unknown bench sections: {', '.join(sorted(unknown))}")
        self.results["meta"] = {
            "quick": cfg.quick,
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        steps: dict[str, Callable[[], Any]] = {
            "codec": self.codec,
            "e2e": self.end_to_end,
            "transport": self.transport,
            "naive": self.naive,
            "latency": self.latency,
            "fanout": self.fanout,
            "bootstrap": self.bootstrap_section,
        }
        for name in SECTIONS:
            if name not in cfg.sections:
                continue
            started = time.monotonic()
            self.progress(f"{name}: running")
            # A fresh cluster per section: the embedded brokers keep earlier
            # sections' data and work in this process, which skewed later ones
            # (the latency p99 measured after e2e/naive/transport was ~20 ms worse).
            with DevCluster(cfg.brokers) as cluster:
                self._cluster = cluster
                await steps[name]()
            self._cluster = None
            self.progress(f"{name}: done in {time.monotonic() - started:.1f} s")
        self._derive()
        return self.results

    def _derive(self) -> None:
        """Figures computed from two sections measured in this same run."""
        e2e, naive = self.results.get("end_to_end"), self.results.get("naive")
        if e2e and naive and naive["entries_per_s"] > 0:
            naive["ratio"] = round(e2e["entries_per_s"] / naive["entries_per_s"], 2)
        transport = self.results.get("transport")
        if e2e and transport and transport["entries_per_s"] > 0:
            transport["walship_share"] = round(e2e["entries_per_s"] / transport["entries_per_s"], 3)

    # -- sections ----------------------------------------------------------------

    async def codec(self) -> None:
        async with self._workers("codec") as w:
            worker = await w.spawn("codec", "codec", {"entries": self.config.codec_entries})
            (result,) = await w.run([worker], timeout_s=600)
        result.pop("peak_rss_bytes", None)
        self.results["codec"] = result

    async def _pipeline(
        self,
        name: str,
        *,
        entries: int,
        readers: int,
        rate_per_s: float | None = None,
        record_latency: bool = False,
        apply_linger_ms: int | None = None,
    ) -> dict[str, Any]:
        """Writer + publisher (+ readers) concurrently; returns their results by role."""
        topic = self._topic(name)
        base = self._dir(name)
        data_dir = base / "writer"
        timeout_s = 300 + entries / 5_000
        async with self._workers(name) as w:
            writer = await w.spawn(
                "writer",
                "writer",
                {
                    "data_dir": str(data_dir),
                    "entries": entries,
                    "keys": self.config.keys,
                    "rate_per_s": rate_per_s,
                    "writer_kind": self.config.writer_kind,
                    "returns_path": str(base / "returns.json") if record_latency else None,
                },
            )
            # Entries go in whole transactions: the last seq is the entry count.
            publisher = await w.spawn(
                "publisher",
                "publisher",
                {
                    "data_dir": str(data_dir),
                    "bootstrap": self.bootstrap,
                    "topic": topic,
                    "partitions": self.config.partitions,
                    "target_seq": entries,
                    "layout_path": str(base / "layout.json"),
                    "acks_path": str(base / "acks.json") if record_latency else None,
                },
            )
            reader_workers = [
                await w.spawn(
                    f"reader-{i}",
                    "reader",
                    self._reader_params(topic, base, i, entries, record_latency, apply_linger_ms),
                )
                for i in range(readers)
            ]
            results = await w.run([writer, publisher, *reader_workers], timeout_s)
        out: dict[str, Any] = {"writer": results[0], "publisher": results[1]}
        out["readers"] = results[2:]
        out["topic"] = topic
        out["base"] = base
        return out

    def _reader_params(
        self,
        topic: str,
        base: Path,
        index: int,
        target_seq: int,
        record_latency: bool,
        apply_linger_ms: int | None,
    ) -> dict[str, Any]:
        return {
            "bootstrap": self.bootstrap,
            "topic": topic,
            "db_path": str(base / f"replica-{index}.db"),
            "reader_id": f"bench-{index}",
            "target_seq": target_seq,
            "commits_path": str(base / f"commits-{index}.json") if record_latency else None,
            "apply_linger_ms": apply_linger_ms,
            "client_extra": self.config.latency_reader_client if record_latency else {},
        }

    async def end_to_end(self) -> None:
        entries = self._whole_txns(self.config.entries)
        cpu_before_s = cpu_s()
        run = await self._pipeline("e2e", entries=entries, readers=1)
        broker_cpu_s = round(cpu_s() - cpu_before_s, 2)
        writer, publisher, reader = run["writer"], run["publisher"], run["readers"][0]
        elapsed = reader["end"] - writer["start"]
        self._e2e_elapsed_s = elapsed
        self._layout_path = run["base"] / "layout.json"
        self.results["end_to_end"] = {
            "entries": entries,
            "elapsed_s": round(elapsed, 3),
            "entries_per_s": _rate(entries, elapsed),
            "mb_per_s": round(payload_mb(entries) / elapsed, 2),
            "writer_entries_per_s": _rate(entries, writer["end"] - writer["start"]),
            "publisher_entries_per_s": _rate(entries, publisher["end"] - publisher["start"]),
            "messages": publisher["messages"],
            "wire_mb": round(publisher["bytes"] / _MB, 2),
            "publisher_retries": publisher["retries"],
            "reader_duplicates": reader["duplicates"],
            "reader_bootstraps": reader["bootstraps"],
            "partitions": self.config.partitions,
            "writer_kind": self.config.writer_kind,
            # CPU seconds per process during the run (2 cores: elapsed_s * 2 is all there is;
            # the embedded brokers run in the orchestrator process).
            "writer_cpu_s": writer.get("cpu_s"),
            "publisher_cpu_s": publisher.get("cpu_s"),
            "reader_cpu_s": reader.get("cpu_s"),
            "orchestrator_cpu_s": broker_cpu_s,  # embedded brokers, incl. process set-up
        }
        rss = self.results.setdefault("rss", {})
        rss["writer_mb"] = round(writer["peak_rss_bytes"] / _RSS_MB, 1)
        rss["publisher_mb"] = round(publisher["peak_rss_bytes"] / _RSS_MB, 1)
        rss["reader_mb"] = round(reader["peak_rss_bytes"] / _RSS_MB, 1)
        rss["backlog_entries_live"] = entries

    async def transport(self) -> None:
        """Replay e2e's messages raw. At most ``transport_bytes_max`` of them: the
        embedded cluster keeps ~5 MB per partition, and a raw producer outruns any
        consumer, so more would be evicted unread and flatter the ceiling. Rates
        compare (MB/s, and entries/s at e2e's wire bytes per entry)."""
        if self._layout_path is None or self._e2e_elapsed_s is None:
            self.progress("transport: skipped (it replays the e2e section's messages)")
            return
        topic = self._topic("transport")
        full: list[tuple[int, int]] = [
            (int(p), int(n)) for p, n in json.loads(self._layout_path.read_text())
        ]
        layout: list[tuple[int, int]] = []
        total = 0
        for partition, size in full:
            if layout and total + size > self.config.transport_bytes_max:
                break
            layout.append((partition, size))
            total += size
        layout_path = self._dir("transport") / "layout.json"
        layout_path.write_text(json.dumps(layout))
        async with self._workers("transport") as w:
            producer = await w.spawn(
                "raw-producer",
                "raw-producer",
                {"bootstrap": self.bootstrap, "topic": topic, "layout_path": str(layout_path)},
            )
            consumer = await w.spawn(
                "raw-consumer",
                "raw-consumer",
                {
                    "bootstrap": self.bootstrap,
                    "topic": topic,
                    "layout_path": str(layout_path),
                    "partitions": self.config.partitions,
                },
            )
            prod, cons = await w.run([producer, consumer], 300 + len(layout) / 100)
        elapsed = cons["end"] - prod["start"]
        e2e = self.results["end_to_end"]
        wire_bytes_per_entry = e2e["wire_mb"] * _MB / e2e["entries"]
        mb_per_s = prod["bytes"] / _MB / elapsed
        self.results["transport"] = {
            "messages": len(layout),
            "of_e2e_messages": len(full),
            "bytes": prod["bytes"],
            "elapsed_s": round(elapsed, 3),
            "mb_per_s": round(mb_per_s, 2),
            "messages_per_s": _rate(len(layout), elapsed),
            "entries_per_s": round(mb_per_s * _MB / wire_bytes_per_entry, 1),
            "evicted_unread": cons["evicted_unread"],
        }

    async def naive(self) -> None:
        entries = self.config.naive_entries
        topic = self._topic("naive")
        base = self._dir("naive")
        async with self._workers("naive") as w:
            producer = await w.spawn(
                "naive-producer",
                "naive-producer",
                {
                    "bootstrap": self.bootstrap,
                    "topic": topic,
                    "entries": entries,
                    "keys": self.config.keys,
                },
            )
            consumer = await w.spawn(
                "naive-consumer",
                "naive-consumer",
                {
                    "bootstrap": self.bootstrap,
                    "topic": topic,
                    "entries": entries,
                    "db_path": str(base / "naive.db"),
                    "partitions": self.config.partitions,
                },
            )
            prod, cons = await w.run([producer, consumer], 300 + entries / 500)
        elapsed = cons["end"] - prod["start"]
        self.results["naive"] = {
            "entries": entries,
            "elapsed_s": round(elapsed, 3),
            "entries_per_s": _rate(entries, elapsed),
            "mb_per_s": round(payload_mb(entries) / elapsed, 2),
            "producer_entries_per_s": _rate(entries, prod["end"] - prod["start"]),
            "wire_mb": round(prod["message_bytes"] / _MB, 2),
            "send": "await producer.send() per entry, acks gathered per 10-entry transaction",
            "apply": "one SQLite commit per message",
        }

    async def latency(self) -> None:
        cfg = self.config
        entries = self._whole_txns(int(cfg.latency_rate * cfg.latency_s))
        run = await self._pipeline(
            "latency",
            entries=entries,
            readers=1,
            rate_per_s=cfg.latency_rate,
            record_latency=True,
            apply_linger_ms=cfg.latency_apply_linger_ms,
        )
        base: Path = run["base"]
        returns = [tuple(x) for x in json.loads((base / "returns.json").read_text())]
        commits = [tuple(x) for x in json.loads((base / "commits-0.json").read_text())]
        summary = latency_mod.summarize(
            returns,  # type: ignore[arg-type]
            commits,  # type: ignore[arg-type]
            warmup_s=cfg.latency_warmup_s,
        )
        acks = [tuple(x) for x in json.loads((base / "acks.json").read_text())]
        to_ack = latency_mod.summarize(
            returns,  # type: ignore[arg-type]
            acks,  # type: ignore[arg-type]
            warmup_s=cfg.latency_warmup_s,
        )
        writer = run["writer"]
        self.results["latency"] = {
            "append_to_kafka_ack": to_ack.to_json(),
            "offered_entries_per_s": cfg.latency_rate,
            "achieved_entries_per_s": _rate(entries, writer["end"] - writer["start"]),
            "duration_s": cfg.latency_s,
            "warmup_s": cfg.latency_warmup_s,
            "reader_apply_linger_ms": cfg.latency_apply_linger_ms,
            **summary.to_json(),
        }

    async def fanout(self) -> None:
        cfg = self.config
        entries = self._whole_txns(cfg.fanout_entries)
        # Fill the topic first (no reader), then let 1, 2, 4 readers read the backlog.
        run = await self._pipeline("fanout", entries=entries, readers=0)
        topic, base = run["topic"], run["base"]
        out: dict[str, Any] = {"entries": entries}
        backlog_rss = 0
        for n in cfg.fanout_readers:
            replicas = base / f"readers-{n}"
            replicas.mkdir(exist_ok=True)
            async with self._workers(f"fanout-{n}") as w:
                readers = [
                    await w.spawn(
                        f"reader-{i}",
                        "reader",
                        self._reader_params(topic, replicas, i, entries, False, None),
                    )
                    for i in range(n)
                ]
                results = await w.run(readers, 300 + entries / 2_000)
            first = min(r["start"] for r in results)
            last = max(r["end"] for r in results)
            per_reader = [_rate(entries, r["end"] - r["start"]) for r in results]
            out[str(n)] = {
                "readers": n,
                "per_reader_entries_per_s": round(sum(per_reader) / n, 1),
                "total_entries_per_s": _rate(entries * n, last - first),
                "per_reader": per_reader,
            }
            backlog_rss = max(backlog_rss, *(r["peak_rss_bytes"] for r in results))
        self.results["fanout"] = out
        rss = self.results.setdefault("rss", {})
        rss["reader_backlog_mb"] = round(backlog_rss / _RSS_MB, 1)
        rss["backlog_entries"] = entries

    async def bootstrap_section(self) -> None:
        keys = self.config.snapshot_keys
        base = self._dir("bootstrap")
        async with self._workers("bootstrap") as w:
            worker = await w.spawn(
                "snapshot", "snapshot", {"keys": keys, "dir": str(base), "seed": 1}
            )
            (result,) = await w.run([worker], timeout_s=600)
        result["snapshot_peak_rss_mb"] = round(result.pop("peak_rss_bytes") / _RSS_MB, 1)
        self.results["bootstrap"] = result

    @staticmethod
    def _whole_txns(entries: int) -> int:
        return max(TXN_ENTRIES, entries - entries % TXN_ENTRIES)


def run_bench(config: BenchConfig, progress: Progress | None = None) -> dict[str, Any]:
    return asyncio.run(BenchRunner(config, progress).run())
