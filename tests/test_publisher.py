"""Publisher: pure batching/ack logic, the durable position, and publishing to Kafka."""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from hypothesis import given, settings
from hypothesis import strategies as st
from publisher_helpers import WRITER, MemoryWal, Received, entries_by_seq, read_topic
from walship.producer.batching import (
    AckTracker,
    Backoff,
    BatchAccumulator,
    message_ends,
    txn_size_bytes,
)
from walship.producer.position import FILE_NAME, PublishedPosition
from walship.producer.publisher import SEQ_HEADER, Publisher
from walship.producer.wal import WalWriter
from walship.shared.codec import Encoder, message_key, partition_for
from walship.shared.devcluster import DevCluster
from walship.shared.errors import WalError
from walship.shared.kafka import describe_topic
from walship.shared.model import Op, Transaction

_TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _txn(first_seq: int, entries: int = 1, value_bytes: int = 10) -> Transaction:
    return Transaction.of(
        first_seq,
        [(Op.PUT, b"k%d" % (first_seq + i), b"v" * value_bytes) for i in range(entries)],
        1_000,
    )


# -- BatchAccumulator ------------------------------------------------------------


def test_accumulator_fills_by_size_and_keeps_whole_transactions() -> None:
    size = txn_size_bytes(_txn(1))
    acc = BatchAccumulator(batch_bytes_max=3 * size, linger_ms=1_000)
    seq = 1
    for _ in range(3):
        t = _txn(seq)
        assert acc.fits(t)
        acc.add(t, None, now_ms=0)
        seq = t.last_seq + 1
    assert acc.full() and acc.ready(now_ms=0)
    assert not acc.fits(_txn(seq))
    with pytest.raises(ValueError, match="does not fit"):
        acc.add(_txn(seq), None, now_ms=0)
    batch = acc.take()
    assert [t.first_seq for t in batch.txns] == [1, 2, 3]
    assert (batch.first_seq, batch.last_seq, batch.entry_count) == (1, 3, 3)
    assert acc.empty and acc.due_ms() is None


def test_accumulator_lingers_then_is_ready() -> None:
    acc = BatchAccumulator(batch_bytes_max=1 << 20, linger_ms=5)
    acc.add(_txn(1), "tp-a", now_ms=100)
    acc.add(_txn(2), None, now_ms=103)
    assert acc.due_ms() == 105
    assert not acc.ready(now_ms=104.9)
    assert acc.ready(now_ms=105)
    assert acc.take().traceparent == "tp-a"


def test_accumulator_oversized_transaction_forms_a_batch_alone() -> None:
    acc = BatchAccumulator(batch_bytes_max=100, linger_ms=5)
    big = _txn(1, entries=3, value_bytes=500)
    assert acc.fits(big)
    acc.add(big, None, now_ms=0)
    assert acc.full()
    assert not acc.fits(_txn(4))


def test_accumulator_refuses_gaps() -> None:
    acc = BatchAccumulator(batch_bytes_max=1 << 20, linger_ms=5)
    acc.add(_txn(1, entries=2), None, now_ms=0)
    with pytest.raises(ValueError, match="dense"):
        acc.add(_txn(4), None, now_ms=0)
    acc.reset(next_seq=10)
    with pytest.raises(ValueError, match="dense"):
        acc.add(_txn(3), None, now_ms=0)
    acc.add(_txn(10), None, now_ms=0)


def test_message_ends() -> None:
    assert message_ends([_txn(1, 2), _txn(3, 1)]) == frozenset({2, 3})


# -- AckTracker ----------------------------------------------------------------


def test_tracker_advances_only_over_acknowledged_prefix() -> None:
    t = AckTracker(acked_seq=10, offsets={0: 5})
    a = t.sent(11, 12, partition=0, ends_txn=True)
    b = t.sent(13, 15, partition=1, ends_txn=True)
    c = t.sent(16, 16, partition=0, ends_txn=True)
    assert not t.acked(b, offset=7)  # out of order: prefix blocked by 11..12
    assert t.acked_seq == 10 and t.offsets == {0: 5}
    assert t.acked(a, offset=5)
    assert t.acked_seq == 15 and t.offsets == {0: 6, 1: 8}
    assert t.acked(c, offset=6)
    assert t.acked_seq == 16 and t.offsets == {0: 7, 1: 8}
    assert t.in_flight == 0


def test_tracker_waits_for_the_last_part_of_a_split_transaction() -> None:
    t = AckTracker()
    a = t.sent(1, 4, partition=2, ends_txn=False)  # part 1 of txn 1..10
    b = t.sent(5, 8, partition=2, ends_txn=False)
    c = t.sent(8, 8, partition=2, ends_txn=False)  # seq 8's value continues
    d = t.sent(8, 10, partition=2, ends_txn=True)
    with pytest.raises(ValueError, match="dense"):
        t.sent(10, 11, partition=2, ends_txn=True)  # only parts may overlap
    for msg_id, offset in ((a, 0), (b, 1), (c, 2)):
        t.acked(msg_id, offset)
    assert t.acked_seq == 0 and t.offsets == {}
    t.acked(d, 3)
    assert t.acked_seq == 10 and t.offsets == {2: 4}


def test_tracker_reset_resends_from_acked() -> None:
    t = AckTracker()
    t.acked(t.sent(1, 1, partition=0, ends_txn=True), 0)
    t.acked(t.sent(2, 2, partition=1, ends_txn=True), 0)
    t.sent(3, 3, partition=0, ends_txn=True)
    late = t.sent(4, 4, partition=1, ends_txn=True)
    t.acked(late, 1)  # acknowledged, but 3 is not: 4 is resent after a reset
    assert t.reset() == 3
    assert t.sent_seq == 2 and t.in_flight == 0
    with pytest.raises(ValueError, match="dense"):
        t.sent(4, 4, partition=1, ends_txn=True)
    with pytest.raises(KeyError):
        t.acked(late, 1)  # a discarded message's late acknowledgement
    assert t.acked(t.sent(3, 3, partition=0, ends_txn=True), 1)
    assert (t.acked_seq, t.offsets) == (3, {0: 2, 1: 1})


def test_tracker_records_end_offsets_only_when_caught_up() -> None:
    t = AckTracker(acked_seq=4, offsets={0: 2, 1: 3})
    assert t.caught_up(wal_last_seq=4) and not t.caught_up(wal_last_seq=5)
    count = t.sent_count
    # a crashed session left messages after offset 3 on partition 1
    assert t.caught_up_at({0: 2, 1: 7}, wal_last_seq=4, sent_count=count)
    assert t.offsets == {0: 2, 1: 7}
    assert not t.caught_up_at({0: 2, 1: 7}, wal_last_seq=4, sent_count=count)  # nothing moved
    assert not t.caught_up_at({0: 9, 1: 9}, wal_last_seq=5, sent_count=count)  # WAL ahead
    # a send while the end offsets were on their way: they may cover seqs beyond 4
    msg = t.sent(5, 5, partition=0, ends_txn=True)
    assert not t.caught_up_at({0: 9}, wal_last_seq=4, sent_count=count)  # in flight
    t.acked(msg, 2)
    assert not t.caught_up_at({0: 9}, wal_last_seq=4, sent_count=count)  # acked since
    count = t.sent_count
    t.sent(6, 6, partition=0, ends_txn=True)
    t.reset()  # the producer was thrown away, the message may still have landed
    assert t.caught_up(wal_last_seq=5)
    assert not t.caught_up_at({0: 9}, wal_last_seq=5, sent_count=count)
    assert t.caught_up_at({0: 9}, wal_last_seq=5, sent_count=t.sent_count)
    assert (t.acked_seq, t.offsets) == (5, {0: 9, 1: 7})


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=30),
    partitions=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
)
def test_tracker_never_claims_more_than_acknowledged(
    sizes: list[int], partitions: int, seed: int
) -> None:
    """Random message cuts, random ack order: acked_seq is always a covered txn end."""
    rng = random.Random(seed)
    t = AckTracker()
    msgs: list[tuple[int, int, int, bool]] = []
    seq = 1
    for size in sizes:
        # Split some transactions into parts.
        parts = rng.randint(1, size)
        bounds = sorted(rng.sample(range(1, size), parts - 1)) if parts > 1 else []
        starts = [0, *bounds]
        ends = [*bounds, size]
        for s, e in zip(starts, ends, strict=True):
            msgs.append((seq + s, seq + e - 1, rng.randrange(partitions), e == size))
        seq += size
    ids = [t.sent(first, last, p, ends_txn=ends_txn) for first, last, p, ends_txn in msgs]
    txn_ends = {last for _, last, _, ends_txn in msgs if ends_txn} | {0}
    next_offset = dict.fromkeys(range(partitions), 0)
    # Kafka acknowledges in order per partition, in any order across partitions.
    per_partition: dict[int, list[tuple[int, int, int]]] = {}
    for msg_id, (first, last, p, _) in zip(ids, msgs, strict=True):
        per_partition.setdefault(p, []).append((msg_id, first, last))
    acked: set[int] = set()
    while any(per_partition.values()):
        p = rng.choice([q for q, v in per_partition.items() if v])
        msg_id, first, last = per_partition[p].pop(0)
        t.acked(msg_id, next_offset[p])
        next_offset[p] += 1
        acked.update(range(first, last + 1))
        assert t.acked_seq in txn_ends
        assert all(s in acked for s in range(1, t.acked_seq + 1))
    assert t.acked_seq == seq - 1
    assert t.offsets == {p: n for p, n in next_offset.items() if n}


def test_backoff_grows_and_caps() -> None:
    b = Backoff(base_ms=100, max_ms=1_000, rng=random.Random(1))
    delays = [b.next_delay_s() for _ in range(8)]
    assert 0.05 <= delays[0] <= 0.1
    assert 0.4 <= delays[3] <= 0.8
    assert all(0.5 <= d <= 1.0 for d in delays[5:])
    b.reset()
    assert b.next_delay_s() <= 0.1


# -- PublishedPosition ---------------------------------------------------------


def test_position_roundtrip_and_merge(tmp_path: Path) -> None:
    pos = PublishedPosition.load(tmp_path)
    assert (pos.seq, pos.offsets) == (0, {})
    pos.save(10, {0: 4, 2: 1})
    pos.save(20, {0: 6})
    again = PublishedPosition.load(tmp_path)
    assert (again.seq, again.offsets) == (20, {0: 6, 2: 1})
    assert json.loads((tmp_path / FILE_NAME).read_text()) == {
        "seq": 20,
        "offsets": {"0": 6, "2": 1},
    }
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match="move back"):
        again.save(19, {})


def test_position_unreadable_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).write_text('{"seq": "x"')
    with pytest.raises(WalError, match="delete it to republish"):
        PublishedPosition.load(tmp_path)
    (tmp_path / FILE_NAME).write_text('{"seq": -1, "offsets": {}}')
    with pytest.raises(WalError, match="negative"):
        PublishedPosition.load(tmp_path)


def test_position_save_failure_is_translated(tmp_path: Path) -> None:
    pos = PublishedPosition.load(tmp_path / "missing-dir")
    with pytest.raises(WalError, match="saving the published position"):
        pos.save(1, {})
    assert pos.seq == 0
    assert not os.path.exists(tmp_path / "missing-dir")


# -- publishing to Kafka -------------------------------------------------------


def _producer_kwargs(bootstrap: str) -> dict[str, object]:
    return {"bootstrap_servers": bootstrap, "request_timeout_ms": 10_000}


def _position_never_ahead(data_dir: Path, received: list[Received]) -> None:
    """The durable position claims nothing Kafka does not hold."""
    pos = PublishedPosition.load(data_dir)
    held = entries_by_seq(received)
    assert all(s in held for s in range(1, pos.seq + 1))
    last_offsets: dict[int, int] = {}
    for r in received:
        last_offsets[r.partition] = max(last_offsets.get(r.partition, -1), r.offset)
    for p, next_offset in pos.offsets.items():
        assert next_offset <= last_offsets[p] + 1


@pytest.mark.kafka
async def test_publishes_wal_exactly_as_decoded(
    tmp_path: Path, kafka_bootstrap: str, new_topic: Callable[..., str]
) -> None:
    """N transactions through the real WAL arrive as an independent consumer decodes them."""
    partitions = 4
    topic = new_topic(partitions)
    rng = random.Random(7)
    expected: dict[int, tuple[Op, bytes, bytes]] = {}
    async with WalWriter(tmp_path / "wal") as wal:
        for i in range(300):
            n = rng.randint(1, 8)
            ops = [
                (Op.DELETE, b"k%d" % rng.randrange(50), b"")
                if rng.random() < 0.1
                else (Op.PUT, b"k%d" % rng.randrange(50), rng.randbytes(rng.randint(0, 300)))
                for _ in range(n)
            ]
            txn = await wal.append(ops, traceparent=None if i % 3 else _TRACEPARENT)
            for e in txn.entries():
                expected[e.seq] = (e.op, e.key, e.value)
        # Past message_bytes_max: a transaction split into parts on one partition.
        big = await wal.append([(Op.PUT, b"big%d" % i, rng.randbytes(3_000)) for i in range(30)])
        for e in big.entries():
            expected[e.seq] = (e.op, e.key, e.value)
        last = wal.last_seq

    published: list[int] = []
    pub = Publisher(
        tmp_path,
        topic=topic,
        partitions=partitions,
        producer_kwargs=_producer_kwargs(kafka_bootstrap),
        writer_id=WRITER,
        batch_bytes_max=8 << 10,
        message_bytes_max=16 << 10,
        on_published=published.append,
    )
    async with pub:
        await asyncio.wait_for(pub.run(until_caught_up=True), 60)
        assert pub.published_seq == last == pub.acked_seq
        assert pub.backlog == 0
    assert published and published[-1] == last

    received = await read_topic(kafka_bootstrap, topic, partitions)
    assert entries_by_seq(received) == expected
    parts = [r for r in received if r.batch.is_part]
    assert parts and len({r.partition for r in parts}) == 1
    for r in received:
        assert r.key == message_key(r.batch.first_seq)
        assert r.batch.writer == WRITER
        routing = r.batch.first_seq if not r.batch.is_part else big.first_seq
        assert r.partition == partition_for(routing, partitions)
        assert r.headers[SEQ_HEADER] == f"{r.batch.first_seq}-{r.batch.last_seq}".encode()
    # No resends in a clean run: each seq exactly once.
    assert sum(r.batch.entry_count for r in received if not r.batch.is_part) + len(big) == len(
        expected
    )
    pos = PublishedPosition.load(tmp_path)
    assert pos.seq == last
    ends: dict[int, int] = {}
    for r in received:
        ends[r.partition] = max(ends.get(r.partition, 0), r.offset + 1)
    assert pos.offsets == ends
    _position_never_ahead(tmp_path, received)


@pytest.mark.kafka
async def test_position_never_claims_more_than_acknowledged(
    tmp_path: Path, kafka_bootstrap: str, new_topic: Callable[..., str]
) -> None:
    """Every position saved while publishing is covered by messages below its offsets."""
    topic = new_topic(3)
    wal = MemoryWal()
    saved: list[tuple[int, dict[int, int]]] = []
    pub = Publisher(
        tmp_path,
        topic=topic,
        partitions=3,
        producer_kwargs=_producer_kwargs(kafka_bootstrap),
        writer_id=WRITER,
        reader=wal,
        batch_bytes_max=2 << 10,
        in_flight_bytes_max=32 << 10,
        position_interval_ms=2,
        on_published=lambda seq: saved.append((seq, PublishedPosition.load(tmp_path).offsets)),
    )
    async with pub:
        running = asyncio.create_task(pub.run())
        for _ in range(100):  # appends keep coming for about a second
            for _ in range(30):
                wal.append(3, value_bytes=100)
            await asyncio.sleep(0.01)
        async with asyncio.timeout(60):
            # Polling on purpose: the test watches the publisher from outside.
            while pub.published_seq < wal.last_seq:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        await pub.stop()
        await running
    received = await read_topic(kafka_bootstrap, topic, 3)
    assert len(entries_by_seq(received)) == wal.last_seq
    assert len(saved) > 3, "the position should advance in steps while publishing"
    assert [s for s, _ in saved] == sorted(s for s, _ in saved)
    for seq, offsets in saved:
        below = [
            r for r in received if r.offset < offsets.get(r.partition, 0) and not r.batch.is_part
        ]
        covered = {s for r in below for s in range(r.batch.first_seq, r.batch.last_seq + 1)}
        assert all(s in covered for s in range(1, seq + 1)), f"position {seq} claims too much"
    _position_never_ahead(tmp_path, received)


@pytest.mark.kafka
async def test_trace_context_in_headers_and_span_per_message(
    tmp_path: Path, kafka_bootstrap: str, new_topic: Callable[..., str]
) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    topic = new_topic(2)
    wal = MemoryWal()
    wal.append(2, traceparent=_TRACEPARENT)
    wal.append(2)
    pub = Publisher(
        tmp_path,
        topic=topic,
        partitions=2,
        producer_kwargs=_producer_kwargs(kafka_bootstrap),
        writer_id=WRITER,
        reader=wal,
        linger_ms=50,
        tracer_provider=provider,
    )
    async with pub:
        await asyncio.wait_for(pub.run(until_caught_up=True), 30)
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "walship.publish"]
    attrs = dict(span.attributes or {})
    assert attrs["walship.first_seq"] == 1 and attrs["walship.last_seq"] == 4
    assert attrs["walship.entries"] == 4 and attrs["walship.offset"] == 0
    assert span.parent is not None
    assert f"{span.parent.trace_id:032x}" == _TRACEPARENT.split("-")[1]
    (r,) = await read_topic(kafka_bootstrap, topic, 2)
    assert attrs["walship.partition"] == r.partition
    traceparent = r.headers["traceparent"].decode()
    assert traceparent.split("-")[1] == _TRACEPARENT.split("-")[1]
    assert traceparent.split("-")[2] == f"{span.context.span_id:016x}"


@pytest.mark.kafka
async def test_sidecar_started_before_its_writer_waits_for_it(
    tmp_path: Path, kafka_bootstrap: str, new_topic: Callable[..., str]
) -> None:
    """A sidecar on an empty data dir waits for the writer instead of exiting."""
    from walship.producer.writer import Writer

    topic = new_topic(2)
    pub = Publisher(
        tmp_path, topic=topic, partitions=2, producer_kwargs=_producer_kwargs(kafka_bootstrap)
    )
    starting = asyncio.create_task(pub.start())
    await asyncio.sleep(0.3)
    assert not starting.done()
    async with Writer(tmp_path) as writer:
        txn = await writer.append([(Op.PUT, b"k", b"v")])
    await asyncio.wait_for(starting, 10)
    try:
        await asyncio.wait_for(pub.run(until_caught_up=True), 30)
        assert pub.published_seq == txn.last_seq
    finally:
        await pub.stop()


@pytest.mark.kafka
async def test_idle_publisher_records_end_offsets_so_writer_snapshots_connect(
    tmp_path: Path, devcluster: DevCluster
) -> None:
    """Messages a crashed session left after the published position do not move it; on an
    idle stream the caught-up publisher records the partitions' end offsets instead, so a
    log start that retention moved past the prefix's last message still connects."""
    topic = "idle"
    devcluster.create_topic(topic, 2)
    kwargs = _producer_kwargs(devcluster.bootstrap_servers)
    wal = MemoryWal()
    for _ in range(20):
        wal.append(2)

    def publisher() -> Publisher:
        return Publisher(
            tmp_path,
            topic=topic,
            partitions=2,
            producer_kwargs=kwargs,
            writer_id=WRITER,
            reader=wal,
            batch_bytes_max=200,
            position_interval_ms=10,
        )

    async with publisher() as pub:
        await asyncio.wait_for(pub.run(until_caught_up=True), 60)
    first = PublishedPosition.load(tmp_path)
    assert first.seq == wal.last_seq and set(first.offsets) == {0, 1}
    # A session that resent from an older position and crashed before its acks counted.
    encoder = Encoder(WRITER, message_bytes_max=4096)
    producer = AIOKafkaProducer(bootstrap_servers=devcluster.bootstrap_servers)
    await producer.start()
    try:
        for m in encoder.encode([txn for txn, _ in wal.txns[10:]]):
            await producer.send_and_wait(topic, m.value, key=m.key, partition=1)
    finally:
        await producer.stop()
    ends = (await describe_topic(kwargs, topic)).end_offsets
    assert ends[1] > first.offsets[1]

    async with publisher() as pub:
        running = asyncio.create_task(pub.run())
        async with asyncio.timeout(30):
            # Polling on purpose: the saved file is what a writer snapshot reads.
            while PublishedPosition.load(tmp_path).offsets != ends:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        await pub.stop()
        await running
    position = PublishedPosition.load(tmp_path)
    assert position.seq == wal.last_seq  # nothing was resent: the WAL was published
    assert (await describe_topic(kwargs, topic)).end_offsets == ends

    # Retention deletes everything on partition 1: the recorded offsets still connect.
    devcluster.truncate(topic, 1, ends[1])
    log_start = (await describe_topic(kwargs, topic)).beginning_offsets
    assert log_start[1] == ends[1] > first.offsets[1]
    assert all(position.offsets[p] >= log_start[p] for p in (0, 1))
