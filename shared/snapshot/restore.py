"""Point-in-time restore: a replica as of sequence S or time T.

The plan: the newest snapshot at or before the target (by sequence, or by the
commit time of its sequence), then the log from the snapshot's offsets, merged
by sequence exactly like a reader does, applied up to S (or up to the last
transaction committed at or before T) and not one entry further. The result is
built in ``<out>.restore`` and renamed over ``<out>`` only when complete.

When the log cannot supply the sequences between the snapshot and the target,
the error names them (and the partitions/offsets), instead of a cryptic EOF.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from walship.consumer.bootstrap import Bootstrapper, LogInspector, LogView, swap_database
from walship.consumer.merge import SequenceMerger
from walship.shared.codec import Decoder, PartAssembler
from walship.shared.crypto import Keyring
from walship.shared.dictionaries import learn_dictionaries
from walship.shared.errors import ConfigError, DecodeError, SnapshotError, SnapshotNotFoundError
from walship.shared.model import Batch
from walship.shared.snapshot.base import SnapshotStore
from walship.shared.snapshot.format import Manifest, missing_partitions, newest_first
from walship.shared.snapshot.progress import NullProgress, Progress, make_progress
from walship.shared.store import Digest, ReplicaStore

log = logging.getLogger(__name__)

APPLY_ENTRIES_MAX = 50_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class RestoreError(SnapshotError):
    """The restore cannot reach its target (the log lacks sequences, bad target...)."""


def parse_time_us(value: str) -> int:
    """ISO 8601 (naive = UTC) or epoch seconds (int or float) -> epoch microseconds."""
    text = value.strip()
    try:
        # Decimal: a float would round 1700000000.123456 to the wrong microsecond.
        return int(Decimal(text) * 1_000_000)
    except InvalidOperation:
        pass
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigError(
            "--to-time must be ISO 8601 (2024-05-01T12:00:00Z) or epoch seconds", value=value
        ) from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - _EPOCH) // timedelta(microseconds=1)


@dataclass(frozen=True)
class RestoreTarget:
    to_seq: int | None = None
    to_time_us: int | None = None

    def __post_init__(self) -> None:
        if (self.to_seq is None) == (self.to_time_us is None):
            raise ConfigError("give exactly one of --to-seq and --to-time")
        if self.to_seq is not None and self.to_seq < 0:
            raise ConfigError("--to-seq must be >= 0", to_seq=self.to_seq)

    def describe(self) -> str:
        if self.to_seq is not None:
            return f"seq {self.to_seq}"
        assert self.to_time_us is not None
        when = datetime.fromtimestamp(self.to_time_us / 1e6, tz=UTC).isoformat()
        return f"time {when} ({self.to_time_us} us)"


def choose_base(
    manifests: Sequence[Manifest], target: RestoreTarget, *, topic: str
) -> Manifest | None:
    """Pure: the newest snapshot of ``topic`` at or before the target."""
    for m in newest_first(manifests):
        if m.topic != topic:
            continue
        if target.to_seq is not None and m.seq <= target.to_seq:
            return m
        if target.to_time_us is not None and m.time_upper_bound_us <= target.to_time_us:
            return m
    return None


def cut_batch(batch: Batch, target: RestoreTarget) -> tuple[Batch | None, bool]:
    """Pure: the prefix of ``batch`` within the target, and whether the target is reached.

    Whole transactions only: a ``to_seq`` inside a transaction is refused, since
    no writer state ever existed there.
    """
    keep = 0  # entries kept
    txns = 0
    reached = False
    start = batch.first_seq
    for size, ts in zip(batch.txn_sizes, batch.txn_timestamps_us, strict=True):
        last = start + size - 1
        if target.to_seq is not None and last > target.to_seq:
            if start <= target.to_seq:
                raise RestoreError(
                    f"seq {target.to_seq} falls inside transaction {start}..{last}; "
                    f"restore to {start - 1} or {last}",
                    to_seq=target.to_seq,
                )
            reached = True
            break
        if target.to_time_us is not None and ts > target.to_time_us:
            reached = True
            break
        keep += size
        txns += 1
        start = last + 1
        if target.to_seq is not None and last == target.to_seq:
            reached = True
            break
    if keep == batch.entry_count:
        return batch, reached
    if keep == 0:
        return None, True
    return (
        Batch(
            writer=batch.writer,
            first_seq=batch.first_seq,
            ops=batch.ops[:keep],
            keys=batch.keys[:keep],
            values=batch.values[:keep],
            txn_sizes=batch.txn_sizes[:txns],
            txn_timestamps_us=batch.txn_timestamps_us[:txns],
            traceparent=batch.traceparent,
        ),
        True,
    )


@dataclass(frozen=True)
class RestorePlan:
    topic: str
    target: RestoreTarget
    snapshot: Manifest | None  # None: replay from the very beginning of the log
    start_offsets: Mapping[int, int]
    log_view: LogView

    @property
    def base_seq(self) -> int:
        return self.snapshot.seq if self.snapshot is not None else 0

    def describe(self) -> list[str]:
        lines = [f"target: {self.target.describe()} on topic {self.topic}"]
        if self.snapshot is not None:
            m = self.snapshot
            lines.append(
                f"snapshot: {m.snapshot_id} (seq {m.seq}, {m.keys} keys, {m.total_bytes} bytes, "
                f"{len(m.chunks)} chunks)"
            )
        else:
            lines.append("snapshot: none (the log is complete: replay from seq 1)")
        if self.target.to_seq is not None:
            n = self.target.to_seq - self.base_seq
            lines.append(
                f"replay: seqs {self.base_seq + 1}..{self.target.to_seq} ({n} entries)"
                if n
                else "replay: nothing (the snapshot is exactly at the target)"
            )
        else:
            lines.append(f"replay: from seq {self.base_seq + 1} up to the target time")
        parts = ", ".join(
            f"p{p}: {o}..{self.log_view.log_end.get(p, 0)}"
            for p, o in sorted(self.start_offsets.items())
        )
        lines.append(f"partitions (from offset..log end): {parts}")
        return lines


async def plan_restore(
    snapshot_store: SnapshotStore, *, topic: str, target: RestoreTarget, inspect_log: LogInspector
) -> RestorePlan:
    """Choose the snapshot and the log range; RestoreError naming what is missing."""
    log_view = await inspect_log()
    base = choose_base(await snapshot_store.list_manifests(), target, topic=topic)
    if base is None:
        if not log_view.complete:
            earliest = log_view.earliest_seq()
            raise RestoreError(
                f"no snapshot at or before {target.describe()} and the log no longer starts "
                f"at seq 1 (earliest left: {earliest}); seqs 1..{(earliest or 1) - 1} cannot be "
                "recovered from this store and topic",
                topic=topic,
                snapshot_store=snapshot_store.url,
            )
        return RestorePlan(
            topic, target, None, dict.fromkeys(range(log_view.partitions), 0), log_view
        )
    if base.partitions != log_view.partitions:
        raise RestoreError(
            f"snapshot {base.snapshot_id} was made for {base.partitions} partitions, the topic "
            f"has {log_view.partitions}",
            topic=topic,
        )
    needs_log = target.to_seq is None or target.to_seq > base.seq
    gaps = missing_partitions(base, log_view.log_start) if needs_log else {}
    if gaps:
        earliest = log_view.earliest_seq()
        upto = target.to_seq if target.to_seq is not None else "the target"
        seqs = (
            f"seqs {base.seq + 1}..{min(earliest - 1, target.to_seq or earliest - 1)}"
            if earliest is not None and earliest > base.seq + 1
            else f"messages after seq {base.seq}"
        )
        where = ", ".join(
            f"partition {p} from offset {o} (log starts at {s})"
            for p, (o, s) in sorted(gaps.items())
        )
        raise RestoreError(
            f"the log cannot supply {seqs} needed to go from snapshot {base.snapshot_id} "
            f"(seq {base.seq}) to {upto}: retention deleted {where}",
            topic=topic,
        )
    offsets = {p: base.offsets.get(p, 0) for p in range(base.partitions)}
    return RestorePlan(topic, target, base, offsets, log_view)


async def restore(
    plan: RestorePlan,
    out: Path,
    *,
    snapshot_store: SnapshotStore,
    client_kwargs: Mapping[str, Any],
    force: bool = False,
    decoder: Decoder | None = None,
    progress: Progress | None = None,
    fetch_timeout_ms: int = 10_000,
    keyring: Keyring | None = None,
) -> Digest:
    """Execute ``plan`` into ``out``; returns the digest of the restored replica.

    ``keyring`` decrypts encrypted snapshot chunks and, when no ``decoder`` is
    given, encrypted messages."""
    out = Path(out)
    if out.exists() and not force:
        raise ConfigError(f"{out} exists; pass --force to overwrite it", path=str(out))
    work = out.with_name(out.name + ".restore")
    for stale in (work, out.with_name(work.name + "-wal"), out.with_name(work.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    if plan.snapshot is not None:
        loader = Bootstrapper(
            work,
            snapshot_store,
            topic=plan.topic,
            inspect_log=_fixed(plan.log_view),
            progress=lambda _: make_progress("restore: snapshot"),
            keyring=keyring,
        )
        await loader.load(plan.snapshot)
    store = ReplicaStore(work)
    try:
        if plan.target.to_seq is None or plan.target.to_seq > plan.base_seq:
            await _replay(
                plan,
                store,
                client_kwargs,
                decoder or Decoder(keyring=keyring),
                progress,
                fetch_timeout_ms,
            )
        digest = store.digest()
    finally:
        store.close()
    await asyncio.to_thread(swap_database, work, out)
    log.info("restored %s to seq %d (%d keys)", out, digest.seq, digest.keys)
    return digest


def _fixed(view: LogView) -> LogInspector:
    async def inspect() -> LogView:
        return view

    return inspect


async def _replay(
    plan: RestorePlan,
    store: ReplicaStore,
    client_kwargs: Mapping[str, Any],
    decoder: Decoder,
    progress: Progress | None,
    fetch_timeout_ms: int,
) -> None:
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from walship.shared.kafka import kafka_errors

    target = plan.target
    progress = progress or NullProgress("restore: replay")
    total = target.to_seq - plan.base_seq if target.to_seq is not None else None
    progress.start(None, total)
    cp = store.checkpoint()
    merger = SequenceMerger(cp.applied_seq, plan.log_view.partitions, writer=cp.writer)
    assemblers = {p: PartAssembler() for p in range(plan.log_view.partitions)}
    end = {p: plan.log_view.log_end.get(p, 0) for p in range(plan.log_view.partitions)}
    position = dict(plan.start_offsets)
    reached = target.to_seq is not None and cp.applied_seq >= target.to_seq
    async with kafka_errors("replaying the log", topic=plan.topic):
        consumer = AIOKafkaConsumer(
            **client_kwargs, enable_auto_commit=False, auto_offset_reset="none"
        )
        await consumer.start()
        try:
            tps = {p: TopicPartition(plan.topic, p) for p in end if position[p] < end[p]}
            consumer.assign(list(tps.values()))
            for p, tp in tps.items():
                consumer.seek(tp, position[p])
            while not reached and any(position[p] < end[p] for p in tps):
                fetched = await consumer.getmany(timeout_ms=fetch_timeout_ms, max_records=5000)
                if not fetched:
                    raise RestoreError(
                        "the log stopped delivering before its end offsets",
                        topic=plan.topic,
                        positions=dict(position),
                        end_offsets=end,
                    )
                for tp, records in fetched.items():
                    p = tp.partition
                    await learn_dictionaries(
                        decoder, (r.value for r in records), client_kwargs, plan.topic
                    )
                    for r in records:
                        if r.offset >= end[p]:
                            break
                        position[p] = r.offset + 1
                        try:
                            batch = decoder.decode(r.value)
                        except DecodeError as exc:
                            raise RestoreError(
                                f"undecodable message in the log: {exc.message}",
                                topic=plan.topic,
                                partition=p,
                                offset=r.offset,
                            ) from exc
                        assembled = assemblers[p].add(batch, r.offset)
                        if assembled is not None:
                            merger.offer(
                                p, r.offset, assembled.batch, first_offset=assembled.first_offset
                            )
                batches, offsets = merger.take_ready(APPLY_ENTRIES_MAX)
                reached = _apply_until(store, batches, offsets, target, progress)
        finally:
            await consumer.stop()
    progress.finish()
    applied = store.checkpoint().applied_seq
    if target.to_seq is not None and applied < target.to_seq:
        waiting = merger.waiting_for()
        raise RestoreError(
            f"the log ends before seq {target.to_seq}: restored up to seq {applied}, "
            f"seqs {applied + 1}..{target.to_seq} are not in the log"
            + (f" (next buffered seq after the gap: {waiting})" if waiting else ""),
            topic=plan.topic,
            end_offsets=end,
        )
    if not reached:
        log.info(
            "the log ends before %s: restored the latest state, seq %d", target.describe(), applied
        )


def _apply_until(
    store: ReplicaStore,
    batches: list[Batch],
    offsets: Mapping[int, int],
    target: RestoreTarget,
    progress: Progress,
) -> bool:
    """Apply ``batches`` up to the target; True once it is reached."""
    kept: list[Batch] = []
    reached = False
    for b in batches:
        prefix, reached = cut_batch(b, target)
        if prefix is not None:
            kept.append(prefix)
        if reached:
            break
    if kept:
        # Offsets only when nothing was cut: a cut message must be read again by
        # whoever continues from this replica (readers drop the duplicates).
        store.apply(kept, offsets=None if reached else offsets, writer=kept[-1].writer)
        progress.advance(done_bytes=0, keys=sum(b.entry_count for b in kept))
    return reached


async def find_snapshot(snapshot_store: SnapshotStore, snapshot_id: str | None) -> Manifest:
    """The named snapshot, or the newest one."""
    if snapshot_id:
        return await snapshot_store.get_manifest(snapshot_id)
    manifests = await snapshot_store.list_manifests()
    if not manifests:
        raise SnapshotNotFoundError(
            "the snapshot store holds no snapshots", store=snapshot_store.url
        )
    return manifests[0]
