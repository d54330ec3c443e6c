"""Orchestrator side of the worker protocol: spawn, wait ready, release, collect."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from walship.shared.bench.profile import py_spy_prefix, summarize_file
from walship.shared.bench.rss import RssSampler
from walship.shared.bench.worker import PROTOCOL_PREFIX
from walship.shared.errors import WalshipError

_STDERR_TAIL_BYTES = 4000


class BenchError(WalshipError):
    """A bench process failed or did not answer in time."""


class WorkerProcess:
    """One running bench worker."""

    def __init__(
        self, name: str, proc: asyncio.subprocess.Process, log_path: Path, sampler: RssSampler
    ) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path
        self._sampler = sampler
        self.result: dict[str, Any] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _stderr_tail(self) -> str:
        try:
            data = self.log_path.read_bytes()[-_STDERR_TAIL_BYTES:]
        except OSError:
            return ""
        return data.decode(errors="replace").strip()

    async def _next_event(self, timeout_s: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(
                    f"bench process {self.name} did not answer within {timeout_s:.0f} s",
                    log=str(self.log_path),
                )
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(), remaining)
            except TimeoutError:
                continue
            if not line:
                code = await self.proc.wait()
                raise BenchError(
                    f"bench process {self.name} exited with code {code}:\n{self._stderr_tail()}",
                    log=str(self.log_path),
                )
            text = line.decode(errors="replace")
            if text.startswith(PROTOCOL_PREFIX):
                event: dict[str, Any] = json.loads(text[len(PROTOCOL_PREFIX) :])
                return event

    async def ready(self, timeout_s: float) -> None:
        event = await self._next_event(timeout_s)
        if event.get("event") != "ready":
            raise BenchError(f"bench process {self.name} sent {event!r} instead of ready")

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")

    async def wait_result(self, timeout_s: float) -> dict[str, Any]:
        event = await self._next_event(timeout_s)
        if event.get("event") != "result":
            raise BenchError(f"bench process {self.name} sent {event!r} instead of a result")
        await self.proc.wait()
        event.pop("event")
        sampled = self._sampler.peaks.get(self.pid, 0)
        event["peak_rss_bytes"] = max(int(event.get("peak_rss_bytes", 0)), sampled)
        self.result = event
        return event

    async def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()


class Workers:
    """A set of workers sampled for RSS; ``async with`` kills whatever is left."""

    def __init__(
        self, log_dir: Path, *, ready_timeout_s: float = 60, profile_dir: Path | None = None
    ) -> None:
        self.log_dir = log_dir
        self.profile_dir = profile_dir
        self.ready_timeout_s = ready_timeout_s
        self.sampler = RssSampler()
        self.workers: list[WorkerProcess] = []

    async def __aenter__(self) -> Workers:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.sampler.start()
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.sampler.stop()
        for w in self.workers:
            await w.kill()
        if self.profile_dir is not None:
            for w in self.workers:
                raw = self._profile_path(w.name)
                if raw.exists():
                    summarize_file(raw)

    def _profile_path(self, name: str) -> Path:
        assert self.profile_dir is not None
        return self.profile_dir / f"{self.log_dir.parent.name}-{name}.txt"

    async def spawn(self, name: str, role: str, params: dict[str, Any]) -> WorkerProcess:
        """Start ``role`` and wait until it is ready (set up and connected)."""
        log_path = self.log_dir / f"{name}.log"
        prefix: list[str] = []
        if self.profile_dir is not None:
            self.profile_dir.mkdir(parents=True, exist_ok=True)
            prefix = py_spy_prefix(self._profile_path(name))
        with log_path.open("wb") as log:
            proc = await asyncio.create_subprocess_exec(
                *prefix,
                sys.executable,
                "-m",
                "walship.shared.bench.worker",
                role,
                json.dumps(params),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
            )
        worker = WorkerProcess(name, proc, log_path, self.sampler)
        self.workers.append(worker)
        self.sampler.watch(proc.pid)
        await worker.ready(self.ready_timeout_s)
        return worker

    async def run(self, workers: list[WorkerProcess], timeout_s: float) -> list[dict[str, Any]]:
        """Release ``workers`` together and collect their results (first failure raises)."""
        for w in workers:
            w.go()
        tasks = [asyncio.create_task(w.wait_result(timeout_s)) for w in workers]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            for w in workers:
                await w.kill()
            raise
