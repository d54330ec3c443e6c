"""The writer's identity: a stream id fixed for the life of the stream, and an
epoch bumped (and made durable) on every writer start.

``<data-dir>/identity.json`` = ``{"stream_id": "<32 hex>", "epoch": n}``, written
atomically: temp file, fsync, rename, directory fsync. A reader seeing two
epochs claim the same sequence knows a second writer ran (split brain).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from walship.shared.errors import WalError, translate_os_error
from walship.shared.model import STREAM_ID_BYTES, WriterId

IDENTITY_NAME = "identity.json"


def _parse(path: Path, text: str) -> WriterId:
    try:
        obj = json.loads(text)
        stream_id = bytes.fromhex(obj["stream_id"])
        epoch = obj["epoch"]
        if type(epoch) is not int:
            raise TypeError("epoch is not an integer")
        return WriterId(stream_id=stream_id, epoch=epoch)
    except (ValueError, KeyError, TypeError) as exc:
        raise WalError(f"identity file is invalid: {exc}", path=str(path)) from exc


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` durably: tmp + fsync + rename + dir fsync."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise translate_os_error(exc, "writing", path) from exc


class WriterIdentity:
    """Loads, creates and bumps ``<data-dir>/identity.json``."""

    @staticmethod
    def load(data_dir: Path) -> WriterId:
        """The current identity, unchanged (for the publisher); WalError when absent."""
        path = Path(data_dir) / IDENTITY_NAME
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise WalError(
                "no writer identity yet: start the writer once first", path=str(path)
            ) from exc
        except OSError as exc:
            raise translate_os_error(exc, "reading", path) from exc
        return _parse(path, text)

    @staticmethod
    def load_or_create(data_dir: Path) -> WriterId:
        """The identity with its epoch bumped and persisted; a new stream on first use."""
        data_dir = Path(data_dir)
        path = data_dir / IDENTITY_NAME
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise translate_os_error(exc, "creating the data directory", data_dir) from exc
        if path.exists():
            current = WriterIdentity.load(data_dir)
            new = WriterId(stream_id=current.stream_id, epoch=current.epoch + 1)
        else:
            new = WriterId(stream_id=os.urandom(STREAM_ID_BYTES), epoch=1)
        body = {"stream_id": new.stream_id.hex(), "epoch": new.epoch}
        write_atomic(path, (json.dumps(body) + "\n").encode())
        return new
