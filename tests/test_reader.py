"""The reader against a Kafka-protocol cluster: ordered apply, resume, duplicates, parts."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from walship.consumer import Replica
from walship.consumer.applier import DictApplier, SqliteApplier
from walship.consumer.reader import BootstrapHook, Reader, group_id_for
from walship.shared.codec import Encoder, partition_for
from walship.shared.model import Batch, Op, Transaction, WriterId
from walship.shared.store import Digest, ReplicaStore

pytestmark = pytest.mark.kafka


def new_writer(epoch: int = 1, stream_id: bytes | None = None) -> WriterId:
    return WriterId(stream_id or os.urandom(16), epoch)


def make_txns(
    first_seq: int, count: int, *, seed: int = 0, keys: int = 200, value_bytes: int = 40
) -> list[Transaction]:
    """``count`` transactions of 1-5 entries from ``first_seq``: puts, overwrites, deletes."""
    rng = random.Random(seed * 1_000_003 + first_seq)
    txns = []
    seq = first_seq
    for _ in range(count):
        kvs = []
        for _ in range(rng.randint(1, 5)):
            key = b"key-%05d" % rng.randrange(keys)
            if rng.random() < 0.1:
                kvs.append((Op.DELETE, key, b""))
            else:
                kvs.append((Op.PUT, key, rng.randbytes(value_bytes)))
        txns.append(Transaction.of(seq, kvs, timestamp_us=1_700_000_000_000_000 + seq))
        seq += len(kvs)
    return txns


def reference_digest(path: Path, writer: WriterId, txns: Sequence[Transaction]) -> Digest:
    """The writer's state after ``txns``, computed by applying them to a fresh store."""
    with ReplicaStore(path) as store:
        store.apply([Batch.from_transactions(writer, txns)], writer=writer)
        return store.digest()


async def publish(
    bootstrap: str,
    topic: str,
    partitions: int,
    writer: WriterId,
    txns: Sequence[Transaction],
    *,
    message_bytes_max: int = 4096,
    partition_of: Callable[[int], int] | None = None,
    traceparent: str | None = None,
) -> list[tuple[int, int]]:
    """Publish like the publisher does (key = first seq, partition from the routing seq)."""
    encoder = Encoder(writer, message_bytes_max=message_bytes_max)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    placed = []
    try:
        futures = []
        for m in encoder.encode(txns):
            p = (
                partition_of(m.routing_seq)
                if partition_of
                else partition_for(m.routing_seq, partitions)
            )
            headers = [("traceparent", traceparent.encode())] if traceparent else None
            futures.append(
                await producer.send(topic, m.value, key=m.key, partition=p, headers=headers)
            )
        for fut in futures:
            md = await fut
            placed.append((md.partition, md.offset))
    finally:
        await producer.stop()
    return placed


async def end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        return {tp.partition: o for tp, o in (await consumer.end_offsets(tps)).items()}
    finally:
        await consumer.stop()


async def committed_offsets(
    bootstrap: str, topic: str, reader_id: str, partitions: int
) -> dict[int, int | None]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=group_id_for(topic, reader_id),
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        return {p: await consumer.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        await consumer.stop()


def make_reader(
    path: Path,
    servers: str,
    topic: str,
    reader_id: str = "r1",
    *,
    gap_timeout_ms: int = 2000,
    bootstrap: BootstrapHook | None = None,
) -> Reader:
    return Reader(
        SqliteApplier(path),
        topic=topic,
        reader_id=reader_id,
        client_kwargs={"bootstrap_servers": servers},
        gap_timeout_ms=gap_timeout_ms,
        bootstrap=bootstrap,
    )


async def run_until(reader: Reader, seq: int, timeout_s: float = 60) -> None:
    await asyncio.wait_for(reader.run(until_seq=seq), timeout_s)


def digest_of(path: Path) -> Digest:
    with ReplicaStore(path) as store:
        return store.digest()


async def test_reader_applies_everything_and_acks(
    kafka_bootstrap: str, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    topic = new_topic(3)
    writer = new_writer()
    txns = make_txns(1, 400)
    last = txns[-1].last_seq
    await publish(kafka_bootstrap, topic, 3, writer, txns)
    reader = make_reader(tmp_path / "r.db", kafka_bootstrap, topic)
    async with reader:
        await run_until(reader, last)
        assert reader.healthy() == (True, "ok")
        assert reader.ready(0) == (True, "ok")
        st = reader.status()
        assert st.applied_seq == last and st.lag_seqs == 0
    assert digest_of(tmp_path / "r.db") == reference_digest(tmp_path / "ref.db", writer, txns)
    ends = await end_offsets(kafka_bootstrap, topic, 3)
    with ReplicaStore(tmp_path / "r.db") as store:
        cp = store.checkpoint()
    assert cp.writer == writer
    assert {p: o for p, o in cp.offsets.items() if ends[p]} == {p: o for p, o in ends.items() if o}
    assert await committed_offsets(kafka_bootstrap, topic, "r1", 3) == {
        p: (o if o else None) for p, o in ends.items()
    }


async def test_two_readers_started_at_different_times(
    kafka_bootstrap: str, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    topic = new_topic(4)
    writer = new_writer()
    first = make_txns(1, 200, seed=1)
    second = make_txns(first[-1].last_seq + 1, 300, seed=2)
    last = second[-1].last_seq
    await publish(kafka_bootstrap, topic, 4, writer, first)
    early = make_reader(tmp_path / "a.db", kafka_bootstrap, topic, "early")
    async with early:
        task = asyncio.create_task(early.run(until_seq=last))
        await publish(kafka_bootstrap, topic, 4, writer, second)
        late = make_reader(tmp_path / "b.db", kafka_bootstrap, topic, "late")
        async with late:
            await run_until(late, last)
        await asyncio.wait_for(task, 60)
    expected = reference_digest(tmp_path / "ref.db", writer, first + second)
    assert digest_of(tmp_path / "a.db") == expected
    assert digest_of(tmp_path / "b.db") == expected


async def test_resume_from_the_local_checkpoint_not_kafka(
    kafka_bootstrap: str, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    topic = new_topic(2)
    writer = new_writer()
    txns = make_txns(1, 300, seed=3)
    await publish(kafka_bootstrap, topic, 2, writer, txns)
    mid = txns[150].last_seq
    reader = make_reader(tmp_path / "r.db", kafka_bootstrap, topic)
    async with reader:
        await run_until(reader, mid)
    # Kafka's committed offsets claim everything is done; the replica knows better.
    ends = await end_offsets(kafka_bootstrap, topic, 2)
    bogus = AIOKafkaConsumer(
        bootstrap_servers=kafka_bootstrap,
        group_id=group_id_for(topic, "r1"),
        enable_auto_commit=False,
    )
    await bogus.start()
    tps = [TopicPartition(topic, p) for p in range(2)]
    bogus.assign(tps)
    await bogus.commit({tp: ends[tp.partition] for tp in tps})
    await bogus.stop()
    reader = make_reader(tmp_path / "r.db", kafka_bootstrap, topic)
    async with reader:
        assert reader.applied_seq >= mid
        await run_until(reader, txns[-1].last_seq)
    assert digest_of(tmp_path / "r.db") == reference_digest(tmp_path / "ref.db", writer, txns)


async def test_until_caught_up(
    kafka_bootstrap: str, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    topic = new_topic(3)
    writer = new_writer()
    txns = make_txns(1, 120, seed=4)
    await publish(kafka_bootstrap, topic, 3, writer, txns)
    reader = make_reader(tmp_path / "r.db", kafka_bootstrap, topic)
    async with reader:
        assert await reader.last_topic_seq() == txns[-1].last_seq
        await asyncio.wait_for(reader.run(until_caught_up=True), 60)
        assert reader.applied_seq == txns[-1].last_seq


async def test_duplicated_and_reordered_deliveries_change_nothing(
    kafka_bootstrap: str, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    topic = new_topic(3)
    writer = new_writer()
    txns = make_txns(1, 300, seed=5)
    last = txns[-1].last_seq
    # Later sequences first, on "wrong" partitions; then everything again, cut differently
    # by a restarted writer (higher epoch), then old batches once more on other partitions.
    await publish(kafka_bootstrap, topic, 3, writer, txns[150:], partition_of=lambda s: s % 3)
    await publish(kafka_bootstrap, topic, 3, writer, txns[:200], message_bytes_max=2048)
    restarted = WriterId(writer.stream_id, 2)
    await publish(kafka_bootstrap, topic, 3, restarted, txns[100:], message_bytes_max=8192)
    await publish(kafka_bootstrap, topic, 3, writer, txns[:50], partition_of=lambda s: 2)
    reader = make_reader(tmp_path / "r.db", kafka_bootstrap, topic)
    async with reader:
        await run_until(reader, last)
        await asyncio.wait_for(reader.run(until_caught_up=True), 60)
        assert reader.status().duplicates > 0
    assert digest_of(tmp_path / "r.db") == reference_digest(tmp_path / "ref.db", writer, txns)


async def test_transactions_split_into_parts(
    kafka_bootstrap: str, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    topic = new_topic(3)
    writer = new_writer()
    small = make_txns(1, 20, seed=6)
    seq = small[-1].last_seq + 1
    big = Transaction.of(
        seq, [(Op.PUT, b"big-%04d" % i, os.urandom(100)) for i in range(200)], timestamp_us=7
    )
    tail = make_txns(big.last_seq + 1, 20, seed=7)
    txns = [*small, big, *tail]
    placed = await publish(kafka_bootstrap, topic, 3, writer, txns, message_bytes_max=4096)
    assert len(placed) > len(txns) // 10  # the big one went out in several parts
    reader = make_reader(tmp_path / "r.db", kafka_bootstrap, topic)
    async with reader:
        await run_until(reader, tail[-1].last_seq)
    assert digest_of(tmp_path / "r.db") == reference_digest(tmp_path / "ref.db", writer, txns)


async def test_dict_applier_and_small_groups(
    kafka_bootstrap: str, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    topic = new_topic(2)
    writer = new_writer()
    txns = make_txns(1, 100, seed=8)
    await publish(kafka_bootstrap, topic, 2, writer, txns)
    applier = DictApplier()
    reader = Reader(
        applier,
        topic=topic,
        reader_id="dict",
        client_kwargs={"bootstrap_servers": kafka_bootstrap},
        apply_entries_max=7,
        partition_buffer_bytes_max=1,  # pauses constantly: must still make progress
    )
    async with reader:
        await asyncio.wait_for(reader.run(until_seq=txns[-1].last_seq), 60)
    assert applier.digest() == reference_digest(tmp_path / "ref.db", writer, txns)


async def test_replica_read_api_while_reading(
    kafka_bootstrap: str, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    topic = new_topic(2)
    writer = new_writer()
    txns = make_txns(1, 50, seed=9, keys=20)
    await publish(kafka_bootstrap, topic, 2, writer, txns)
    path = tmp_path / "r.db"
    reader = make_reader(path, kafka_bootstrap, topic)
    async with reader:
        await run_until(reader, txns[-1].last_seq)
        with Replica(path) as replica:
            assert replica.applied_seq == txns[-1].last_seq
            with ReplicaStore(tmp_path / "ref.db") as ref:
                ref.apply([Batch.from_transactions(writer, txns)])
                expected = dict(ref.scan())
            assert dict(replica.scan()) == expected
            assert dict(replica.scan(b"key-0001")) == {
                k: v for k, v in expected.items() if k.startswith(b"key-0001")
            }
            some = next(iter(expected))
            assert replica.get(some) == expected[some]
            assert replica.get(b"absent") is None
            more = make_txns(txns[-1].last_seq + 1, 10, seed=10, keys=20)
            await publish(kafka_bootstrap, topic, 2, writer, more)
            await run_until(reader, more[-1].last_seq)
            assert replica.applied_seq == more[-1].last_seq


async def test_two_readers_match_the_real_writer_through_the_publisher(
    kafka_bootstrap: str, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    from walship.producer.publisher import Publisher
    from walship.producer.writer import Writer

    topic = new_topic(3)
    data_dir = tmp_path / "writer"
    rng = random.Random(51)

    async def write(writer: Writer, count: int) -> None:
        for _ in range(count):
            ops = []
            for _ in range(rng.randint(1, 4)):
                key = b"k%03d" % rng.randrange(150)
                if rng.random() < 0.1:
                    ops.append((Op.DELETE, key, b""))
                else:
                    ops.append((Op.PUT, key, rng.randbytes(30)))
            await writer.append(ops)

    async def publish_all() -> None:
        async with Publisher(
            data_dir,
            topic=topic,
            partitions=3,
            producer_kwargs={"bootstrap_servers": kafka_bootstrap},
            message_bytes_max=4096,
        ) as publisher:
            await asyncio.wait_for(publisher.run(until_caught_up=True), 60)

    async with Writer(data_dir) as writer:
        await write(writer, 150)
        await publish_all()
        early = make_reader(tmp_path / "a.db", kafka_bootstrap, topic, "early")
        async with early:
            await asyncio.wait_for(early.run(until_caught_up=True), 60)
        await write(writer, 150)
        await publish_all()
        last = writer.last_seq
    # A restarted writer (new epoch) continues the sequence.
    async with Writer(data_dir) as writer:
        await write(writer, 50)
        await publish_all()
        last = writer.last_seq
        await writer.wait_applied()  # state.db follows the WAL shortly after an append
        expected = writer.store.digest()
    for path, reader_id in ((tmp_path / "a.db", "early"), (tmp_path / "b.db", "late")):
        reader = make_reader(path, kafka_bootstrap, topic, reader_id)
        async with reader:
            await run_until(reader, last)
        assert digest_of(path) == expected


async def send_raw(
    bootstrap: str, topic: str, partition: int, values: Sequence[bytes]
) -> list[int]:
    """Append encoded messages to one partition in order; returns their offsets."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        return [
            (await producer.send_and_wait(topic, v, partition=partition)).offset for v in values
        ]
    finally:
        await producer.stop()


async def test_foreign_message_between_parts_neither_stalls_nor_commits_past_them(
    kafka_bootstrap: str, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    """A restarted writer's resend (other epoch) lands between the parts of a split
    transaction. The parts survive it, and until the last part arrives the reader's
    checkpoint and Kafka commit stay before the first part: a reader restarted in
    between still finds every part and applies the transaction."""
    topic = new_topic(1)
    writer = new_writer()
    small = make_txns(1, 10, seed=11)
    big = Transaction.of(
        small[-1].last_seq + 1,
        [(Op.PUT, b"big-%03d" % i, os.urandom(100)) for i in range(60)],
        timestamp_us=9,
    )
    parts = [m.value for m in Encoder(writer, message_bytes_max=2048).encode([big])]
    assert len(parts) >= 3
    resend = Encoder(WriterId(writer.stream_id, 2)).encode(small[5:])  # the same content
    whole = [m.value for m in Encoder(writer).encode(small)]
    offsets = await send_raw(kafka_bootstrap, topic, 0, [*whole, *parts[:2]])
    first_part = offsets[len(whole)]
    await send_raw(kafka_bootstrap, topic, 0, [m.value for m in resend])

    reader = make_reader(tmp_path / "r.db", kafka_bootstrap, topic)
    async with reader:
        running = asyncio.create_task(reader.run())
        async with asyncio.timeout(30):
            # Polling on purpose: the test watches the reader from outside.
            while reader.status().duplicates < 1 or reader.applied_seq < small[-1].last_seq:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)  # a flush of whatever became safe
        assert reader.healthy() == (True, "ok")
        await reader.stop()
        await running
        assert reader.stored_offsets()[0] <= first_part
    assert (await committed_offsets(kafka_bootstrap, topic, "r1", 1))[0] <= first_part

    await send_raw(kafka_bootstrap, topic, 0, parts[2:])
    reader = make_reader(tmp_path / "r.db", kafka_bootstrap, topic)
    async with reader:
        await run_until(reader, big.last_seq, timeout_s=30)
        assert reader.stored_offsets()[0] == first_part + len(parts) + len(resend)
    txns = [*small, big]
    assert digest_of(tmp_path / "r.db") == reference_digest(tmp_path / "ref.db", writer, txns)


class SlowApplier(DictApplier):
    """A DictApplier whose commits take a while; records group sizes and overlap."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.groups: list[int] = []
        self.active = 0
        self.overlapped = False

    def apply(
        self,
        batches: Sequence[Batch],
        offsets: Mapping[int, int] | None = None,
        writer: WriterId | None = None,
    ) -> None:
        self.active += 1
        self.overlapped |= self.active > 1
        try:
            time.sleep(self.delay_s)
            super().apply(batches, offsets, writer)
            self.groups.append(sum(b.entry_count for b in batches))
        finally:
            self.active -= 1


async def test_applies_are_pipelined_one_at_a_time_and_groups_grow_when_behind(
    kafka_bootstrap: str, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    topic = new_topic(3)
    writer = new_writer()
    txns = make_txns(1, 600, seed=11)
    last = txns[-1].last_seq
    await publish(kafka_bootstrap, topic, 3, writer, txns, message_bytes_max=1024)
    applier = SlowApplier(0.05)
    reader = Reader(
        applier,
        topic=topic,
        reader_id="pipe",
        client_kwargs={"bootstrap_servers": kafka_bootstrap},
        apply_entries_max=400,
    )
    async with reader:
        await asyncio.wait_for(reader.run(until_seq=last), 60)
        assert reader.applied_seq == last
    assert not applier.overlapped  # never two applies at once: seq order holds
    assert sum(applier.groups) == last
    # Behind (everything published up front, slow commits): the groups fill up while
    # the previous apply runs instead of one commit per fetched message.
    assert len(applier.groups) < last / 100
    assert max(applier.groups) >= 400
    assert applier.digest() == reference_digest(tmp_path / "ref.db", writer, txns)


async def test_a_caught_up_reader_applies_new_data_without_lingering(
    kafka_bootstrap: str, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    topic = new_topic(3)
    writer = new_writer()
    txns = make_txns(1, 30, seed=12)
    reader = make_reader(tmp_path / "r.db", kafka_bootstrap, topic)
    async with reader:
        run = asyncio.create_task(reader.run())
        try:
            delays = []
            for txn in txns:
                await publish(kafka_bootstrap, topic, 3, writer, [txn])
                t = time.monotonic()
                while reader.applied_seq < txn.last_seq:  # noqa: ASYNC110 (no event to await)
                    await asyncio.sleep(0.001)
                delays.append(time.monotonic() - t)
        finally:
            reader.request_stop()
            await run
    delays.sort()
    # fetch_max_wait_ms=20 and no apply linger: well under the old 100 ms linger + 500 ms wait.
    assert delays[len(delays) // 2] < 0.1, delays


async def test_total_buffer_bound_pauses_ahead_yet_a_gap_still_fills(
    kafka_bootstrap: str, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    """Over ``buffer_bytes_max`` the partitions ahead are paused, but never those that
    may deliver the missing seq: the gap fills long before the gap timeout."""
    topic = new_topic(3)
    writer = new_writer()
    txns = make_txns(1, 300, seed=11)
    await publish(kafka_bootstrap, topic, 3, writer, txns[100:])  # beyond a gap
    applier = DictApplier()
    reader = Reader(
        applier,
        topic=topic,
        reader_id="bounded",
        client_kwargs={"bootstrap_servers": kafka_bootstrap},
        buffer_bytes_max=1,  # always over: pauses on every step
        gap_timeout_ms=600_000,  # no resume-everything: the bound itself must let it fill
    )
    async with reader:
        run = asyncio.create_task(reader.run(until_seq=txns[-1].last_seq))
        deadline = asyncio.get_running_loop().time() + 30
        while reader.status().waiting_for != 1:
            assert asyncio.get_running_loop().time() < deadline, reader.status()
            await asyncio.sleep(0.05)
        await publish(kafka_bootstrap, topic, 3, writer, txns[:100])
        await asyncio.wait_for(run, 60)
    assert applier.digest() == reference_digest(tmp_path / "ref.db", writer, txns)
