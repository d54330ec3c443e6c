"""walship's own pipeline roles: writer, publisher, reader (one process each), and the codec.

- writer: a :class:`~walship.producer.wal.WalWriter` (what an application
  embeds; fsync per group commit) or, with ``writer_kind="state"``, the
  reference :class:`~walship.producer.writer.Writer` (WAL + state.db), driven
  by :func:`~walship.producer.loadgen.run_load`; optionally paced (latency
  run) and recording when each append returned.
- publisher: a sidecar :class:`~walship.producer.publisher.Publisher` on the
  writer's data directory, with default settings; records the partition and size
  of every message it sends (the transport-ceiling run replays that layout).
- reader: a :class:`~walship.consumer.reader.Reader` applying into a SQLite
  replica; optionally recording when each apply committed (latency run).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from walship.consumer.applier import SqliteApplier
from walship.producer.publisher import SEQ_HEADER
from walship.shared.bench.worker import Gate
from walship.shared.bench.workload import KEY_BYTES, TXN_ENTRIES, VALUE_BYTES, now
from walship.shared.model import Batch, Op, Transaction, WriterId
from walship.shared.store import Checkpoint

_POLL_S = 0.005


def save_json(path: str, data: object) -> None:
    """Write a record file after the measurement (blocking is harmless by then)."""
    Path(path).write_text(json.dumps(data))


class TimedAppender:
    """Wraps a writer; records (last seq, time) when each append returns."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.returns: list[tuple[int, float]] = []

    async def append(
        self,
        ops_keys_values: Sequence[tuple[Op, bytes, bytes]],
        *,
        timestamp_us: int | None = None,
        traceparent: str | None = None,
    ) -> Transaction:
        txn: Transaction = await self.inner.append(
            ops_keys_values, timestamp_us=timestamp_us, traceparent=traceparent
        )
        self.returns.append((txn.last_seq, now()))
        return txn


class TimedApplier:
    """Wraps an applier; records (last applied seq, time) after each commit."""

    def __init__(self, inner: SqliteApplier) -> None:
        self.inner = inner
        self.commits: list[tuple[int, float]] = []

    def checkpoint(self) -> Checkpoint:
        return self.inner.checkpoint()

    def apply(
        self,
        batches: Sequence[Batch],
        offsets: Mapping[int, int] | None = None,
        writer: WriterId | None = None,
    ) -> None:
        self.inner.apply(batches, offsets, writer)
        if batches:
            self.commits.append((batches[-1].last_seq, now()))

    def close(self) -> None:
        self.inner.close()


class RecordingProducer:
    """An AIOKafkaProducer that remembers (partition, size) of every message sent,
    and (last seq, time) of every acknowledgement (from the publisher's seq header)."""

    def __init__(
        self,
        inner: AIOKafkaProducer,
        layout: list[tuple[int, int]],
        acks: list[tuple[int, float]],
    ) -> None:
        self._inner = inner
        self._layout = layout
        self._acks = acks

    async def send(self, topic: str, value: bytes, **kwargs: Any) -> Any:
        self._layout.append((int(kwargs.get("partition") or 0), len(value)))
        fut = await self._inner.send(topic, value, **kwargs)
        last_seq = _last_seq_of(kwargs.get("headers") or ())
        if last_seq is not None:
            acks = self._acks

            def acked(f: asyncio.Future[Any]) -> None:
                if not f.cancelled() and f.exception() is None:
                    acks.append((last_seq, now()))

            fut.add_done_callback(acked)
        return fut

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _last_seq_of(headers: Sequence[tuple[str, bytes]]) -> int | None:
    for name, value in headers:
        if name == SEQ_HEADER:
            return int(value.rpartition(b"-")[2])
    return None


async def writer_role(params: dict[str, Any], go: Gate) -> dict[str, Any]:
    from walship.producer.identity import WriterIdentity
    from walship.producer.loadgen import run_load
    from walship.producer.wal import FsyncPolicy, WalWriter
    from walship.producer.writer import WAL_DIR_NAME, Writer

    data_dir = Path(params["data_dir"])
    fsync = FsyncPolicy(params.get("fsync", "batch"))
    writer: Writer | WalWriter
    if params.get("writer_kind", "wal") == "state":
        writer = Writer(data_dir, fsync=fsync)
    else:
        # The append path an application embeds: the WAL alone (identity for the sidecar).
        await asyncio.to_thread(WriterIdentity.load_or_create, data_dir)
        writer = WalWriter(data_dir / WAL_DIR_NAME, fsync=fsync)
    await writer.start()
    try:
        timed = TimedAppender(writer)
        await go()
        start = now()
        result = await run_load(
            timed,
            entries=params["entries"],
            keys=params["keys"],
            value_bytes=VALUE_BYTES,
            txn_entries=TXN_ENTRIES,
            rate_per_s=params.get("rate_per_s"),
            seed=params.get("seed", 1),
            key_bytes=KEY_BYTES,
        )
        end = now()
        last_seq = writer.last_seq
    finally:
        await writer.stop()
    if params.get("returns_path"):
        save_json(params["returns_path"], timed.returns)
    return {"start": start, "end": end, "entries": result.entries, "last_seq": last_seq}


async def publisher_role(params: dict[str, Any], go: Gate) -> dict[str, Any]:
    from walship.producer.publisher import Publisher

    layout: list[tuple[int, int]] = []
    acks: list[tuple[int, float]] = []
    target: int = params["target_seq"]
    publisher = Publisher(
        Path(params["data_dir"]),
        topic=params["topic"],
        partitions=params["partitions"],
        producer_kwargs={"bootstrap_servers": params["bootstrap"]},
        producer_factory=lambda kw: RecordingProducer(AIOKafkaProducer(**kw), layout, acks),
    )
    await publisher.start()
    await go()
    start = now()
    run = asyncio.create_task(publisher.run())
    try:
        while publisher.acked_seq < target:
            if run.done():
                run.result()  # raises what stopped it
                raise RuntimeError("publisher stopped before publishing everything")
            await asyncio.sleep(_POLL_S)
        end = now()
    finally:
        await publisher.stop()
        await run
    if params.get("layout_path"):
        save_json(params["layout_path"], layout)
    if params.get("acks_path"):
        save_json(params["acks_path"], acks)
    return {
        "start": start,
        "end": end,
        "acked_seq": publisher.acked_seq,
        "messages": len(layout),
        "bytes": sum(n for _, n in layout),
        "retries": publisher.retries,
    }


async def reader_role(params: dict[str, Any], go: Gate) -> dict[str, Any]:
    from walship.consumer.reader import Reader

    applier = TimedApplier(SqliteApplier(Path(params["db_path"])))
    options: dict[str, Any] = {}
    if params.get("apply_linger_ms") is not None:
        options["apply_linger_ms"] = params["apply_linger_ms"]
    reader = Reader(
        applier,
        topic=params["topic"],
        reader_id=params["reader_id"],
        client_kwargs={"bootstrap_servers": params["bootstrap"], **params.get("client_extra", {})},
        **options,
    )
    await reader.start()
    try:
        await go()
        start = now()
        await reader.run(until_seq=params["target_seq"])
        end = now()
        status = reader.status()
    finally:
        await reader.stop()
        applier.close()
    if params.get("commits_path"):
        save_json(params["commits_path"], applier.commits)
    return {
        "start": start,
        "end": end,
        "applied_seq": status.applied_seq,
        "applied_entries": status.applied_entries,
        "duplicates": status.duplicates,
        "bootstraps": status.bootstraps,
    }


async def codec_role(params: dict[str, Any], go: Gate) -> dict[str, Any]:
    from walship.shared.cli.codec_bench import run_codec_bench

    await go()
    return run_codec_bench(params["entries"])
