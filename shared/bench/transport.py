"""The transport ceiling: raw aiokafka produce + consume of pre-built messages.

The messages have the count, sizes and partitions of the ones walship's
publisher produced in the end-to-end run (recorded there), the producer has
the publisher's settings (idempotent, ``acks="all"``, same batch and request
limits, the same 32 MB of unacknowledged bytes in flight) and the consumer
fetches all partitions like a reader, but nobody encodes, decodes or applies
anything. The time this takes is what client and broker allow for that data.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from walship.shared.bench.worker import Gate
from walship.shared.bench.workload import now
from walship.shared.codec import MESSAGE_BYTES_MAX_DEFAULT

IN_FLIGHT_BYTES_MAX = 32 << 20


def load_layout(path: Path) -> list[tuple[int, int]]:
    """The (partition, size) of every message, in send order."""
    return [(int(p), int(n)) for p, n in json.loads(path.read_text())]


def producer_kwargs(bootstrap: str) -> dict[str, Any]:
    """The settings the publisher enforces or defaults to."""
    return {
        "bootstrap_servers": bootstrap,
        "enable_idempotence": True,
        "acks": "all",
        "compression_type": None,
        "max_batch_size": MESSAGE_BYTES_MAX_DEFAULT,
        "max_request_size": MESSAGE_BYTES_MAX_DEFAULT + (64 << 10),
        "linger_ms": 0,
    }


async def producer_role(params: dict[str, Any], go: Gate) -> dict[str, Any]:
    layout = load_layout(Path(params["layout_path"]))
    rng = random.Random(7)
    pool = rng.randbytes(max((n for _, n in layout), default=1))
    # Random bytes, like zstd output: nothing for the broker or client to gain.
    messages = [(p, i.to_bytes(8, "big"), pool[:n]) for i, (p, n) in enumerate(layout)]
    producer = AIOKafkaProducer(**producer_kwargs(params["bootstrap"]))
    await producer.start()
    try:
        await go()
        start = now()
        in_flight: collections.deque[tuple[asyncio.Future[Any], int]] = collections.deque()
        in_flight_bytes = 0
        for partition, key, value in messages:
            while in_flight and in_flight_bytes + len(value) > IN_FLIGHT_BYTES_MAX:
                fut, size = in_flight.popleft()
                await fut
                in_flight_bytes -= size
            fut = await producer.send(params["topic"], value, key=key, partition=partition)
            in_flight.append((fut, len(value)))
            in_flight_bytes += len(value)
        await asyncio.gather(*(f for f, _ in in_flight))
        end = now()
    finally:
        await producer.stop()
    return {
        "start": start,
        "end": end,
        "messages": len(messages),
        "bytes": sum(len(v) for _, _, v in messages),
    }


async def consumer_role(params: dict[str, Any], go: Gate) -> dict[str, Any]:
    """Reads every partition up to the offsets the layout will reach.

    When the producer outruns this consumer by more than the broker keeps
    (the embedded cluster holds ~5 MB per partition), the oldest messages are
    evicted unread: the consumer restarts at the log start, counts them as
    ``evicted_unread`` and the figure becomes an upper bound of the ceiling.
    """
    topic: str = params["topic"]
    expected = collections.Counter(p for p, _ in load_layout(Path(params["layout_path"])))
    consumer = AIOKafkaConsumer(
        bootstrap_servers=params["bootstrap"],
        enable_auto_commit=False,
        group_id=None,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        # The orchestrator created the topic; its partition count is known.
        tps = [TopicPartition(topic, p) for p in range(params["partitions"])]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        await go()
        next_offset = dict.fromkeys(range(params["partitions"]), 0)
        received = evicted = size = 0
        while any(next_offset[p] < n for p, n in expected.items()):
            batches = await consumer.getmany(timeout_ms=100)
            for tp, records in batches.items():
                if not records:
                    continue
                evicted += max(0, records[0].offset - next_offset[tp.partition])
                next_offset[tp.partition] = records[-1].offset + 1
                received += len(records)
                size += sum(len(r.value or b"") for r in records)
        end = now()
    finally:
        await consumer.stop()
    return {"end": end, "messages": received, "evicted_unread": evicted, "bytes": size}
