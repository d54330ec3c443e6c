"""Supervised subprocesses for the chaos suite: start, SIGKILL, SIGTERM, auto-restart.

Each process writes stdout and stderr into one log file (appended across
restarts, with a marker line per start). An exit the supervisor did not ask for
is recorded with its reason (the ``Error: ...`` line walship prints) and, when
``auto_restart`` is on, the process is started again after a short pause, as
an init system or Kubernetes would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

from walship.shared.chaos.plan import ExitRecord

_TAIL_BYTES = 16 << 10


def _open_log(path: Path, marker: str) -> BinaryIO:
    """Open a process log for appending, with a marker line (small local writes)."""
    log = open(path, "ab")  # noqa: SIM115 - the caller closes it
    log.write(f"=== {marker}\n".encode())
    log.flush()
    return log


def walship_argv(*args: str) -> list[str]:
    """``walship <args>`` run with this interpreter (no reliance on PATH)."""
    return [sys.executable, "-m", "walship.shared.cli.main", *args]


def last_error_line(log_path: Path) -> str:
    """The last ``Error: ...`` line of a log (else its last non-empty line)."""
    try:
        with open(log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - _TAIL_BYTES))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("Error:"):
            return line
    for line in reversed(lines):
        if not line.startswith("=== "):
            return line[-400:]
    return ""


class ManagedProcess:
    """One supervised walship process. ``argv`` is called at every start (profiles change)."""

    def __init__(
        self,
        name: str,
        role: str,
        argv: Callable[[], list[str]],
        *,
        env: Mapping[str, str],
        log_path: Path,
        clock_start: float,
        on_exit: Callable[[ExitRecord], None],
        expected: Callable[[str, str], bool],
        auto_restart_s: float = 1.5,
    ) -> None:
        self.name = name
        self.role = role
        self._argv = argv
        self._env = dict(env)
        self.log_path = log_path
        self._t0 = clock_start
        self._on_exit = on_exit
        self._expected = expected
        self.auto_restart_s = auto_restart_s
        self.auto_restart = True
        self.starts = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._watch: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._stopping = False
        self._pending_restart: asyncio.Task[None] | None = None
        self._signalled: set[int] = set()  # pids we killed or terminated on purpose

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def restarts(self) -> int:
        return max(0, self.starts - 1)

    async def start(self) -> None:
        async with self._lock:
            if self.running or self._stopping:
                return
            argv = self._argv()
            marker = f"start {self.starts + 1}: {' '.join(argv[3:])}"
            with _open_log(self.log_path, marker) as log:
                self._proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    env=self._env,
                    start_new_session=True,
                )
            self.starts += 1
            self._watch = asyncio.create_task(self._watch_exit(self._proc))

    async def _watch_exit(self, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if proc is not self._proc or self._stopping or proc.pid in self._signalled:
            return
        reason = last_error_line(self.log_path)
        self._on_exit(
            ExitRecord(
                process=self.name,
                role=self.role,
                code=code,
                reason=reason,
                at_s=time.monotonic() - self._t0,
                expected=self._expected(self.role, reason),
            )
        )
        if self.auto_restart:
            self._pending_restart = asyncio.create_task(self.start_after(self.auto_restart_s))

    async def start_after(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        await self.start()

    async def kill(self) -> bool:
        """SIGKILL (no clean-up at all); True if it was running."""
        return await self._signal(signal.SIGKILL, timeout_s=10.0)

    async def terminate(self, timeout_s: float = 20.0) -> bool:
        """SIGTERM, then SIGKILL after ``timeout_s``; True if it was running."""
        return await self._signal(signal.SIGTERM, timeout_s=timeout_s)

    async def _signal(self, sig: signal.Signals, *, timeout_s: float) -> bool:
        async with self._lock:
            proc = self._proc
            if proc is None or proc.returncode is not None:
                return False
            self._signalled.add(proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                await asyncio.wait_for(proc.wait(), timeout_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            return True

    async def stop(self, timeout_s: float = 20.0) -> None:
        """Stop for good: no restarts after this (idempotent)."""
        self.auto_restart = False
        pending, self._pending_restart = self._pending_restart, None
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pending
        await self.terminate(timeout_s)
        self._stopping = True


async def run_once(
    argv: list[str], *, env: Mapping[str, str], log_path: Path, timeout_s: float
) -> tuple[int, str]:
    """Run a walship command to completion: (exit code, stdout). Stderr goes to the log.

    A command still running after ``timeout_s`` is killed and reported as exit -9.
    """
    with _open_log(log_path, f"run: {' '.join(argv[3:])}") as log:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            env=dict(env),
            start_new_session=True,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            log.write(f"=== killed after {timeout_s:.0f}s\n".encode())
            return -9, ""
    text = out.decode("utf-8", "replace")
    with _open_log(log_path, "its stdout:") as log:
        log.write(text.encode())
    return proc.returncode if proc.returncode is not None else -1, text
