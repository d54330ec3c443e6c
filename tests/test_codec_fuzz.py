"""Fuzzing the decoders: whatever the bytes, only DecodeError escapes, and nothing wrong decodes.

Kept fast (a few seconds): the interesting inputs are valid messages with a few
bytes changed, and hand-built messages whose CRC is right but whose body is not.
"""

from __future__ import annotations

import contextlib
import random
import struct
from typing import Any

import crc32c
import msgpack
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from walship.shared.codec import (
    HEADER_BYTES,
    Decoder,
    Encoder,
    ZstdDictionary,
    decode_transaction,
    encode_transaction,
    peek_header,
    train_dictionary,
    training_samples,
)
from walship.shared.errors import DecodeError
from walship.shared.model import Batch, Op, Transaction, WriterId

WRITER = WriterId(stream_id=b"\x01" * 16, epoch=3)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _txns() -> list[Transaction]:
    rng = random.Random(7)
    out = []
    seq = 1
    for i in range(6):
        entries = [
            (
                Op.PUT,
                rng.randbytes(16),
                b'{"i":%d,"v":"%s"}' % (i, rng.randbytes(20).hex().encode()),
            )
            for _ in range(5)
        ]
        entries.append((Op.DELETE, b"gone%d" % i, b""))
        out.append(Transaction.of(seq, entries, 1_700_000_000_000_000 + i))
        seq += len(entries)
    return out


TXNS = _txns()
DICT: ZstdDictionary = train_dictionary(
    training_samples(
        [
            Transaction.of(
                i + 1, [(Op.PUT, b"k%d" % i, b'{"name":"user%d","n":%d}' % (i % 50, i))], i
            )
            for i in range(500)
        ]
    ),
    size_bytes=2048,
)
MESSAGES: list[bytes] = [
    *(m.value for m in Encoder(WRITER).encode(TXNS)),
    *(m.value for m in Encoder(WRITER, dictionary=DICT).encode(TXNS[:2])),
    *(m.value for m in Encoder(WRITER, message_bytes_max=HEADER_BYTES + 300).encode(TXNS[:1])),
    *(m.value for m in Encoder(WRITER, level=-5).encode([TXNS[0]])),
]
RECORDS: list[bytes] = [
    encode_transaction(t, "00-" + "1" * 32 + "-" + "2" * 16 + "-01") for t in TXNS
]


def decode_or_refuse(decoder: Decoder, value: bytes) -> Batch | None:
    with contextlib.suppress(DecodeError):
        peek_header(value)
    try:
        return decoder.decode(value)
    except DecodeError:
        return None


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes(data: bytes) -> None:
    decoder = Decoder(dictionaries={DICT.dict_id: DICT})
    assert decode_or_refuse(decoder, data) is None
    assert decode_or_refuse(decoder, b"WSHP\x01" + data) is None
    with contextlib.suppress(DecodeError):
        decode_transaction(data)


def mutate(data: bytes, draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["flip", "flip", "byte", "truncate", "extend", "splice"]))
    buf = bytearray(data)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 3))):
            pos = draw(st.integers(0, len(buf) - 1))
            buf[pos] ^= 1 << draw(st.integers(0, 7))
    elif kind == "byte":
        buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
    elif kind == "truncate":
        del buf[draw(st.integers(0, len(buf) - 1)) :]
    elif kind == "extend":
        buf += draw(st.binary(min_size=1, max_size=64))
    else:
        pos = draw(st.integers(0, len(buf)))
        buf[pos:pos] = draw(st.binary(min_size=1, max_size=16))
    return bytes(buf)


@FUZZ
@given(st.data())
def test_mutated_messages_are_refused_or_harmless(data: st.DataObject) -> None:
    original = data.draw(st.sampled_from(MESSAGES))
    value = mutate(original, data.draw)
    decoder = Decoder(dictionaries={DICT.dict_id: DICT})
    batch = decode_or_refuse(decoder, value)
    if batch is not None:  # only a change that alters nothing decoded may pass
        assert batch == decoder.decode(original)


@FUZZ
@given(st.data())
def test_mutated_wal_records_only_raise_decode_error(data: st.DataObject) -> None:
    record = mutate(data.draw(st.sampled_from(RECORDS)), data.draw)
    try:
        txn, tp = decode_transaction(record)
    except DecodeError:
        return
    # no CRC inside (the WAL adds one): a mutated record may decode, but only to a valid txn
    assert len(txn.keys) == len(txn.values) == len(txn.ops) >= 1
    assert tp is None or tp.isascii()


# Arbitrary msgpack-able objects with a *correct* CRC: exercises the body checks.
MSGPACK_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.binary(max_size=8),
    st.text(max_size=4),
    st.floats(allow_nan=False),
)
MSGPACK_OBJ = st.recursive(MSGPACK_LEAF, lambda c: st.lists(c, max_size=4), max_leaves=12)
BODY_LIKE = st.tuples(
    st.one_of(st.binary(max_size=4), MSGPACK_OBJ),
    st.one_of(st.lists(st.binary(max_size=3), max_size=4), MSGPACK_OBJ),
    st.one_of(st.lists(st.binary(max_size=3), max_size=4), MSGPACK_OBJ),
    st.one_of(st.lists(st.integers(-1, 5), max_size=3), MSGPACK_OBJ),
    st.one_of(st.lists(st.integers(-1, 2**64 - 1), max_size=3), MSGPACK_OBJ),
).map(list)


def hand_built(body: Any, entry_count: int, txn_count: int, compress: bool, part: int) -> bytes:
    raw = msgpack.packb(body, use_bin_type=True)
    payload = zstandard.ZstdCompressor().compress(raw) if compress else raw
    part_index, part_count = (0, 1) if part == 0 else (part - 1, 3)
    fields = [b"WSHP", 1, 0, int(compress), 0, 5, 4 + entry_count, entry_count, txn_count]
    fields += [part_index, part_count, len(raw), len(payload), 0, WRITER.stream_id, 3]
    header = pack_header(fields, 0)
    return pack_header(fields, crc32c.crc32c(raw, crc32c.crc32c(header[:72]))) + payload


def pack_header(fields: list[Any], crc: int) -> bytes:
    return struct.pack(">4sBBBBQQIIIIIII16sII", *fields, crc)


@FUZZ
@given(
    st.one_of(BODY_LIKE, MSGPACK_OBJ),
    st.integers(1, 5),
    st.integers(1, 3),
    st.booleans(),
    st.integers(0, 3),
)
def test_well_framed_bodies_decode_only_when_consistent(
    body: Any, entry_count: int, txn_count: int, compress: bool, part: int
) -> None:
    value = hand_built(body, entry_count, txn_count, compress, part)
    batch = decode_or_refuse(Decoder(), value)
    if batch is None:
        return
    # Whatever got through satisfies every invariant the readers rely on.
    assert len(batch.ops) == len(batch.keys) == len(batch.values) == entry_count
    assert all(type(k) is bytes for k in batch.keys)
    assert all(type(v) is bytes for v in batch.values)
    assert set(batch.ops) <= {0, 1}
    assert all(not v for op, v in zip(batch.ops, batch.values, strict=True) if op == Op.DELETE)
    assert sum(batch.txn_sizes) == entry_count and min(batch.txn_sizes) >= 1
    assert len(batch.txn_timestamps_us) == len(batch.txn_sizes) == txn_count
    assert all(type(t) is int and 0 <= t < 2**63 for t in batch.txn_timestamps_us)
    assert list(batch.transactions())  # walkable
