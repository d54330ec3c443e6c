"""Helpers for the publisher tests: an in-memory WAL and an independent topic reader."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from walship.producer.batching import txn_size_bytes
from walship.shared.codec import Decoder, PartAssembler
from walship.shared.model import Batch, Op, Transaction, WriterId

WRITER = WriterId(stream_id=bytes(range(16)), epoch=1)


class MemoryWal:
    """The WalReader contract (read_from, wait_for, last_seq) over a list.

    Lets publisher logic be tested without the WAL's files, e.g. with a fake
    producer that fails on purpose.
    """

    def __init__(self) -> None:
        self.txns: list[tuple[Transaction, str | None]] = []
        self._changed = asyncio.Event()

    @property
    def last_seq(self) -> int:
        return self.txns[-1][0].last_seq if self.txns else 0

    def append(self, entries: int, value_bytes: int = 20, traceparent: str | None = None) -> None:
        first = self.last_seq + 1
        txn = Transaction.of(
            first,
            [(Op.PUT, b"key-%d" % (first + i), b"v" * value_bytes) for i in range(entries)],
            1_700_000_000_000_000 + first,
        )
        self.txns.append((txn, traceparent))
        self._changed.set()

    def read_from(self, seq: int, *, max_bytes: int) -> list[tuple[Transaction, str | None]]:
        out: list[tuple[Transaction, str | None]] = []
        size = 0
        for txn, tp in self.txns:
            if txn.last_seq < seq:
                continue
            assert txn.first_seq == seq or out, f"read_from({seq}) inside a transaction"
            n = txn_size_bytes(txn)
            if out and size + n > max_bytes:
                break
            out.append((txn, tp))
            size += n
        return out

    async def wait_for(self, seq: int, timeout_s: float) -> bool:
        try:
            async with asyncio.timeout(timeout_s):
                while self.last_seq < seq:
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            return False
        return True


@dataclass
class Received:
    partition: int
    offset: int
    key: bytes
    batch: Batch
    headers: dict[str, bytes]


async def read_topic(bootstrap: str, topic: str, partitions: int) -> list[Received]:
    """Every message on ``topic``, decoded with a plain consumer and the Decoder."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    decoder = Decoder()
    out: list[Received] = []
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        for tp in tps:
            while await consumer.position(tp) < end[tp]:
                records = await consumer.getmany(tp, timeout_ms=2_000)
                for rec in records.get(tp, []):
                    assert rec.value is not None and rec.key is not None
                    out.append(
                        Received(
                            tp.partition,
                            rec.offset,
                            rec.key,
                            decoder.decode(rec.value),
                            {k: bytes(v) for k, v in rec.headers},
                        )
                    )
    finally:
        await consumer.stop()
    return out


def entries_by_seq(received: Sequence[Received]) -> dict[int, tuple[Op, bytes, bytes]]:
    """seq -> (op, key, value) over all messages (parts reassembled per partition)."""
    out: dict[int, tuple[Op, bytes, bytes]] = {}
    assemblers: dict[int, PartAssembler] = {}
    for r in sorted(received, key=lambda r: (r.partition, r.offset)):
        whole = assemblers.setdefault(r.partition, PartAssembler()).feed(r.batch)
        if whole is None:
            continue
        for t in whole.transactions():
            for e in t.entries():
                previous = out.setdefault(e.seq, (e.op, e.key, e.value))
                assert previous == (e.op, e.key, e.value), f"seq {e.seq} differs between copies"
    return out
