"""Dictionary records (pure), training, and shipping through Kafka."""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Callable

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
