"""Publisher under faults: failing producers, SIGKILL, brokers down, leaders moved."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import sys
import time
from asyncio.subprocess import PIPE
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
from aiokafka import errors as ak
from publisher_helpers import WRITER, MemoryWal, Received, entries_by_seq, read_topic
from walship.producer.identity import WriterIdentity
from walship.producer.position import PublishedPosition
from walship.producer.publisher import Publisher
from walship.producer.wal import WalReader, WalWriter
from walship.shared.codec import Decoder, partition_for
from walship.shared.devcluster import DevCluster
from walship.shared.errors import KafkaOperationError
from walship.shared.model import Op

# -- a scripted producer (no Kafka) -----------------------------------------------


class _Meta:
    def __init__(self, offset: int) -> None:
        self.offset = offset


class FakeProducer:
    """Records sends; ``fail_send``/``fail_ack`` script failures; acks on demand or at once."""

    instances: ClassVar[list[FakeProducer]] = []

    def __init__(self, log: list[tuple[int, bytes]], script: dict[str, Any]) -> None:
        self.log = log
        self.script = script
        self.pending: list[tuple[asyncio.Future[_Meta], int]] = []
        self.started = self.stopped = False
        self.offsets: dict[int, int] = {}
        FakeProducer.instances.append(self)

    async def start(self) -> None:
        if self.script.get("start_failures", 0) > 0:
            self.script["start_failures"] -= 1
            raise ak.KafkaConnectionError("no brokers")
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    async def send(
        self, topic: str, value: bytes, *, key: bytes, partition: int, headers: Any
    ) -> asyncio.Future[_Meta]:
        n = len(self.log)
        if n in self.script.get("raise_on_send", set()):
            self.script["raise_on_send"].discard(n)
            raise self.script.get("send_error", ak.KafkaTimeoutError())
        self.log.append((partition, value))
        fut: asyncio.Future[_Meta] = asyncio.get_running_loop().create_future()
        if n in self.script.get("fail_ack", set()):
            self.script["fail_ack"].discard(n)
            fut.set_exception(self.script.get("ack_error", ak.OutOfOrderSequenceNumber()))
        elif self.script.get("hold_acks"):
            self.pending.append((fut, partition))
        else:
            self._ack(fut, partition)
        return fut

    def _ack(self, fut: asyncio.Future[_Meta], partition: int) -> None:
        offset = self.offsets.get(partition, 0)
        self.offsets[partition] = offset + 1
        fut.set_result(_Meta(offset))

    def ack_all(self) -> None:
        for fut, partition in self.pending:
            self._ack(fut, partition)
        self.pending.clear()


def _fake_publisher(
    tmp_path: Path, wal: MemoryWal, script: dict[str, Any], **kwargs: Any
) -> tuple[Publisher, list[tuple[int, bytes]]]:
    sent: list[tuple[int, bytes]] = []
    FakeProducer.instances = []
    pub = Publisher(
        tmp_path,
        topic="t",
        partitions=3,
        producer_kwargs={"bootstrap_servers": "unused:9092"},
        writer_id=WRITER,
        reader=wal,
        producer_factory=lambda kw: FakeProducer(sent, script),
        retry_backoff_ms=1,
        retry_backoff_max_ms=5,
        **kwargs,
    )
    pub._topic_checked = True  # no cluster to check the topic against
    return pub, sent


def _seqs_sent(sent: list[tuple[int, bytes]]) -> list[int]:
    decoder = Decoder()
    out: list[int] = []
    for _, value in sent:
        b = decoder.decode(value)
        out.extend(range(b.first_seq, b.last_seq + 1))
    return out


async def test_failed_acknowledgement_recreates_producer_and_resends(tmp_path: Path) -> None:
    wal = MemoryWal()
    for _ in range(200):
        wal.append(2)
    script: dict[str, Any] = {"fail_ack": {5, 17}, "raise_on_send": {30}}
    pub, sent = _fake_publisher(tmp_path, wal, script, batch_bytes_max=300)
    async with pub:
        await asyncio.wait_for(pub.run(until_caught_up=True), 20)
    assert pub.published_seq == wal.last_seq == 400
    assert pub.retries == 3 and len(FakeProducer.instances) == 4
    assert all(p.stopped for p in FakeProducer.instances)
    seqs = _seqs_sent(sent)
    assert set(seqs) == set(range(1, 401))  # everything, some of it twice
    assert len(seqs) > 400


async def test_start_failures_back_off_then_publish(tmp_path: Path) -> None:
    wal = MemoryWal()
    wal.append(3)
    pub, sent = _fake_publisher(tmp_path, wal, {"start_failures": 4})
    async with pub:
        await asyncio.wait_for(pub.run(until_caught_up=True), 20)
    assert pub.retries == 4 and pub.published_seq == 3
    assert _seqs_sent(sent) == [1, 2, 3]


async def test_non_retriable_error_ends_run(tmp_path: Path) -> None:
    wal = MemoryWal()
    wal.append(3)
    script: dict[str, Any] = {"fail_ack": {0}, "ack_error": ak.TopicAuthorizationFailedError()}
    pub, _ = _fake_publisher(tmp_path, wal, script)
    async with pub:
        with pytest.raises(KafkaOperationError, match="TopicAuthorizationFailed"):
            await asyncio.wait_for(pub.run(), 20)
        assert not pub.health()[0]
    assert pub.published_seq == 0


async def test_in_flight_bytes_are_bounded(tmp_path: Path) -> None:
    wal = MemoryWal()
    for _ in range(500):
        wal.append(1, value_bytes=500)
    script: dict[str, Any] = {"hold_acks": True}
    pub, sent = _fake_publisher(
        tmp_path, wal, script, batch_bytes_max=2_000, in_flight_bytes_max=10_000
    )
    async with pub:
        task = asyncio.create_task(pub.run(until_caught_up=True))
        peak = 0
        while not task.done():
            await asyncio.sleep(0.01)
            (producer,) = FakeProducer.instances
            held = sum(len(sent[i][1]) for i in range(len(sent) - len(producer.pending), len(sent)))
            peak = max(peak, held)
            assert held <= 10_000 + max(len(v) for _, v in sent)
            assert pub.published_seq <= len(_seqs_sent(sent[: len(sent) - len(producer.pending)]))
            producer.ack_all()
        await task
    assert peak > 5_000 and pub.published_seq == 500


async def test_ack_timeout_recreates_a_stuck_producer(tmp_path: Path) -> None:
    wal = MemoryWal()
    wal.append(2)
    script: dict[str, Any] = {"hold_acks": True}
    pub, _ = _fake_publisher(tmp_path, wal, script, ack_timeout_ms=200)
    async with pub:
        task = asyncio.create_task(pub.run(until_caught_up=True))
        await asyncio.sleep(0.5)
        assert pub.retries >= 1 and len(FakeProducer.instances) >= 2
        script["hold_acks"] = False
        await asyncio.wait_for(task, 10)
    assert pub.published_seq == 2


# -- the embedded cluster --------------------------------------------------------


async def _append_until(
    wal: WalWriter, rng: random.Random, pause_s: float, stop: asyncio.Event
) -> None:
    """Append small transactions until ``stop`` (never cancelled mid-append)."""
    i = 0
    while not stop.is_set():
        n = rng.randint(1, 5)
        await wal.append(
            [(Op.PUT, b"k%d" % rng.randrange(1000), b"v%d" % (i + j)) for j in range(n)]
        )
        i += n
        await asyncio.sleep(pause_s)


def _durable_last_seq(data_dir: Path) -> int:
    with WalReader(data_dir / "wal") as reader:
        return reader.last_seq


def _wal_entries(data_dir: Path) -> dict[int, tuple[Op, bytes, bytes]]:
    out: dict[int, tuple[Op, bytes, bytes]] = {}
    with WalReader(data_dir / "wal") as reader:
        seq = 1
        while seq <= reader.last_seq:
            for txn, _ in reader.read_from(seq, max_bytes=1 << 20):
                for e in txn.entries():
                    out[e.seq] = (e.op, e.key, e.value)
                seq = txn.last_seq + 1
    return out


def _check_topic(
    received: list[Received], partitions: int, expected: dict[int, Any], sessions: int
) -> None:
    """Every seq at least once, same content, on its partition, in per-partition order.

    Within one publisher session (or producer object) each partition's
    messages go forward by sequence; only a restart may step back (a resend
    from the durable position, possibly cut differently), so each partition
    steps back at most ``sessions - 1`` times.
    """
    assert entries_by_seq(received) == expected
    by_partition: dict[int, list[Received]] = {}
    for r in sorted(received, key=lambda r: (r.partition, r.offset)):
        if not r.batch.is_part:
            assert r.partition == partition_for(r.batch.first_seq, partitions)
        by_partition.setdefault(r.partition, []).append(r)
    for p, msgs in by_partition.items():
        back = sum(1 for a, b in itertools.pairwise(msgs) if b.batch.first_seq <= a.batch.first_seq)
        assert back <= sessions - 1, (
            f"partition {p} stepped back {back} times in {sessions} sessions"
        )


def _publisher_cmd(data_dir: Path, bootstrap: str, topic: str, partitions: int) -> list[str]:
    return [
        sys.executable,
        "-c",
        "from walship.shared.cli.main import main; main()",
        "--log-level",
        "warning",
        "producer",
        "run",
        "--data-dir",
        str(data_dir),
        "--bootstrap-servers",
        bootstrap,
        "--topic",
        topic,
        "--partitions",
        str(partitions),
    ]


def _sidecar_env() -> dict[str, str]:
    env = dict(os.environ)
    env["WALSHIP_PRODUCER__AUTO_CREATE_TOPIC"] = "false"
    env["WALSHIP_PRODUCER__BATCH_BYTES_MAX"] = "4096"
    env.pop("WALSHIP_CONFIG", None)
    return env


async def _kill_loop(
    tmp_path: Path, bootstrap: str, topic: str, iterations: int, seed: int
) -> None:
    partitions = 3
    rng = random.Random(seed)
    WriterIdentity.load_or_create(tmp_path)
    cmd = _publisher_cmd(tmp_path, bootstrap, topic, partitions)
    env = _sidecar_env()
    positions: list[int] = []
    async with WalWriter(tmp_path / "wal") as wal:
        stop_appending = asyncio.Event()
        appender = asyncio.create_task(_append_until(wal, rng, 0.002, stop_appending))
        try:
            for i in range(iterations):
                proc = await asyncio.create_subprocess_exec(*cmd, env=env, stderr=PIPE)
                await asyncio.sleep(rng.uniform(0.3, 1.6))
                if proc.returncode is not None:
                    _, err = await proc.communicate()
                    pytest.fail(f"publisher {i} exited early: {err.decode()}")
                proc.send_signal(signal.SIGKILL)
                await proc.communicate()
                positions.append(PublishedPosition.load(tmp_path).seq)
        finally:
            stop_appending.set()
            await appender
    last = _durable_last_seq(tmp_path)
    assert positions[-1] > 0, "the publisher never got anything acknowledged"
    assert positions == sorted(positions)
    # The position never claims more than the topic holds, even right after a kill.
    received = await read_topic(bootstrap, topic, partitions)
    held = entries_by_seq(received)
    assert all(s in held for s in range(1, positions[-1] + 1))
    done = await asyncio.create_subprocess_exec(
        *cmd, "--until-caught-up", env=env, stdout=PIPE, stderr=PIPE
    )
    out, err = await asyncio.wait_for(done.communicate(), 60)
    assert done.returncode == 0, err.decode()
    assert f"published through seq {last}" in out.decode()
    received = await read_topic(bootstrap, topic, partitions)
    _check_topic(received, partitions, _wal_entries(tmp_path), sessions=iterations + 1)
    assert PublishedPosition.load(tmp_path).seq == last


@pytest.mark.kafka
@pytest.mark.timeout(120)
async def test_sigkill_publisher_5_times(
    tmp_path: Path, kafka_bootstrap: str, new_topic: Callable[..., str]
) -> None:
    await _kill_loop(tmp_path, kafka_bootstrap, new_topic(3), iterations=5, seed=5)


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_sigkill_publisher_30_times(
    tmp_path: Path, kafka_bootstrap: str, new_topic: Callable[..., str]
) -> None:
    await _kill_loop(tmp_path, kafka_bootstrap, new_topic(3), iterations=30, seed=30)


async def _wait_caught_up(pub: Publisher, wal: WalWriter, timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        # Polling on purpose: the test watches the publisher from outside.
        while pub.acked_seq < wal.last_seq:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


def _fault_publisher(data_dir: Path, cluster: DevCluster, topic: str) -> Publisher:
    return Publisher(
        data_dir,
        topic=topic,
        partitions=3,
        producer_kwargs={
            "bootstrap_servers": cluster.bootstrap_servers,
            "request_timeout_ms": 5_000,
            "metadata_max_age_ms": 1_000,
        },
        writer_id=WRITER,
        batch_bytes_max=4_096,
        retry_backoff_max_ms=1_000,
        ack_timeout_ms=5_000,
    )


@pytest.mark.kafka
@pytest.mark.timeout(120)
async def test_broker_down_and_leaders_moved(tmp_path: Path, devcluster: DevCluster) -> None:
    devcluster.create_topic("t", 3, 3)
    for p in range(3):
        devcluster.set_leader("t", p, 1)
    rng = random.Random(3)
    async with (
        WalWriter(tmp_path / "wal") as wal,
        _fault_publisher(tmp_path, devcluster, "t") as pub,
    ):
        running = asyncio.create_task(pub.run())
        stop_appending = asyncio.Event()
        appender = asyncio.create_task(_append_until(wal, rng, 0.002, stop_appending))
        await asyncio.sleep(1.0)
        await _wait_caught_up(pub, wal, 20)
        devcluster.broker_down(1)
        for p in range(3):
            devcluster.set_leader("t", p, 2 + p % 2)
        await asyncio.sleep(1.0)
        before = pub.acked_seq
        await asyncio.sleep(2.0)
        stop_appending.set()
        await appender
        await _wait_caught_up(pub, wal, 30)
        assert pub.acked_seq > before, "publishing did not resume on the new leaders"
        pub.request_stop()
        await running
    last = _durable_last_seq(tmp_path)
    assert PublishedPosition.load(tmp_path).seq == last
    received = await read_topic(devcluster.bootstrap_servers, "t", 3)
    _check_topic(received, 3, _wal_entries(tmp_path), sessions=pub.retries + 1)


async def _all_down(tmp_path: Path, cluster: DevCluster, down_s: float) -> None:
    cluster.create_topic("t", 3, 3)
    rng = random.Random(4)
    async with WalWriter(tmp_path / "wal") as wal, _fault_publisher(tmp_path, cluster, "t") as pub:
        running = asyncio.create_task(pub.run())
        stop_appending = asyncio.Event()
        appender = asyncio.create_task(_append_until(wal, rng, 0.002, stop_appending))
        await asyncio.sleep(1.0)
        for b in cluster.broker_ids:
            cluster.broker_down(b)
        await asyncio.sleep(0.5)
        wal_at_outage, acked_at_outage = wal.last_seq, pub.acked_seq
        await asyncio.sleep(down_s)
        assert wal.last_seq > wal_at_outage + 100, "appends must continue while Kafka is down"
        assert pub.acked_seq <= acked_at_outage + 50
        for b in cluster.broker_ids:
            cluster.broker_up(b)
        started = time.monotonic()
        await asyncio.sleep(1.0)
        stop_appending.set()
        await appender
        await _wait_caught_up(pub, wal, 60)
        recovery_s = time.monotonic() - started
        pub.request_stop()
        await running
    last = _durable_last_seq(tmp_path)
    assert PublishedPosition.load(tmp_path).seq == last
    received = await read_topic(cluster.bootstrap_servers, "t", 3)
    _check_topic(received, 3, _wal_entries(tmp_path), sessions=pub.retries + 1)
    print(f"all brokers down {down_s} s: caught up {recovery_s:.1f} s after they returned")


@pytest.mark.kafka
@pytest.mark.timeout(120)
async def test_all_brokers_down_10s(tmp_path: Path, devcluster: DevCluster) -> None:
    await _all_down(tmp_path, devcluster, 10)


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_all_brokers_down_30s(tmp_path: Path, devcluster: DevCluster) -> None:
    await _all_down(tmp_path, devcluster, 30)
