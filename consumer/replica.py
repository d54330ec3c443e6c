"""Read a replica while its reader runs: ``Replica(path).get(key)``, ``.scan(prefix)``.

The connection is read-only (``mode=ro`` URI) and the replica uses SQLite's WAL
journal, so readers never block the reader's applies and always see a
committed state: data and ``applied_seq`` of one and the same transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

from walship.shared.errors import ReplicaError


def _prefix_end(prefix: bytes) -> bytes | None:
    """The smallest key greater than every key starting with ``prefix`` (None: no bound)."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return None
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


class Replica:
    """Read-only view of a replica's SQLite file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise ReplicaError("no replica at this path", path=str(self.path))
        uri = f"file:{quote(str(self.path.resolve()))}?mode=ro"
        try:
            self._conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
            self._conn.execute("PRAGMA query_only=1")
        except sqlite3.Error as exc:
            raise ReplicaError(f"cannot open replica: {exc}", path=str(self.path)) from exc

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Replica:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _query(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        try:
            return self._conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise ReplicaError(f"reading the replica failed: {exc}", path=str(self.path)) from exc

    @property
    def applied_seq(self) -> int:
        """The last sequence the replica holds (0 when empty)."""
        rows = self._query("SELECT value FROM meta WHERE name = 'applied_seq'")
        return int(str(rows[0][0])) if rows else 0

    def get(self, key: bytes) -> bytes | None:
        rows = self._query("SELECT value FROM kv WHERE key = ?", (key,))
        if not rows:
            return None
        value = rows[0][0]
        assert isinstance(value, bytes)
        return value

    def scan(self, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """Key-value pairs whose key starts with ``prefix``, in key order.

        One SELECT statement: it reads one committed state however long the
        iteration takes (WAL mode), without holding everything in memory.
        """
        end = _prefix_end(prefix)
        params: tuple[bytes, ...]
        if end is None:
            sql, params = "SELECT key, value FROM kv WHERE key >= ? ORDER BY key", (prefix,)
        else:
            sql = "SELECT key, value FROM kv WHERE key >= ? AND key < ? ORDER BY key"
            params = (prefix, end)
        try:
            cursor = self._conn.execute(sql, params)
            while rows := cursor.fetchmany(1000):
                for key, value in rows:
                    yield bytes(key), bytes(value)
        except sqlite3.Error as exc:
            raise ReplicaError(f"reading the replica failed: {exc}", path=str(self.path)) from exc
