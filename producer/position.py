"""The publisher's durable "published up to" position: ``<data-dir>/published.json``.

``{"seq": S, "offsets": {"<partition>": next_offset, ...}}`` says that every
WAL entry up to sequence ``S`` (a transaction boundary) has been acknowledged
by Kafka, and, per partition, the offset right after the last acknowledged
message of that prefix. After a crash the publisher resends from ``S + 1``
(readers drop the duplicates). The offsets let snapshots tell readers where
to resume. The file is replaced atomically (write a temporary file, fsync,
rename, fsync the directory), so a crash leaves the old or the new position,
never a torn one. It may lag behind what Kafka holds, never run ahead of it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from walship.shared.errors import WalError, translate_os_error

FILE_NAME = "published.json"


class PublishedPosition:
    """Load with :meth:`load`, advance with :meth:`save` (never backwards)."""

    def __init__(self, path: Path, seq: int = 0, offsets: Mapping[int, int] | None = None) -> None:
        self.path = path
        self._seq = seq
        self._offsets: dict[int, int] = dict(offsets or {})

    @classmethod
    def load(cls, data_dir: Path) -> PublishedPosition:
        """The position in ``data_dir`` (seq 0 and no offsets when there is none yet)."""
        path = Path(data_dir) / FILE_NAME
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls(path)
        except OSError as exc:
            raise translate_os_error(exc, "reading the published position", path) from exc
        try:
            obj = json.loads(text)
            seq = int(obj["seq"])
            offsets = {int(p): int(o) for p, o in dict(obj.get("offsets", {})).items()}
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise WalError(
                "the published position file is unreadable; delete it to republish the "
                "whole WAL from its first entry (readers ignore the duplicates)",
                path=str(path),
                reason=str(exc),
            ) from exc
        if seq < 0 or any(p < 0 or o < 0 for p, o in offsets.items()):
            raise WalError("the published position file holds negative numbers", path=str(path))
        return cls(path, seq, offsets)

    @property
    def seq(self) -> int:
        """The last sequence acknowledged by Kafka and recorded durably."""
        return self._seq

    @property
    def offsets(self) -> dict[int, int]:
        """Per partition, the next offset after the last acknowledged message."""
        return dict(self._offsets)

    def save(self, seq: int, offsets: Mapping[int, int]) -> None:
        """Record ``seq`` and merge ``offsets`` (per-partition maximum), durably.

        Moving backwards is a bug in the caller (it would claim less than was
        already claimed durably) and raises ``ValueError``.
        """
        if seq < self._seq:
            raise ValueError(f"published position cannot move back from {self._seq} to {seq}")
        merged = dict(self._offsets)
        for p, o in offsets.items():
            merged[p] = max(o, merged.get(p, 0))
        body = json.dumps(
            {"seq": seq, "offsets": {str(p): o for p, o in sorted(merged.items())}},
            separators=(",", ":"),
        ).encode()
        tmp = self.path.with_name(f".{FILE_NAME}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                view = memoryview(body)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise translate_os_error(exc, "saving the published position", self.path) from exc
        self._seq = seq
        self._offsets = merged
