"""The reader under faults: corrupt input, retention, split brain, SIGKILL at random points."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from test_reader import (
    digest_of,
    end_offsets,
    make_reader,
    make_txns,
    new_writer,
    publish,
    reference_digest,
)
from walship.shared.codec import Encoder, partition_for
from walship.shared.devcluster import DevCluster
from walship.shared.errors import DecodeError, RetentionExpiredError, SplitBrainError
from walship.shared.model import Batch, Transaction, WriterId
from walship.shared.store import Checkpoint, ReplicaStore

pytestmark = pytest.mark.kafka


async def test_corrupt_message_stops_the_reader_and_nothing_after_is_applied(
    kafka_bootstrap: str, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    topic = new_topic(2)
    writer = new_writer()
    good = make_txns(1, 60, seed=11)
    bad = make_txns(good[-1].last_seq + 1, 5, seed=12)
    after = make_txns(bad[-1].last_seq + 1, 60, seed=13)
    await publish(kafka_bootstrap, topic, 2, writer, good)
    # One message whose body no longer matches its checksum (header still readable).
    message = Encoder(writer).encode(bad)[0]
    corrupt = bytearray(message.value)
    corrupt[-3] ^= 0xFF
    partition = partition_for(message.routing_seq, 2)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    md = await producer.send_and_wait(topic, bytes(corrupt), key=message.key, partition=partition)
    await producer.stop()
    await publish(kafka_bootstrap, topic, 2, writer, after)
    reader = make_reader(tmp_path / "r.db", kafka_bootstrap, topic)
    async with reader:
        with pytest.raises(DecodeError) as info:
            await asyncio.wait_for(reader.run(until_seq=after[-1].last_seq), 60)
        healthy, reason = reader.healthy()
    text = str(info.value)
    assert f"topic={topic}" in text
    assert f"partition={md.partition}" in text and f"offset={md.offset}" in text
    assert f"seq={bad[0].first_seq}..{bad[-1].last_seq}" in text
    assert not healthy and "undecodable" in reason
    with ReplicaStore(tmp_path / "r.db") as store:
        assert store.applied_seq == good[-1].last_seq
    assert digest_of(tmp_path / "r.db") == reference_digest(tmp_path / "ref.db", writer, good)


async def test_corrupt_message_recovered_through_a_snapshot_past_it(
    kafka_bootstrap: str, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    topic = new_topic(1)
    writer = new_writer()
    good = make_txns(1, 30, seed=14)
    bad = make_txns(good[-1].last_seq + 1, 3, seed=15)
    after = make_txns(bad[-1].last_seq + 1, 30, seed=16)
    await publish(kafka_bootstrap, topic, 1, writer, good)
    message = Encoder(writer).encode(bad)[0]
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    await producer.send_and_wait(topic, message.value[:-5] + b"xxxxx", key=message.key, partition=0)
    await producer.stop()
    # No good copy of `bad` is on the topic: only a snapshot past it can get the reader on.
    await publish(kafka_bootstrap, topic, 1, writer, after)
    path = tmp_path / "r.db"
    calls: list[str] = []

    async def hook(reason: str) -> Checkpoint | None:
        calls.append(reason)
        return catch_up(path, writer, good + bad, {0: 0})

    reader = make_reader(path, kafka_bootstrap, topic, bootstrap=hook)
    async with reader:
        await asyncio.wait_for(reader.run(until_seq=after[-1].last_seq), 60)
    assert len(calls) == 1 and "undecodable" in calls[0]
    # Re-read from offset 0: the corrupt message now only repeats what the snapshot holds.
    assert digest_of(path) == reference_digest(tmp_path / "ref.db", writer, good + bad + after)


def catch_up(
    replica: Path, writer: WriterId, txns: Sequence[Transaction], offsets: dict[int, int]
) -> Checkpoint:
    """What a snapshot bootstrap achieves: the replica holds the state at the end of
    ``txns`` and continues from the snapshot's ``offsets``."""
    with ReplicaStore(replica) as store:
        batch = Batch.from_transactions(writer, txns).drop_through(store.applied_seq)
        if batch.entry_count:
            store.apply([batch], writer=writer)
        cp = store.checkpoint()
        new = Checkpoint(cp.applied_seq, offsets, writer, cp.applied_timestamp_us)
        store.set_checkpoint(new)
    return new


async def test_retention_expired_without_a_hook_names_the_fix(
    devcluster: DevCluster, tmp_path: Path
) -> None:
    devcluster.create_topic("t", 2)
    bootstrap = devcluster.bootstrap_servers
    writer = new_writer()
    txns = make_txns(1, 200, seed=17)
    await publish(bootstrap, "t", 2, writer, txns, message_bytes_max=1024)
    ends = await end_offsets(bootstrap, "t", 2)
    assert ends[0] >= 4
    devcluster.truncate("t", 0, ends[0] // 2)
    reader = make_reader(tmp_path / "r.db", bootstrap, "t", gap_timeout_ms=500)
    async with reader:
        with pytest.raises(RetentionExpiredError) as info:
            await asyncio.wait_for(reader.run(until_seq=txns[-1].last_seq), 60)
    assert "snapshot" in str(info.value) and "partition 0" in str(info.value)
    assert not reader.healthy()[0]


async def test_retention_expired_while_away_bootstraps_and_continues(
    devcluster: DevCluster, tmp_path: Path
) -> None:
    devcluster.create_topic("t", 3)
    bootstrap = devcluster.bootstrap_servers
    writer = new_writer()
    first = make_txns(1, 100, seed=18)
    second = make_txns(first[-1].last_seq + 1, 100, seed=19)
    third = make_txns(second[-1].last_seq + 1, 100, seed=20)
    path = tmp_path / "r.db"
    await publish(bootstrap, "t", 3, writer, first)
    reader = make_reader(path, bootstrap, "t", gap_timeout_ms=500)
    async with reader:
        await asyncio.wait_for(reader.run(until_seq=first[-1].last_seq), 60)
    await publish(bootstrap, "t", 3, writer, second)
    snapshot_offsets = await end_offsets(bootstrap, "t", 3)
    await publish(bootstrap, "t", 3, writer, third)
    # While the reader was away, retention deleted part of `second` on every partition.
    for p, end in snapshot_offsets.items():
        devcluster.truncate("t", p, end - 1)
    calls: list[str] = []

    async def hook(reason: str) -> Checkpoint | None:
        calls.append(reason)
        return catch_up(path, writer, first + second, snapshot_offsets)

    reader = make_reader(path, bootstrap, "t", gap_timeout_ms=500, bootstrap=hook)
    async with reader:
        await asyncio.wait_for(reader.run(until_seq=third[-1].last_seq), 60)
        assert reader.status().bootstraps == 1
    assert len(calls) == 1
    expected = reference_digest(tmp_path / "ref.db", writer, first + second + third)
    assert digest_of(path) == expected


async def test_fresh_reader_on_a_log_starting_beyond_seq_1(
    devcluster: DevCluster, tmp_path: Path
) -> None:
    # The topic only ever held seqs from 101 (e.g. recreated): no offset was deleted,
    # but the earliest seq left is beyond applied + 1.
    devcluster.create_topic("t", 2)
    bootstrap = devcluster.bootstrap_servers
    writer = new_writer()
    txns = make_txns(1, 200, seed=21)
    await publish(bootstrap, "t", 2, writer, txns[100:])
    reader = make_reader(tmp_path / "r.db", bootstrap, "t", gap_timeout_ms=300)
    async with reader:
        with pytest.raises(RetentionExpiredError) as info:
            await asyncio.wait_for(reader.run(until_seq=txns[-1].last_seq), 60)
    assert "needs 1 " in str(info.value)


async def test_two_writers_on_one_topic_is_split_brain(
    kafka_bootstrap: str, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    topic = new_topic(2)
    writer = new_writer()
    impostor = WriterId(writer.stream_id, 7)
    await publish(kafka_bootstrap, topic, 2, writer, make_txns(1, 40, seed=22))
    await publish(kafka_bootstrap, topic, 2, impostor, make_txns(1, 40, seed=23))
    reader = make_reader(tmp_path / "r.db", kafka_bootstrap, topic)
    async with reader:
        with pytest.raises(SplitBrainError) as info:
            await asyncio.wait_for(reader.run(until_seq=10_000), 60)
    text = str(info.value)
    assert "epoch 1" in text and "epoch 7" in text and "offset" in text


async def test_another_stream_on_the_topic_is_refused(
    kafka_bootstrap: str, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    topic = new_topic(1)
    await publish(kafka_bootstrap, topic, 1, new_writer(), make_txns(1, 10))
    other = new_writer()
    await publish(kafka_bootstrap, topic, 1, other, make_txns(1, 10))
    reader = make_reader(tmp_path / "r.db", kafka_bootstrap, topic)
    async with reader:
        with pytest.raises(SplitBrainError) as info:
            await asyncio.wait_for(reader.run(until_seq=10_000), 60)
    assert other.stream_id.hex() in str(info.value)


# --- SIGKILL at random points under load ------------------------------------------


def _reader_process(
    bootstrap: str, topic: str, data_dir: Path, *extra: str
) -> subprocess.Popen[bytes]:
    env = dict(os.environ, WALSHIP_LOG_LEVEL="warning", OTEL_SDK_DISABLED="true")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "walship.shared.cli.main",
            "consumer",
            "run",
            "--bootstrap-servers",
            bootstrap,
            "--topic",
            topic,
            "--data-dir",
            str(data_dir),
            "--reader-id",
            "killed",
            *extra,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def _kill_repeatedly(
    bootstrap: str, topic: str, tmp_path: Path, iterations: int, seed: int
) -> None:
    rng = random.Random(seed)
    writer = new_writer()
    partitions = 3
    txns = make_txns(1, 3000, seed=seed, value_bytes=100)
    chunks = [txns[i : i + 100] for i in range(0, len(txns), 100)]
    data_dir = tmp_path / "reader"
    published = 0

    async def load() -> None:
        nonlocal published
        for chunk in chunks:
            await publish(bootstrap, topic, partitions, writer, chunk, message_bytes_max=8192)
            # Resend a random older stretch now and then (a publisher restart).
            if rng.random() < 0.3 and published:
                start = rng.randrange(0, published)
                await publish(bootstrap, topic, partitions, writer, txns[start : start + 30])
            published += len(chunk)
            await asyncio.sleep(rng.uniform(0, 0.3))

    loader = asyncio.create_task(load())
    for _ in range(iterations):
        proc = _reader_process(bootstrap, topic, data_dir)
        await asyncio.sleep(rng.uniform(0.8, 2.0))
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait)
    await loader
    last = txns[-1].last_seq
    proc = _reader_process(bootstrap, topic, data_dir, "--until-seq", str(last))
    _, err = await asyncio.to_thread(proc.communicate, None, 120)
    assert proc.returncode == 0, err.decode()
    assert digest_of(data_dir / "state.db") == reference_digest(tmp_path / "ref.db", writer, txns)


async def test_reader_sigkilled_at_random_points_ends_equal(
    kafka_bootstrap: str, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    await _kill_repeatedly(kafka_bootstrap, new_topic(3), tmp_path, iterations=5, seed=31)


@pytest.mark.slow
async def test_reader_sigkilled_30_times_ends_equal(
    kafka_bootstrap: str, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    started = time.monotonic()
    await _kill_repeatedly(kafka_bootstrap, new_topic(3), tmp_path, iterations=30, seed=32)
    assert time.monotonic() - started < 300
