"""Pure publishing logic: batching, acknowledgement ordering and backoff (no I/O).

The publisher keeps many sends in flight; Kafka acknowledges them per
partition, so acknowledgements can complete out of order across partitions.
:class:`AckTracker` turns that into the one number that matters for the WAL:
the last sequence below which *everything* was acknowledged, always on a
transaction boundary (a resend after a crash starts at a transaction).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from walship.shared.model import Transaction

# Per-entry framing estimate (op, two length prefixes) on top of key + value.
ENTRY_OVERHEAD_BYTES = 8


def txn_size_bytes(txn: Transaction) -> int:
    """Approximate uncompressed size of a transaction in a batch body."""
    keys = txn.keys
    return sum(map(len, keys)) + sum(map(len, txn.values)) + ENTRY_OVERHEAD_BYTES * len(keys)


@dataclass
class PendingBatch:
    """Whole, dense transactions waiting to be encoded and sent together."""

    txns: list[Transaction] = field(default_factory=list)
    traceparents: list[str | None] = field(default_factory=list)
    size_bytes: int = 0
    started_ms: float = 0.0

    @property
    def first_seq(self) -> int:
        return self.txns[0].first_seq

    @property
    def last_seq(self) -> int:
        return self.txns[-1].last_seq

    @property
    def entry_count(self) -> int:
        return sum(len(t) for t in self.txns)

    @property
    def traceparent(self) -> str | None:
        """The trace context the batch's span continues: the first one present."""
        return next((tp for tp in self.traceparents if tp), None)


class BatchAccumulator:
    """Collects transactions until ``batch_bytes_max`` or ``linger_ms`` is reached.

    A batch holds whole transactions only; one transaction larger than the
    budget forms a batch alone (the encoder splits it into parts).
    """

    def __init__(self, *, batch_bytes_max: int, linger_ms: float) -> None:
        if batch_bytes_max < 1:
            raise ValueError("batch_bytes_max must be >= 1")
        if linger_ms < 0:
            raise ValueError("linger_ms must be >= 0")
        self.batch_bytes_max = batch_bytes_max
        self.linger_ms = linger_ms
        self._pending = PendingBatch()
        self._next_seq: int | None = None

    @property
    def empty(self) -> bool:
        return not self._pending.txns

    @property
    def size_bytes(self) -> int:
        return self._pending.size_bytes

    @property
    def room_bytes(self) -> int:
        """How many more bytes fit before the batch is full (at least 1)."""
        return max(1, self.batch_bytes_max - self._pending.size_bytes)

    def fits(self, txn: Transaction) -> bool:
        """Whether ``txn`` can join the current batch without overflowing it."""
        return self.empty or self._pending.size_bytes + txn_size_bytes(txn) <= self.batch_bytes_max

    def add(self, txn: Transaction, traceparent: str | None, now_ms: float) -> None:
        if self._next_seq is not None and txn.first_seq != self._next_seq:
            raise ValueError(
                f"transactions must be dense: expected seq {self._next_seq}, got {txn.first_seq}"
            )
        size = txn_size_bytes(txn)
        if not (self.empty or self._pending.size_bytes + size <= self.batch_bytes_max):
            raise ValueError("transaction does not fit; take() the batch first")
        if self.empty:
            self._pending.started_ms = now_ms
        self._pending.txns.append(txn)
        self._pending.traceparents.append(traceparent)
        self._pending.size_bytes += size
        self._next_seq = txn.last_seq + 1

    def full(self) -> bool:
        return self._pending.size_bytes >= self.batch_bytes_max

    def due_ms(self) -> float | None:
        """When the linger time of the current batch ends (None when empty)."""
        if self.empty:
            return None
        return self._pending.started_ms + self.linger_ms

    def ready(self, now_ms: float) -> bool:
        due = self.due_ms()
        return due is not None and (self.full() or now_ms >= due)

    def take(self) -> PendingBatch:
        batch, self._pending = self._pending, PendingBatch()
        return batch

    def reset(self, next_seq: int | None = None) -> None:
        """Drop the pending batch (after a producer restart)."""
        self._pending = PendingBatch()
        self._next_seq = next_seq


@dataclass
class _Sent:
    first_seq: int
    last_seq: int
    partition: int
    ends_txn: bool
    offset: int | None = None


class AckTracker:
    """Orders out-of-order acknowledgements into a contiguous published prefix.

    Messages are registered in sequence order with :meth:`sent`, which returns
    a message id; acknowledgements (:meth:`acked`) may arrive in any order.
    :attr:`acked_seq` only moves over a prefix of acknowledged messages and
    only to the end of a transaction; :attr:`offsets` then holds, per
    partition, the offset after the last acknowledged message of that prefix
    (or a partition's end offset, see :meth:`caught_up_at`).

    Registered messages are dense: each starts right after the previous one,
    or, within a transaction split into parts, at the previous one's last
    sequence (a value too large for one message continues in the next part).
    """

    def __init__(self, acked_seq: int = 0, offsets: Mapping[int, int] | None = None) -> None:
        self._acked_seq = acked_seq
        self._offsets: dict[int, int] = dict(offsets or {})
        self._queue: deque[_Sent] = deque()
        self._by_id: dict[int, _Sent] = {}
        self._first_id = 0  # id of self._queue[0]
        self._sent_seq = acked_seq
        self._open_txn = False  # the last registered message did not end its transaction
        self._sent_count = 0

    @property
    def acked_seq(self) -> int:
        return self._acked_seq

    @property
    def offsets(self) -> dict[int, int]:
        return dict(self._offsets)

    @property
    def sent_seq(self) -> int:
        """The last sequence handed to Kafka (acknowledged or not)."""
        return self._sent_seq

    @property
    def sent_count(self) -> int:
        """How many messages were ever registered with :meth:`sent`."""
        return self._sent_count

    @property
    def in_flight(self) -> int:
        """Messages registered and not yet part of the published prefix."""
        return len(self._queue)

    def sent(self, first_seq: int, last_seq: int, partition: int, *, ends_txn: bool) -> int:
        """Register the next message; returns its id for :meth:`acked`."""
        dense = first_seq == self._sent_seq + 1 or (self._open_txn and first_seq == self._sent_seq)
        if not dense:
            raise ValueError(
                f"sends must be dense: expected seq {self._sent_seq + 1}, got {first_seq}"
            )
        if last_seq < first_seq:
            raise ValueError(f"empty message {first_seq}..{last_seq}")
        item = _Sent(first_seq, last_seq, partition, ends_txn)
        msg_id = self._first_id + len(self._queue)
        self._queue.append(item)
        self._by_id[msg_id] = item
        self._sent_seq = last_seq
        self._open_txn = not ends_txn
        self._sent_count += 1
        return msg_id

    def acked(self, msg_id: int, offset: int) -> bool:
        """Record Kafka's offset for message ``msg_id``; returns whether acked_seq moved."""
        item = self._by_id.get(msg_id)
        if item is None:
            raise KeyError(f"no message {msg_id} in flight")
        item.offset = offset
        return self._advance()

    def _advance(self) -> bool:
        # The longest acknowledged prefix, cut back to its last transaction end.
        cut = 0
        for i, item in enumerate(self._queue):
            if item.offset is None:
                break
            if item.ends_txn:
                cut = i + 1
        if cut == 0:
            return False
        for _ in range(cut):
            item = self._queue.popleft()
            del self._by_id[self._first_id]
            self._first_id += 1
            assert item.offset is not None
            self._offsets[item.partition] = max(
                item.offset + 1, self._offsets.get(item.partition, 0)
            )
            self._acked_seq = item.last_seq
        return True

    def caught_up(self, wal_last_seq: int) -> bool:
        """Nothing in flight and everything durable in the WAL acknowledged."""
        return not self._queue and self._sent_seq == self._acked_seq >= wal_last_seq

    def caught_up_at(
        self, end_offsets: Mapping[int, int], *, wal_last_seq: int, sent_count: int
    ) -> bool:
        """Move :attr:`offsets` up to the partitions' ``end_offsets`` read while caught up.

        Offsets otherwise move only when a message of the acknowledged prefix
        lands on a partition. Messages a crashed session left there (sent, never
        acknowledged as a prefix, then resent elsewhere) sit past them, and on an
        idle stream retention eventually deletes past the recorded offset: no
        snapshot carrying it connects with the log any more, although nothing a
        reader needs is missing.

        Safe because, with one publisher per WAL and nothing in flight, every
        message on the topic holds sequences <= ``acked_seq``: this session sent
        nothing beyond it, and earlier sessions sent only what was durable then,
        which is <= ``wal_last_seq`` <= ``acked_seq``. Later sequences can only
        land at or after these end offsets, which is all the offsets promise.

        ``end_offsets`` must have been read after the caller saw this tracker
        caught up (``wal_last_seq`` and :attr:`sent_count` read then); if anything
        was sent since, even if acknowledged or forgotten by :meth:`reset`, they
        may cover sequences beyond the prefix and are ignored. Returns whether an
        offset moved.
        """
        if sent_count != self._sent_count or not self.caught_up(wal_last_seq):
            return False
        moved = False
        for p, end in end_offsets.items():
            if end > self._offsets.get(p, 0):
                self._offsets[p] = end
                moved = True
        return moved

    def reset(self) -> int:
        """Forget everything in flight (the producer is gone); return the seq to resend from."""
        self._first_id += len(self._queue)
        self._queue.clear()
        self._by_id.clear()
        self._sent_seq = self._acked_seq
        self._open_txn = False
        return self._acked_seq + 1


def message_ends(txns: Sequence[Transaction]) -> frozenset[int]:
    """The last sequences of ``txns``: a message ending on one ends a transaction."""
    return frozenset(t.last_seq for t in txns)


class Backoff:
    """Exponential backoff with jitter (50-100% of the step), capped; :meth:`reset` after a success."""

    def __init__(
        self, *, base_ms: float = 100, max_ms: float = 10_000, rng: random.Random | None = None
    ) -> None:
        if base_ms <= 0 or max_ms < base_ms:
            raise ValueError("need 0 < base_ms <= max_ms")
        self.base_ms = base_ms
        self.max_ms = max_ms
        self.attempts = 0
        self._rng = rng or random.Random()

    def next_delay_s(self) -> float:
        ceiling = min(self.max_ms, self.base_ms * (2.0**self.attempts))
        self.attempts += 1
        # Never below half the ceiling, so a retry storm still spreads out.
        return (ceiling / 2 + self._rng.random() * ceiling / 2) / 1000

    def reset(self) -> None:
        self.attempts = 0
