"""The naive pipeline, as most teams write it first (the baseline walship is compared to).

Producer: one Kafka message per entry, JSON-encoded (key hex, value base64),
keyed by the entry's key, sent with one ``await producer.send(...)`` per entry;
the acknowledgements of a transaction's entries are awaited together before the
next transaction (the application wants to know its transaction was shipped).
``acks="all"`` like walship, so both pay for the same durability.

Consumer: one message at a time, ``json.loads``, ``INSERT OR REPLACE`` and its
own SQLite ``COMMIT`` per message (WAL journal, ``synchronous=NORMAL``, the
replica's default). Offsets auto-committed by aiokafka.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import sqlite3
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from walship.producer.loadgen import generate_txn
from walship.shared.bench.worker import Gate
from walship.shared.bench.workload import KEY_BYTES, TXN_ENTRIES, VALUE_BYTES, now


def encode_entry(seq: int, op: int, key: bytes, value: bytes, timestamp_us: int) -> bytes:
    """One entry as the naive pipeline ships it."""
    record = {
        "seq": seq,
        "op": "put" if op == 0 else "delete",
        "key": key.hex(),
        "value": base64.b64encode(value).decode(),
        "ts": timestamp_us,
    }
    return json.dumps(record).encode()


async def producer_role(params: dict[str, Any], go: Gate) -> dict[str, Any]:
    entries: int = params["entries"]
    producer = AIOKafkaProducer(bootstrap_servers=params["bootstrap"], acks="all")
    await producer.start()
    try:
        rng = random.Random(params.get("seed", 1))
        await go()
        start = now()
        seq = 0
        message_bytes = 0
        while seq < entries:
            n = min(TXN_ENTRIES, entries - seq)
            txn = generate_txn(
                rng,
                n,
                keys=params["keys"],
                value_bytes=VALUE_BYTES,
                delete_ratio=0.0,
                key_bytes=KEY_BYTES,
            )
            ts = time.time_ns() // 1000
            acks = []
            for op, key, value in txn:
                seq += 1
                payload = encode_entry(seq, int(op), key, value, ts)
                message_bytes += len(payload)
                acks.append(await producer.send(params["topic"], payload, key=key))
            await asyncio.gather(*acks)
        end = now()
    finally:
        await producer.stop()
    return {"start": start, "end": end, "entries": entries, "message_bytes": message_bytes}


async def consumer_role(params: dict[str, Any], go: Gate) -> dict[str, Any]:
    entries: int = params["entries"]
    topic: str = params["topic"]
    conn = sqlite3.connect(params["db_path"])
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE IF NOT EXISTS kv (key BLOB PRIMARY KEY, value BLOB NOT NULL)")
    conn.commit()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=params["bootstrap"],
        group_id=f"naive-{topic}",
        enable_auto_commit=True,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        # Assigned rather than subscribed: a group rebalance would only add a
        # fixed delay to the baseline, which is not what is being compared.
        # The orchestrator created the topic; its partition count is known.
        tps = [TopicPartition(topic, p) for p in range(params["partitions"])]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        await go()
        applied = 0
        while applied < entries:
            batches = await consumer.getmany(timeout_ms=100)
            for records in batches.values():
                for msg in records:
                    assert msg.value is not None
                    record = json.loads(msg.value)
                    key = bytes.fromhex(record["key"])
                    if record["op"] == "put":
                        conn.execute(
                            "INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)",
                            (key, base64.b64decode(record["value"])),
                        )
                    else:
                        conn.execute("DELETE FROM kv WHERE key = ?", (key,))
                    conn.commit()
                    applied += 1
        end = now()
    finally:
        await consumer.stop()
        conn.close()
    return {"end": end, "entries": applied}
