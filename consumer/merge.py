"""Merge batches fetched from all partitions into one dense sequence (pure, no I/O).

The publisher spreads batches over partitions by sequence, and a resend after a
crash may cut batches differently, land on other partitions, or repeat what a
reader already holds. The merger turns whatever arrives, in whatever order,
into batches that are dense from ``applied_seq + 1``:

- a batch entirely at or below the applied sequence is a duplicate: dropped
  (and counted), after checking that it says the same thing as what was applied;
- a batch overlapping the applied sequence is trimmed with ``Batch.drop_through``;
- a batch starting beyond ``applied_seq + 1`` waits until the gap is filled;
- two batches saying different things about the same sequence are refused with
  ``SplitBrainError`` (a second writer): a batch at or below the applied
  sequence is compared, transaction by transaction, with the fingerprints of
  what was applied (see ``AppliedHistory``): different content, or different
  transaction boundaries, is a split brain;
- a batch of another stream (different ``stream_id``) is refused outright.

A writer restarted with a higher epoch continues the sequences: that is not a
split brain, and resends of the same entries under a new epoch are duplicates.
We compare content even when the epochs are equal because two processes
started from a copied data directory share stream id and epoch.

For acknowledgements, the merger tracks per partition the next offset that is
safe to commit: every message before it is applied or dropped. A batch
reassembled from parts spans several offsets (``first_offset..offset``), and
another writer's message may sit between its parts, so batches can be offered
with a ``first_offset`` below offsets already seen. Parts still held by the
reader's ``PartAssembler`` were never offered: the reader declares them with
``hold`` and the safe offset never passes the first of them (committing past
it would lose them on a restart, and the transaction with them).
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import itertools
import struct
from array import array
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from walship.shared.errors import SplitBrainError
from walship.shared.model import Batch, WriterId

# Rough per-entry overhead of a decoded entry (two bytes objects, list slots):
# the buffer limits are about memory, not payload bytes.
ENTRY_OVERHEAD_BYTES = 80
# The split-brain history keeps a 24-byte fingerprint per applied transaction
# (plus ~250 bytes per applied batch), not the entries: 1,000,000 sequences cost
# ~2.5 MB with 10-entry transactions; the transaction bound caps the worst case
# (1-entry transactions) at ~6 MB.
HISTORY_ENTRIES_MAX_DEFAULT = 1_000_000
HISTORY_TXNS_MAX_DEFAULT = 262_144
FINGERPRINT_BYTES = 16
_TXN_HEAD = struct.Struct(">qqI")


def batch_nbytes(batch: Batch) -> int:
    """Approximate memory a decoded batch holds."""
    return (
        sum(map(len, batch.keys))
        + sum(map(len, batch.values))
        + ENTRY_OVERHEAD_BYTES * batch.entry_count
    )


def describe_writer(writer: WriterId) -> str:
    return f"stream {writer.stream_id.hex()} epoch {writer.epoch}"


@dataclass(slots=True)
class _Item:
    partition: int
    first_offset: int
    offset: int
    batch: Batch
    nbytes: int
    done: bool = False


@dataclass(frozen=True, slots=True)
class Source:
    """Where an applied batch came from (for traces and error messages)."""

    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class Ready:
    """What ``take`` hands to the applier."""

    batches: list[Batch]
    sources: list[Source]  # parallel to ``batches``
    offsets: dict[int, int]  # partition -> next offset now safe to commit (changed ones only)

    @property
    def entry_count(self) -> int:
        return sum(b.entry_count for b in self.batches)


def transaction_fingerprints(batch: Batch) -> tuple[array[int], bytes]:
    """(first seq of each transaction, 16-byte blake2b of each, concatenated).

    A fingerprint covers the transaction's first seq, timestamp, ops, keys and
    values (lengths included, so no two different transactions share an input):
    equal fingerprints mean equal transactions, short of a 128-bit collision.
    """
    firsts: array[int] = array("q")
    out = bytearray()
    ops, keys, values = batch.ops, batch.keys, batch.values
    start = 0
    seq = batch.first_seq
    for size, ts in zip(batch.txn_sizes, batch.txn_timestamps_us, strict=True):
        end = start + size
        h = hashlib.blake2b(_TXN_HEAD.pack(seq, ts, size), digest_size=FINGERPRINT_BYTES)
        h.update(ops[start:end])
        k = keys[start:end]
        v = values[start:end]
        h.update(array("I", map(len, k)).tobytes())
        h.update(array("I", map(len, v)).tobytes())
        h.update(b"".join(k))
        h.update(b"".join(v))
        out += h.digest()
        firsts.append(seq)
        seq += size
        start = end
    return firsts, bytes(out)


@dataclass(frozen=True, slots=True)
class _Applied:
    """What the history keeps of one applied batch: fingerprints, not entries."""

    first_seq: int
    last_seq: int
    txn_firsts: array[int]
    fingerprints: bytes  # FINGERPRINT_BYTES per transaction, parallel to txn_firsts
    writer: WriterId
    source: Source

    def txn_at(self, first_seq: int) -> tuple[int, bytes] | None:
        """(last seq, fingerprint) of the transaction starting at ``first_seq``, or None
        when no transaction of this batch starts there."""
        i = bisect.bisect_left(self.txn_firsts, first_seq)
        if i == len(self.txn_firsts) or self.txn_firsts[i] != first_seq:
            return None
        last = self.txn_firsts[i + 1] - 1 if i + 1 < len(self.txn_firsts) else self.last_seq
        return last, self.fingerprints[i * FINGERPRINT_BYTES : (i + 1) * FINGERPRINT_BYTES]


@dataclass(slots=True)
class MergeStats:
    offered: int = 0
    emitted_batches: int = 0
    emitted_entries: int = 0
    duplicates: int = 0  # batches dropped entirely
    trimmed: int = 0  # batches partly dropped


class SequenceMerger:
    """Order batches from all partitions by sequence; see the module docstring."""

    def __init__(
        self,
        applied_seq: int,
        partitions: int,
        *,
        writer: WriterId | None = None,
        history_entries_max: int = HISTORY_ENTRIES_MAX_DEFAULT,
        history_txns_max: int = HISTORY_TXNS_MAX_DEFAULT,
    ) -> None:
        if applied_seq < 0:
            raise ValueError("applied_seq must be >= 0")
        if partitions < 1:
            raise ValueError("partitions must be >= 1")
        self._applied = applied_seq
        self._partitions = partitions
        self._writer = writer
        self._stream_id = writer.stream_id if writer is not None else None
        self._history_entries_max = history_entries_max
        self._history_txns_max = history_txns_max
        self._heap: list[tuple[int, int, _Item]] = []
        self._tiebreak = itertools.count()
        self._by_partition: dict[int, deque[_Item]] = {}
        self._next_offset_seen: dict[int, int] = {}
        self._committable: dict[int, int] = {}
        self._holds: dict[int, int] = {}
        self._buffered_bytes: dict[int, int] = {}
        self._history: deque[_Applied] = deque()
        self._history_entries = 0
        self._history_txns = 0
        self.stats = MergeStats()

    # --- state -------------------------------------------------------------

    @property
    def applied_seq(self) -> int:
        """The last sequence handed out by ``take`` (or given at construction)."""
        return self._applied

    @property
    def partitions(self) -> int:
        return self._partitions

    @property
    def writer(self) -> WriterId | None:
        """The writer of the last batch handed out (or the one given at construction)."""
        return self._writer

    @property
    def duplicates(self) -> int:
        return self.stats.duplicates

    def buffered_bytes(self, partition: int) -> int:
        return self._buffered_bytes.get(partition, 0)

    @property
    def buffered_bytes_total(self) -> int:
        return sum(self._buffered_bytes.values())

    @property
    def buffered_batches(self) -> int:
        return len(self._heap)

    def buffered_heads(self) -> dict[int, int]:
        """Per partition with batches buffered: the lowest first seq among them."""
        heads: dict[int, int] = {}
        for p, items in self._by_partition.items():
            firsts = [i.batch.first_seq for i in items if not i.done]
            if firsts:
                heads[p] = min(firsts)
        return heads

    def earliest_buffered_seq(self) -> int | None:
        return self._heap[0][0] if self._heap else None

    def earliest_buffered_timestamp_us(self) -> int | None:
        """Commit timestamp of the oldest buffered transaction (for lag in seconds)."""
        if not self._heap:
            return None
        stamps = self._heap[0][2].batch.txn_timestamps_us
        return stamps[0] if stamps else None

    def waiting_for(self) -> int | None:
        """The sequence needed next when data is buffered beyond a gap, else None."""
        if self._heap and self._heap[0][0] > self._applied + 1:
            return self._applied + 1
        return None

    def committable_offsets(self) -> dict[int, int]:
        """Per partition: every message before this offset is applied or dropped."""
        return {p: self._safe_offset(p) for p in self._next_offset_seen}

    # --- input -------------------------------------------------------------

    def offer(
        self,
        partition: int,
        offset: int,
        batch: Batch,
        *,
        first_offset: int | None = None,
        nbytes: int | None = None,
    ) -> None:
        """Add a whole batch (after ``PartAssembler``) read at ``partition``/``offset``.

        ``first_offset`` is the offset of its first part when it was reassembled
        from parts. Offsets of one partition must be offered in increasing order.
        """
        if not 0 <= partition < self._partitions:
            raise ValueError(f"partition {partition} out of range 0..{self._partitions - 1}")
        if batch.is_part:
            raise ValueError("offer whole batches: reassemble parts with PartAssembler first")
        if batch.entry_count == 0:
            raise ValueError(f"empty batch at partition {partition} offset {offset}")
        start = offset if first_offset is None else first_offset
        if start > offset:
            raise ValueError(f"first_offset {start} after offset {offset}")
        seen = self._next_offset_seen.get(partition)
        if seen is not None and offset < seen:
            raise ValueError(
                f"partition {partition}: offset {offset} offered after {seen - 1} (must increase)"
            )
        self._check_stream(batch, partition, offset)
        size = batch_nbytes(batch) if nbytes is None else nbytes
        item = _Item(partition, start, offset, batch, size)
        self._next_offset_seen[partition] = offset + 1
        _insert_by_first_offset(self._by_partition.setdefault(partition, deque()), item)
        self._buffered_bytes[partition] = self._buffered_bytes.get(partition, 0) + size
        heapq.heappush(self._heap, (batch.first_seq, next(self._tiebreak), item))
        self.stats.offered += 1

    def skip(self, partition: int, offset: int) -> None:
        """Record that the message at ``offset`` needs nothing applied (e.g. a stray part).

        It only lets the safe offset move past it once everything before is done.
        """
        seen = self._next_offset_seen.get(partition)
        if seen is not None and offset < seen:
            raise ValueError(f"partition {partition}: offset {offset} skipped after {seen - 1}")
        self._next_offset_seen[partition] = offset + 1

    def hold(self, partition: int, offset: int | None) -> None:
        """Messages from ``offset`` on are held outside the merger (the parts of a split
        transaction not complete yet): the safe offset stays at or below it. None releases.

        Takes effect with the next ``take``.
        """
        if offset is None:
            self._holds.pop(partition, None)
        else:
            self._holds[partition] = offset

    # --- output ------------------------------------------------------------

    def take_ready(self, max_entries: int) -> tuple[list[Batch], dict[int, int]]:
        """Batches dense from applied+1 (at most ``max_entries`` entries unless one batch
        alone is larger) and the partitions' next offsets that became safe to commit."""
        ready = self.take(max_entries)
        return ready.batches, ready.offsets

    def take(self, max_entries: int) -> Ready:
        batches: list[Batch] = []
        sources: list[Source] = []
        touched: set[int] = set()
        count = 0
        while self._heap:
            first_seq, _, item = self._heap[0]
            batch = item.batch
            if batch.last_seq <= self._applied:
                heapq.heappop(self._heap)
                self._check_history(item, batch.last_seq)
                self.stats.duplicates += 1
                self._finish(item, touched)
                continue
            if first_seq > self._applied + 1:
                break
            new_entries = batch.last_seq - self._applied
            if count and count + new_entries > max_entries:
                break
            heapq.heappop(self._heap)
            if first_seq <= self._applied:
                self._check_history(item, self._applied)
                batch = self._trim(item)
                self.stats.trimmed += 1
            self._finish(item, touched)
            source = Source(item.partition, item.offset)
            batches.append(batch)
            sources.append(source)
            count += batch.entry_count
            self._applied = batch.last_seq
            self._writer = batch.writer
            self._remember(batch, source)
        self.stats.emitted_batches += len(batches)
        self.stats.emitted_entries += count
        offsets: dict[int, int] = {}
        for p in touched | set(self._next_offset_seen):
            safe = self._safe_offset(p)
            if self._committable.get(p) != safe:
                self._committable[p] = safe
                offsets[p] = safe
        return Ready(batches, sources, offsets)

    # --- internals -----------------------------------------------------------

    def _safe_offset(self, partition: int) -> int:
        items = self._by_partition.get(partition)
        while items and items[0].done:
            items.popleft()
        safe = items[0].first_offset if items else self._next_offset_seen[partition]
        held = self._holds.get(partition)
        return safe if held is None else min(safe, held)

    def _finish(self, item: _Item, touched: set[int]) -> None:
        item.done = True
        self._buffered_bytes[item.partition] -= item.nbytes
        touched.add(item.partition)

    def _check_stream(self, batch: Batch, partition: int, offset: int) -> None:
        if self._stream_id is None:
            self._stream_id = batch.writer.stream_id
            return
        if batch.writer.stream_id != self._stream_id:
            raise SplitBrainError(
                "a batch of another stream is on the topic; refusing to merge two streams",
                expected_stream=self._stream_id.hex(),
                found=describe_writer(batch.writer),
                partition=partition,
                offset=offset,
                first_seq=batch.first_seq,
            )

    def _trim(self, item: _Item) -> Batch:
        try:
            return item.batch.drop_through(self._applied)
        except ValueError as exc:
            # Transaction boundaries are fixed by the writer's WAL: a batch whose
            # boundaries disagree with what was applied was written by someone else.
            other = self._history_at(self._applied)
            raise SplitBrainError(
                "two batches disagree on transaction boundaries at the same sequence",
                seq=self._applied,
                batch=f"{describe_writer(item.batch.writer)} at partition "
                f"{item.partition} offset {item.offset}",
                other=self._describe_applied(other),
            ) from exc

    def _remember(self, batch: Batch, source: Source) -> None:
        firsts, fingerprints = transaction_fingerprints(batch)
        self._history.append(
            _Applied(batch.first_seq, batch.last_seq, firsts, fingerprints, batch.writer, source)
        )
        self._history_entries += batch.entry_count
        self._history_txns += len(firsts)
        while self._history and (
            self._history_entries > self._history_entries_max
            or self._history_txns > self._history_txns_max
        ):
            old = self._history.popleft()
            self._history_entries -= old.last_seq - old.first_seq + 1
            self._history_txns -= len(old.txn_firsts)

    def _history_at(self, seq: int) -> _Applied | None:
        for applied in reversed(self._history):
            if applied.first_seq <= seq <= applied.last_seq:
                return applied
            if applied.last_seq < seq:
                break
        return None

    @staticmethod
    def _describe_applied(applied: _Applied | None) -> str:
        if applied is None:
            return "no longer in memory"
        return (
            f"{describe_writer(applied.writer)} at partition "
            f"{applied.source.partition} offset {applied.source.offset}"
        )

    def _check_history(self, item: _Item, through: int) -> None:
        """Compare ``item.batch``'s transactions ending at or before ``through`` with the
        fingerprints of what was applied. Transaction boundaries are fixed by the
        writer's WAL, so a transaction of it that does not start and end where an
        applied one does was written by someone else. A transaction crossing
        ``through`` is ``_trim``'s to refuse; one older than the history is not
        compared (nothing is left to compare it with)."""
        batch = item.batch
        if not self._history or batch.first_seq > self._history[-1].last_seq:
            return
        oldest = self._history[0].first_seq
        firsts, fingerprints = transaction_fingerprints(batch)
        for i, first in enumerate(firsts):
            last = firsts[i + 1] - 1 if i + 1 < len(firsts) else batch.last_seq
            if last > through:
                break
            if first < oldest:
                continue
            applied = self._history_at(first)
            if applied is None:
                continue
            mine = fingerprints[i * FINGERPRINT_BYTES : (i + 1) * FINGERPRINT_BYTES]
            theirs = applied.txn_at(first)
            where = (
                f"{describe_writer(batch.writer)} at partition {item.partition} "
                f"offset {item.offset}"
            )
            if theirs is None or theirs[0] != last:
                raise SplitBrainError(
                    "two batches disagree on transaction boundaries at the same sequence",
                    seqs=f"{first}..{last}",
                    batch=where,
                    other=self._describe_applied(applied),
                )
            if theirs[1] != mine:
                raise SplitBrainError(
                    "two different batches claim the same sequences",
                    seqs=f"{first}..{last}",
                    batch=where,
                    other=self._describe_applied(applied),
                )


def _insert_by_first_offset(items: deque[_Item], item: _Item) -> None:
    """Keep a partition's items ordered by first offset (the safe offset is the first
    undone one's). Out of order only when a reassembled transaction's first part came
    before another writer's message: rare, so a linear search from the right."""
    i = len(items)
    while i and items[i - 1].first_offset > item.first_offset:
        i -= 1
    items.insert(i, item)


def retention_gap(
    *,
    applied_seq: int,
    next_offsets: Mapping[int, int],
    log_start_offsets: Mapping[int, int],
    log_end_offsets: Mapping[int, int],
    first_seq_at_log_start: Mapping[int, int | None],
) -> str | None:
    """Why the log can no longer fill the reader's gap, or None if it still may.

    Decide only after the reader has fetched every partition to its end and the
    gap persisted for the gap timeout. Expired when a partition's log start is
    beyond the next offset the reader needs from it, or when every partition
    still holds messages and the earliest sequence left is beyond applied + 1
    (an empty partition may still receive the missing sequence).
    """
    for p in sorted(log_start_offsets):
        need = next_offsets.get(p, 0)
        start = log_start_offsets[p]
        if start > need:
            return (
                f"partition {p} log starts at offset {start} but the replica needs "
                f"offset {need} (seqs from {applied_seq + 1} were deleted by retention)"
            )
    firsts: list[int] = []
    for p in sorted(log_start_offsets):
        if log_end_offsets.get(p, 0) <= log_start_offsets[p]:
            return None
        first = first_seq_at_log_start.get(p)
        if first is None:
            return None
        firsts.append(first)
    if firsts and min(firsts) > applied_seq + 1:
        return (
            f"the earliest sequence left on the topic is {min(firsts)} but the replica "
            f"needs {applied_seq + 1} (seqs {applied_seq + 1}..{min(firsts) - 1} are gone)"
        )
    return None
