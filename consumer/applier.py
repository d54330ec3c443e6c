"""Where a reader applies merged batches: the ``Applier`` interface and two implementations.

An applier owns the replica's data *and* its position (applied sequence,
per-partition next offsets, writer id): ``apply`` changes all of them in one
atomic step, so a crash at any point leaves data and position consistent, and
Kafka offsets (committed only afterwards) can never run ahead of the data.

- ``SqliteApplier``: the product's replica, a ``ReplicaStore`` (SQLite file).
- ``DictApplier``: an in-memory dict, for users replicating into their own
  store (copy its shape) and for simulations.

Both pass ``tests/test_applier_conformance.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from walship.shared.errors import ReplicaError
from walship.shared.model import Batch, Op, WriterId
from walship.shared.store import Checkpoint, Digest, ReplicaStore, check_applicable, digest_items

_DELETE = int(Op.DELETE)
_PUT = int(Op.PUT)


@runtime_checkable
class Applier(Protocol):
    """Applies dense, whole transactions atomically together with the position."""

    def checkpoint(self) -> Checkpoint:
        """The position the data corresponds to."""
        ...

    def apply(
        self,
        batches: Sequence[Batch],
        offsets: Mapping[int, int] | None = None,
        writer: WriterId | None = None,
    ) -> None:
        """Apply ``batches`` (dense from applied_seq + 1, whole transactions), merge
        ``offsets`` into the stored ones and record ``writer`` — all or nothing.

        Raises ``ReplicaError`` (nothing changed) when the batches are not dense
        from the applied sequence, including a re-apply of what is already held.
        """
        ...

    def close(self) -> None: ...


class SqliteApplier:
    """The product replica: a ``ReplicaStore`` SQLite file (schema in docs)."""

    def __init__(self, path: str | Path, *, synchronous: str = "normal") -> None:
        self.path = Path(path)
        self.store = ReplicaStore(self.path, synchronous=synchronous)

    def checkpoint(self) -> Checkpoint:
        return self.store.checkpoint()

    def apply(
        self,
        batches: Sequence[Batch],
        offsets: Mapping[int, int] | None = None,
        writer: WriterId | None = None,
    ) -> None:
        self.store.apply(batches, offsets=offsets, writer=writer)

    def digest(self) -> Digest:
        return self.store.digest()

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> SqliteApplier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DictApplier:
    """An in-memory replica: ``data`` is a plain dict of the current state.

    Changes are staged and validated before anything is touched, so a failing
    apply leaves data and position unchanged, like a rolled-back transaction.
    """

    def __init__(self, checkpoint: Checkpoint | None = None) -> None:
        self.data: dict[bytes, bytes] = {}
        self._cp = checkpoint if checkpoint is not None else Checkpoint(applied_seq=0)
        self._closed = False

    def checkpoint(self) -> Checkpoint:
        return self._cp

    def apply(
        self,
        batches: Sequence[Batch],
        offsets: Mapping[int, int] | None = None,
        writer: WriterId | None = None,
    ) -> None:
        if self._closed:
            raise ReplicaError("the replica is closed")
        cp = self._cp
        applied_seq = check_applicable(cp, batches, writer, store="memory")
        staged: dict[bytes, bytes | None] = {}
        timestamp_us = cp.applied_timestamp_us
        for b in batches:
            for i, (op, key, value) in enumerate(zip(b.ops, b.keys, b.values, strict=True)):
                if not isinstance(key, bytes) or not isinstance(value, bytes):
                    raise ReplicaError("keys and values must be bytes", seq=b.first_seq + i)
                if op == _PUT:
                    staged[key] = value
                elif op == _DELETE:
                    staged[key] = None
                else:
                    raise ReplicaError(f"unknown op {op}", seq=b.first_seq + i)
            if b.entry_count:
                timestamp_us = b.txn_timestamps_us[-1]
        # Validated: commit (nothing below can fail).
        for key, staged_value in staged.items():
            if staged_value is None:
                self.data.pop(key, None)
            else:
                self.data[key] = staged_value
        merged = dict(cp.offsets)
        merged.update(offsets or {})
        self._cp = Checkpoint(
            applied_seq=applied_seq,
            offsets=merged,
            writer=writer if writer is not None else cp.writer,
            applied_timestamp_us=timestamp_us,
        )

    def set_checkpoint(self, cp: Checkpoint) -> None:
        self._cp = cp

    def digest(self) -> Digest:
        return digest_items(self._cp.applied_seq, sorted(self.data.items()))

    def close(self) -> None:
        self._closed = True
