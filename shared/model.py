"""The data model: entries, transactions and batches.

Every entry has a sequence number; sequences are dense per stream (1, 2, 3...).
A transaction is a run of entries applied atomically; all its entries share
the transaction's commit timestamp. A batch is a run of whole transactions with
dense sequences ``first_seq..last_seq``, stored column-wise (parallel arrays),
because building and walking a few large lists is far cheaper in Python than
one object per entry. A batch can also be one *part* of a transaction too large
for a single Kafka message (``part_count > 1``); parts are reassembled before
anything is applied.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum

STREAM_ID_BYTES = 16


class Op(IntEnum):
    PUT = 0
    DELETE = 1


@dataclass(frozen=True, slots=True)
class Entry:
    seq: int
    op: Op
    key: bytes
    value: bytes  # b"" for deletes
    timestamp_us: int


@dataclass(frozen=True, slots=True)
class WriterId:
    """Who wrote a batch: the stream and the writer's epoch (bumped per start)."""

    stream_id: bytes  # 16 bytes, random, fixed for the life of the stream
    epoch: int  # 1, 2, 3... one per writer start

    def __post_init__(self) -> None:
        if len(self.stream_id) != STREAM_ID_BYTES:
            raise ValueError(f"stream_id must be {STREAM_ID_BYTES} bytes")
        if not 0 <= self.epoch < 2**32:
            raise ValueError("epoch must fit in 32 bits")


@dataclass(frozen=True, slots=True)
class Transaction:
    """Entries applied atomically, column-wise. ``values[i]`` is b"" for deletes."""

    first_seq: int
    ops: bytes  # one byte per entry: Op values
    keys: Sequence[bytes]
    values: Sequence[bytes]
    timestamp_us: int

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.keys) - 1

    def __len__(self) -> int:
        return len(self.keys)

    def entries(self) -> Iterator[Entry]:
        ts = self.timestamp_us
        for i, (op, key, value) in enumerate(zip(self.ops, self.keys, self.values, strict=True)):
            yield Entry(self.first_seq + i, Op(op), key, value, ts)

    @classmethod
    def of(
        cls, first_seq: int, ops_keys_values: Sequence[tuple[Op, bytes, bytes]], timestamp_us: int
    ) -> Transaction:
        """Build from (op, key, value) triples; handy in tests and small writers."""
        return cls(
            first_seq=first_seq,
            ops=bytes(op for op, _, _ in ops_keys_values),
            keys=[k for _, k, _ in ops_keys_values],
            values=[v for _, _, v in ops_keys_values],
            timestamp_us=timestamp_us,
        )


@dataclass(frozen=True, slots=True)
class Batch:
    """A run of whole transactions (or one part of one transaction), column-wise.

    ``txn_sizes[i]`` entries of transaction i follow those of transaction i-1;
    ``sum(txn_sizes) == len(keys)``. For a part (``part_count > 1``) there is
    exactly one (partial) transaction.
    """

    writer: WriterId
    first_seq: int
    ops: bytes
    keys: Sequence[bytes]
    values: Sequence[bytes]
    txn_sizes: Sequence[int]
    txn_timestamps_us: Sequence[int]
    part_index: int = 0
    part_count: int = 1
    # Optional W3C trace context of the writer's append, carried to readers.
    traceparent: str | None = field(default=None, compare=False)

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.keys) - 1

    @property
    def entry_count(self) -> int:
        return len(self.keys)

    @property
    def is_part(self) -> bool:
        return self.part_count > 1

    def transactions(self) -> Iterator[Transaction]:
        start = 0
        for size, ts in zip(self.txn_sizes, self.txn_timestamps_us, strict=True):
            end = start + size
            yield Transaction(
                first_seq=self.first_seq + start,
                ops=self.ops[start:end],
                keys=self.keys[start:end],
                values=self.values[start:end],
                timestamp_us=ts,
            )
            start = end

    def drop_through(self, seq: int) -> Batch:
        """The same batch without the transactions whose last sequence is <= ``seq``.

        Transaction boundaries are fixed by the WAL, so a replica's applied
        sequence always falls on one; a ``seq`` inside a transaction is a bug.
        """
        if seq < self.first_seq:
            return self
        if self.is_part:
            raise ValueError("drop_through applies to whole transactions, not parts")
        start = 0
        txn = 0
        while txn < len(self.txn_sizes) and self.first_seq + start + self.txn_sizes[txn] - 1 <= seq:
            start += self.txn_sizes[txn]
            txn += 1
        if self.first_seq + start != seq + 1 and txn < len(self.txn_sizes):
            raise ValueError(
                f"seq {seq} falls inside a transaction of batch {self.first_seq}..{self.last_seq}"
            )
        return Batch(
            writer=self.writer,
            first_seq=self.first_seq + start,
            ops=self.ops[start:],
            keys=self.keys[start:],
            values=self.values[start:],
            txn_sizes=self.txn_sizes[txn:],
            txn_timestamps_us=self.txn_timestamps_us[txn:],
            traceparent=self.traceparent,
        )

    @classmethod
    def from_transactions(cls, writer: WriterId, txns: Sequence[Transaction]) -> Batch:
        """Concatenate dense, whole transactions into one batch."""
        if not txns:
            raise ValueError("a batch needs at least one transaction")
        keys: list[bytes] = []
        values: list[bytes] = []
        ops = bytearray()
        expected = txns[0].first_seq
        for t in txns:
            if t.first_seq != expected:
                raise ValueError(
                    f"transactions not dense: expected seq {expected}, got {t.first_seq}"
                )
            if len(t.keys) == 0:
                raise ValueError(f"transaction at seq {t.first_seq} is empty")
            ops += t.ops
            keys.extend(t.keys)
            values.extend(t.values)
            expected = t.last_seq + 1
        return cls(
            writer=writer,
            first_seq=txns[0].first_seq,
            ops=bytes(ops),
            keys=keys,
            values=values,
            txn_sizes=[len(t.keys) for t in txns],
            txn_timestamps_us=[t.timestamp_us for t in txns],
        )
