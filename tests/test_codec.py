"""Wire format: round trips, parts, dictionaries, the partition function, and refusals."""

from __future__ import annotations

import json
import random
import re
import struct
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import crc32c
import msgpack
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from walship.shared.cli.codec_bench import run_codec_bench
from walship.shared.codec import (
    FORMAT_VERSION,
    HEADER_BYTES,
    MESSAGE_BYTES_MAX_DEFAULT,
    Codec,
    Decoder,
    EncodedMessage,
    Encoder,
    PartAssembler,
    ZstdDictionary,
    decode_transaction,
    encode_transaction,
    message_key,
    partition_for,
    peek_header,
    train_dictionary,
    training_samples,
)
from walship.shared.errors import DecodeError
from walship.shared.model import Batch, Op, Transaction, WriterId

WRITER = WriterId(stream_id=bytes(range(16)), epoch=7)
HEADER = struct.Struct(">4sBBBBQQIIIIIII16sII")


def norm(t: Transaction) -> tuple[int, bytes, list[bytes], list[bytes], int]:
    return (t.first_seq, bytes(t.ops), list(t.keys), list(t.values), t.timestamp_us)


def roundtrip(msgs: Sequence[EncodedMessage], decoder: Decoder | None = None) -> list[Transaction]:
    decoder = decoder or Decoder()
    assembler = PartAssembler()
    out: list[Transaction] = []
    for m in msgs:
        batch = assembler.feed(decoder.decode(m.value))
        if batch is not None:
            out.extend(batch.transactions())
    assert not assembler.pending
    return out


def make_txns(first_seq: int, count: int, size: int, value_bytes: int = 100) -> list[Transaction]:
    rng = random.Random(first_seq)
    txns = []
    seq = first_seq
    for i in range(count):
        entries = [
            (Op.PUT, rng.randbytes(16), b'{"n":%d,"pad":"%s"}' % (seq + j, b"x" * value_bytes))
            for j in range(size)
        ]
        txns.append(Transaction.of(seq, entries, 1_700_000_000_000_000 + i))
        seq += size
    return txns


def raw_message(
    body: Any,
    *,
    first_seq: int = 1,
    entry_count: int = 1,
    txn_count: int = 1,
    part_index: int = 0,
    part_count: int = 1,
    magic: bytes = b"WSHP",
    version: int = FORMAT_VERSION,
    flags: int = 0,
    reserved: int = 0,
    codec: int = 0,
    dict_id: int = 0,
    raw_body: bytes | None = None,
) -> bytes:
    """A message built by hand with a correct CRC, to test body validation."""
    data = raw_body if raw_body is not None else msgpack.packb(body, use_bin_type=True)
    payload = zstandard.ZstdCompressor().compress(data) if codec else data
    fields = [
        magic,
        version,
        flags,
        codec,
        reserved,
        first_seq,
        first_seq + entry_count - 1,
        entry_count,
        txn_count,
        part_index,
        part_count,
        len(data),
        len(payload),
        dict_id,
        WRITER.stream_id,
        WRITER.epoch,
        0,
    ]
    header = HEADER.pack(*fields)
    fields[-1] = crc32c.crc32c(data, crc32c.crc32c(header[:72]))
    return HEADER.pack(*fields) + payload


# ---------------------------------------------------------------------------- header, key


def test_header_layout_matches_the_documented_offsets() -> None:
    txns = make_txns(41, 3, 10)
    [msg] = Encoder(WRITER).encode(txns)
    assert HEADER_BYTES == 76
    v = msg.value
    assert v[0:4] == b"WSHP"
    assert v[4] == FORMAT_VERSION and v[5] == 0 and v[6] == Codec.ZSTD and v[7] == 0
    assert int.from_bytes(v[8:16], "big") == 41
    assert int.from_bytes(v[16:24], "big") == 70
    assert int.from_bytes(v[24:28], "big") == 30
    assert int.from_bytes(v[28:32], "big") == 3
    assert int.from_bytes(v[32:36], "big") == 0
    assert int.from_bytes(v[36:40], "big") == 1
    body_len = int.from_bytes(v[40:44], "big")
    assert int.from_bytes(v[44:48], "big") == len(v) - 76
    assert int.from_bytes(v[48:52], "big") == 0
    assert v[52:68] == WRITER.stream_id
    assert int.from_bytes(v[68:72], "big") == 7
    body = zstandard.ZstdDecompressor().decompress(v[76:])
    assert len(body) == body_len == msg.body_bytes
    assert int.from_bytes(v[72:76], "big") == crc32c.crc32c(body, crc32c.crc32c(v[:72]))
    ops, keys, values, sizes, stamps = msgpack.unpackb(body)
    assert ops == bytes(30) and sizes == [10, 10, 10] and len(keys) == len(values) == 30
    assert stamps == [t.timestamp_us for t in txns]
    assert msg.key == message_key(41) == (41).to_bytes(8, "big")

    h = peek_header(v)
    assert (h.first_seq, h.last_seq, h.entry_count, h.txn_count) == (41, 70, 30, 3)
    assert h.writer == WRITER and h.codec is Codec.ZSTD and not h.is_part


def test_message_key_is_8_byte_big_endian() -> None:
    assert message_key(1) == b"\x00" * 7 + b"\x01"
    assert message_key(2**64 - 1) == b"\xff" * 8
    with pytest.raises(ValueError):
        message_key(-1)


# ---------------------------------------------------------------------------- partition_for


def test_partition_for_is_pinned() -> None:
    # Pinned so that other implementations (and docs/wire-format.md) can check theirs.
    assert [partition_for(s, 6) for s in (1, 11, 21, 31, 41, 51)] == [5, 3, 1, 0, 3, 4]
    assert partition_for(0, 1) == 0
    # The mix is splitmix64's: its first output for state 0 is a published constant.
    assert partition_for(0, 2**64) == 0xE220A8397B1DCDAF


def test_partition_for_spreads_txn_aligned_seqs_over_all_partitions() -> None:
    seqs = range(1, 10 * 60, 10)  # 10-entry transactions: first seqs 1, 11, 21, ...
    assert {partition_for(s, 6) for s in seqs} == set(range(6))
    counts = Counter(partition_for(s, 6) for s in range(1, 10 * 60_000, 10))
    assert min(counts.values()) > 0.95 * 10_000 and max(counts.values()) < 1.05 * 10_000


@given(st.integers(0, 2**64 - 1), st.integers(1, 1024))
def test_partition_for_is_deterministic_and_in_range(seq: int, partitions: int) -> None:
    p = partition_for(seq, partitions)
    assert 0 <= p < partitions and p == partition_for(seq, partitions)


def test_partition_for_refuses_programmer_errors() -> None:
    with pytest.raises(ValueError):
        partition_for(1, 0)
    with pytest.raises(ValueError):
        partition_for(2**64, 3)


# ---------------------------------------------------------------------------- round trips


@st.composite
def values(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["small", "small", "empty", "large_random", "large_text"]))
    if kind == "empty":
        return b""
    if kind == "small":
        return draw(st.binary(max_size=64))
    size = draw(st.integers(200, 6000))
    rng = random.Random(draw(st.integers(0, 2**32)))
    if kind == "large_random":
        return rng.randbytes(size)
    return (b"lorem ipsum %d " % rng.randrange(1000) * (size // 10 + 1))[:size]


@st.composite
def transactions(draw: st.DrawFn, max_txns: int = 6) -> list[Transaction]:
    seq = draw(st.integers(1, 2**40))
    txns = []
    for _ in range(draw(st.integers(1, max_txns))):
        entries = []
        for _ in range(draw(st.integers(1, 8))):
            op = draw(st.sampled_from([Op.PUT, Op.PUT, Op.DELETE]))
            key = draw(st.binary(max_size=40))
            entries.append((op, key, b"" if op == Op.DELETE else draw(values())))
        txns.append(Transaction.of(seq, entries, draw(st.integers(0, 2**63 - 1))))
        seq += len(entries)
    return txns


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(transactions(), st.sampled_from([HEADER_BYTES + 256, 700, 1500, 4096, 65536]))
def test_round_trip_with_parts_and_routing(txns: list[Transaction], message_bytes_max: int) -> None:
    msgs = Encoder(WRITER, message_bytes_max=message_bytes_max).encode(txns, "00-ab-cd-01")
    assert roundtrip_norm(msgs) == [norm(t) for t in txns]

    starts = {t.first_seq: t for t in txns}
    expected_seq = txns[0].first_seq
    for m in msgs:
        assert len(m.value) <= message_bytes_max
        assert m.key == message_key(m.first_seq)
        h = peek_header(m.value)
        assert (h.first_seq, h.last_seq, h.entry_count) == (m.first_seq, m.last_seq, m.entry_count)
        if h.is_part:
            # every part of a split txn routes by the txn's first seq: one partition, in order
            assert m.routing_seq in starts and m.routing_seq <= m.first_seq
            assert m.last_seq <= starts[m.routing_seq].last_seq
        else:
            assert m.routing_seq == m.first_seq in starts
        # dense, in order; a part continuing a value repeats the seq it ends on
        assert m.first_seq in (expected_seq, expected_seq - 1)
        expected_seq = m.last_seq + 1
    assert expected_seq == txns[-1].last_seq + 1


def roundtrip_norm(msgs: Sequence[EncodedMessage]) -> list[Any]:
    return [norm(t) for t in roundtrip(msgs)]


def test_decoded_batch_equals_the_model_batch_and_has_no_traceparent() -> None:
    txns = [*make_txns(1, 4, 3), Transaction.of(13, [(Op.DELETE, b"gone", b"")], 9)]
    [msg] = Encoder(WRITER).encode(txns, traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01")
    batch = Decoder().decode(msg.value)
    assert batch == Batch.from_transactions(WRITER, txns)
    assert batch.traceparent is None
    assert b"aaaaaaaa" not in msg.value


def test_messages_are_packed_greedily_below_the_limit() -> None:
    txns = make_txns(1, 2000, 10)  # ~2.9 MB of bodies: 3 full messages and a rest
    msgs = Encoder(WRITER).encode(txns)
    assert len(msgs) == 4
    assert all(len(m.value) <= MESSAGE_BYTES_MAX_DEFAULT for m in msgs)
    assert all(m.body_bytes > 0.9 * (MESSAGE_BYTES_MAX_DEFAULT - HEADER_BYTES) for m in msgs[:-1])
    assert roundtrip_norm(msgs) == [norm(t) for t in txns]


def test_incompressible_messages_are_stored_raw_and_still_fit() -> None:
    rng = random.Random(1)
    txn = Transaction.of(1, [(Op.PUT, b"k%d" % i, rng.randbytes(3000)) for i in range(50)], 5)
    msgs = Encoder(WRITER, message_bytes_max=20_000).encode([txn])
    assert len(msgs) > 1
    for m in msgs:
        assert len(m.value) <= 20_000
        assert peek_header(m.value).codec is Codec.NONE
    assert roundtrip_norm(msgs) == [norm(txn)]


def test_a_value_larger_than_a_message_is_cut_and_rejoined() -> None:
    rng = random.Random(2)
    big = rng.randbytes(50_000)
    txn = Transaction.of(
        10, [(Op.PUT, b"a", b"1"), (Op.PUT, b"big", big), (Op.DELETE, b"d", b"")], 3
    )
    msgs = Encoder(WRITER, message_bytes_max=4096).encode([txn])
    assert len(msgs) >= 13
    assert {m.routing_seq for m in msgs} == {10}
    assert [peek_header(m.value).part_index for m in msgs] == list(range(len(msgs)))
    assert roundtrip_norm(msgs) == [norm(txn)]


def test_encoder_refuses_invalid_transactions() -> None:
    enc = Encoder(WRITER)
    t1 = Transaction.of(1, [(Op.PUT, b"k", b"v")], 1)
    with pytest.raises(ValueError, match="dense"):
        enc.encode([t1, Transaction.of(3, [(Op.PUT, b"k", b"v")], 1)])
    with pytest.raises(ValueError, match="empty"):
        enc.encode([Transaction.of(1, [], 1)])
    with pytest.raises(ValueError, match="delete"):
        enc.encode([Transaction.of(1, [(Op.DELETE, b"k", b"v")], 1)])
    with pytest.raises(ValueError, match="ops"):
        enc.encode([Transaction(1, b"\x02", [b"k"], [b"v"], 1)])
    with pytest.raises(ValueError, match="seq"):
        enc.encode([Transaction.of(0, [(Op.PUT, b"k", b"v")], 1)])
    with pytest.raises(ValueError, match="message_bytes_max"):
        Encoder(WRITER, message_bytes_max=100)
    with pytest.raises(ValueError, match="key of"):
        Encoder(WRITER, message_bytes_max=1000).encode(
            [Transaction.of(1, [(Op.PUT, b"k" * 2000, b"v")], 1)]
        )


# ---------------------------------------------------------------------------- parts


def split(txn: Transaction, message_bytes_max: int) -> list[Batch]:
    msgs = Encoder(WRITER, message_bytes_max=message_bytes_max).encode([txn])
    return [Decoder().decode(m.value) for m in msgs]


BIG_TXN = Transaction.of(
    100, [(Op.PUT, b"key%03d" % i, random.Random(i).randbytes(300)) for i in range(20)], 77
)


def test_part_assembler_handles_resends_and_foreign_parts() -> None:
    parts = split(BIG_TXN, 1500)
    assert len(parts) >= 4 and all(p.is_part for p in parts)
    other = split(BIG_TXN, 2500)  # the same txn cut differently (a config change + crash)
    a = PartAssembler()
    feed = [*parts[:2], *other[:2], *parts[:3], *parts]
    results = [r for r in map(a.feed, feed) if r is not None]
    assert [norm(t) for r in results for t in r.transactions()] == [norm(BIG_TXN)]
    assert not a.pending

    # a part that does not continue is dropped with the txn in progress
    assert a.feed(parts[0]) is None and a.pending
    assert a.feed(parts[2]) is None and not a.pending
    # a whole batch passes through and abandons what was pending
    whole = Decoder().decode(Encoder(WRITER).encode(make_txns(1, 1, 2))[0].value)
    assert a.feed(parts[0]) is None
    assert a.feed(whole) is whole and not a.pending
    # a new writer epoch's parts do not continue the old epoch's (and do not destroy them)
    epoch2 = [
        Decoder().decode(m.value)
        for m in Encoder(WriterId(WRITER.stream_id, 8), message_bytes_max=1500).encode([BIG_TXN])
    ]
    assert a.feed(parts[0]) is None
    assert a.feed(epoch2[1]) is None and a.pending
    assert a.first_seq == BIG_TXN.first_seq
    # the old epoch's leftover goes once the replica applied that transaction
    assert not a.discard_through(BIG_TXN.first_seq - 1) and a.pending
    assert a.discard_through(BIG_TXN.first_seq) and not a.pending


def rogue(txns: Sequence[Transaction], epoch: int, message_bytes_max: int = 1 << 20) -> list[Batch]:
    """The same sequences with other content, published by a second writer."""
    forged = [
        Transaction(t.first_seq, t.ops, t.keys, [v + b"!" for v in t.values], t.timestamp_us)
        for t in txns
    ]
    enc = Encoder(WriterId(WRITER.stream_id, epoch), message_bytes_max=message_bytes_max)
    return [Decoder().decode(m.value) for m in enc.encode(forged)]


def test_part_assembler_keeps_parts_across_a_foreign_whole_batch() -> None:
    """A second writer's batch between the parts of a split transaction leaves it intact."""
    parts = split(BIG_TXN, 1500)
    (foreign,) = rogue([BIG_TXN], epoch=3)
    a = PartAssembler()
    assert a.add(parts[0], 10) is None and a.add(parts[1], 11) is None
    assert a.first_offset == 10
    out = a.add(foreign, 12)
    assert out is not None and out.batch is foreign and out.first_offset == 12
    assert a.pending and a.first_offset == 10  # still needed: a reader must not commit past 10
    results = [a.add(p, 13 + i) for i, p in enumerate(parts[2:])]
    assert results[:-1] == [None] * (len(parts) - 3)
    last = results[-1]
    assert last is not None and last.first_offset == 10
    assert [norm(t) for t in last.batch.transactions()] == [norm(BIG_TXN)]
    assert not a.pending and a.first_offset is None


def test_part_assembler_keeps_two_writers_parts_apart() -> None:
    """A second writer's split transaction interleaved with the real one: both complete."""
    parts = split(BIG_TXN, 1500)
    foreign = rogue([BIG_TXN], epoch=9, message_bytes_max=2500)
    assert len(foreign) > 1
    a = PartAssembler()
    done = [a.add(parts[0], 0), *(a.add(f, 1 + i) for i, f in enumerate(foreign))]
    done += [a.add(p, 100 + i) for i, p in enumerate(parts[1:])]
    whole = [d for d in done if d is not None]
    assert [(d.batch.writer.epoch, d.first_offset) for d in whole] == [(9, 1), (WRITER.epoch, 0)]
    assert [norm(t) for t in whole[1].batch.transactions()] == [norm(BIG_TXN)]
    assert whole[0].batch.values != whole[1].batch.values
    assert not a.pending


def test_part_assembler_same_writer_restarts_and_abandons() -> None:
    """The same writer's part 0 restarts its assembly; its whole batch abandons it."""
    parts = split(BIG_TXN, 1500)
    a = PartAssembler()
    a.add(parts[0], 0)
    a.add(parts[1], 1)
    assert a.add(parts[0], 2) is None and a.first_offset == 2
    (whole,) = [Decoder().decode(m.value) for m in Encoder(WRITER).encode([BIG_TXN])]
    out = a.add(whole, 3)
    assert out is not None and out.batch is whole and not a.pending


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 100), max_size=5), st.integers(600, 3000))
def test_part_assembler_yields_each_txn_once_whatever_the_crash_points(
    crashes: list[int], message_bytes_max: int
) -> None:
    parts = split(BIG_TXN, message_bytes_max)
    feed: list[Batch] = []
    for c in crashes:  # a publisher that crashed after sending some parts, then resent
        feed.extend(parts[: c % len(parts)])
    feed.extend(parts)
    a = PartAssembler()
    results = [r for r in map(a.feed, feed) if r is not None]
    assert len(results) == 1
    assert [norm(t) for t in results[0].transactions()] == [norm(BIG_TXN)]
    assert results[0].part_count == 1 and results[0].writer == WRITER


def test_part_assembler_refuses_oversized_transactions() -> None:
    parts = split(BIG_TXN, 1500)
    a = PartAssembler(txn_bytes_max=3000)
    with pytest.raises(DecodeError, match="txn_bytes_max"):
        for p in parts:
            a.feed(p)
    assert not a.pending


# ---------------------------------------------------------------------------- dictionaries


def json_txns(first_seq: int, count: int, seed: int) -> list[Transaction]:
    rng = random.Random(seed)
    names = ["alice", "bob", "carol", "dave", "erin", "frank"]
    return [
        Transaction.of(
            first_seq + i,
            [
                (
                    Op.PUT,
                    b"user:%08d" % rng.randrange(10**6),
                    json.dumps(
                        {
                            "id": rng.randrange(10**6),
                            "name": rng.choice(names),
                            "email": f"{rng.choice(names)}{rng.randrange(999)}@example.com",
                            "active": rng.random() < 0.5,
                            "balance": round(rng.random() * 1000, 2),
                        }
                    ).encode(),
                )
            ],
            1_700_000_000_000_000 + i,
        )
        for i in range(count)
    ]


def test_dictionary_shrinks_small_messages_and_is_required_to_decode() -> None:
    d = train_dictionary(training_samples(json_txns(1, 2000, seed=1)), size_bytes=8192)
    assert d.dict_id > 0
    test = json_txns(5000, 200, seed=2)
    plain = Encoder(WRITER)
    with_dict = Encoder(WRITER, dictionary=d)
    plain_bytes = with_dict_bytes = 0
    decoder = Decoder(dictionaries={d.dict_id: d})
    for t in test:
        [m1] = plain.encode([t])
        [m2] = with_dict.encode([t])
        plain_bytes += len(m1.value)
        with_dict_bytes += len(m2.value)
        h = peek_header(m2.value)
        assert h.codec is Codec.ZSTD_DICT and h.dict_id == d.dict_id
        assert [norm(x) for x in decoder.decode(m2.value).transactions()] == [norm(t)]
    assert with_dict_bytes < 0.8 * plain_bytes

    with pytest.raises(DecodeError, match=str(d.dict_id)):
        Decoder().decode(m2.value)
    late = Decoder()
    late.add_dictionary(d)
    assert late.decode(m2.value) == decoder.decode(m2.value)


def test_dictionary_validation() -> None:
    with pytest.raises(ValueError):
        ZstdDictionary(0, b"x")
    with pytest.raises(ValueError):
        ZstdDictionary(5, b"")
    with pytest.raises(ValueError, match="samples"):
        train_dictionary([b"a", b"b"])
    d = ZstdDictionary(5, b"x" * 100)
    with pytest.raises(ValueError):
        Decoder(dictionaries={6: d})


# ---------------------------------------------------------------------------- refusals

GOOD_BODY = [b"\x00", [b"k"], [b"v"], [1], [5]]


def test_hand_built_message_is_accepted() -> None:
    for codec in (0, 1):
        batch = Decoder().decode(raw_message(GOOD_BODY, codec=codec))
        assert (batch.keys, batch.values, batch.txn_sizes) == ([b"k"], [b"v"], [1])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"magic": b"XXXX"}, "magic"),
        ({"version": 2}, "version"),
        ({"flags": 2}, "flags"),  # bit 0 is ENCRYPTED (tests/test_crypto.py)
        ({"reserved": 1}, "reserved"),
        ({"codec": 3}, "codec"),
        ({"first_seq": 0}, "first_seq"),
        ({"entry_count": 2}, "column lengths"),
        ({"txn_count": 2, "entry_count": 1}, "txn_count"),
        ({"part_index": 2, "part_count": 2}, "part"),
        ({"body": [b"\x02", [b"k"], [b"v"], [1], [5]]}, "neither 0"),
        ({"body": [b"\x01", [b"k"], [b"v"], [1], [5]]}, "delete carries"),
        ({"body": [b"\x00", [b"k"], [b"v"], [2], [5]]}, "add up"),
        ({"body": [b"\x00", [b"k"], [b"v"], [0], [5]]}, "out of range"),
        ({"body": [b"\x00", [b"k"], [7], [1], [5]]}, "not binary"),
        ({"body": [b"\x00", [b"k"], [b"v"], [True], [5]]}, "integers"),
        ({"body": [b"\x00", [b"k"], [b"v"], [1], [-5]]}, "out of range"),
        ({"body": [b"\x00", [b"k"], [b"v"], [1]]}, "5-element"),
        ({"body": {b"a": 1}}, "msgpack"),
        ({"body": [b"\x00", ["k"], [b"v"], [1], [5]]}, "msgpack"),
        ({"raw_body": msgpack.packb(GOOD_BODY) + b"\x00"}, "msgpack"),
        ({"codec": 2, "dict_id": 0}, "dict_id"),
        ({"codec": 0, "dict_id": 9}, "dict_id"),
        ({"part_count": 2, "txn_count": 2, "entry_count": 2}, "one transaction"),
    ],
)
def test_decoder_refuses(kwargs: dict[str, Any], match: str) -> None:
    body = kwargs.pop("body", GOOD_BODY)
    value = raw_message(body, **kwargs)
    with pytest.raises(DecodeError, match=match):
        Decoder().decode(value)


def test_decoder_refuses_bad_crc_lengths_and_bombs() -> None:
    [msg] = Encoder(WRITER).encode(make_txns(1, 3, 10))
    v = bytearray(msg.value)
    v[72] ^= 1
    with pytest.raises(DecodeError, match="CRC32C"):
        Decoder().decode(bytes(v))
    with pytest.raises(DecodeError, match="payload bytes"):
        Decoder().decode(msg.value + b"\x00")
    with pytest.raises(DecodeError, match="payload bytes"):
        Decoder().decode(msg.value[:-1])
    with pytest.raises(DecodeError, match="shorter"):
        Decoder().decode(msg.value[:50])
    with pytest.raises(DecodeError, match="message_bytes_max"):
        Decoder(message_bytes_max=100).decode(msg.value)
    with pytest.raises(DecodeError, match="body_bytes_max"):
        Decoder(body_bytes_max=100).decode(msg.value)

    # A bomb: 100 MB of zeros compresses to a few KB; the header claims a small body.
    bomb = zstandard.ZstdCompressor().compress(bytes(100 << 20))
    value = bytearray(raw_message(None, raw_body=b"\x00" * 10))
    value[40:44] = (1000).to_bytes(4, "big")
    value[44:48] = len(bomb).to_bytes(4, "big")
    value[6] = Codec.ZSTD
    with pytest.raises(DecodeError, match="declares"):
        Decoder().decode(bytes(value[:76]) + bomb)
    # ... and a frame without a declared size may not produce more than the header says
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(1 << 20))
    value[44:48] = len(unsized).to_bytes(4, "big")
    with pytest.raises(DecodeError):
        Decoder().decode(bytes(value[:76]) + unsized)
    with pytest.raises(DecodeError, match="bytes"):
        Decoder().decode("not bytes")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- WAL records

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@settings(max_examples=100, deadline=None)
@given(transactions(max_txns=1), st.one_of(st.none(), st.just(TRACEPARENT)))
def test_wal_record_round_trip(txns: list[Transaction], traceparent: str | None) -> None:
    txn = txns[0]
    got, tp = decode_transaction(encode_transaction(txn, traceparent))
    assert norm(got) == norm(txn) and tp == traceparent


@pytest.mark.parametrize(
    "record",
    [
        [2, 1, 5, b"\x00", [b"k"], [b"v"], None],
        [1, 0, 5, b"\x00", [b"k"], [b"v"], None],
        [1, 1, -5, b"\x00", [b"k"], [b"v"], None],
        [1, 1, 5, b"", [], [], None],
        [1, 1, 5, b"\x00", [b"k"], [b"v", b"w"], None],
        [1, 1, 5, b"\x01", [b"k"], [b"v"], None],
        [1, 1, 5, b"\x00", [b"k"], [b"v"], 17],
        [1, 1, 5, b"\x00", [b"k"], [b"v"], "caf\u00e9"],
        [1, 1, 5, b"\x00", [b"k"], [b"v"]],
        {"a": 1},
    ],
)
def test_wal_record_refusals(record: Any) -> None:
    with pytest.raises(DecodeError):
        decode_transaction(msgpack.packb(record, use_bin_type=True))


def test_wal_record_encoder_refuses_bad_input() -> None:
    with pytest.raises(ValueError):
        encode_transaction(Transaction.of(1, [], 1))
    with pytest.raises(ValueError):
        encode_transaction(Transaction.of(1, [(Op.PUT, b"k", b"v")], 1), "caf\u00e9")


# ---------------------------------------------------------------------------- docs, bench

DOC = Path(__file__).resolve().parent.parent / "docs" / "wire-format.md"


def test_docs_worked_example_and_decoder_match_the_code() -> None:
    text = DOC.read_text()
    txn = Transaction.of(
        41,
        [(Op.PUT, b"user:1", b'{"name":"ada"}'), (Op.DELETE, b"user:2", b"")],
        1_700_000_000_000_000,
    )
    [msg] = Encoder(WRITER).encode([txn])
    dump = re.search(r"## Worked example.*?```\n(.*?)```", text, re.S)
    assert dump is not None
    documented = bytes.fromhex("".join(line[6:53] for line in dump.group(1).splitlines()))
    assert documented == msg.value
    assert partition_for(41, 6) == 3

    snippet = re.search(r"## A decoder in 15 lines.*?```python\n(.*?)```", text, re.S)
    assert snippet is not None
    namespace: dict[str, Any] = {}
    exec(snippet.group(1), namespace)
    got = namespace["decode"](msg.value)
    assert (got["first_seq"], got["keys"], got["values"]) == (41, list(txn.keys), list(txn.values))
    big = make_txns(1, 30, 10)
    [zmsg] = Encoder(WRITER).encode(big)
    assert peek_header(zmsg.value).codec is Codec.ZSTD
    assert namespace["decode"](zmsg.value)["txn_sizes"] == [10] * 30


def test_codec_bench_reports_its_figures() -> None:
    figures = run_codec_bench(entries=2_000)
    assert figures["entries"] == 2_000
    assert figures["decode_entries_per_s"] > 0 and figures["encode_entries_per_s"] > 0
    assert figures["small"]["ratio_with_dict"] > figures["small"]["ratio_without_dict"]
