"""Dictionary records (pure), training, and shipping through Kafka."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from walship.shared.codec import Decoder, Encoder
from walship.shared.dictionaries import (
    DictionaryTrainer,
    decode_dictionary,
    dictionaries_topic,
    encode_dictionary,
    load_dictionaries,
    publish_dictionary,
)
from walship.shared.errors import DecodeError
from walship.shared.model import Op, Transaction, WriterId

WRITER = WriterId(b"s" * 16, 1)


def _json_txns(n: int, first_seq: int = 1) -> list[Transaction]:
    rng = random.Random(3)
    out = []
    for i in range(n):
        value = json.dumps(
            {
                "user": rng.randrange(10_000),
                "status": rng.choice(["active", "idle", "gone"]),
                "score": rng.random(),
                "tags": ["a", "b"][: rng.randrange(3)],
            }
        ).encode()
        out.append(Transaction.of(first_seq + i, [(Op.PUT, b"user:%08d" % i, value)], 1_000 + i))
    return out


def test_record_round_trip_and_checks() -> None:
    trainer = DictionaryTrainer(dict_bytes=4096, sample_bytes=64 << 10, rng=random.Random(1))
    trainer.add(_json_txns(2000))
    assert trainer.ready
    d = trainer.train()
    key, value = encode_dictionary(d)
    assert int.from_bytes(key, "big") == d.dict_id
    assert decode_dictionary(value) == d
    flipped = bytearray(value)
    flipped[-1] ^= 1
    with pytest.raises(DecodeError, match="CRC32C"):
        decode_dictionary(bytes(flipped))
    with pytest.raises(DecodeError, match="magic"):
        decode_dictionary(b"XXXX" + value[4:])


@given(st.binary(max_size=200))
def test_decode_dictionary_only_raises_decode_error(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode_dictionary(data)


def test_trained_dictionary_shrinks_small_messages() -> None:
    txns = _json_txns(3000)
    trainer = DictionaryTrainer(dict_bytes=8192, sample_bytes=128 << 10, rng=random.Random(2))
    trainer.add(txns[:2000])
    d = trainer.train()
    plain, with_dict = Encoder(WRITER), Encoder(WRITER, dictionary=d)
    sample = txns[2000:2500]
    plain_bytes = sum(len(m.value) for t in sample for m in plain.encode([t]))
    dict_bytes = sum(len(m.value) for t in sample for m in with_dict.encode([t]))
    assert dict_bytes < 0.8 * plain_bytes
    decoder = Decoder(dictionaries={d.dict_id: d})
    message = with_dict.encode([sample[0]])[0]
    assert list(decoder.decode(message.value).keys) == list(sample[0].keys)
    with pytest.raises(DecodeError, match="unknown zstd dictionary id"):
        Decoder().decode(message.value)


@pytest.mark.kafka
async def test_published_dictionaries_are_loaded(
    kafka_bootstrap: str, new_topic: Callable[..., str]
) -> None:
    topic = new_topic(1)
    kwargs = {"bootstrap_servers": kafka_bootstrap}
    assert await load_dictionaries(kwargs, topic) == {}
    trainer = DictionaryTrainer(dict_bytes=4096, sample_bytes=64 << 10, rng=random.Random(4))
    trainer.add(_json_txns(2000))
    first = trainer.train()
    await publish_dictionary(kwargs, topic, first)
    second = DictionaryTrainer(dict_bytes=2048, sample_bytes=32 << 10, rng=random.Random(5))
    second.add(_json_txns(1000, first_seq=5000))
    other = second.train()
    await publish_dictionary(kwargs, topic, other)
    loaded = await load_dictionaries(kwargs, topic)
    assert loaded == {first.dict_id: first, other.dict_id: other}
    assert dictionaries_topic(topic) == f"{topic}.dicts"


@pytest.mark.kafka
async def test_publisher_trains_ships_and_readers_decode(
    kafka_bootstrap: str, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    """Small JSON transactions: the publisher switches to a trained dictionary that a
    reader started afterwards loads from <topic>.dicts; the replica equals the writer."""
    from walship.consumer.applier import SqliteApplier
    from walship.consumer.reader import Reader
    from walship.producer.publisher import Publisher
    from walship.producer.writer import Writer
    from walship.shared.codec import Codec, peek_header
    from walship.shared.store import digest_file

    topic = new_topic(2)
    kwargs = {"bootstrap_servers": kafka_bootstrap}
    data_dir = tmp_path / "writer"
    txns = _json_txns(3000)

    def publisher() -> Publisher:
        return Publisher(
            data_dir,
            topic=topic,
            partitions=2,
            producer_kwargs=kwargs,
            linger_ms=0,
            batch_bytes_max=600,
            train_dictionary=True,
            dictionary_bytes=4096,
            dictionary_sample_bytes=96 << 10,
        )

    async with Writer(data_dir) as writer:
        for t in txns[:2000]:
            await writer.append([(Op.PUT, k, v) for k, v in zip(t.keys, t.values, strict=True)])
        async with publisher() as pub:
            await asyncio.wait_for(pub.run(until_caught_up=True), 60)
        shipped = await load_dictionaries(kwargs, topic)
        assert len(shipped) == 1
        # A restarted publisher reuses the shipped dictionary instead of training again.
        for t in txns[2000:]:
            await writer.append([(Op.PUT, k, v) for k, v in zip(t.keys, t.values, strict=True)])
        async with publisher() as pub:
            await asyncio.wait_for(pub.run(until_caught_up=True), 60)
        assert len(await load_dictionaries(kwargs, topic)) == 1
        last = writer.last_seq
    received = await _raw_values(kafka_bootstrap, topic, 2)
    codecs = [peek_header(v).codec for v in received]
    assert Codec.ZSTD_DICT in codecs and codecs[0] != Codec.ZSTD_DICT
    assert {peek_header(v).dict_id for v in received} - {0} == set(shipped)

    reader = Reader(
        SqliteApplier(tmp_path / "replica.db"),
        topic=topic,
        reader_id="r",
        client_kwargs=kwargs,
        gap_timeout_ms=2000,
    )
    async with reader:
        await asyncio.wait_for(reader.run(until_seq=last), 60)
    assert digest_file(tmp_path / "replica.db") == digest_file(data_dir / "state.db")

    # Point-in-time restore reads the same dictionary-compressed log.
    from walship.consumer.bootstrap import kafka_log_inspector
    from walship.shared.snapshot import FileSnapshotStore
    from walship.shared.snapshot.restore import RestoreTarget, plan_restore, restore

    snaps = FileSnapshotStore(tmp_path / "snaps")
    plan = await plan_restore(
        snaps,
        topic=topic,
        target=RestoreTarget(to_seq=last),
        inspect_log=kafka_log_inspector(topic, kwargs),
    )
    restored = await restore(plan, tmp_path / "asof.db", snapshot_store=snaps, client_kwargs=kwargs)
    assert restored == digest_file(data_dir / "state.db")


async def _raw_values(bootstrap: str, topic: str, partitions: int) -> list[bytes]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    out: list[tuple[int, bytes]] = []
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        for tp in tps:
            while await consumer.position(tp) < end[tp]:
                for rec in (await consumer.getmany(tp, timeout_ms=2000)).get(tp, []):
                    out.append((int.from_bytes(rec.key or b"", "big"), rec.value or b""))
    finally:
        await consumer.stop()
    return [v for _, v in sorted(out)]
