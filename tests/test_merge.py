"""SequenceMerger: dense output from any delivery order, duplicates, resends, restarts."""

from __future__ import annotations

import dataclasses
import itertools
import random
import tracemalloc
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from walship.consumer.merge import SequenceMerger, retention_gap
from walship.shared.errors import SplitBrainError
from walship.shared.model import Batch, Op, Transaction, WriterId

STREAM = WriterId(b"S" * 16, 1)


def make_txns(sizes: Sequence[int], *, salt: bytes = b"") -> list[Transaction]:
    txns: list[Transaction] = []
    seq = 1
    for i, size in enumerate(sizes):
        kvs = []
        for j in range(size):
            s = seq + j
            if s % 7 == 0:
                kvs.append((Op.DELETE, b"k%d" % (s % 5), b""))
            else:
                kvs.append((Op.PUT, b"k%d" % (s % 5), b"v%d" % s + salt))
        txns.append(Transaction.of(seq, kvs, timestamp_us=1000 + i))
        seq += size
    return txns


def cut(writer: WriterId, txns: Sequence[Transaction], bounds: Sequence[int]) -> list[Batch]:
    """Batches of ``txns`` cut before each txn index in ``bounds``."""
    edges = sorted({0, *(b for b in bounds if 0 < b < len(txns)), len(txns)})
    return [Batch.from_transactions(writer, txns[a:b]) for a, b in itertools.pairwise(edges)]


def entries(batches: Sequence[Batch]) -> list[tuple[int, int, bytes, bytes]]:
    out = []
    for b in batches:
        for i in range(b.entry_count):
            out.append((b.first_seq + i, b.ops[i], bytes(b.keys[i]), bytes(b.values[i])))
    return out


def test_in_order_single_partition() -> None:
    txns = make_txns([2, 1, 3])
    batches = cut(STREAM, txns, [1, 2])
    m = SequenceMerger(0, 1)
    for off, b in enumerate(batches):
        m.offer(0, off, b)
    out, offsets = m.take_ready(1000)
    assert entries(out) == entries(batches)
    assert offsets == {0: 3}
    assert m.applied_seq == 6 and m.writer == STREAM
    assert m.waiting_for() is None and m.buffered_bytes(0) == 0


def test_gap_waits_then_fills() -> None:
    txns = make_txns([2, 2, 2])
    b1, b2, b3 = cut(STREAM, txns, [1, 2])
    m = SequenceMerger(0, 3)
    m.offer(2, 0, b3)
    m.offer(0, 0, b1)
    out, offsets = m.take_ready(100)
    assert [b.first_seq for b in out] == [1]
    assert offsets == {0: 1, 2: 0}  # b3 on partition 2 is still pending
    assert m.waiting_for() == 3
    assert m.buffered_bytes(2) > 0 and m.buffered_bytes(0) == 0
    m.offer(1, 0, b2)
    out, offsets = m.take_ready(100)
    assert [b.first_seq for b in out] == [3, 5]
    assert offsets == {1: 1, 2: 1}
    assert m.waiting_for() is None


def test_duplicates_counted_and_overlap_trimmed() -> None:
    txns = make_txns([1, 2, 3, 1])
    whole = Batch.from_transactions(STREAM, txns)
    first_two = Batch.from_transactions(STREAM, txns[:2])
    m = SequenceMerger(0, 2)
    m.offer(0, 0, first_two)
    m.offer(1, 0, whole)  # overlaps 1..3, brings 4..7
    m.offer(0, 1, first_two)  # pure duplicate
    out, _ = m.take_ready(100)
    assert entries(out) == entries([whole])
    assert m.duplicates == 1 and m.stats.trimmed == 1
    assert out[1].first_seq == 4


def test_max_entries_bounds_groups_but_never_splits_a_batch() -> None:
    batches = cut(STREAM, make_txns([5, 5, 5]), [1, 2])
    m = SequenceMerger(0, 1)
    for off, b in enumerate(batches):
        m.offer(0, off, b)
    out, offsets = m.take_ready(7)
    assert [b.first_seq for b in out] == [1]
    assert offsets == {0: 1}
    out, _ = m.take_ready(3)  # one batch larger than the limit still goes alone
    assert [b.first_seq for b in out] == [6]


def test_starts_from_applied_seq() -> None:
    txns = make_txns([2, 2, 2])
    m = SequenceMerger(4, 1, writer=STREAM)
    m.offer(0, 10, Batch.from_transactions(STREAM, txns))
    out, offsets = m.take_ready(100)
    assert [(b.first_seq, b.last_seq) for b in out] == [(5, 6)]
    assert offsets == {0: 11}


def test_reassembled_parts_hold_the_commit_offset_at_their_first_part() -> None:
    txns = make_txns([3, 3])
    b1, b2 = cut(STREAM, txns, [1])
    m = SequenceMerger(0, 1)
    m.offer(0, 5, b2, first_offset=2)  # parts at offsets 2..5
    out, offsets = m.take_ready(100)
    assert out == [] and offsets == {0: 2}
    m2 = SequenceMerger(0, 2)
    m2.offer(1, 0, b1)
    m2.offer(0, 5, b2, first_offset=2)
    out, offsets = m2.take_ready(100)
    assert offsets == {0: 6, 1: 1}


def test_held_parts_cap_the_commit_offset() -> None:
    """Parts the reader still holds keep the safe offset at the first of them, even when
    another writer's message after them is offered (and dropped) first."""
    txns = make_txns([3, 3, 3])
    b1, b2, b3 = cut(STREAM, txns, [1, 2])
    m = SequenceMerger(0, 1)
    m.offer(0, 0, b1)
    m.hold(0, 1)  # part 0 of b2's transaction at offset 1, part 1 at 2
    m.skip(0, 1)
    m.skip(0, 2)
    resend = cut(WriterId(STREAM.stream_id, 2), txns[:1], [])[0]  # a duplicate of b1
    m.offer(0, 3, resend)
    out, offsets = m.take_ready(100)
    assert entries(out) == entries([b1]) and offsets == {0: 1}
    assert m.duplicates == 1  # done, yet the commit stays before the held parts
    m.skip(0, 4)  # a stray message: still capped
    assert m.take_ready(100) == ([], {})
    m.hold(0, None)  # the last part at 5 completes the transaction (first part at 1)
    m.offer(0, 5, b2, first_offset=1)
    m.offer(0, 6, b3)
    out, offsets = m.take_ready(100)
    assert entries(out) == entries([b2, b3]) and offsets == {0: 7}


def test_offered_out_of_offset_order_keeps_the_safe_offset_at_the_earliest() -> None:
    txns = make_txns([3, 3, 3])
    b1, b2, b3 = cut(STREAM, txns, [1, 2])
    m = SequenceMerger(0, 1)
    m.offer(0, 4, b3)  # waits for 1..6
    m.offer(0, 5, b2, first_offset=2)  # its parts started before b3's offset
    assert m.take_ready(100) == ([], {0: 2})
    with pytest.raises(ValueError, match="first_offset"):
        m.offer(0, 7, b1, first_offset=8)
    m2 = SequenceMerger(0, 1)
    m2.offer(0, 4, b3)
    with pytest.raises(ValueError, match="must increase"):
        m2.offer(0, 4, b2, first_offset=2)


def test_offsets_must_increase_per_partition() -> None:
    b = cut(STREAM, make_txns([1]), [])[0]
    m = SequenceMerger(0, 1)
    m.offer(0, 3, b)
    with pytest.raises(ValueError):
        m.offer(0, 3, b)
    with pytest.raises(ValueError):
        m.offer(1, 4, b)


def test_skip_moves_the_commit_offset_past_stray_messages() -> None:
    b = cut(STREAM, make_txns([1]), [])[0]
    m = SequenceMerger(0, 1)
    m.offer(0, 0, b)
    m.skip(0, 1)
    _, offsets = m.take_ready(10)
    assert offsets == {0: 2}


def test_restarted_writer_with_higher_epoch_is_not_split_brain() -> None:
    txns = make_txns([2, 2, 2, 2])
    epoch2 = WriterId(STREAM.stream_id, 2)
    m = SequenceMerger(0, 2)
    m.offer(0, 0, Batch.from_transactions(STREAM, txns[:3]))
    # The restarted writer resends 3..6 (same content) and continues with 7..8.
    m.offer(1, 0, Batch.from_transactions(epoch2, txns[1:]))
    out, _ = m.take_ready(100)
    assert entries(out) == entries([Batch.from_transactions(STREAM, txns)])
    assert m.writer == epoch2


def test_same_epoch_identical_resend_is_a_duplicate() -> None:
    txns = make_txns([2, 2])
    m = SequenceMerger(0, 2)
    m.offer(0, 0, Batch.from_transactions(STREAM, txns))
    m.take_ready(100)
    m.offer(1, 0, Batch.from_transactions(STREAM, txns))
    out, _ = m.take_ready(100)
    assert out == [] and m.duplicates == 1


@pytest.mark.parametrize("pending_together", [True, False])
def test_two_writers_same_seq_different_content_is_split_brain(pending_together: bool) -> None:
    mine = make_txns([2, 2])
    theirs = make_txns([2, 2], salt=b"!")
    other = WriterId(STREAM.stream_id, 2)
    m = SequenceMerger(0, 2)
    m.offer(0, 7, Batch.from_transactions(STREAM, mine))
    if not pending_together:
        m.take_ready(100)
    m.offer(1, 9, Batch.from_transactions(other, theirs))
    with pytest.raises(SplitBrainError) as info:
        m.take_ready(100)
    text = str(info.value)
    assert "epoch 1" in text and "epoch 2" in text
    assert "partition 0 offset 7" in text and "partition 1 offset 9" in text


def test_same_epoch_different_content_is_split_brain() -> None:
    # Two processes started from a copied data dir share stream id and epoch.
    m = SequenceMerger(0, 2)
    m.offer(0, 0, Batch.from_transactions(STREAM, make_txns([2])))
    m.offer(1, 0, Batch.from_transactions(STREAM, make_txns([2], salt=b"x")))
    with pytest.raises(SplitBrainError):
        m.take_ready(100)


def test_different_transaction_boundaries_are_split_brain() -> None:
    m = SequenceMerger(0, 2)
    m.offer(0, 0, Batch.from_transactions(STREAM, make_txns([2, 2])))
    m.take_ready(100)  # applied 4
    other = Batch.from_transactions(STREAM, make_txns([3, 3]))  # 1..3, 4..6
    m.offer(1, 0, other)
    with pytest.raises(SplitBrainError):
        m.take_ready(100)


def test_another_stream_is_refused() -> None:
    m = SequenceMerger(0, 2, writer=STREAM)
    foreign = WriterId(b"F" * 16, 1)
    with pytest.raises(SplitBrainError) as info:
        m.offer(0, 3, Batch.from_transactions(foreign, make_txns([1])))
    assert ("F" * 16).encode().hex() in str(info.value)


def test_first_stream_seen_fixes_the_stream() -> None:
    m = SequenceMerger(0, 2)
    m.offer(0, 0, Batch.from_transactions(STREAM, make_txns([1])))
    with pytest.raises(SplitBrainError):
        m.offer(1, 0, Batch.from_transactions(WriterId(b"F" * 16, 1), make_txns([1])))


def test_history_is_bounded() -> None:
    txns = make_txns([1] * 50)
    m = SequenceMerger(0, 1, history_entries_max=10)
    for off, t in enumerate(txns):
        m.offer(0, off, Batch.from_transactions(STREAM, [t]))
    m.take_ready(1000)
    assert m._history_entries <= 10
    # Too old to compare: a conflicting batch below the history is dropped as a duplicate.
    m.offer(0, 60, Batch.from_transactions(STREAM, make_txns([1], salt=b"?")))
    out, _ = m.take_ready(10)
    assert out == [] and m.duplicates == 1


def test_history_is_bounded_by_transactions_too() -> None:
    m = SequenceMerger(0, 1, history_txns_max=8)
    m.offer(0, 0, Batch.from_transactions(STREAM, make_txns([1] * 20)))
    m.take_ready(1000)
    m.offer(0, 1, Batch.from_transactions(STREAM, make_txns([1] * 24)[20:]))
    m.take_ready(1000)
    assert m._history_txns <= 8


def test_resend_cut_differently_matches_the_fingerprints() -> None:
    txns = make_txns([3, 1, 2, 4, 2])
    m = SequenceMerger(0, 2)
    m.offer(0, 0, Batch.from_transactions(STREAM, txns))
    m.take_ready(100)
    for off, batch in enumerate(cut(STREAM, txns, [1, 3])):
        m.offer(1, off, batch)
    out, _ = m.take_ready(100)
    assert out == [] and m.duplicates == 3


@pytest.mark.parametrize("what", ["value", "key", "op", "timestamp"])
def test_one_changed_transaction_inside_an_applied_batch_is_split_brain(what: str) -> None:
    txns = make_txns([2, 3, 2])
    t = txns[1]
    if what == "value":
        changed = dataclasses.replace(t, values=[t.values[0], t.values[1] + b"!", t.values[2]])
    elif what == "key":
        changed = dataclasses.replace(t, keys=[t.keys[0], t.keys[1], t.keys[2] + b"!"])
    elif what == "op":
        changed = dataclasses.replace(t, ops=bytes(1 - o for o in t.ops))
    else:
        changed = dataclasses.replace(t, timestamp_us=t.timestamp_us + 1)
    m = SequenceMerger(0, 2)
    m.offer(0, 4, Batch.from_transactions(STREAM, txns))
    m.take_ready(100)
    m.offer(1, 8, Batch.from_transactions(WriterId(STREAM.stream_id, 2), [changed]))
    with pytest.raises(SplitBrainError) as info:
        m.take_ready(100)
    text = str(info.value)
    assert "3..5" in text and "partition 0 offset 4" in text and "partition 1 offset 8" in text


def test_duplicate_with_other_transaction_boundaries_is_split_brain() -> None:
    m = SequenceMerger(0, 2)
    m.offer(0, 0, Batch.from_transactions(STREAM, make_txns([2, 2, 2])))
    m.take_ready(100)  # applied 6
    m.offer(1, 0, Batch.from_transactions(STREAM, make_txns([3, 3])))  # same entries
    with pytest.raises(SplitBrainError, match="transaction boundaries"):
        m.take_ready(100)


def test_history_of_a_million_sequences_is_compact_and_still_compares() -> None:
    txns = make_txns([10] * 100_000)
    batches = [Batch.from_transactions(STREAM, txns[i : i + 1000]) for i in range(0, 100_000, 1000)]
    m = SequenceMerger(0, 1)
    tracemalloc.start()
    try:
        for off, b in enumerate(batches):
            m.offer(0, off, b)
            m.take_ready(1_000_000)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert m.applied_seq == 1_000_000 and m._history_entries == 1_000_000
    # Whole batches kept 1M keys and values (~130 MB here); fingerprints ~3 MB.
    assert held < 6 << 20, held
    m.offer(0, 200, Batch.from_transactions(STREAM, make_txns([10], salt=b"!")))
    with pytest.raises(SplitBrainError, match=r"1\.\.10"):
        m.take_ready(100)


# --- exhaustive: any cuts, partitions, resends and interleavings --------------


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[int], list[list[Batch]], int, list[int], int]:
    sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=25))
    txns = make_txns(sizes)
    partitions = draw(st.integers(1, 4))
    logs: list[list[Batch]] = [[] for _ in range(partitions)]
    sessions = draw(st.integers(1, 3))
    epoch = 1
    for s in range(sessions):
        start = 0 if s == 0 else draw(st.integers(0, len(txns) - 1))
        bounds = draw(st.lists(st.integers(start + 1, len(txns)), max_size=8))
        writer = WriterId(STREAM.stream_id, epoch)
        epoch += draw(st.integers(0, 1))
        for b in cut(writer, txns[start:], [x - start for x in bounds]):
            logs[draw(st.integers(0, partitions - 1))].append(b)
    # Extra resends of arbitrary batches to arbitrary partitions.
    for _ in range(draw(st.integers(0, 3))):
        src = draw(st.sampled_from([b for log in logs for b in log]))
        logs[draw(st.integers(0, partitions - 1))].append(src)
    seed = draw(st.integers(0, 2**32 - 1))
    max_entries = draw(st.integers(1, 20))
    restarts = draw(st.lists(st.integers(0, 200), max_size=3))
    return sizes, logs, seed, restarts, max_entries


@settings(max_examples=400, deadline=None)
@given(scenarios())
def test_any_delivery_order_yields_the_dense_stream(
    scenario: tuple[list[int], list[list[Batch]], int, list[int], int],
) -> None:
    sizes, logs, seed, restarts, max_entries = scenario
    expected = entries([Batch.from_transactions(STREAM, make_txns(sizes))])
    rng = random.Random(seed)
    partitions = len(logs)
    applied: list[tuple[int, int, bytes, bytes]] = []
    committed: dict[int, int] = {}  # what a reader would have acked (= stored with the data)
    positions = dict.fromkeys(range(partitions), 0)
    merger = SequenceMerger(0, partitions)
    step = 0
    restart_at = sorted(restarts)
    while True:
        if restart_at and step >= restart_at[0]:
            # Crash: lose everything in memory, resume from the checkpoint.
            restart_at.pop(0)
            merger = SequenceMerger(len(applied), partitions, writer=merger.writer)
            positions = {p: committed.get(p, 0) for p in range(partitions)}
        live = [p for p in range(partitions) if positions[p] < len(logs[p])]
        if not live:
            break
        p = rng.choice(live)
        merger.offer(p, positions[p], logs[p][positions[p]])
        positions[p] += 1
        step += 1
        if rng.random() < 0.5:
            out, offsets = merger.take_ready(max_entries)
            if len(out) > 1:
                assert sum(b.entry_count for b in out) <= max_entries
            applied.extend(entries(out))
            committed.update(offsets)
            assert merger.applied_seq == len(applied)
    while True:
        out, offsets = merger.take_ready(max_entries)
        applied.extend(entries(out))
        committed.update(offsets)
        if not out:
            break
    assert applied == expected
    assert merger.waiting_for() is None
    assert merger.buffered_bytes_total == 0
    assert committed == {p: len(logs[p]) for p in range(partitions) if logs[p]}


# --- retention decisions -------------------------------------------------------


def test_retention_log_start_beyond_needed_offset() -> None:
    reason = retention_gap(
        applied_seq=10,
        next_offsets={0: 5, 1: 7},
        log_start_offsets={0: 5, 1: 9},
        log_end_offsets={0: 20, 1: 20},
        first_seq_at_log_start={0: 11, 1: 40},
    )
    assert reason is not None and "partition 1" in reason and "offset 7" in reason


def test_retention_earliest_seq_beyond_applied() -> None:
    reason = retention_gap(
        applied_seq=0,
        next_offsets={},
        log_start_offsets={0: 0, 1: 0},
        log_end_offsets={0: 3, 1: 3},
        first_seq_at_log_start={0: 50, 1: 61},
    )
    assert reason is not None and "1..49" in reason


@pytest.mark.parametrize(
    ("ends", "firsts"),
    [
        ({0: 3, 1: 0}, {0: 50, 1: None}),  # an empty partition may still get seq 1
        ({0: 3, 1: 3}, {0: 1, 1: 61}),  # seq 1 is still there
    ],
)
def test_retention_not_expired(ends: dict[int, int], firsts: dict[int, int | None]) -> None:
    assert (
        retention_gap(
            applied_seq=0,
            next_offsets={},
            log_start_offsets={0: 0, 1: 0},
            log_end_offsets=ends,
            first_seq_at_log_start=firsts,
        )
        is None
    )
