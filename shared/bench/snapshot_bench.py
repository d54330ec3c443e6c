"""Bootstrap figures: snapshot create and restore of N keys (16-byte keys, 100-byte values).

Setup (not timed): a replica with N keys at seq N. Timed: ``create_snapshot``
into a ``file://`` store, then ``Bootstrapper.load`` of that snapshot into a
fresh replica (what a reader does when it bootstraps, and the first step of a
point-in-time restore). Afterwards (not timed) the restored replica's digest is
compared with the snapshot manifest's.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from walship.shared.bench.worker import Gate
from walship.shared.bench.workload import KEY_BYTES, PARTITIONS, VALUE_BYTES, now
from walship.shared.errors import StoreMismatchError
from walship.shared.model import WriterId
from walship.shared.store import Checkpoint, ReplicaStore

_MB = 1e6


def items(keys: int, seed: int) -> Iterator[tuple[bytes, bytes]]:
    from walship.producer.loadgen import key_for

    rng = random.Random(seed)
    for i in range(keys):
        yield key_for(i, KEY_BYTES), rng.randbytes(VALUE_BYTES)


def build_source(path: Path, keys: int, seed: int) -> ReplicaStore:
    store = ReplicaStore(path)
    store.load_items(items(keys, seed))
    store.set_checkpoint(
        Checkpoint(
            applied_seq=keys,
            offsets=dict.fromkeys(range(PARTITIONS), 0),
            writer=WriterId(stream_id=bytes(range(16)), epoch=1),
        )
    )
    return store


async def snapshot_role(params: dict[str, Any], go: Gate) -> dict[str, Any]:
    from walship.consumer.bootstrap import Bootstrapper, LogView
    from walship.shared.snapshot import FileSnapshotStore
    from walship.shared.snapshot.create import create_snapshot
    from walship.shared.snapshot.progress import NullProgress

    keys: int = params["keys"]
    base = Path(params["dir"])
    source = await asyncio.to_thread(build_source, base / "source.db", keys, params["seed"])
    snapshots = FileSnapshotStore(base / "snapshots")
    view = LogView(
        partitions=PARTITIONS,
        log_start=dict.fromkeys(range(PARTITIONS), 0),
        log_end=dict.fromkeys(range(PARTITIONS), 0),
        first_seqs=dict.fromkeys(range(PARTITIONS)),
    )

    async def inspect() -> LogView:
        return view

    loader = Bootstrapper(
        base / "restored.db",
        snapshots,
        topic="bench",
        inspect_log=inspect,
        progress=lambda operation: NullProgress(operation),
    )
    try:
        await go()
        t0 = now()
        manifest = await create_snapshot(source, snapshots, topic="bench", partitions=PARTITIONS)
        t1 = now()
        checkpoint = await loader.load(manifest)
        t2 = now()
    finally:
        source.close()
    with ReplicaStore(base / "restored.db") as restored:
        digest = await asyncio.to_thread(restored.digest)
    if digest.sha256 != manifest.digest or digest.keys != keys or checkpoint.applied_seq != keys:
        raise StoreMismatchError(
            "the restored replica differs from the snapshot",
            snapshot=manifest.snapshot_id,
            keys=digest.keys,
            expected_keys=keys,
        )
    create_s, restore_s = t1 - t0, t2 - t1
    return {
        "keys": keys,
        "raw_mb": round(manifest.raw_bytes / _MB, 2),
        "snapshot_mb": round(manifest.total_bytes / _MB, 2),
        "chunks": len(manifest.chunks),
        "create_s": round(create_s, 3),
        "create_keys_per_s": round(keys / create_s),
        "create_mb_per_s": round(manifest.raw_bytes / _MB / create_s, 2),
        "restore_s": round(restore_s, 3),
        "restore_keys_per_s": round(keys / restore_s),
        "restore_mb_per_s": round(manifest.raw_bytes / _MB / restore_s, 2),
        "restored_digest_matches": True,
    }
