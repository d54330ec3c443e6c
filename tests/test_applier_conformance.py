"""Every Applier implementation behaves the same (SqliteApplier, DictApplier)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from walship.consumer.applier import Applier, DictApplier, SqliteApplier
from walship.shared.errors import ReplicaError, StoreMismatchError
from walship.shared.model import Batch, Op, Transaction, WriterId

W1 = WriterId(b"A" * 16, 1)
W2 = WriterId(b"A" * 16, 2)


class Harness:
    """Opens an implementation and can reopen it (persistence where it has any)."""

    def __init__(self, kind: str, tmp_path: Path) -> None:
        self.kind = kind
        self.path = tmp_path / "replica.db"
        self.applier: Applier = self._open()

    def _open(self) -> Applier:
        if self.kind == "sqlite":
            return SqliteApplier(self.path, synchronous="full")
        return DictApplier()

    def reopen(self) -> Applier:
        if self.kind == "sqlite":
            self.applier.close()
            self.applier = self._open()
        return self.applier

    def state(self) -> dict[bytes, bytes]:
        a = self.applier
        if isinstance(a, SqliteApplier):
            return dict(a.store.scan())
        assert isinstance(a, DictApplier)
        return dict(a.data)


@pytest.fixture(params=["sqlite", "dict"])
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    h = Harness(request.param, tmp_path)
    yield h
    h.applier.close()


def batch(first_seq: int, *txns: list[tuple[Op, bytes, bytes]], writer: WriterId = W1) -> Batch:
    out: list[Transaction] = []
    seq = first_seq
    for i, kvs in enumerate(txns):
        out.append(Transaction.of(seq, kvs, timestamp_us=1_000_000 + seq * 10 + i))
        seq += len(kvs)
    return Batch.from_transactions(writer, out)


def put(k: bytes, v: bytes) -> tuple[Op, bytes, bytes]:
    return (Op.PUT, k, v)


def delete(k: bytes) -> tuple[Op, bytes, bytes]:
    return (Op.DELETE, k, b"")


def test_both_satisfy_the_protocol(harness: Harness) -> None:
    assert isinstance(harness.applier, Applier)


def test_fresh_checkpoint(harness: Harness) -> None:
    cp = harness.applier.checkpoint()
    assert cp.applied_seq == 0 and dict(cp.offsets) == {} and cp.writer is None


def test_dense_from_applied(harness: Harness) -> None:
    a = harness.applier
    a.apply([batch(1, [put(b"a", b"1")]), batch(2, [put(b"b", b"2"), put(b"c", b"3")])])
    assert a.checkpoint().applied_seq == 3
    with pytest.raises(ReplicaError):
        a.apply([batch(5, [put(b"x", b"gap")])])  # 4 is missing
    with pytest.raises(ReplicaError):
        a.apply([batch(4, [put(b"d", b"4")]), batch(6, [put(b"x", b"gap")])])
    assert a.checkpoint().applied_seq == 3
    assert harness.state() == {b"a": b"1", b"b": b"2", b"c": b"3"}


def test_reapply_is_refused_and_changes_nothing(harness: Harness) -> None:
    a = harness.applier
    first = batch(1, [put(b"a", b"1")], [put(b"b", b"2")])
    a.apply([first], offsets={0: 1}, writer=W1)
    with pytest.raises(ReplicaError):
        a.apply([first], offsets={0: 99}, writer=W1)
    with pytest.raises(ReplicaError):
        a.apply([batch(2, [put(b"b", b"other")])])
    cp = a.checkpoint()
    assert cp.applied_seq == 2 and dict(cp.offsets) == {0: 1}
    assert harness.state() == {b"a": b"1", b"b": b"2"}


def test_failing_apply_changes_nothing(harness: Harness) -> None:
    a = harness.applier
    a.apply([batch(1, [put(b"a", b"1")])], offsets={0: 1}, writer=W1)
    good = batch(2, [put(b"a", b"changed"), delete(b"a"), put(b"b", b"2")])
    # Injected failure: the second batch carries a value that cannot be stored.
    broken = batch(5, [put(b"c", b"3")])
    broken = Batch(
        writer=broken.writer,
        first_seq=broken.first_seq,
        ops=broken.ops,
        keys=broken.keys,
        values=[cast(bytes, None)],
        txn_sizes=broken.txn_sizes,
        txn_timestamps_us=broken.txn_timestamps_us,
    )
    with pytest.raises(ReplicaError):
        a.apply([good, broken], offsets={0: 9, 1: 4}, writer=W2)
    cp = a.checkpoint()
    assert cp.applied_seq == 1 and dict(cp.offsets) == {0: 1} and cp.writer == W1
    assert harness.state() == {b"a": b"1"}
    a.apply([good], offsets={0: 2}, writer=W2)  # still usable afterwards
    assert harness.state() == {b"b": b"2"}


def test_checkpoint_round_trip(harness: Harness) -> None:
    a = harness.applier
    a.apply([batch(1, [put(b"a", b"1")], [put(b"b", b"2")])], offsets={0: 3, 2: 7}, writer=W1)
    a.apply([batch(3, [put(b"c", b"3")])], offsets={2: 8}, writer=W2)
    a = harness.reopen()
    cp = a.checkpoint()
    assert cp.applied_seq == 3
    assert dict(cp.offsets) == {0: 3, 2: 8}  # merged, not replaced
    assert cp.writer == W2
    assert cp.applied_timestamp_us == 1_000_000 + 3 * 10
    assert harness.state() == {b"a": b"1", b"b": b"2", b"c": b"3"}


def test_offsets_alone_advance_without_data(harness: Harness) -> None:
    a = harness.applier
    a.apply([batch(1, [put(b"a", b"1")])], offsets={0: 1})
    a.apply([], offsets={1: 5})  # duplicates dropped on partition 1: only the ack moves
    cp = a.checkpoint()
    assert cp.applied_seq == 1 and dict(cp.offsets) == {0: 1, 1: 5}


def test_deletes_and_overwrites(harness: Harness) -> None:
    a = harness.applier
    a.apply(
        [
            batch(1, [put(b"a", b"1"), put(b"b", b"1")], [put(b"a", b"2")]),
            batch(4, [delete(b"b")], [delete(b"missing"), put(b"c", b"x")]),
        ]
    )
    assert harness.state() == {b"a": b"2", b"c": b"x"}
    # Within one transaction the last operation on a key wins.
    a.apply([batch(7, [put(b"d", b"1"), delete(b"d")], [delete(b"a"), put(b"a", b"3")])])
    assert harness.state() == {b"a": b"3", b"c": b"x"}
    assert a.checkpoint().applied_seq == 10


def test_another_stream_is_refused(harness: Harness) -> None:
    a = harness.applier
    a.apply([batch(1, [put(b"a", b"1")])], writer=W1)
    foreign = WriterId(b"B" * 16, 1)
    with pytest.raises(StoreMismatchError):
        a.apply([batch(2, [put(b"a", b"x")], writer=foreign)], writer=foreign)
    assert harness.state() == {b"a": b"1"}


def test_parts_are_refused(harness: Harness) -> None:
    whole = batch(1, [put(b"a", b"1"), put(b"b", b"2")])
    part = Batch(
        writer=W1,
        first_seq=1,
        ops=whole.ops[:1],
        keys=whole.keys[:1],
        values=whole.values[:1],
        txn_sizes=[1],
        txn_timestamps_us=whole.txn_timestamps_us,
        part_index=0,
        part_count=2,
    )
    with pytest.raises(ReplicaError):
        harness.applier.apply([part])
    assert harness.applier.checkpoint().applied_seq == 0


def test_same_digest_for_same_history(tmp_path: Path) -> None:
    history = [
        batch(1, [put(b"k%d" % i, b"v%d" % i) for i in range(50)]),
        batch(51, [delete(b"k3"), put(b"k4", b"new")]),
    ]
    appliers: list[Any] = [SqliteApplier(tmp_path / "a.db"), DictApplier()]
    for applier in appliers:
        applier.apply(history)
    digests = [applier.digest() for applier in appliers]
    assert digests[0] == digests[1] and digests[0].seq == 52 and digests[0].keys == 49
    for applier in appliers:
        applier.close()


def test_closed_dict_applier_refuses() -> None:
    a = DictApplier()
    a.close()
    with pytest.raises(ReplicaError):
        a.apply([batch(1, [put(b"a", b"1")])])
