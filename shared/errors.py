"""The one exception hierarchy of walship.

Every error says two things retry code needs, so callers read flags instead of
keeping lists of exception types (as aiokafka and litestream do):

- ``retriable``: the same operation may succeed if tried again later
  (a broker is down, the WAL is full until the publisher catches up).
- ``recoverable``: the component can get back to a correct state on its own
  through a different path (a reader whose log was truncated bootstraps from a
  snapshot), without an operator.

Foreign errors (aiokafka, zstandard, msgpack, sqlite3, OSError) are translated
once, at the boundary that calls the foreign code, with ``raise ... from exc``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar


class WalshipError(Exception):
    """Base of every error walship raises on purpose."""

    retriable: ClassVar[bool] = False
    recoverable: ClassVar[bool] = False

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        # Where it happened: topic, partition, offset, seq, path, setting...
        self.context: Mapping[str, Any] = context

    def __str__(self) -> str:
        if not self.context:
            return self.message
        where = ", ".join(f"{k}={v}" for k, v in self.context.items())
        return f"{self.message} ({where})"


class ConfigError(WalshipError):
    """A setting or a command-line argument is invalid (exit code 2)."""


# --- input that must never be applied -------------------------------------


class DecodeError(WalshipError):
    """Bytes that are not a valid walship message, WAL record or snapshot chunk.

    The only exception a decoder lets escape, whatever the input.
    """


class SplitBrainError(WalshipError):
    """Two different batches claim the same sequence (a second writer)."""


# --- the writer side --------------------------------------------------------


class WalError(WalshipError):
    """The WAL cannot be read or written."""


class WalCorruptError(WalError):
    """A WAL record in the middle of the log fails its checksum."""


class WalFullError(WalError):
    """The WAL reached its size limit because publishing is behind.

    Appends fail loudly instead of dropping data; they succeed again once the
    publisher catches up and segments are released.
    """

    retriable = True


class DurabilityError(WalError):
    """Writing or fsyncing the WAL failed (disk full, read-only, I/O error).

    Nothing of the failed append is acknowledged or published; appends may
    succeed again once the condition clears.
    """

    retriable = True


# --- Kafka ------------------------------------------------------------------


class KafkaUnavailableError(WalshipError):
    """Kafka could not be reached or did not acknowledge in time."""

    retriable = True


class KafkaOperationError(WalshipError):
    """Kafka refused an operation in a way retrying will not fix."""


class TopicMismatchError(WalshipError):
    """An existing topic does not match the stream (partition count changed)."""


# --- the reader side --------------------------------------------------------


class RetentionExpiredError(WalshipError):
    """The log no longer holds what the replica needs next; bootstrap fixes it."""

    recoverable = True


class ReplicaError(WalshipError):
    """The replica store cannot be read or written."""


class StoreMismatchError(WalshipError):
    """A replica belongs to another stream, or two stores differ."""


# --- snapshots --------------------------------------------------------------


class SnapshotError(WalshipError):
    """A snapshot store operation failed."""


class SnapshotNotFoundError(SnapshotError):
    """No snapshot with that id (or no snapshot at all) in the store."""


class SnapshotCorruptError(SnapshotError):
    """A snapshot chunk or manifest fails verification."""


class NoConnectingSnapshotError(SnapshotError):
    """No snapshot connects with what the log still holds."""


def translate_os_error(exc: OSError, what: str, path: object) -> WalshipError:
    """Translate an OSError at a disk boundary, keeping whether a retry can help."""
    import errno

    transient = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EAGAIN, errno.EINTR}
    cls: type[WalshipError] = DurabilityError if exc.errno in transient else WalError
    reason = exc.strerror or str(exc)
    return cls(f"{what} failed: {reason}", path=str(path), errno=exc.errno)
