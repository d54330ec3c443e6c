"""Point-in-time restore: to a sequence and to a time, equal to the writer's state then."""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from walship.consumer.bootstrap import kafka_log_inspector
from walship.shared.codec import Encoder, partition_for
from walship.shared.errors import ConfigError
from walship.shared.model import Batch, Op, Transaction, WriterId
from walship.shared.snapshot import FileSnapshotStore
from walship.shared.snapshot.create import create_snapshot
from walship.shared.snapshot.restore import (
    RestoreError,
    RestoreTarget,
    cut_batch,
    parse_time_us,
    plan_restore,
    restore,
)
from walship.shared.store import Checkpoint, Digest, ReplicaStore, digest_file, digest_items

WRITER = WriterId(stream_id=b"R" * 16, epoch=2)
PARTITIONS = 3
T0 = 1_700_000_000_000_000


# --- pure parts -------------------------------------------------------------------


def _batch() -> Batch:
    txns = [
        Transaction.of(1, [(Op.PUT, b"a", b"1"), (Op.PUT, b"b", b"2")], 100),
        Transaction.of(3, [(Op.DELETE, b"a", b"")], 200),
        Transaction.of(4, [(Op.PUT, b"c", b"3"), (Op.PUT, b"d", b"4"), (Op.PUT, b"e", b"5")], 300),
    ]
    return Batch.from_transactions(WRITER, txns)


def test_cut_batch_by_seq_and_time() -> None:
    b = _batch()
    assert cut_batch(b, RestoreTarget(to_seq=10)) == (b, False)
    prefix, reached = cut_batch(b, RestoreTarget(to_seq=3))
    assert reached and prefix is not None and prefix.last_seq == 3 and len(prefix.txn_sizes) == 2
    assert cut_batch(b, RestoreTarget(to_seq=6)) == (b, True)
    assert cut_batch(b, RestoreTarget(to_seq=0)) == (None, True)
    with pytest.raises(RestoreError, match=re.escape("inside transaction 4..6")):
        cut_batch(b, RestoreTarget(to_seq=5))
    prefix, reached = cut_batch(b, RestoreTarget(to_time_us=250))
    assert reached and prefix is not None and prefix.last_seq == 3
    assert cut_batch(b, RestoreTarget(to_time_us=99)) == (None, True)
    assert cut_batch(b, RestoreTarget(to_time_us=300)) == (b, False)


def test_parse_time() -> None:
    assert parse_time_us("1700000000.123456") == 1_700_000_000_123_456
    assert parse_time_us("1700000000") == 1_700_000_000_000_000
    assert parse_time_us("2023-11-14T22:13:20Z") == 1_700_000_000_000_000
    assert parse_time_us("2023-11-14T22:13:20.5") == 1_700_000_000_500_000
    assert parse_time_us("2023-11-15T00:13:20+02:00") == 1_700_000_000_000_000
    with pytest.raises(ConfigError):
        parse_time_us("yesterday")
    with pytest.raises(ConfigError):
        RestoreTarget()
    with pytest.raises(ConfigError):
        RestoreTarget(to_seq=1, to_time_us=1)


# --- against the log ------------------------------------------------------------------


@dataclass
class History:
    """The writer's state after every transaction, and what was published where."""

    txns: list[Transaction] = field(default_factory=list)
    digests: dict[int, Digest] = field(default_factory=dict)  # by txn index
    offsets_after: list[dict[int, int]] = field(default_factory=list)  # by txn index


async def publish_history(bootstrap: str, topic: str, n_txns: int = 60) -> History:
    rng = random.Random(5)
    h = History()
    state: dict[bytes, bytes] = {}
    seq = 1
    for i in range(n_txns):
        ops: list[tuple[Op, bytes, bytes]] = []
        for _ in range(rng.randint(1, 30)):
            key = b"key-%03d" % rng.randrange(150)
            if rng.random() < 0.2:
                ops.append((Op.DELETE, key, b""))
                state.pop(key, None)
            else:
                value = rng.randbytes(rng.randint(0, 300))
                ops.append((Op.PUT, key, value))
                state[key] = value
        txn = Transaction.of(seq, ops, T0 + 1000 * i)
        seq = txn.last_seq + 1
        h.txns.append(txn)
        h.digests[i] = digest_items(txn.last_seq, sorted(state.items()))
    # Small messages: many per partition, some transactions split into parts.
    enc = Encoder(WRITER, message_bytes_max=2048)
    offsets: dict[int, int] = {}
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        for txn in h.txns:
            for msg in enc.encode([txn]):
                p = partition_for(msg.routing_seq, PARTITIONS)
                md = await producer.send_and_wait(topic, msg.value, key=msg.key, partition=p)
                offsets[p] = md.offset + 1
            h.offsets_after.append(dict(offsets))
    finally:
        await producer.stop()
    return h


def writer_store(path: Path, h: History, upto: int) -> ReplicaStore:
    store = ReplicaStore(path)
    store.apply([Batch.from_transactions(WRITER, h.txns[: upto + 1])], writer=WRITER)
    return store


@pytest.fixture
async def world(
    tmp_path: Path, kafka_bootstrap: str, new_topic: Callable[..., str]
) -> tuple[str, str, History, FileSnapshotStore]:
    topic = new_topic(PARTITIONS, prefix="restore")
    h = await publish_history(kafka_bootstrap, topic)
    snaps = FileSnapshotStore(tmp_path / "snaps")
    # Snapshot at txn 25 with the offsets published as of txn 20: conservative,
    # the replay re-reads txns 21..25 and must drop them as duplicates.
    with writer_store(tmp_path / "w.db", h, 25) as store:
        await create_snapshot(
            store,
            snaps,
            topic=topic,
            partitions=PARTITIONS,
            offsets=h.offsets_after[20],
            offsets_seq=h.txns[20].last_seq,
            chunk_keys=16,
        )
    return kafka_bootstrap, topic, h, snaps


async def run_restore(
    world: tuple[str, str, History, FileSnapshotStore],
    out: Path,
    target: RestoreTarget,
    **kw: bool,
) -> Digest:
    bootstrap, topic, _, snaps = world
    kwargs = {"bootstrap_servers": bootstrap}
    plan = await plan_restore(
        snaps, topic=topic, target=target, inspect_log=kafka_log_inspector(topic, kwargs)
    )
    return await restore(plan, out, snapshot_store=snaps, client_kwargs=kwargs, **kw)


@pytest.mark.kafka
async def test_restore_to_seq_equals_writer_state(
    world: tuple[str, str, History, FileSnapshotStore], tmp_path: Path
) -> None:
    h = world[2]
    for i in (25, 26, 44, 59):
        out = tmp_path / f"r{i}.db"
        d = await run_restore(world, out, RestoreTarget(to_seq=h.txns[i].last_seq))
        assert d == h.digests[i], i
        assert digest_file(out) == h.digests[i]


@pytest.mark.kafka
async def test_restore_to_time_equals_writer_state(
    world: tuple[str, str, History, FileSnapshotStore], tmp_path: Path
) -> None:
    h = world[2]
    # After the snapshot: snapshot + replay up to the last txn at or before T.
    d = await run_restore(world, tmp_path / "a.db", RestoreTarget(to_time_us=T0 + 1000 * 37 + 999))
    assert d == h.digests[37]
    # Before the snapshot: the log is complete, so replay from seq 1.
    d = await run_restore(world, tmp_path / "b.db", RestoreTarget(to_time_us=T0 + 1000 * 10))
    assert d == h.digests[10]
    # Beyond the end of the log: the latest state.
    d = await run_restore(world, tmp_path / "c.db", RestoreTarget(to_time_us=T0 + 10**12))
    assert d == h.digests[59]


@pytest.mark.kafka
async def test_restore_refuses_what_it_cannot_do(
    world: tuple[str, str, History, FileSnapshotStore], tmp_path: Path
) -> None:
    h = world[2]
    last = h.txns[-1].last_seq
    with pytest.raises(
        RestoreError, match=re.escape(f"seqs {last + 1}..{last + 5} are not in the log")
    ):
        await run_restore(world, tmp_path / "x.db", RestoreTarget(to_seq=last + 5))
    assert not (tmp_path / "x.db").exists()
    inside = h.txns[30].first_seq
    if len(h.txns[30]) > 1:
        with pytest.raises(RestoreError, match="inside transaction"):
            await run_restore(world, tmp_path / "y.db", RestoreTarget(to_seq=inside))
    out = tmp_path / "z.db"
    await run_restore(world, out, RestoreTarget(to_seq=h.txns[30].last_seq))
    with pytest.raises(ConfigError, match="--force"):
        await run_restore(world, out, RestoreTarget(to_seq=h.txns[40].last_seq))
    d = await run_restore(world, out, RestoreTarget(to_seq=h.txns[40].last_seq), force=True)
    assert d == h.digests[40] == digest_file(out)


@pytest.mark.kafka
async def test_plan_names_missing_sequences_after_truncation(
    tmp_path: Path, devcluster: object
) -> None:
    from walship.shared.devcluster import DevCluster

    assert isinstance(devcluster, DevCluster)
    topic = "restore-trunc"
    devcluster.create_topic(topic, PARTITIONS)
    bootstrap = devcluster.bootstrap_servers
    h = await publish_history(bootstrap, topic, n_txns=30)
    snaps = FileSnapshotStore(tmp_path / "snaps")
    with writer_store(tmp_path / "w.db", h, 10) as store:
        await create_snapshot(
            store,
            snaps,
            topic=topic,
            partitions=PARTITIONS,
            offsets=h.offsets_after[10],
            offsets_seq=h.txns[10].last_seq,
        )
    # Retention deletes everything published up to txn 20 on every partition.
    for p, o in h.offsets_after[20].items():
        devcluster.truncate(topic, p, o)
    kwargs = {"bootstrap_servers": bootstrap}
    with pytest.raises(RestoreError) as info:
        await plan_restore(
            snaps,
            topic=topic,
            target=RestoreTarget(to_seq=h.txns[25].last_seq),
            inspect_log=kafka_log_inspector(topic, kwargs),
        )
    msg = str(info.value)
    assert f"seqs {h.txns[10].last_seq + 1}..{h.txns[21].first_seq - 1}" in msg
    assert "partition" in msg and "log starts at" in msg
    # Restoring exactly to the snapshot needs no log at all.
    plan = await plan_restore(
        snaps,
        topic=topic,
        target=RestoreTarget(to_seq=h.txns[10].last_seq),
        inspect_log=kafka_log_inspector(topic, kwargs),
    )
    assert "nothing" in " ".join(plan.describe())
    d = await restore(plan, tmp_path / "r.db", snapshot_store=snaps, client_kwargs=kwargs)
    assert d == h.digests[10]


@pytest.mark.kafka
def test_cli_create_list_verify_restore(
    tmp_path: Path, kafka_bootstrap: str, new_topic: Callable[..., str]
) -> None:
    import asyncio
    import json

    from click.testing import CliRunner
    from walship.shared.cli.main import main

    topic = new_topic(PARTITIONS, prefix="cli")
    h = asyncio.run(publish_history(kafka_bootstrap, topic, n_txns=20))
    replica = tmp_path / "replica.db"
    with writer_store(replica, h, 9) as store:
        store.set_checkpoint(
            Checkpoint(
                applied_seq=h.txns[9].last_seq,
                offsets=h.offsets_after[9],
                writer=WRITER,
                applied_timestamp_us=h.txns[9].timestamp_us,
            )
        )
    common = [
        "--bootstrap-servers",
        kafka_bootstrap,
        "--topic",
        topic,
        "--snapshot-url",
        (tmp_path / "snaps").as_uri(),
    ]
    runner = CliRunner()
    r = runner.invoke(main, ["snapshot", "create", "--replica", str(replica), "--json", *common])
    assert r.exit_code == 0, r.output
    created = json.loads(r.output)
    assert created["seq"] == h.txns[9].last_seq and created["offsets"] == {
        str(p): o for p, o in sorted(h.offsets_after[9].items())
    }
    r = runner.invoke(main, ["snapshot", "list", "--json", *common])
    assert r.exit_code == 0 and json.loads(r.output)[0]["snapshot_id"] == created["snapshot_id"]
    r = runner.invoke(main, ["snapshot", "verify", *common])
    assert r.exit_code == 0 and "digest matches" in r.output, r.output
    out = tmp_path / "restored.db"
    target = str(h.txns[15].last_seq)
    r = runner.invoke(
        main, ["snapshot", "restore", "--out", str(out), "--to-seq", target, "--dry-run", *common]
    )
    assert r.exit_code == 0 and "dry run" in r.output and not out.exists(), r.output
    assert f"seqs {h.txns[9].last_seq + 1}..{target}" in r.output
    r = runner.invoke(main, ["snapshot", "restore", "--out", str(out), "--to-seq", target, *common])
    assert r.exit_code == 0, r.output
    assert digest_file(out) == h.digests[15]
    r = runner.invoke(main, ["snapshot", "restore", "--out", str(out), "--to-seq", target, *common])
    assert r.exit_code == 2 and "--force" in r.output
    # A corrupted chunk makes verify fail with exit code 1, naming the chunk.
    chunk = next((tmp_path / "snaps" / created["snapshot_id"]).glob("chunk-*"))
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0xFF
    chunk.write_bytes(bytes(data))
    r = runner.invoke(main, ["snapshot", "verify", created["snapshot_id"], *common])
    assert r.exit_code == 1 and "CORRUPT" in r.output and "chunk=0" in r.output, r.output
