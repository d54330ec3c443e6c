"""Corrupt messages for the chaos suite, and producing them raw to a partition.

Two kinds (both must be refused by every reader, BRIEF rule 6):

- ``garbage``: random bytes; not even the header is readable, so the reader
  cannot tell which sequences the message claims.
- ``bad_crc``: a well-formed walship message (header and body written by the
  real encoder, claiming the next sequences the writer has not written yet)
  whose CRC32C field is flipped; the header parses, the checksum fails.

What a reader does with them is in ``consumer/reader.py``: a message whose
claimed sequences are all applied already is skipped (it could only repeat
what the replica holds); any other undecodable message stops the stream and
calls the bootstrap hook, which recovers only through a snapshot past the
replica's position; without one the reader exits with an error naming
topic/partition/offset and is restarted by its supervisor. The chaos run
therefore follows every injection with a writer snapshot taken once the
publisher's acknowledged offsets on that partition are past the corrupt
message, so a snapshot that skips it exists and stuck readers recover.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from walship.shared.codec import HEADER_BYTES, Encoder, message_key
from walship.shared.errors import DecodeError
from walship.shared.kafka import translate_kafka_error
from walship.shared.model import Op, Transaction, WriterId

CORRUPT_KINDS = ("garbage", "bad_crc")
_CRC_OFFSET = HEADER_BYTES - 4


def garbage_message(rng: random.Random) -> bytes:
    """Random bytes that never start with the walship magic."""
    body = rng.randbytes(rng.randint(1, 2048))
    return b"JUNK" + body


def bad_crc_message(writer: WriterId, first_seq: int, rng: random.Random) -> bytes:
    """A real encoded message for seqs ``first_seq``.. whose CRC32C field is flipped."""
    n = rng.randint(1, 5)
    txn = Transaction.of(
        first_seq,
        [(Op.PUT, b"chaos-corrupt-%d" % i, rng.randbytes(32)) for i in range(n)],
        time.time_ns() // 1000,
    )
    (msg,) = Encoder(writer).encode([txn])
    value = bytearray(msg.value)
    value[_CRC_OFFSET] ^= 0xFF
    return bytes(value)


def check_undecodable(value: bytes) -> None:
    """Raise AssertionError unless the real decoder refuses ``value`` (a self-check)."""
    from walship.shared.codec import Decoder

    try:
        Decoder().decode(value)
    except DecodeError:
        return
    raise AssertionError("the corrupt message decodes: it would be applied")


class RawProducer:
    """A plain (non-idempotent) producer that writes arbitrary bytes to a partition."""

    def __init__(self, client_kwargs: Mapping[str, Any], topic: str) -> None:
        self._kwargs = dict(client_kwargs)
        self.topic = topic
        self._producer: AIOKafkaProducer | None = None

    async def send(self, partition: int, key_seq: int, value: bytes) -> int:
        """Produce and wait for the ack; returns the message's offset."""
        if self._producer is None:
            producer = AIOKafkaProducer(**self._kwargs, acks="all", request_timeout_ms=10_000)
            try:
                await producer.start()
            except (KafkaError, OSError) as exc:
                await producer.stop()
                raise translate_kafka_error(exc, "start raw producer", topic=self.topic) from exc
            self._producer = producer
        try:
            meta = await self._producer.send_and_wait(
                self.topic, value, key=message_key(key_seq), partition=partition
            )
        except (KafkaError, OSError) as exc:
            await self.stop()
            raise translate_kafka_error(
                exc, "produce a corrupt message", topic=self.topic, partition=partition
            ) from exc
        return int(meta.offset)

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()
