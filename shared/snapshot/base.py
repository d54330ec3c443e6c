"""The snapshot store interface and the logic every store shares (retention, verify).

Stores only move bytes: chunk frames and manifests. What a chunk or manifest
means lives in ``format.py``; stores never interpret chunks.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from walship.shared.crypto import Keyring
from walship.shared.errors import SnapshotCorruptError
from walship.shared.snapshot.format import Manifest, check_chunk, decode_chunk, newest_first
from walship.shared.store import DigestBuilder

log = logging.getLogger(__name__)


@runtime_checkable
class SnapshotStore(Protocol):
    """Where snapshots live. All stores pass tests/test_snapshot_store_conformance.py.

    Contract:
    - ``put_chunk`` for every chunk, then ``put_manifest`` LAST; a snapshot
      whose manifest is absent does not exist (never listed, never loaded).
    - ``list_manifests`` returns complete, undeleted snapshots newest first
      (by snapshot id: sequence, then creation time); unreadable manifests are
      skipped with a warning (``get_manifest`` raises for them).
    - ``get_chunk`` returns the stored frame as written; a missing chunk of a
      listed snapshot raises SnapshotCorruptError naming snapshot and chunk.
    - ``delete`` removes the manifest first, so a half-deleted snapshot is
      never listed. Deleting an unknown id is not an error.
    """

    @property
    def url(self) -> str: ...

    async def put_chunk(self, snapshot_id: str, index: int, data: bytes) -> None: ...

    async def put_manifest(self, manifest: Manifest) -> None: ...

    async def list_manifests(self) -> list[Manifest]: ...

    async def get_manifest(self, snapshot_id: str) -> Manifest: ...

    async def get_chunk(self, snapshot_id: str, index: int) -> bytes: ...

    async def delete(self, snapshot_id: str) -> None: ...

    async def retain(self, keep: int) -> list[str]: ...

    async def close(self) -> None: ...


async def retain_newest(store: SnapshotStore, keep: int) -> list[str]:
    """Delete all but the ``keep`` newest complete snapshots; returns the deleted ids."""
    if keep < 1:
        raise ValueError("keep must be >= 1: retention never deletes the last snapshot")
    manifests = newest_first(await store.list_manifests())
    doomed = [m.snapshot_id for m in manifests[keep:]]
    for snapshot_id in doomed:
        await store.delete(snapshot_id)
    if doomed:
        log.info("snapshot retention deleted %d snapshot(s): %s", len(doomed), ", ".join(doomed))
    return doomed


@dataclass
class VerifyReport:
    """What ``verify_snapshot`` checked."""

    snapshot_id: str
    chunks: int = 0
    keys: int = 0
    stored_bytes: int = 0
    digest_ok: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.digest_ok and not self.problems


async def verify_snapshot(
    store: SnapshotStore,
    manifest: Manifest,
    *,
    raise_on_error: bool = True,
    keyring: Keyring | None = None,
) -> VerifyReport:
    """Read every chunk: frame CRC, decode, key order, counts, then the state digest.

    With ``raise_on_error`` the first problem raises SnapshotCorruptError (naming
    snapshot and chunk); otherwise every problem is collected in the report.
    """
    report = VerifyReport(snapshot_id=manifest.snapshot_id)
    builder = DigestBuilder()
    last_key: bytes | None = None
    sid = manifest.snapshot_id
    for info in manifest.chunks:
        try:
            frame = await store.get_chunk(sid, info.index)
            check_chunk(frame, info, snapshot_id=sid)
            keys, values = decode_chunk(frame, snapshot_id=sid, index=info.index, keyring=keyring)
            if len(keys) != info.keys:
                raise SnapshotCorruptError(
                    f"chunk holds {len(keys)} keys, manifest says {info.keys}",
                    snapshot=sid,
                    chunk=info.index,
                )
            if keys and last_key is not None and keys[0] <= last_key:
                raise SnapshotCorruptError(
                    "chunk keys are not after the previous chunk's", snapshot=sid, chunk=info.index
                )
            if any(a >= b for a, b in itertools.pairwise(keys)):
                raise SnapshotCorruptError(
                    "chunk keys are not strictly sorted", snapshot=sid, chunk=info.index
                )
        except SnapshotCorruptError as exc:
            if raise_on_error:
                raise
            report.problems.append(str(exc))
            continue
        if keys:
            last_key = keys[-1]
        builder.update(zip(keys, values, strict=True))
        report.chunks += 1
        report.keys += len(keys)
        report.stored_bytes += len(frame)
    if not report.problems:
        digest = builder.digest(manifest.seq)
        report.digest_ok = digest.sha256 == manifest.digest and digest.keys == manifest.keys
        if not report.digest_ok:
            mismatch = SnapshotCorruptError(
                "snapshot content does not match the manifest digest",
                snapshot=sid,
                expected=manifest.digest[:16],
                actual=digest.sha256[:16],
            )
            if raise_on_error:
                raise mismatch
            report.problems.append(str(mismatch))
    return report


def describe_ids(manifests: Sequence[Manifest]) -> str:
    return ", ".join(f"{m.snapshot_id} (seq {m.seq})" for m in manifests) or "none"
