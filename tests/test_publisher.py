"""Publisher: pure batching/ack logic, the durable position, and publishing to Kafka."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from walship.producer.batching import (
    AckTracker,
    Backoff,
    BatchAccumulator,
    message_ends,
    txn_size_bytes,
)
from walship.producer.position import FILE_NAME, PublishedPosition
from walship.shared.errors import WalError
from walship.shared.model import Op, Transaction


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
    t.sent(11, 12, partition=0, ends_txn=True)
    t.sent(13, 15, partition=1, ends_txn=True)
    t.sent(16, 16, partition=0, ends_txn=True)
    assert not t.acked(13, offset=7)  # out of order: prefix blocked by 11..12
    assert t.acked_seq == 10 and t.offsets == {0: 5}
    assert t.acked(11, offset=5)
    assert t.acked_seq == 15 and t.offsets == {0: 6, 1: 8}
    assert t.acked(16, offset=6)
    assert t.acked_seq == 16 and t.offsets == {0: 7, 1: 8}
    assert t.in_flight == 0


def test_tracker_waits_for_the_last_part_of_a_split_transaction() -> None:
    t = AckTracker()
    t.sent(1, 4, partition=2, ends_txn=False)  # part 1 of txn 1..10
    t.sent(5, 8, partition=2, ends_txn=False)
    t.sent(9, 10, partition=2, ends_txn=True)
    t.acked(1, 0)
    t.acked(5, 1)
    assert t.acked_seq == 0 and t.offsets == {}
    t.acked(9, 2)
    assert t.acked_seq == 10 and t.offsets == {2: 3}


def test_tracker_reset_resends_from_acked() -> None:
    t = AckTracker()
    t.sent(1, 1, partition=0, ends_txn=True)
    t.sent(2, 2, partition=1, ends_txn=True)
    t.acked(1, 0)
    t.acked(2, 0)
    t.sent(3, 3, partition=0, ends_txn=True)
    t.sent(4, 4, partition=1, ends_txn=True)
    t.acked(4, 1)  # acknowledged, but 3 is not: 4 is resent after a reset
    assert t.reset() == 3
    assert t.sent_seq == 2 and t.in_flight == 0
    with pytest.raises(ValueError, match="dense"):
        t.sent(4, 4, partition=1, ends_txn=True)
    with pytest.raises(KeyError):
        t.acked(4, 1)


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
    for first, last, p, ends_txn in msgs:
        t.sent(first, last, p, ends_txn=ends_txn)
    txn_ends = {last for _, last, _, ends_txn in msgs if ends_txn} | {0}
    next_offset = dict.fromkeys(range(partitions), 0)
    # Kafka acknowledges in order per partition, in any order across partitions.
    per_partition: dict[int, list[tuple[int, int]]] = {}
    for first, last, p, _ in msgs:
        per_partition.setdefault(p, []).append((first, last))
    acked: set[int] = set()
    while any(per_partition.values()):
        p = rng.choice([q for q, v in per_partition.items() if v])
        first, last = per_partition[p].pop(0)
        t.acked(first, next_offset[p])
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
