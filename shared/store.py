"""The SQLite store behind the writer's state and every replica.

One file, WAL journal mode, three tables anyone can query (docs/wal.md):

- ``kv(key BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID``: the data.
- ``meta(name TEXT PRIMARY KEY, value)``: applied_seq, applied_timestamp_us,
  stream_id (hex), writer_epoch, schema_version.
- ``offsets(partition INTEGER PRIMARY KEY, next_offset INTEGER NOT NULL)``: the
  Kafka position that goes with applied_seq (empty for the writer's own store).

``apply`` commits data, position and offsets in ONE sqlite transaction, so a
crash leaves either all of a call or none of it (correctness rules 3 and 4).
sqlite3 errors are translated to ReplicaError here, once.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from walship.shared.errors import ReplicaError, StoreMismatchError
from walship.shared.model import Batch, Op, WriterId

SCHEMA_VERSION = 1
SYNCHRONOUS_MODES = ("off", "normal", "full")

_P = ParamSpec("_P")
_R = TypeVar("_R")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value);
CREATE TABLE IF NOT EXISTS offsets (partition INTEGER PRIMARY KEY, next_offset INTEGER NOT NULL);
"""
_META_SQL = "INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)"
_OFFSET_SQL = "INSERT OR REPLACE INTO offsets (partition, next_offset) VALUES (?, ?)"
_U32 = struct.Struct(">I")
_DELETE = int(Op.DELETE)
# Rows per multi-row statement. sqlite3 releases the GIL around every step and
# must win it back afterwards: with executemany that is once per row, and while
# another thread of the process is busy (the reader's event loop decoding the
# next group, the writer's appends) each win-back can wait out the 5 ms switch
# interval; measured here: 7,800 rows/s with a busy thread vs 245,000 without.
# One statement per 4,096 rows waits once per 4,096 rows (100,000+ rows/s busy)
# and is ~10% faster when idle too (fewer bytecode round trips per row).
_ROWS_PER_STATEMENT_MAX = 4096


@dataclass(frozen=True)
class Digest:
    """Content digest of a store at ``seq`` (see ``digest_items`` for the definition)."""

    seq: int
    keys: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "keys": self.keys, "sha256": self.sha256}


@dataclass(frozen=True)
class Checkpoint:
    applied_seq: int
    offsets: Mapping[int, int] = field(default_factory=dict)
    writer: WriterId | None = None
    applied_timestamp_us: int = 0  # commit timestamp of the last applied txn (for lag in seconds)


class DigestBuilder:
    """sha256 over the pairs in key order: for each, u32be len(k), k, u32be len(v), v."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.keys = 0

    def update(self, pairs: Iterable[tuple[bytes, bytes]]) -> None:
        h = self._hash
        pack = _U32.pack
        n = 0
        for k, v in pairs:
            h.update(pack(len(k)) + k + pack(len(v)) + v)
            n += 1
        self.keys += n

    def digest(self, seq: int) -> Digest:
        return Digest(seq=seq, keys=self.keys, sha256=self._hash.hexdigest())


def digest_items(seq: int, sorted_pairs: Iterable[tuple[bytes, bytes]]) -> Digest:
    """The digest of pairs already sorted by key (bytewise), as ``ReplicaStore.digest``."""
    builder = DigestBuilder()
    builder.update(sorted_pairs)
    return builder.digest(seq)


def _translated(what: str) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Translate sqlite3 errors raised by a store method into ReplicaError, naming the file."""

    def wrap(fn: Callable[_P, _R]) -> Callable[_P, _R]:
        def inner(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            try:
                return fn(*args, **kwargs)
            except sqlite3.Error as exc:
                store = args[0] if args else None
                path = getattr(store, "path", "?")
                raise ReplicaError(f"{what} failed: {exc}", path=str(path)) from exc

        inner.__name__ = fn.__name__
        inner.__doc__ = fn.__doc__
        return inner

    return wrap


def final_state(
    ops: bytes, keys: Sequence[bytes], values: Sequence[bytes]
) -> tuple[list[tuple[bytes, bytes]], list[bytes]]:
    """Collapse a run of puts and deletes to the last op per key, sorted by key (pure).

    Applied inside one transaction only each key's last op is observable: a put
    then a delete is a delete, a delete then a put is that put, two puts are
    the second. Returns (puts as (key, value), deleted keys), each sorted by
    key: key order walks the b-tree page after page instead of jumping around
    (+30% measured for random keys), and the collapse saves the repeated
    writes of hot keys.
    """
    if _DELETE not in ops:  # the common case: puts only
        return sorted(dict(zip(keys, values, strict=True)).items()), []
    last = dict(zip(keys, range(len(keys)), strict=True))
    puts: list[tuple[bytes, bytes]] = []
    deletes: list[bytes] = []
    for k, i in last.items():
        if ops[i] == _DELETE:
            deletes.append(k)
        else:
            puts.append((k, values[i]))
    puts.sort()  # keys are unique here: tuples never compare their values
    deletes.sort()
    return puts, deletes


def _chunk_sizes(n: int, size_max: int) -> Iterator[int]:
    """Split ``n`` rows into full chunks of ``size_max`` then powers of two.

    Every chunk size maps to one cached statement, so a few distinct sizes
    (at most log2(size_max) + 1) cover any row count.
    """
    full, rest = divmod(n, size_max)
    yield from (size_max for _ in range(full))
    size = size_max
    while rest:
        size >>= 1
        if rest >= size:
            yield size
            rest -= size


class _RowWriter:
    """Multi-row INSERT OR REPLACE / DELETE statements for one connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        variables_max = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        rows_max = min(_ROWS_PER_STATEMENT_MAX, variables_max // 2)
        # Round down to a power of two so _chunk_sizes' halving reaches 1.
        self._rows_max = 1 << (rows_max.bit_length() - 1)
        self._put_sql: dict[int, str] = {}
        self._delete_sql: dict[int, str] = {}

    def put(self, conn: sqlite3.Connection, rows: Sequence[tuple[bytes, bytes]]) -> None:
        at = 0
        for n in _chunk_sizes(len(rows), self._rows_max):
            sql = self._put_sql.get(n)
            if sql is None:
                sql = "INSERT OR REPLACE INTO kv (key, value) VALUES " + ",".join(["(?,?)"] * n)
                self._put_sql[n] = sql
            conn.execute(sql, list(chain.from_iterable(rows[at : at + n])))
            at += n

    def delete(self, conn: sqlite3.Connection, keys: Sequence[bytes]) -> None:
        at = 0
        for n in _chunk_sizes(len(keys), self._rows_max):
            sql = self._delete_sql.get(n)
            if sql is None:
                sql = "DELETE FROM kv WHERE key IN (" + ",".join(["?"] * n) + ")"
                self._delete_sql[n] = sql
            conn.execute(sql, keys[at : at + n])
            at += n


def check_applicable(
    cp: Checkpoint, batches: Sequence[Batch], writer: WriterId | None, **where: Any
) -> int:
    """Refuse what no store may apply after ``cp``; returns the applied seq after ``batches``.

    Pure, shared by every store (SQLite, in memory): same stream, whole
    transactions only, dense from ``cp.applied_seq + 1``. ``where`` names the store.
    """
    if writer is not None and cp.writer is not None and writer.stream_id != cp.writer.stream_id:
        raise StoreMismatchError(
            "batches come from another stream than the store holds",
            **where,
            store_stream=cp.writer.stream_id.hex(),
            batch_stream=writer.stream_id.hex(),
        )
    expected = cp.applied_seq + 1
    for b in batches:
        if b.is_part:
            raise ReplicaError(
                "cannot apply a part of a transaction; reassemble it first",
                **where,
                first_seq=b.first_seq,
                part=f"{b.part_index + 1}/{b.part_count}",
            )
        if b.first_seq != expected:
            raise ReplicaError(
                f"batches not dense: expected seq {expected}, got {b.first_seq}",
                **where,
                applied_seq=cp.applied_seq,
            )
        expected = b.last_seq + 1
    return expected - 1


class ReplicaStore:
    """A key-value store at a sequence, for the writer and for replicas.

    Thread-safe: one connection guarded by a lock (the writer applies from a
    worker thread); consistent reads (``digest``, ``iter_items``) use their own
    short-lived connection so they neither block nor see a half-applied call.
    """

    @_translated("opening the store")
    def __init__(self, path: str | Path, *, synchronous: str = "normal") -> None:
        if synchronous not in SYNCHRONOUS_MODES:
            raise ReplicaError(
                f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}, got {synchronous!r}",
                path=str(path),
            )
        self.path = Path(path)
        self._lock = threading.Lock()
        self._closed = False
        # isolation_level=None: we issue BEGIN/COMMIT ourselves.
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            # 16 KiB pages: fewer, fuller b-tree pages for random keys (+25% apply
            # throughput measured); only takes effect when the file is created.
            self._conn.execute("PRAGMA page_size=16384")
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._conn.execute("PRAGMA cache_size=-65536")  # 64 MiB: keeps the kv b-tree hot
            self._conn.executescript(_SCHEMA)
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._init_meta()
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            self._rows = _RowWriter(self._conn)
        except BaseException:
            self._conn.close()
            raise

    def _init_meta(self) -> None:
        cur = self._conn.execute("SELECT value FROM meta WHERE name = 'schema_version'")
        row = cur.fetchone()
        if row is None:
            self._conn.executemany(
                _META_SQL,
                [
                    ("schema_version", SCHEMA_VERSION),
                    ("applied_seq", 0),
                    ("applied_timestamp_us", 0),
                ],
            )
        elif row[0] != SCHEMA_VERSION:
            raise ReplicaError(
                f"unsupported schema version {row[0]}, expected {SCHEMA_VERSION}",
                path=str(self.path),
            )

    def __enter__(self) -> ReplicaStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()

    # --- reads ------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ReplicaError("store is closed", path=str(self.path))

    @property
    def applied_seq(self) -> int:
        return self.checkpoint().applied_seq

    @_translated("reading the checkpoint")
    def checkpoint(self) -> Checkpoint:
        with self._lock:
            self._check_open()
            return _read_checkpoint(self._conn)

    @_translated("get")
    def get(self, key: bytes) -> bytes | None:
        with self._lock:
            self._check_open()
            row = self._conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def scan(self, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """Pairs whose key starts with ``prefix``, in key order, from one consistent read."""
        with self.iter_items(1024) as (_seq, chunks):
            for chunk in chunks:
                for k, v in chunk:
                    if k.startswith(prefix):
                        yield k, v
                    elif k > prefix:
                        return

    def digest(self) -> Digest:
        """sha256 over all pairs sorted by key: u32be len(k) k u32be len(v) v each; at applied_seq."""
        builder = DigestBuilder()
        with self.iter_items(8192) as (seq, chunks):
            for chunk in chunks:
                builder.update(chunk)
        return builder.digest(seq)

    @contextlib.contextmanager
    def iter_items(
        self, chunk_keys: int, *, prefix: bytes = b""
    ) -> Iterator[tuple[int, Iterator[list[tuple[bytes, bytes]]]]]:
        """A consistent read: (applied_seq, chunks of up to ``chunk_keys`` pairs sorted by key).

        Runs on its own connection inside one read transaction, so concurrent
        applies neither block it nor leak into it (WAL-mode snapshot isolation).
        """
        if chunk_keys < 1:
            raise ReplicaError("chunk_keys must be >= 1", chunk_keys=chunk_keys)
        self._check_open()
        try:
            conn = sqlite3.connect(
                f"file:{self.path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise ReplicaError(
                f"opening a read snapshot failed: {exc}", path=str(self.path)
            ) from exc
        try:
            try:
                conn.execute("BEGIN")
                seq = _read_checkpoint(conn).applied_seq  # first read pins the snapshot
                if prefix:
                    cur = conn.execute(
                        "SELECT key, value FROM kv WHERE key >= ? ORDER BY key", (prefix,)
                    )
                else:
                    cur = conn.execute("SELECT key, value FROM kv ORDER BY key")
            except sqlite3.Error as exc:
                raise ReplicaError(f"reading items failed: {exc}", path=str(self.path)) from exc

            def chunks() -> Iterator[list[tuple[bytes, bytes]]]:
                while True:
                    try:
                        rows = cur.fetchmany(chunk_keys)
                    except sqlite3.Error as exc:
                        raise ReplicaError(
                            f"reading items failed: {exc}", path=str(self.path)
                        ) from exc
                    if not rows:
                        return
                    yield rows

            yield seq, chunks()
        finally:
            conn.close()

    # --- writes -----------------------------------------------------------

    @_translated("apply")
    def apply(
        self,
        batches: Sequence[Batch],
        *,
        offsets: Mapping[int, int] | None = None,
        writer: WriterId | None = None,
    ) -> None:
        """Apply whole, dense transactions from applied_seq+1 in ONE sqlite transaction."""
        with self._lock:
            self._check_open()
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._apply_locked(conn, batches, offsets, writer)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _apply_locked(
        self,
        conn: sqlite3.Connection,
        batches: Sequence[Batch],
        offsets: Mapping[int, int] | None,
        writer: WriterId | None,
    ) -> None:
        cp = _read_checkpoint(conn)
        expected = check_applicable(cp, batches, writer, path=str(self.path)) + 1
        nonempty = [b for b in batches if b.entry_count]
        if len(nonempty) == 1:
            ops, keys, values = nonempty[0].ops, nonempty[0].keys, nonempty[0].values
        else:
            ops = b"".join(b.ops for b in nonempty)
            keys = [k for b in nonempty for k in b.keys]
            values = [v for b in nonempty for v in b.values]
        if keys:
            puts, deletes = final_state(ops, keys, values)
            self._rows.delete(conn, deletes)
            self._rows.put(conn, puts)
        meta: list[tuple[str, Any]] = []
        if nonempty:
            meta.append(("applied_seq", expected - 1))
            last = nonempty[-1]
            if last.txn_timestamps_us:
                meta.append(("applied_timestamp_us", last.txn_timestamps_us[-1]))
        if writer is not None:
            meta.append(("stream_id", writer.stream_id.hex()))
            meta.append(("writer_epoch", writer.epoch))
        if meta:
            conn.executemany(_META_SQL, meta)
        if offsets:
            conn.executemany(_OFFSET_SQL, sorted(offsets.items()))

    @_translated("load_items")
    def load_items(self, items: Iterable[tuple[bytes, bytes]]) -> None:
        """Bulk insert (bootstrap) in one transaction; the applied sequence does not change."""
        with self._lock:
            self._check_open()
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                it = iter(items)
                while chunk := list(islice(it, _ROWS_PER_STATEMENT_MAX)):
                    self._rows.put(conn, chunk)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @_translated("set_checkpoint")
    def set_checkpoint(self, cp: Checkpoint) -> None:
        """Replace the position: applied_seq, timestamp, writer and the whole offsets table."""
        with self._lock:
            self._check_open()
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                meta: list[tuple[str, Any]] = [
                    ("applied_seq", cp.applied_seq),
                    ("applied_timestamp_us", cp.applied_timestamp_us),
                ]
                if cp.writer is not None:
                    meta.append(("stream_id", cp.writer.stream_id.hex()))
                    meta.append(("writer_epoch", cp.writer.epoch))
                conn.executemany(_META_SQL, meta)
                conn.execute("DELETE FROM offsets")
                conn.executemany(_OFFSET_SQL, sorted(cp.offsets.items()))
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")


def _read_checkpoint(conn: sqlite3.Connection) -> Checkpoint:
    meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
    offsets = dict(conn.execute("SELECT partition, next_offset FROM offsets").fetchall())
    writer = None
    if meta.get("stream_id") is not None:
        writer = WriterId(
            stream_id=bytes.fromhex(str(meta["stream_id"])), epoch=int(meta.get("writer_epoch", 0))
        )
    return Checkpoint(
        applied_seq=int(meta.get("applied_seq", 0)),
        offsets=offsets,
        writer=writer,
        applied_timestamp_us=int(meta.get("applied_timestamp_us", 0)),
    )


def digest_file(path: str | Path) -> Digest:
    """The digest of a store file, opened read-only (it is never created or changed)."""
    p = Path(path)
    if not p.is_file():
        raise ReplicaError("no store file", path=str(p))
    try:
        conn = sqlite3.connect(f"file:{p}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise ReplicaError(f"opening the store failed: {exc}", path=str(p)) from exc
    try:
        conn.execute("BEGIN")
        seq = _read_checkpoint(conn).applied_seq
        cur = conn.execute("SELECT key, value FROM kv ORDER BY key")
        builder = DigestBuilder()
        while rows := cur.fetchmany(8192):
            builder.update(rows)
        return builder.digest(seq)
    except sqlite3.Error as exc:
        raise ReplicaError(f"digest failed: {exc}", path=str(p)) from exc
    finally:
        conn.close()
