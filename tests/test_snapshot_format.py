"""The pure snapshot format: chunk frames, manifests, ids, connection checks."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from walship.shared.errors import SnapshotCorruptError
from walship.shared.snapshot.create import SchedulePolicy, rechunk
from walship.shared.snapshot.format import (
    CHUNK_HEADER_BYTES,
    FORMAT_VERSION,
    ChunkInfo,
    Manifest,
    chunk_info,
    connects,
    decode_chunk,
    decode_manifest,
    encode_chunk,
    encode_manifest,
    make_snapshot_id,
    missing_partitions,
    parse_snapshot_id,
)

SID = make_snapshot_id(12, 345)


def manifest(**over: object) -> Manifest:
    frame = encode_chunk([b"a", b"b"], [b"1", b"22"])
    base: dict[str, object] = dict(
        snapshot_id=SID,
        stream_id="00" * 16,
        writer_epoch=2,
        seq=12,
        seq_timestamp_us=300,
        created_at_us=345,
        source="writer",
        topic="t",
        partitions=2,
        offsets={0: 5, 1: 7},
        keys=2,
        total_bytes=len(frame),
        raw_bytes=5,
        chunks=(chunk_info(0, frame, [b"a", b"b"]),),
        digest="ab" * 32,
    )
    base.update(over)
    return Manifest(**base)  # type: ignore[arg-type]


def test_chunk_round_trip() -> None:
    keys = [b"k%d" % i for i in range(100)]
    values = [b"x" * i for i in range(100)]
    frame = encode_chunk(keys, values)
    info = chunk_info(4, frame, keys)
    assert info.keys == 100 and info.first_key == b"k0" and info.stored_bytes == len(frame)
    assert decode_chunk(frame, snapshot_id=SID, index=4, info=info) == (keys, values)


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_any_single_byte_change_is_detected(data: st.DataObject) -> None:
    frame = encode_chunk([b"key-%d" % i for i in range(20)], [b"value" * i for i in range(20)])
    i = data.draw(st.integers(0, len(frame) - 1))
    flip = data.draw(st.integers(1, 255))
    bad = frame[:i] + bytes([frame[i] ^ flip]) + frame[i + 1 :]
    with pytest.raises(SnapshotCorruptError) as info:
        decode_chunk(bad, snapshot_id=SID, index=3)
    assert info.value.context == {"snapshot": SID, "chunk": 3}


@given(st.binary(max_size=200))
def test_garbage_never_escapes_as_another_error(blob: bytes) -> None:
    with pytest.raises(SnapshotCorruptError):
        decode_chunk(b"WSNC" + blob, snapshot_id=SID, index=0)


def test_truncated_frame_is_detected() -> None:
    frame = encode_chunk([b"a"], [b"b"])
    for n in range(len(frame)):
        with pytest.raises(SnapshotCorruptError):
            decode_chunk(frame[:n], snapshot_id=SID, index=0)


def test_sizes_are_bounded_before_allocation() -> None:
    frame = bytearray(encode_chunk([b"a"], [b"b" * 1000]))
    with pytest.raises(SnapshotCorruptError, match="exceeds"):
        decode_chunk(bytes(frame), snapshot_id=SID, index=0, body_bytes_max=100)
    # A header claiming a huge key count for a small body is refused up front.
    struct.pack_into(">I", frame, 8, 10**9)
    with pytest.raises(SnapshotCorruptError, match="cannot fit"):
        decode_chunk(bytes(frame), snapshot_id=SID, index=0)


def test_manifest_check_against_chunk_info() -> None:
    frame = encode_chunk([b"a"], [b"b"])
    info = ChunkInfo(index=0, keys=1, stored_bytes=len(frame), crc32c=1)
    with pytest.raises(SnapshotCorruptError, match="CRC32C"):
        decode_chunk(frame, snapshot_id=SID, index=0, info=info)
    short = ChunkInfo(index=0, keys=1, stored_bytes=len(frame) + 1, crc32c=1)
    with pytest.raises(SnapshotCorruptError, match="bytes"):
        decode_chunk(frame, snapshot_id=SID, index=0, info=short)
    assert CHUNK_HEADER_BYTES == 24


def test_manifest_round_trip_and_crc() -> None:
    m = manifest()
    data = encode_manifest(m)
    assert decode_manifest(data) == m
    assert b'"format_version":%d' % FORMAT_VERSION in data
    tampered = data.replace(b'"seq":12', b'"seq":13')
    with pytest.raises(SnapshotCorruptError, match="CRC32C"):
        decode_manifest(tampered)
    for cut in (1, len(data) // 2, len(data) - 1):
        with pytest.raises(SnapshotCorruptError):
            decode_manifest(data[:cut])


def test_manifest_validation() -> None:
    with pytest.raises(SnapshotCorruptError, match="snapshot_id"):
        manifest(seq=13).validate()
    with pytest.raises(SnapshotCorruptError, match="keys"):
        manifest(keys=3).validate()
    with pytest.raises(SnapshotCorruptError, match="partitions"):
        manifest(offsets={5: 1}).validate()
    with pytest.raises(SnapshotCorruptError, match="format_version"):
        manifest(format_version=99).validate()


def test_snapshot_ids_sort_by_seq_then_time() -> None:
    ids = [make_snapshot_id(s, t) for s, t in [(9, 5), (10, 1), (10, 2), (100, 0)]]
    assert sorted(ids) == ids
    assert parse_snapshot_id(ids[1]) == (10, 1)
    for bad in ("", "../x", "1-2", ids[0] + "/"):
        with pytest.raises(SnapshotCorruptError):
            parse_snapshot_id(bad)


def test_missing_partitions_names_each_gap() -> None:
    m = manifest()
    assert connects(m, {0: 5, 1: 0})
    assert missing_partitions(m, {0: 6, 1: 7}) == {0: (5, 6)}
    assert not connects(m, {1: 8})


def test_rechunk_respects_both_limits() -> None:
    pairs = [(b"%03d" % i, b"v" * i) for i in range(100)]
    out = list(rechunk([pairs[:30], pairs[30:]], keys_max=7, raw_bytes_max=200))
    assert [p for k, v, _ in out for p in zip(k, v, strict=True)] == pairs
    for keys, values, raw in out:
        assert len(keys) <= 7
        assert raw == sum(map(len, keys)) + sum(map(len, values))
        assert raw <= 200 or len(keys) == 1


def test_schedule_policy() -> None:
    p = SchedulePolicy(every_seqs=100, every_s=60)
    assert not p.due(seq=50, last_seq=0, now_s=10, last_s=0)
    assert p.due(seq=100, last_seq=0, now_s=10, last_s=0)
    assert p.due(seq=1, last_seq=0, now_s=61, last_s=0)
    assert not p.due(seq=5, last_seq=5, now_s=1000, last_s=0)  # nothing new
    assert p.due(seq=0, last_seq=-1, now_s=0, last_s=0)  # no snapshot yet
