"""Snapshots in a directory (``file:///path``): local disk or a shared volume.

Layout::

    <root>/<snapshot_id>/chunk-000000.wsnc ...   chunk frames
    <root>/<snapshot_id>/manifest.json           written last

Every file is written to a unique temporary name, fsynced, renamed into place
and the directory fsynced, so readers on other machines (NFS, EFS, a shared
Kubernetes volume) see either nothing or the whole file, and two creators never
collide on a temporary name.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import shutil
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

from walship.shared.errors import (
    ConfigError,
    SnapshotCorruptError,
    SnapshotError,
    SnapshotNotFoundError,
)
from walship.shared.snapshot.base import retain_newest
from walship.shared.snapshot.format import (
    Manifest,
    decode_manifest,
    encode_manifest,
    is_snapshot_id,
    newest_first,
    parse_snapshot_id,
)

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
# Incomplete snapshots (no manifest) older than this are garbage from a crashed
# create; younger ones may still be being written by another process.
INCOMPLETE_GRACE_S = 3600.0


def chunk_name(index: int) -> str:
    return f"chunk-{index:06d}.wsnc"


def _os_error(exc: OSError, what: str, path: Path) -> SnapshotError:
    return SnapshotError(f"{what} failed: {exc.strerror or exc}", path=str(path), errno=exc.errno)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """tmp (unique, O_EXCL) + write + fsync + rename + fsync(dir)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise _os_error(exc, "writing", path) from exc


class FileSnapshotStore:
    """A SnapshotStore over a directory."""

    def __init__(self, root: str | Path, *, create: bool = True) -> None:
        self.root = Path(root)
        if create:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise _os_error(exc, "creating the snapshot directory", self.root) from exc
        elif not self.root.is_dir():
            raise ConfigError("snapshot directory does not exist", path=str(self.root))

    @classmethod
    def from_url(cls, url: str) -> FileSnapshotStore:
        parsed = urlparse(url)
        if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
            raise ConfigError(
                "a file snapshot URL looks like file:///absolute/path", snapshot_url=url
            )
        return cls(unquote(parsed.path))

    @property
    def url(self) -> str:
        return self.root.resolve().as_uri()

    def _dir(self, snapshot_id: str) -> Path:
        parse_snapshot_id(snapshot_id)  # rejects anything that could escape root
        return self.root / snapshot_id

    # --- writes -------------------------------------------------------------

    async def put_chunk(self, snapshot_id: str, index: int, data: bytes) -> None:
        d = self._dir(snapshot_id)
        await asyncio.to_thread(self._put, d, chunk_name(index), data)

    async def put_manifest(self, manifest: Manifest) -> None:
        manifest.validate()
        d = self._dir(manifest.snapshot_id)
        for info in manifest.chunks:
            if not (d / chunk_name(info.index)).is_file():
                raise SnapshotError(
                    "refusing to write a manifest before all its chunks",
                    snapshot=manifest.snapshot_id,
                    chunk=info.index,
                )
        await asyncio.to_thread(self._put, d, MANIFEST_NAME, encode_manifest(manifest))

    def _put(self, d: Path, name: str, data: bytes) -> None:
        try:
            d.mkdir(exist_ok=True)
        except OSError as exc:
            raise _os_error(exc, "creating the snapshot directory", d) from exc
        atomic_write(d / name, data)

    # --- reads --------------------------------------------------------------

    async def list_manifests(self) -> list[Manifest]:
        return newest_first(await asyncio.to_thread(self._list))

    def _list(self) -> list[Manifest]:
        found: list[Manifest] = []
        try:
            entries = sorted(os.listdir(self.root))
        except OSError as exc:
            raise _os_error(exc, "listing snapshots", self.root) from exc
        for name in entries:
            if not is_snapshot_id(name):
                continue
            try:
                found.append(self._read_manifest(name))
            except SnapshotNotFoundError:
                continue  # incomplete: no manifest yet (or being deleted)
            except SnapshotCorruptError as exc:
                log.warning("skipping unreadable snapshot manifest: %s", exc)
        return found

    async def get_manifest(self, snapshot_id: str) -> Manifest:
        return await asyncio.to_thread(self._read_manifest, snapshot_id)

    def _read_manifest(self, snapshot_id: str) -> Manifest:
        path = self._dir(snapshot_id) / MANIFEST_NAME
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise SnapshotNotFoundError("no such snapshot", snapshot=snapshot_id) from exc
        except OSError as exc:
            raise _os_error(exc, "reading the manifest", path) from exc
        m = decode_manifest(data, where=str(path))
        if m.snapshot_id != snapshot_id:
            raise SnapshotCorruptError(
                "manifest names another snapshot", snapshot=snapshot_id, names=m.snapshot_id
            )
        return m

    async def get_chunk(self, snapshot_id: str, index: int) -> bytes:
        path = self._dir(snapshot_id) / chunk_name(index)
        return await asyncio.to_thread(self._read_chunk, snapshot_id, index, path)

    @staticmethod
    def _read_chunk(snapshot_id: str, index: int, path: Path) -> bytes:
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise SnapshotCorruptError(
                "snapshot chunk is missing", snapshot=snapshot_id, chunk=index, path=str(path)
            ) from exc
        except OSError as exc:
            raise _os_error(exc, "reading a chunk", path) from exc

    # --- deletion -----------------------------------------------------------

    async def delete(self, snapshot_id: str) -> None:
        await asyncio.to_thread(self._delete, self._dir(snapshot_id))

    def _delete(self, d: Path) -> None:
        # The manifest goes first (and durably), so the snapshot stops existing
        # before any chunk disappears.
        try:
            (d / MANIFEST_NAME).unlink()
            _fsync_dir(d)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno != errno.ENOTDIR:
                raise _os_error(exc, "deleting a manifest", d) from exc
        try:
            shutil.rmtree(d)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _os_error(exc, "deleting a snapshot", d) from exc

    async def retain(self, keep: int) -> list[str]:
        deleted = await retain_newest(self, keep)
        await asyncio.to_thread(self._collect_garbage)
        return deleted

    def _collect_garbage(self) -> None:
        """Remove incomplete snapshot dirs and stray temp files left by crashed creates."""
        now_us = int(time.time() * 1e6)
        try:
            names = os.listdir(self.root)
        except OSError as exc:
            raise _os_error(exc, "listing snapshots", self.root) from exc
        for name in names:
            if not is_snapshot_id(name) or (self.root / name / MANIFEST_NAME).exists():
                continue
            _, created_us = parse_snapshot_id(name)
            if now_us - created_us > INCOMPLETE_GRACE_S * 1e6:
                log.info("removing incomplete snapshot %s", name)
                self._delete(self.root / name)

    async def close(self) -> None:
        return None
