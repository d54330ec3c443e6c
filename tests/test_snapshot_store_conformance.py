"""ONE conformance suite for every SnapshotStore: file:// and kafka:// run the same tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from walship.shared.errors import SnapshotCorruptError, SnapshotError, SnapshotNotFoundError
from walship.shared.model import WriterId
from walship.shared.snapshot import FileSnapshotStore, KafkaSnapshotStore, open_store
from walship.shared.snapshot.base import SnapshotStore, verify_snapshot
from walship.shared.snapshot.create import write_snapshot
from walship.shared.snapshot.flaky import FlakyStore, InjectedFault
from walship.shared.snapshot.format import Manifest, decode_chunk
from walship.shared.store import digest_items

WRITER = WriterId(stream_id=bytes(range(16)), epoch=3)


def items(n: int, salt: bytes = b"") -> list[tuple[bytes, bytes]]:
    return sorted((f"key-{i:06d}".encode(), b"v" * (i % 50) + salt) for i in range(n))


async def put(
    store: SnapshotStore,
    seq: int,
    pairs: list[tuple[bytes, bytes]],
    *,
    created_at_us: int = 1_700_000_000_000_000,
    chunk_keys: int = 100,
) -> Manifest:
    return await write_snapshot(
        store,
        [pairs],
        seq=seq,
        seq_timestamp_us=created_at_us - 5,
        writer=WRITER,
        topic="stream",
        partitions=3,
        offsets={0: 10, 1: 20, 2: 30},
        source="replica",
        chunk_keys=chunk_keys,
        created_at_us=created_at_us,
    )


@pytest.fixture(params=["file", pytest.param("kafka", marks=pytest.mark.kafka)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SnapshotStore]:
    s: SnapshotStore
    if request.param == "file":
        s = open_store((tmp_path / "snaps").as_uri())
        assert isinstance(s, FileSnapshotStore)
    else:
        new_topic: Callable[..., str] = request.getfixturevalue("new_topic")
        bootstrap: str = request.getfixturevalue("kafka_bootstrap")
        topic = new_topic(1, prefix="snap")
        # Small pieces: every chunk spans several Kafka messages.
        s = KafkaSnapshotStore(topic, bootstrap, piece_bytes=700)
    try:
        yield s
    finally:
        await s.close()


async def test_round_trip(store: SnapshotStore) -> None:
    pairs = items(1050)
    m = await put(store, 42, pairs)
    assert len(m.chunks) == 11 and m.keys == 1050
    assert m.digest == digest_items(42, pairs).sha256
    listed = await store.list_manifests()
    assert [x.snapshot_id for x in listed] == [m.snapshot_id]
    got = await store.get_manifest(m.snapshot_id)
    assert got == m
    assert dict(got.offsets) == {0: 10, 1: 20, 2: 30}
    back: list[tuple[bytes, bytes]] = []
    for info in got.chunks:
        frame = await store.get_chunk(m.snapshot_id, info.index)
        keys, values = decode_chunk(frame, snapshot_id=m.snapshot_id, index=info.index, info=info)
        back.extend(zip(keys, values, strict=True))
    assert back == pairs
    report = await verify_snapshot(store, got)
    assert report.ok and report.keys == 1050 and report.chunks == 11


async def test_empty_state_round_trips(store: SnapshotStore) -> None:
    m = await put(store, 0, [])
    assert m.chunks == () and m.keys == 0
    assert (await verify_snapshot(store, await store.get_manifest(m.snapshot_id))).ok


async def test_corrupted_chunk_is_detected_naming_snapshot_and_chunk(store: SnapshotStore) -> None:
    flaky = FlakyStore(store, corrupt={"put_chunk": {3}})
    m = await put(flaky, 7, items(500))
    with pytest.raises(SnapshotCorruptError) as info:
        await verify_snapshot(store, m)
    assert info.value.context["snapshot"] == m.snapshot_id
    assert info.value.context["chunk"] == 2
    report = await verify_snapshot(store, m, raise_on_error=False)
    assert not report.ok and len(report.problems) == 1 and "chunk=2" in report.problems[0]


async def test_corruption_on_read_is_detected(store: SnapshotStore) -> None:
    m = await put(store, 7, items(300))
    flaky = FlakyStore(store, corrupt={"get_chunk": {2}})
    with pytest.raises(SnapshotCorruptError) as info:
        await verify_snapshot(flaky, m)
    assert info.value.context["chunk"] == 1


async def test_missing_manifest_is_not_listed(store: SnapshotStore) -> None:
    done = await put(store, 5, items(50))
    flaky = FlakyStore(store, fail={"put_manifest": {1}})
    with pytest.raises(InjectedFault):
        await put(flaky, 9, items(250), created_at_us=1_800_000_000_000_000)
    listed = await store.list_manifests()
    assert [m.snapshot_id for m in listed] == [done.snapshot_id]
    with pytest.raises(SnapshotNotFoundError):
        await store.get_manifest("00000000000000000009-01800000000000000000")


async def test_interrupted_chunk_upload_leaves_no_snapshot(store: SnapshotStore) -> None:
    flaky = FlakyStore(store, fail={"put_chunk": {2}})
    with pytest.raises(InjectedFault):
        await put(flaky, 9, items(250))
    assert await store.list_manifests() == []


async def test_manifest_before_chunks_is_refused(store: SnapshotStore) -> None:
    m = await put(store, 3, items(250))
    other = Manifest(**{**{f: getattr(m, f) for f in m.__dataclass_fields__}})
    await store.delete(m.snapshot_id)
    with pytest.raises(SnapshotError):
        await store.put_manifest(other)
    assert await store.list_manifests() == []


async def test_missing_chunk_names_the_chunk(store: SnapshotStore) -> None:
    m = await put(store, 3, items(250))
    with pytest.raises(SnapshotCorruptError) as info:
        await store.get_chunk(m.snapshot_id, 99)
    assert info.value.context["chunk"] == 99


async def test_newest_first_by_seq_then_time(store: SnapshotStore) -> None:
    a = await put(store, 10, items(20), created_at_us=3_000)
    b = await put(store, 30, items(20), created_at_us=1_000)
    c = await put(store, 30, items(20), created_at_us=2_000)
    d = await put(store, 20, items(20), created_at_us=9_000)
    listed = [m.snapshot_id for m in await store.list_manifests()]
    assert listed == [c.snapshot_id, b.snapshot_id, d.snapshot_id, a.snapshot_id]


async def test_retention_keeps_newest(store: SnapshotStore) -> None:
    made = [await put(store, seq, items(30), created_at_us=seq) for seq in (1, 5, 3, 9, 7)]
    deleted = await store.retain(2)
    assert sorted(deleted) == sorted(m.snapshot_id for m in made if m.seq in (1, 3, 5))
    listed = await store.list_manifests()
    assert [m.seq for m in listed] == [9, 7]
    with pytest.raises(SnapshotNotFoundError):
        await store.get_manifest(made[0].snapshot_id)
    assert await store.retain(2) == []
    with pytest.raises(ValueError):
        await store.retain(0)


async def test_delete_unknown_is_not_an_error(store: SnapshotStore) -> None:
    await store.delete("00000000000000000001-00000000000000000001")
    assert await store.list_manifests() == []


async def test_malformed_ids_are_refused(store: SnapshotStore) -> None:
    with pytest.raises(SnapshotCorruptError):
        await store.get_chunk("../etc", 0)


async def test_digest_mismatch_is_detected(store: SnapshotStore) -> None:
    m = await put(store, 4, items(120))
    wrong = Manifest(**{**{f: getattr(m, f) for f in m.__dataclass_fields__}, "digest": "0" * 64})
    with pytest.raises(SnapshotCorruptError, match="digest"):
        await verify_snapshot(store, wrong)


async def test_a_second_store_instance_sees_the_same_snapshots(
    store: SnapshotStore, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    m = await put(store, 11, items(150))
    other: SnapshotStore
    if isinstance(store, FileSnapshotStore):
        other = FileSnapshotStore(store.root)
    else:
        assert isinstance(store, KafkaSnapshotStore)
        other = KafkaSnapshotStore(store.topic, request.getfixturevalue("kafka_bootstrap"))
    try:
        assert [x.snapshot_id for x in await other.list_manifests()] == [m.snapshot_id]
        assert (await verify_snapshot(other, m)).ok
    finally:
        await other.close()


@pytest.mark.kafka
async def test_kafka_snapshot_that_lost_chunks_to_retention_is_not_listed(
    devcluster: object,
) -> None:
    from walship.shared.devcluster import DevCluster

    assert isinstance(devcluster, DevCluster)
    devcluster.create_topic("snaps", 1)
    store = KafkaSnapshotStore("snaps", devcluster.bootstrap_servers, piece_bytes=500)
    try:
        old = await put(store, 1, items(300), created_at_us=1)
        new = await put(store, 2, items(300), created_at_us=2)
        assert [m.seq for m in await store.list_manifests()] == [2, 1]
        devcluster.truncate("snaps", 0, 3)  # the first pieces of the old snapshot are gone
        assert [m.snapshot_id for m in await store.list_manifests()] == [new.snapshot_id]
        with pytest.raises(SnapshotCorruptError):
            await store.get_chunk(old.snapshot_id, 0)
    finally:
        await store.close()
