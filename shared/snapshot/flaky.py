"""A fault-injecting SnapshotStore wrapper for tests and chaos runs.

``FlakyStore(inner, fail={"get_chunk": {3, 7}}, corrupt={"get_chunk": {5}})``
raises on the 3rd and 7th ``get_chunk`` call and flips a byte in what the 5th
returns. Call numbers count from 1, per method. ``calls`` records every call.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Set

from walship.shared.errors import SnapshotError
from walship.shared.snapshot.base import SnapshotStore
from walship.shared.snapshot.format import Manifest


class InjectedFault(SnapshotError):
    """The failure a FlakyStore injects (retriable, like a transient store outage)."""

    retriable = True


class FlakyStore:
    """Wraps a SnapshotStore; fails or corrupts chosen calls."""

    def __init__(
        self,
        inner: SnapshotStore,
        *,
        fail: Mapping[str, Set[int]] | None = None,
        corrupt: Mapping[str, Set[int]] | None = None,
    ) -> None:
        self.inner = inner
        self.fail = {k: set(v) for k, v in (fail or {}).items()}
        self.corrupt = {k: set(v) for k, v in (corrupt or {}).items()}
        self.calls: Counter[str] = Counter()
        self.chunk_reads: Counter[tuple[str, int]] = Counter()

    def _enter(self, method: str) -> int:
        self.calls[method] += 1
        n = self.calls[method]
        if n in self.fail.get(method, ()):
            raise InjectedFault(f"injected failure of {method}", call=n)
        return n

    def _maybe_corrupt(self, method: str, n: int, data: bytes) -> bytes:
        if n in self.corrupt.get(method, ()) and data:
            i = len(data) // 2
            return data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1 :]
        return data

    @property
    def url(self) -> str:
        return self.inner.url

    async def put_chunk(self, snapshot_id: str, index: int, data: bytes) -> None:
        n = self._enter("put_chunk")
        await self.inner.put_chunk(snapshot_id, index, self._maybe_corrupt("put_chunk", n, data))

    async def put_manifest(self, manifest: Manifest) -> None:
        self._enter("put_manifest")
        await self.inner.put_manifest(manifest)

    async def list_manifests(self) -> list[Manifest]:
        self._enter("list_manifests")
        return await self.inner.list_manifests()

    async def get_manifest(self, snapshot_id: str) -> Manifest:
        self._enter("get_manifest")
        return await self.inner.get_manifest(snapshot_id)

    async def get_chunk(self, snapshot_id: str, index: int) -> bytes:
        n = self._enter("get_chunk")
        self.chunk_reads[(snapshot_id, index)] += 1
        data = await self.inner.get_chunk(snapshot_id, index)
        return self._maybe_corrupt("get_chunk", n, data)

    async def delete(self, snapshot_id: str) -> None:
        self._enter("delete")
        await self.inner.delete(snapshot_id)

    async def retain(self, keep: int) -> list[str]:
        self._enter("retain")
        return await self.inner.retain(keep)

    async def close(self) -> None:
        await self.inner.close()
