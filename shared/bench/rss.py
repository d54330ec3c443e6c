"""Peak resident memory of bench processes.

Two views that should agree: each worker reports its own ``ru_maxrss`` (the
kernel's exact high-water mark) when it ends, and the orchestrator samples
every worker's RSS with psutil while it runs (which still gives a figure when a
worker dies before reporting).
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import sys

import psutil

SAMPLE_INTERVAL_S = 0.05


def self_peak_rss_bytes() -> int:
    """This process's peak RSS (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class RssSampler:
    """Samples the RSS of registered pids until stopped; keeps each one's maximum."""

    def __init__(self, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.peaks: dict[int, int] = {}
        self._procs: dict[int, psutil.Process] = {}
        self._task: asyncio.Task[None] | None = None

    def watch(self, pid: int) -> None:
        with contextlib.suppress(psutil.Error):
            self._procs[pid] = psutil.Process(pid)
            self.peaks.setdefault(pid, 0)

    def sample(self) -> None:
        for pid, proc in list(self._procs.items()):
            try:
                rss = int(proc.memory_info().rss)
            except psutil.Error:  # exited: its last sample stays
                del self._procs[pid]
                continue
            if rss > self.peaks[pid]:
                self.peaks[pid] = rss

    async def _loop(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="bench-rss-sampler")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
