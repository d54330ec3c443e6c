"""The simulated world: a writer, its publisher, a Kafka topic and readers.

Everything is driven by one ``random.Random``: no wall clock, no threads, no
real I/O, so a seed replays exactly. The pieces that decide correctness are the
REAL ones (``Encoder``/``Decoder``/``PartAssembler``/``partition_for`` from
``walship.shared.codec``, ``SequenceMerger`` from ``walship.consumer.merge``,
``DictApplier`` from ``walship.consumer.applier``); this module only models what
sits around them: durability, crashes, the broker, delivery and retention.

What "durable" means here: a value that survives a crash of its process is a
plain attribute the crash does not reset (the writer's WAL list, the
publisher's saved position, the reader's applier, the snapshot store, the log).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from walship.consumer.applier import DictApplier
from walship.consumer.merge import SequenceMerger, retention_gap
from walship.producer.batching import AckTracker
from walship.shared.codec import (
    Decoder,
    EncodedMessage,
    Encoder,
    PartAssembler,
    partition_for,
    peek_header,
)
from walship.shared.errors import DecodeError, SplitBrainError
from walship.shared.model import Batch, Op, Transaction, WriterId
from walship.shared.store import Checkpoint


class MergerFactory(Protocol):
    """Builds a reader's merger; ``SequenceMerger`` itself (tests pass broken subclasses)."""

    def __call__(
        self, applied_seq: int, partitions: int, *, writer: WriterId | None = None
    ) -> SequenceMerger: ...


State = dict[bytes, bytes]

TRACE_KEEP = 400


class InvariantViolation(Exception):
    """A correctness rule was broken; the message says which and where."""


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class SimConfig:
    """What one seed simulates. Shape parameters are drawn from the seed itself."""

    seed: int
    steps: int = 1000
    faults: bool = True
    trace_keep: int | None = TRACE_KEEP  # None keeps the whole trace
    # Make the rogue writer wait for a moment between the parts of a split transaction
    # (otherwise it publishes whenever its event fires, between parts or not).
    rogue_between_parts: bool = False
    # Fault kinds that are rare by design; each seed enables them with these odds.
    log_corruption_seed_share: float = 0.15
    rogue_writer_seed_share: float = 0.08


@dataclass(frozen=True)
class Shape:
    """Per-seed parameters drawn from the seed (so different seeds stress differently)."""

    partitions: int
    readers: int
    key_space: int
    message_bytes_max: int
    log_corruption: bool
    rogue_writer: bool
    # Per-step odds of the fault events (0 when the seed's faults are off).
    writer_crash: float
    publisher_crash: float
    reader_crash: float
    retention: float
    delivery_corruption: float
    snapshot: float

    @classmethod
    def draw(cls, rng: random.Random, config: SimConfig) -> Shape:
        f = 1.0 if config.faults else 0.0
        return cls(
            partitions=rng.randint(1, 4),
            readers=rng.randint(2, 3),
            key_space=rng.choice((4, 8, 16)),
            message_bytes_max=rng.choice((400, 700, 1500, 4000)),
            log_corruption=config.faults and rng.random() < config.log_corruption_seed_share,
            rogue_writer=config.faults and rng.random() < config.rogue_writer_seed_share,
            writer_crash=f * rng.choice((0.0, 0.01, 0.03)),
            publisher_crash=f * rng.choice((0.0, 0.01, 0.04)),
            reader_crash=f * rng.choice((0.0, 0.02, 0.05)),
            retention=f * rng.choice((0.0, 0.02, 0.06)),
            delivery_corruption=f * rng.choice((0.0, 0.0, 0.01)),
            snapshot=rng.choice((0.01, 0.03, 0.06)),
        )


# --------------------------------------------------------------------------- Kafka


@dataclass(slots=True)
class Record:
    """One message in a partition. ``first_seq``/``last_seq``/``routing_seq`` are the
    publisher's own bookkeeping of what it sent (a reader never looks at them)."""

    offset: int
    key: bytes
    value: bytes
    first_seq: int
    last_seq: int
    routing_seq: int
    part_index: int
    part_count: int
    rogue: bool = False
    corrupt: bool = False

    @property
    def unfinished_part(self) -> bool:
        """A part of a split transaction that more parts should follow."""
        return self.part_index + 1 < self.part_count


class SimKafka:
    """Per-partition append-only logs with a moving log start (retention)."""

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions
        # Records below log_start stay in the list (deleted for readers) so the
        # checker and writer-side snapshots can reason about what was sent.
        self.logs: list[list[Record]] = [[] for _ in range(partitions)]
        self.log_start: list[int] = [0] * partitions

    def end(self, p: int) -> int:
        return len(self.logs[p])

    def append(self, p: int, msg: EncodedMessage, *, rogue: bool = False) -> int:
        offset = len(self.logs[p])
        h = peek_header(msg.value)
        self.logs[p].append(
            Record(
                offset,
                msg.key,
                msg.value,
                msg.first_seq,
                msg.last_seq,
                msg.routing_seq,
                h.part_index,
                h.part_count,
                rogue,
            )
        )
        return offset

    def read(self, p: int, offset: int, count: int) -> list[Record]:
        if offset < self.log_start[p]:
            raise ValueError("read below log start")
        return self.logs[p][offset : offset + count]


def flip_bit(value: bytes, rng: random.Random) -> bytes:
    i = rng.randrange(len(value))
    return value[:i] + bytes([value[i] ^ (1 << rng.randrange(8))]) + value[i + 1 :]


# --------------------------------------------------------------------------- writer


class SimWriter:
    """The application's writer: WAL (durable list) plus its state per sequence."""

    def __init__(self, stream_id: bytes) -> None:
        self.stream_id = stream_id
        self.epoch = 1
        self.wal: list[Transaction] = []  # durable, dense
        self.pending: list[Transaction] = []  # appended, not yet fsynced: not acknowledged
        self.state: State = {}  # state at the last durable seq
        self.states: dict[int, State] = {0: {}}  # durable txn boundary seq -> state there
        self.wal_index: dict[int, int] = {}  # txn first_seq -> index in wal

    @property
    def writer_id(self) -> WriterId:
        return WriterId(self.stream_id, self.epoch)

    @property
    def last_seq(self) -> int:
        """Last durable (acknowledged) sequence."""
        return self.wal[-1].last_seq if self.wal else 0

    def next_seq(self) -> int:
        if self.pending:
            return self.pending[-1].last_seq + 1
        return self.last_seq + 1

    def append(self, ops: list[tuple[Op, bytes, bytes]], timestamp_us: int) -> Transaction:
        txn = Transaction.of(self.next_seq(), ops, timestamp_us)
        self.pending.append(txn)
        return txn

    def sync(self) -> int:
        """fsync: pending appends become durable and are acknowledged."""
        n = len(self.pending)
        for txn in self.pending:
            self.wal_index[txn.first_seq] = len(self.wal)
            self.wal.append(txn)
            for op, key, value in zip(txn.ops, txn.keys, txn.values, strict=True):
                if op == Op.PUT:
                    self.state[key] = value
                else:
                    self.state.pop(key, None)
            self.states[txn.last_seq] = dict(self.state)
        self.pending = []
        return n

    def crash_restart(self) -> int:
        """Lose what was not fsynced; restart from the WAL with a new epoch."""
        lost = len(self.pending)
        self.pending = []
        self.epoch += 1
        return lost

    def txns_from(self, seq: int, count: int) -> list[Transaction]:
        i = self.wal_index[seq]
        return self.wal[i : i + count]


# --------------------------------------------------------------------------- publisher


@dataclass(slots=True)
class InFlight:
    msg: EncodedMessage
    partition: int
    msg_id: int  # the AckTracker's id
    offset: int | None = None


class SimPublisher:
    """WAL -> Kafka through the real ``AckTracker``: the position advances only over
    the contiguous acked prefix (to a transaction end); offsets are those it records.

    Like the real save loop, a caught-up publisher also reads the partitions' end
    offsets and records them (``AckTracker.caught_up_at``). The real read happens
    somewhere between the caught-up check and the save; here the check is one
    event (``probe``) and the read happens at the next save, the latest it could,
    so sends, acks and crashes in between exercise the tracker's guard.
    """

    IN_FLIGHT_MAX = 24

    def __init__(self, partitions: int, message_bytes_max: int) -> None:
        self.partitions = partitions
        self.message_bytes_max = message_bytes_max
        # Durable (published.json): seq plus per-partition offsets, merged by maximum.
        self.saved_seq = 0
        self.saved_offsets: dict[int, int] = {}
        self.restart_count = 0
        self._reset(WriterId(b"\0" * 16, 1))

    def _reset(self, writer: WriterId) -> None:
        self.encoder = Encoder(writer, message_bytes_max=self.message_bytes_max, level=1)
        self.tracker = AckTracker(self.saved_seq, self.saved_offsets)
        self.next_seq = self.saved_seq + 1
        self.unsent: list[deque[InFlight]] = [deque() for _ in range(self.partitions)]
        self.unacked: list[deque[InFlight]] = [deque() for _ in range(self.partitions)]
        # (sent_count, wal_last_seq) seen caught up, waiting for the end offsets.
        self.probe_started: tuple[int, int] | None = None

    def restart(self, writer: WriterId) -> None:
        """A crash loses everything in flight; resend from the saved position."""
        self.restart_count += 1
        self._reset(writer)

    @property
    def position(self) -> int:
        return self.tracker.acked_seq

    def send(self, writer: SimWriter, txn_count: int) -> list[InFlight]:
        """Cut up to ``txn_count`` transactions into messages (one ``encode`` call)."""
        if self.next_seq > writer.last_seq or self.tracker.in_flight >= self.IN_FLIGHT_MAX:
            return []
        txns = writer.txns_from(self.next_seq, txn_count)
        sent = []
        for m in self.encoder.encode(txns):
            h = peek_header(m.value)
            p = partition_for(m.routing_seq, self.partitions)
            ends_txn = h.part_index + 1 == h.part_count
            item = InFlight(m, p, self.tracker.sent(m.first_seq, m.last_seq, p, ends_txn=ends_txn))
            self.unsent[p].append(item)
            sent.append(item)
        self.next_seq = txns[-1].last_seq + 1
        return sent

    def ack(self, item: InFlight) -> None:
        assert item.offset is not None
        self.tracker.acked(item.msg_id, item.offset)

    def probe(self, wal_last_seq: int) -> bool:
        """Caught up: start reading the end offsets (they arrive with the next save)."""
        if self.probe_started is not None or not self.tracker.caught_up(wal_last_seq):
            return False
        self.probe_started = (self.tracker.sent_count, wal_last_seq)
        return True

    def save(self, kafka: SimKafka) -> bool:
        """Persist the position (``PublishedPosition.save`` merges offsets by maximum)."""
        if self.probe_started is not None:
            sent_count, wal_last_seq = self.probe_started
            self.probe_started = None
            ends = {p: kafka.end(p) for p in range(kafka.partitions)}
            self.tracker.caught_up_at(ends, wal_last_seq=wal_last_seq, sent_count=sent_count)
        offsets = dict(self.saved_offsets)
        for p, o in self.tracker.offsets.items():
            offsets[p] = max(o, offsets.get(p, 0))
        if self.saved_seq == self.position and offsets == self.saved_offsets:
            return False
        self.saved_seq = self.position
        self.saved_offsets = offsets
        return True

    @property
    def idle(self) -> bool:
        return self.tracker.in_flight == 0


# --------------------------------------------------------------------------- snapshots


@dataclass(frozen=True)
class Snapshot:
    seq: int
    state: Mapping[bytes, bytes]
    offsets: Mapping[int, int]  # partition -> next offset to read after bootstrapping
    source: str
    step: int

    def connects(self, kafka: SimKafka) -> bool:
        return all(self.offsets[p] >= kafka.log_start[p] for p in range(kafka.partitions))


# --------------------------------------------------------------------------- reader


@dataclass(slots=True)
class Delivery:
    partition: int
    offset: int
    value: bytes


class SimReader:
    """A reader process. ``applier`` is its durable replica; the rest dies in a crash."""

    def __init__(self, name: str, partitions: int, merger_factory: MergerFactory) -> None:
        self.name = name
        self.partitions = partitions
        self.merger_factory = merger_factory
        self.applier = DictApplier()
        self.stopped: str | None = None  # "decode" | "split_brain"
        self.stop_error: str = ""
        self.bad_position: tuple[int, int] | None = None  # (partition, offset) of a DecodeError
        self.expired = False  # waiting for a snapshot that connects
        # seq -> times applied since the last bootstrap past it (rule 3).
        self.apply_counts: dict[int, int] = {}
        self.committed: dict[int, int] = {}  # Kafka consumer-group offsets (the ack)
        self.bootstraps = 0
        self.restarts = 0
        self.split_brains = 0
        self.decode_errors = 0
        self.start()

    @property
    def applied_seq(self) -> int:
        return self.applier.checkpoint().applied_seq

    def start(self) -> None:
        """Process start: volatile state rebuilt from the applier's durable checkpoint."""
        cp = self.applier.checkpoint()
        self.merger = self.merger_factory(cp.applied_seq, self.partitions, writer=cp.writer)
        self.decoder = Decoder()
        self.assemblers = [PartAssembler() for _ in range(self.partitions)]
        self.fetch_pos = {p: cp.offsets.get(p, 0) for p in range(self.partitions)}
        self.inbox: deque[Delivery] = deque()

    def crash_restart(self) -> None:
        self.restarts += 1
        if self.stopped == "decode":  # an operator restart retries the stream
            self.stopped = None
            self.bad_position = None
        self.start()

    def bootstrap(self, snap: Snapshot) -> None:
        # What a bootstrap does to the durable replica: data and position replaced together.
        self.applier.data = dict(snap.state)
        self.applier.set_checkpoint(Checkpoint(applied_seq=snap.seq, offsets=dict(snap.offsets)))
        self.apply_counts = {s: n for s, n in self.apply_counts.items() if s > snap.seq}
        self.bootstraps += 1
        self.stopped = None
        self.bad_position = None
        self.expired = False
        self.start()

    def state(self) -> State:
        return dict(self.applier.data)


# --------------------------------------------------------------------------- world


class World:
    """All processes plus the scheduler: ``step()`` runs one randomly chosen event."""

    def __init__(self, config: SimConfig, merger_factory: MergerFactory | None = None) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.shape = Shape.draw(self.rng, config)
        self.step_no = 0
        self.trace: deque[str] = deque(maxlen=config.trace_keep)
        self.faults_on = config.faults
        self.kafka = SimKafka(self.shape.partitions)
        self.writer = SimWriter(self.rng.randbytes(16))
        self.publisher = SimPublisher(self.shape.partitions, self.shape.message_bytes_max)
        self.publisher.restart(self.writer.writer_id)
        factory: MergerFactory = merger_factory or SequenceMerger
        self.readers = [
            SimReader(f"r{i}", self.shape.partitions, factory) for i in range(self.shape.readers)
        ]
        self.snapshots: list[Snapshot] = []
        self.rogue_published = False
        self.corruption_injected = False  # any corrupt bytes stored or delivered
        self.stats: dict[str, int] = {}
        self._events: list[tuple[float, str, Callable[[], None]]] = [
            (8.0, "append", self.ev_append),
            (5.0, "sync", self.ev_sync),
            (10.0, "send", self.ev_send),
            (14.0, "deliver", self.ev_deliver),
            (12.0, "ack", self.ev_ack),
            (5.0, "save_position", self.ev_save_position),
            (16.0, "fetch", self.ev_fetch),
            (16.0, "process", self.ev_process),
            (100.0 * self.shape.writer_crash, "writer_crash", self.ev_writer_crash),
            (100.0 * self.shape.publisher_crash, "publisher_crash", self.ev_publisher_crash),
            (100.0 * self.shape.reader_crash, "reader_crash", self.ev_reader_crash),
            (100.0 * self.shape.retention, "retention", self.ev_retention),
            (100.0 * self.shape.snapshot, "snapshot", self.ev_snapshot),
            (0.3 if self.shape.log_corruption else 0.0, "corrupt_log", self.ev_corrupt_log),
            (0.5 if self.shape.rogue_writer else 0.0, "rogue", self.ev_rogue),
        ]

    # --- bookkeeping -----------------------------------------------------------

    def log(self, what: str) -> None:
        self.trace.append(f"{self.step_no:5d} {what}")

    def count(self, name: str, n: int = 1) -> None:
        self.stats[name] = self.stats.get(name, 0) + n

    def step(self) -> None:
        self.step_no += 1
        events = [e for e in self._events if e[0] > 0]
        weights = [w for w, _, _ in events]
        _, _, fn = self.rng.choices(events, weights)[0]
        fn()

    # --- writer ----------------------------------------------------------------

    def _random_ops(self) -> list[tuple[Op, bytes, bytes]]:
        rng = self.rng
        keys = [b"k%02d" % i for i in range(self.shape.key_space)]
        roll = rng.random()
        if roll < 0.04:  # a huge transaction: many entries, forces parts
            n, vmax = rng.randint(30, 90), 120
        elif roll < 0.07:  # one value larger than a message: forces value fragments
            return [(Op.PUT, rng.choice(keys), rng.randbytes(self.shape.message_bytes_max * 2))]
        else:
            n, vmax = rng.randint(1, 20), 24
        ops: list[tuple[Op, bytes, bytes]] = []
        for _ in range(n):
            key = rng.choice(keys)
            if rng.random() < 0.2:
                ops.append((Op.DELETE, key, b""))
            else:
                ops.append((Op.PUT, key, rng.randbytes(rng.randint(0, vmax))))
        return ops

    def ev_append(self) -> None:
        txn = self.writer.append(self._random_ops(), timestamp_us=self.step_no * 1000)
        self.log(f"writer append seqs {txn.first_seq}..{txn.last_seq}")
        if self.rng.random() < 0.5:
            self.ev_sync()

    def ev_sync(self) -> None:
        n = self.writer.sync()
        if n:
            self.log(f"writer fsync {n} txns, durable through {self.writer.last_seq}")
            self.count("txns", n)

    def ev_writer_crash(self) -> None:
        lost = self.writer.crash_restart()
        self.publisher.restart(self.writer.writer_id)
        self.count("writer_crashes")
        self.log(
            f"CRASH writer+publisher: {lost} unsynced txns lost (never acked), epoch "
            f"{self.writer.epoch}, resend from {self.publisher.saved_seq + 1}"
        )

    # --- publisher and broker ----------------------------------------------------

    def ev_send(self) -> None:
        sent = self.publisher.send(self.writer, self.rng.randint(1, 6))
        if sent:
            where = ", ".join(f"{m.msg.first_seq}..{m.msg.last_seq}->p{m.partition}" for m in sent)
            self.log(f"publisher send {where}")
            self.count("messages", len(sent))

    def ev_deliver(self) -> None:
        """The broker appends the head of one partition's queue (per-partition order kept)."""
        ready = [p for p in range(self.kafka.partitions) if self.publisher.unsent[p]]
        if not ready:
            return
        p = self.rng.choice(ready)
        for _ in range(self.rng.randint(1, 3)):
            if not self.publisher.unsent[p]:
                break
            item = self.publisher.unsent[p].popleft()
            item.offset = self.kafka.append(p, item.msg)
            self.publisher.unacked[p].append(item)
            self.log(f"kafka p{p}@{item.offset} <- seqs {item.msg.first_seq}..{item.msg.last_seq}")

    def ev_ack(self) -> None:
        """Acks come back per partition in order, partitions in any order."""
        ready = [p for p in range(self.kafka.partitions) if self.publisher.unacked[p]]
        if not ready:
            return
        p = self.rng.choice(ready)
        before = self.publisher.position
        for _ in range(self.rng.randint(1, 3)):
            if not self.publisher.unacked[p]:
                break
            self.publisher.ack(self.publisher.unacked[p].popleft())
        self.log(f"publisher acks p{p}; position {before} -> {self.publisher.position}")

    def ev_save_position(self) -> None:
        """The publisher's save loop: save, then, if caught up, start reading end offsets."""
        if self.publisher.save(self.kafka):
            self.log(
                f"publisher saves position {self.publisher.saved_seq} "
                f"offsets {self.publisher.saved_offsets}"
            )
        if self.publisher.probe(self.writer.last_seq):
            self.log(f"publisher caught up at {self.publisher.position}: reads end offsets")

    def ev_publisher_crash(self) -> None:
        self.publisher.restart(self.writer.writer_id)
        self.count("publisher_crashes")
        self.log(f"CRASH publisher: resend from {self.publisher.saved_seq + 1}")

    def ev_retention(self) -> None:
        p = self.rng.randrange(self.kafka.partitions)
        start, end = self.kafka.log_start[p], self.kafka.end(p)
        if end <= start:
            return
        new_start = self.rng.randint(start + 1, end) if self.rng.random() < 0.3 else start + 1
        self.kafka.log_start[p] = new_start
        self.count("retention_truncations")
        self.log(f"RETENTION p{p} log start {start} -> {new_start}")

    def ev_corrupt_log(self) -> None:
        live = [
            (p, r)
            for p in range(self.kafka.partitions)
            for r in self.kafka.logs[p][self.kafka.log_start[p] :]
        ]
        if not live:
            return
        p, rec = self.rng.choice(live)
        rec.value = flip_bit(rec.value, self.rng)
        rec.corrupt = True
        self.corruption_injected = True
        self.count("log_corruptions")
        self.log(f"CORRUPT stored p{p}@{rec.offset} (seqs {rec.first_seq}..{rec.last_seq})")

    def ev_rogue(self) -> None:
        """A second writer (other epoch) republishes an existing batch with other content."""
        if self.rogue_published:
            return
        whole = [
            r
            for p in range(self.kafka.partitions)
            for r in self.kafka.logs[p][self.kafka.log_start[p] :]
            if r.routing_seq == r.first_seq and not r.rogue and r.first_seq in self.writer.wal_index
        ]
        whole = [r for r in whole if not r.corrupt and r.part_count == 1]
        if not whole:
            return
        real = self.rng.choice(whole)
        p = partition_for(real.routing_seq, self.kafka.partitions)
        log = self.kafka.logs[p]
        if self.config.rogue_between_parts and not (log and log[-1].unfinished_part):
            return  # wait for a moment between the parts of a split transaction
        txns = []
        for t in self.writer.txns_from(real.first_seq, len(self.writer.wal)):
            if t.first_seq > real.last_seq:
                break
            txns.append(t)
        forged = [_forge(t) for t in txns]
        epoch = self.writer.epoch + self.rng.choice((-1, 5)) if self.writer.epoch > 1 else 9
        enc = Encoder(WriterId(self.writer.stream_id, epoch), message_bytes_max=1 << 20, level=1)
        for m in enc.encode(forged):
            p = partition_for(m.routing_seq, self.kafka.partitions)
            off = self.kafka.append(p, m, rogue=True)
            self.log(f"ROGUE writer epoch {epoch}: p{p}@{off} seqs {m.first_seq}..{m.last_seq}")
        self.rogue_published = True
        self.count("rogue_batches")

    # --- snapshots -----------------------------------------------------------------

    def ev_snapshot(self) -> None:
        healthy = [r for r in self.readers if r.stopped is None and r.applied_seq > 0]
        if healthy and self.rng.random() < 0.6:
            r = self.rng.choice(healthy)
            cp = r.applier.checkpoint()
            offsets = {p: cp.offsets.get(p, 0) for p in range(self.kafka.partitions)}
            snap = Snapshot(cp.applied_seq, r.state(), offsets, r.name, self.step_no)
        elif self.writer.last_seq > 0:
            snap = self.writer_snapshot()
        else:
            return
        self.snapshots.append(snap)
        self.count("snapshots")
        self.log(f"SNAPSHOT from {snap.source} at seq {snap.seq} offsets {dict(snap.offsets)}")

    def writer_snapshot(self) -> Snapshot:
        """What ``create_from_data_dir`` does: the publisher's saved position is read
        first, then the writer's state (at a seq >= that position) is snapshotted
        with the position's offsets (a partition never published to: offset 0)."""
        offsets = {p: self.publisher.saved_offsets.get(p, 0) for p in range(self.kafka.partitions)}
        seq = self.writer.last_seq
        return Snapshot(seq, dict(self.writer.states[seq]), offsets, "writer", self.step_no)

    def _usable_by_all(self, snap: Snapshot) -> bool:
        """Connects, and every partition continues past its corrupt messages."""
        if not snap.connects(self.kafka):
            return False
        return all(
            snap.offsets[p] > rec.offset
            for p in range(self.kafka.partitions)
            for rec in self.kafka.logs[p]
            if rec.corrupt
        )

    def _drain(self, after_step: Callable[[World], None]) -> None:
        """Publish everything durable, every message delivered and acked."""
        pub = self.publisher
        while not (pub.position == self.writer.last_seq and pub.idle):
            self.step_no += 1
            pub.send(self.writer, 8)
            for p in range(self.kafka.partitions):
                while pub.unsent[p]:
                    item = pub.unsent[p].popleft()
                    item.offset = self.kafka.append(p, item.msg)
                    pub.unacked[p].append(item)
                while pub.unacked[p]:
                    pub.ack(pub.unacked[p].popleft())
            after_step(self)

    def newest_snapshot(self, reader: SimReader) -> Snapshot | None:
        """The newest snapshot that connects with the log and does not go back in time;
        after a DecodeError, it must also start past the bad message."""
        for snap in reversed(self.snapshots):
            if snap.seq < reader.applied_seq or not snap.connects(self.kafka):
                continue
            if reader.bad_position is not None:
                p, off = reader.bad_position
                if snap.offsets[p] <= off:
                    continue
            return snap
        return None

    # --- readers -------------------------------------------------------------------

    def ev_reader_crash(self) -> None:
        r = self.rng.choice(self.readers)
        r.crash_restart()
        self.count("reader_crashes")
        self.log(f"CRASH reader {r.name}: restart from checkpoint seq {r.applied_seq}")

    def ev_fetch(self) -> None:
        self.fetch(self.rng.choice(self.readers), full=False)

    def ev_process(self) -> None:
        self.process(self.rng.choice(self.readers), full=False)

    def retention_reason(self, r: SimReader) -> str | None:
        """The real reader's retention decision (``merge.retention_gap``) on this log."""
        k = self.kafka
        parts = range(k.partitions)
        first_at_start: dict[int, int | None] = {}
        for p in parts:
            live = k.end(p) > k.log_start[p]
            # The reader learns it from the message key at the log start.
            key = k.logs[p][k.log_start[p]].key if live else None
            first_at_start[p] = int.from_bytes(key, "big") if key is not None else None
        return retention_gap(
            applied_seq=r.applied_seq,
            next_offsets=dict(r.fetch_pos),
            log_start_offsets={p: k.log_start[p] for p in parts},
            log_end_offsets={p: k.end(p) for p in parts},
            first_seq_at_log_start=first_at_start,
        )

    def try_bootstrap(self, r: SimReader, why: str) -> bool:
        snap = self.newest_snapshot(r)
        if snap is None:
            if not r.expired:
                self.log(f"reader {r.name} {why}: no snapshot connects; waiting (never skip)")
            r.expired = True
            return False
        before = r.applied_seq
        r.bootstrap(snap)
        self.count("bootstraps")
        self.log(
            f"BOOTSTRAP reader {r.name} ({why}) from {snap.source} snapshot seq {snap.seq} "
            f"(was {before}), offsets {dict(snap.offsets)}"
        )
        return True

    def fetch(self, r: SimReader, *, full: bool) -> None:
        """Fetch random-sized prefixes per partition, partitions in random order,
        interleaved into the reader's inbox (order is kept within a partition)."""
        if r.stopped == "split_brain":
            return
        if r.stopped == "decode":
            self.try_bootstrap(r, "stopped on corrupt input")
            return
        parts = list(range(self.kafka.partitions))
        expired = [p for p in parts if r.fetch_pos[p] < self.kafka.log_start[p]]
        if expired:  # Kafka answers OffsetOutOfRange
            reason = self.retention_reason(r)
            if reason is None:
                raise InvariantViolation(
                    f"retention_gap() says nothing expired for reader {r.name} although "
                    f"p{expired[0]} starts at {self.kafka.log_start[expired[0]]} > "
                    f"{r.fetch_pos[expired[0]]}"
                )
            self.try_bootstrap(r, reason)
            return
        self.rng.shuffle(parts)
        streams: list[deque[Delivery]] = []
        for p in parts:
            if not full and self.rng.random() < 0.3:
                continue  # this partition's fetch is late
            pos = r.fetch_pos[p]
            n = self.kafka.end(p) - pos if full else self.rng.randint(0, 4)
            recs = self.kafka.read(p, pos, n)
            r.fetch_pos[p] = pos + len(recs)
            if recs:
                streams.append(deque(Delivery(p, rec.offset, rec.value) for rec in recs))
        delivered = 0
        while streams:
            s = self.rng.choice(streams)
            d = s.popleft()
            if self.faults_on and self.rng.random() < self.shape.delivery_corruption:
                d = Delivery(d.partition, d.offset, flip_bit(d.value, self.rng))
                self.corruption_injected = True
                self.count("delivery_corruptions")
                self.log(f"CORRUPT delivery of p{d.partition}@{d.offset} to {r.name}")
            r.inbox.append(d)
            delivered += 1
            if not s:
                streams.remove(s)
        if delivered:
            self.log(f"reader {r.name} fetched {delivered} messages")

    def process(self, r: SimReader, *, full: bool) -> None:
        """Decode, reassemble, merge and apply part of the inbox."""
        if r.stopped is not None:
            return
        n = len(r.inbox) if full or not r.inbox else self.rng.randint(1, len(r.inbox))
        for _ in range(n):
            d = r.inbox.popleft()
            if not self._offer(r, d):
                return
        while True:
            try:
                batches, offsets = r.merger.take_ready(max_entries=self.rng.randint(1, 60))
            except SplitBrainError as exc:
                self._stop_split_brain(r, exc)
                return
            if not batches:
                break
            # As the real reader: parts of transactions already applied stop holding.
            for p, assembler in enumerate(r.assemblers):
                if assembler.discard_through(r.merger.applied_seq):
                    r.merger.hold(p, assembler.first_offset)
            self._apply(r, batches, offsets)
            if not full and self.rng.random() < 0.3:
                return
        # A gap that persists with every partition fetched to its end: the real
        # reader asks retention_gap() whether the log can still fill it.
        caught_up = all(r.fetch_pos[p] == self.kafka.end(p) for p in range(self.kafka.partitions))
        if not r.inbox and caught_up and r.merger.waiting_for() is not None:
            reason = self.retention_reason(r)
            if reason is not None:
                self.try_bootstrap(r, reason)

    def _offer(self, r: SimReader, d: Delivery) -> bool:
        p = d.partition
        try:
            batch = r.decoder.decode(d.value)
        except DecodeError as exc:
            r.stopped = "decode"
            r.stop_error = str(exc)
            r.bad_position = (p, d.offset)
            r.decode_errors += 1
            self.count("decode_stops")
            self.log(f"reader {r.name} STOPPED (unhealthy): DecodeError at p{p}@{d.offset}: {exc}")
            return False
        assembler = r.assemblers[p]
        whole = assembler.add(batch, d.offset)
        # As the real reader: never commit past a part still held.
        r.merger.hold(p, assembler.first_offset)
        if whole is None:
            r.merger.skip(p, d.offset)  # held (see hold) or a stray part
            return True
        try:
            r.merger.offer(p, d.offset, whole.batch, first_offset=whole.first_offset)
        except SplitBrainError as exc:
            self._stop_split_brain(r, exc)
            return False
        return True

    def _stop_split_brain(self, r: SimReader, exc: SplitBrainError) -> None:
        r.stopped = "split_brain"
        r.stop_error = str(exc)
        r.split_brains += 1
        self.count("split_brain_stops")
        self.log(f"reader {r.name} STOPPED: SplitBrainError: {exc}")

    def _apply(self, r: SimReader, batches: list[Batch], offsets: dict[int, int]) -> None:
        applied = r.applied_seq
        # (d), checked before the applier sees the batches (it would refuse them too).
        expected = applied + 1
        for b in batches:
            if b.first_seq != expected:
                raise InvariantViolation(
                    f"(d) reader {r.name}: merger handed out seqs from {b.first_seq}, expected "
                    f"{expected} (replica applied through {applied})"
                )
            expected = b.last_seq + 1
            for s in range(b.first_seq, b.last_seq + 1):
                n = r.apply_counts.get(s, 0) + 1
                r.apply_counts[s] = n
                if n > 1:
                    raise InvariantViolation(f"(d) reader {r.name}: seq {s} applied {n} times")
        r.applier.apply(batches, offsets, batches[-1].writer)
        r.committed.update(offsets)  # commit Kafka offsets only after the local commit
        self.count("applied_batches", len(batches))
        self.log(
            f"reader {r.name} applied {batches[0].first_seq}..{batches[-1].last_seq}"
            f" commit {offsets}"
        )

    # --- the end: faults off, everything drains -------------------------------------

    def quiesce(self, after_step: Callable[[World], None]) -> None:
        """Faults off; the publisher drains the WAL; readers catch up. No more writes.

        Once caught up, the publisher records the partitions' end offsets, so a
        writer snapshot taken then connects with the log and starts past every
        corrupt message, even where retention moved a log start past the last
        message of the acknowledged prefix (messages of crashed sessions sit
        after it). Readers stopped on corrupt input first restart (a transient
        corruption heals), then bootstrap past it; readers whose log was
        truncated bootstrap from that snapshot. A healthy reader is never
        bootstrapped here: one that cannot progress on an intact log is a
        liveness bug.
        """
        self.faults_on = False
        self.log("--- quiescent phase: faults off ---")
        self.ev_sync()
        self._drain(after_step)
        self.ev_save_position()  # caught up: starts reading the end offsets
        self.ev_save_position()  # ... and records them
        snap = self.writer_snapshot()
        if not self._usable_by_all(snap):
            raise InvariantViolation(
                f"(c) the caught-up publisher's offsets {dict(snap.offsets)} do not reach "
                f"the log (log start {self.kafka.log_start}, end "
                f"{[self.kafka.end(p) for p in range(self.kafka.partitions)]}) or stop before "
                "a corrupt message: a writer snapshot taken now would not serve every reader"
            )
        self.snapshots.append(snap)
        self.log(f"final writer snapshot at {snap.seq} offsets {dict(snap.offsets)}")
        for r in self.readers:
            if r.stopped == "decode":
                r.crash_restart()
                self.log(f"reader {r.name} restarted after a decode stop")
        for _ in range(50):
            progressed = False
            for r in self.readers:
                self.step_no += 1
                before = (r.applied_seq, r.stopped, r.bootstraps)
                self.fetch(r, full=True)
                self.process(r, full=True)
                after_step(self)
                progressed |= (r.applied_seq, r.stopped, r.bootstraps) != before
            if not progressed:
                break


def _forge(t: Transaction) -> Transaction:
    """The same sequences and boundaries with different content."""
    ops = bytearray(t.ops)
    values = [b"rogue:" + v if op == Op.PUT else v for op, v in zip(ops, t.values, strict=True)]
    if Op.PUT not in ops:
        ops[0] = Op.PUT
        values[0] = b"rogue"
    return Transaction(t.first_seq, bytes(ops), list(t.keys), values, t.timestamp_us)
