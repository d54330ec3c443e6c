"""``start()``/``stop()`` plus ``async with``, the way aiokafka's clients work.

Components (WAL writer, writer, publisher, reader, heartbeats, health server,
snapshot scheduler) implement ``start`` and an idempotent ``stop``; this base
adds the context manager once instead of in every class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Self


class AsyncService(ABC):
    @abstractmethod
    async def start(self) -> None:
        """Acquire resources; calling it again on a started service does nothing."""

    @abstractmethod
    async def stop(self) -> None:
        """Release resources; idempotent."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
