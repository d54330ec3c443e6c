"""Shipping zstd dictionaries from the publisher to every reader.

Small transactions compress poorly on their own (see docs/wire-format.md,
"Dictionaries"). With ``producer.zstd_dictionary`` on, the publisher sends its
first transactions without a dictionary while it collects samples, trains one,
publishes it to the compacted side topic ``<topic>.dicts`` and only then starts
using it. Readers load that topic at start and again whenever a message names
a dictionary id they do not know yet. A dictionary is never needed before it
is acknowledged by Kafka, so a reader can always find it.

Dictionary record (Kafka value, big-endian; key = dict id as 4 bytes):

    offset  size  field
    0       4     magic b"WSDC"
    4       1     version (1)
    5       3     reserved, zero
    8       4     dict id (matches the key and the messages' header dict_id)
    12      4     CRC32C of the dictionary bytes
    16      n     the zstd dictionary
"""

from __future__ import annotations

import logging
import random
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import crc32c
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from walship.shared.codec import (
    Decoder,
    ZstdDictionary,
    peek_header,
    train_dictionary,
    training_samples,
)
from walship.shared.codec_dict import DICT_ID_MAX
from walship.shared.errors import DecodeError, KafkaOperationError
from walship.shared.kafka import describe_topic, ensure_side_topic, kafka_errors
from walship.shared.model import Transaction

log = logging.getLogger(__name__)

MAGIC = b"WSDC"
VERSION = 1
_HEADER = struct.Struct(">4sB3xII")
DICT_BYTES_MAX = 1 << 20  # a dictionary record larger than this is refused


def dictionaries_topic(topic: str) -> str:
    return f"{topic}.dicts"


# --- the record format (pure) ------------------------------------------------------


def encode_dictionary(d: ZstdDictionary) -> tuple[bytes, bytes]:
    """(key, value) of the Kafka record that ships ``d``."""
    header = _HEADER.pack(MAGIC, VERSION, d.dict_id, crc32c.crc32c(d.data))
    return struct.pack(">I", d.dict_id), header + d.data


def decode_dictionary(value: bytes, *, where: str = "") -> ZstdDictionary:
    """The dictionary in a record; DecodeError for anything else."""
    if len(value) < _HEADER.size:
        raise DecodeError("dictionary record shorter than its header", where=where)
    if len(value) > _HEADER.size + DICT_BYTES_MAX:
        raise DecodeError("dictionary record too large", where=where, bytes=len(value))
    magic, version, dict_id, crc = _HEADER.unpack_from(value)
    if magic != MAGIC:
        raise DecodeError("not a walship dictionary record (bad magic)", where=where)
    if version != VERSION:
        raise DecodeError(f"unknown dictionary record version {version}", where=where)
    data = bytes(value[_HEADER.size :])
    if crc32c.crc32c(data) != crc:
        raise DecodeError("dictionary record fails its CRC32C", where=where, dict_id=dict_id)
    try:
        return ZstdDictionary(dict_id, data)
    except ValueError as exc:
        raise DecodeError(f"invalid dictionary record: {exc}", where=where) from exc


class DictionaryTrainer:
    """Collects sample bodies from transactions until there is enough to train.

    Pure apart from the random dictionary id (ids only need to differ between
    the dictionaries of one stream; 32 random bits make a clash negligible).
    """

    def __init__(
        self,
        *,
        dict_bytes: int = 16384,
        sample_bytes: int = 1 << 20,
        rng: random.Random | None = None,
    ) -> None:
        self.dict_bytes = dict_bytes
        self.sample_bytes = sample_bytes
        self._samples: list[bytes] = []
        self._collected = 0
        self._rng = rng or random.SystemRandom()

    @property
    def ready(self) -> bool:
        return self._collected >= self.sample_bytes

    def add(self, txns: Sequence[Transaction]) -> None:
        for sample in training_samples(txns):
            if self.ready:
                return
            self._samples.append(sample)
            self._collected += len(sample)

    def train(self) -> ZstdDictionary:
        """A dictionary trained on the samples (ValueError if zstd cannot train one)."""
        trained = train_dictionary(self._samples, self.dict_bytes)
        return ZstdDictionary(self._rng.randint(1, DICT_ID_MAX), trained.data)


# --- Kafka adapters -------------------------------------------------------------------


async def publish_dictionary(
    client_kwargs: Mapping[str, Any], topic: str, d: ZstdDictionary
) -> None:
    """Ship ``d`` to ``<topic>.dicts``; returns once Kafka acknowledged it."""
    name = dictionaries_topic(topic)
    await ensure_side_topic(client_kwargs, name)
    key, value = encode_dictionary(d)
    producer = AIOKafkaProducer(
        **client_kwargs, enable_idempotence=True, acks="all", max_request_size=DICT_BYTES_MAX * 2
    )
    async with kafka_errors("publish a dictionary", topic=name, dict_id=d.dict_id):
        await producer.start()
        try:
            await producer.send_and_wait(name, value, key=key, partition=0)
        finally:
            await producer.stop()
    log.info("dictionary %d (%d bytes) published to %s", d.dict_id, len(d.data), name)


async def load_dictionaries(
    client_kwargs: Mapping[str, Any], topic: str
) -> dict[int, ZstdDictionary]:
    """Every dictionary in ``<topic>.dicts`` (empty when the topic does not exist).

    A record that fails to decode is skipped with a warning: a dictionary that
    is really needed then shows up as an unknown id when a message names it.
    """
    name = dictionaries_topic(topic)
    tp = TopicPartition(name, 0)
    found: dict[int, ZstdDictionary] = {}
    try:
        end = (await describe_topic(client_kwargs, name)).end_offsets.get(0, 0)
    except KafkaOperationError:
        return found  # no dictionary was ever published for this stream
    consumer = AIOKafkaConsumer(**client_kwargs, enable_auto_commit=False)
    async with kafka_errors("load dictionaries", topic=name):
        await consumer.start()
        try:
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            while await consumer.position(tp) < end:
                records = await consumer.getmany(tp, timeout_ms=1000)
                for record in records.get(tp, []):
                    where = f"{name}/0@{record.offset}"
                    try:
                        d = decode_dictionary(record.value or b"", where=where)
                    except DecodeError as exc:
                        log.warning("skipping a dictionary record: %s", exc)
                        continue
                    found[d.dict_id] = d
        finally:
            await consumer.stop()
    return found


async def learn_dictionaries(
    decoder: Decoder, values: Iterable[bytes | None], client_kwargs: Mapping[str, Any], topic: str
) -> None:
    """Give ``decoder`` the dictionaries that ``values`` name and it lacks.

    The publisher ships a dictionary before its first use, so one load of
    ``<topic>.dicts`` finds it; a message whose dictionary is still missing
    then fails to decode like any other corrupt input.
    """
    known = decoder.dictionary_ids
    for value in values:
        try:
            dict_id = peek_header(value or b"").dict_id
        except DecodeError:
            continue  # the decoder reports it, with its location
        if dict_id == 0 or dict_id in known:
            continue
        for d in (await load_dictionaries(client_kwargs, topic)).values():
            if d.dict_id not in known:
                decoder.add_dictionary(d)
        log.info("loaded zstd dictionaries %s", sorted(decoder.dictionary_ids))
        return
