"""Progress of long snapshot operations (create, bootstrap, restore).

A rich progress bar (bytes, keys, rate, ETA) on a terminal; periodic log lines
otherwise, so a Kubernetes pod's log shows how far a bootstrap got. Every
implementation also feeds OpenTelemetry counters (``walship.snapshot.bytes``,
``walship.snapshot.keys``, attribute ``operation``) for dashboards.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Protocol

from opentelemetry import metrics

log = logging.getLogger(__name__)
_meter = metrics.get_meter("walship.snapshot")
_bytes_counter = _meter.create_counter(
    "walship.snapshot.bytes", unit="By", description="Snapshot bytes written or loaded"
)
_keys_counter = _meter.create_counter(
    "walship.snapshot.keys", unit="{key}", description="Snapshot keys written or loaded"
)


class Progress(Protocol):
    def start(self, total_bytes: int | None, total_keys: int | None) -> None: ...

    def advance(self, *, done_bytes: int, keys: int) -> None: ...

    def finish(self) -> None: ...


class _Base:
    def __init__(self, operation: str) -> None:
        self.operation = operation
        self.total_bytes: int | None = None
        self.total_keys: int | None = None
        self.done_bytes = 0
        self.keys = 0
        self.started = time.monotonic()
        self._attrs = {"operation": operation}

    def start(self, total_bytes: int | None, total_keys: int | None) -> None:
        self.total_bytes, self.total_keys = total_bytes, total_keys
        self.started = time.monotonic()

    def advance(self, *, done_bytes: int, keys: int) -> None:
        self.done_bytes += done_bytes
        self.keys += keys
        _bytes_counter.add(done_bytes, self._attrs)
        _keys_counter.add(keys, self._attrs)

    def finish(self) -> None:
        return None

    def rate_keys_s(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.keys / elapsed if elapsed > 0 else 0.0

    def eta_s(self) -> float | None:
        elapsed = time.monotonic() - self.started
        if self.total_keys and self.keys and elapsed > 0:
            return (self.total_keys - self.keys) * elapsed / self.keys
        return None


class NullProgress(_Base):
    """Counts (and feeds metrics) without printing anything."""


class LogProgress(_Base):
    """A log line every ``interval_s`` with keys, bytes, rate and ETA."""

    def __init__(self, operation: str, *, interval_s: float = 5.0) -> None:
        super().__init__(operation)
        self.interval_s = interval_s
        self._last = 0.0

    def start(self, total_bytes: int | None, total_keys: int | None) -> None:
        super().start(total_bytes, total_keys)
        self._last = time.monotonic()
        if total_keys is None and total_bytes is None:
            log.info("%s: starting", self.operation)
        else:
            log.info(
                "%s: starting (%s keys, %s bytes)",
                self.operation,
                "?" if total_keys is None else total_keys,
                "?" if total_bytes is None else total_bytes,
            )

    def advance(self, *, done_bytes: int, keys: int) -> None:
        super().advance(done_bytes=done_bytes, keys=keys)
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            self._line("progress")

    def finish(self) -> None:
        self._line("done")

    def _line(self, what: str) -> None:
        # Unknown totals (a snapshot being created) show as plain counts, no ETA.
        keys = f"{self.keys}" + (f"/{self.total_keys}" if self.total_keys is not None else "")
        done = f"{self.done_bytes}" + (
            f"/{self.total_bytes}" if self.total_bytes is not None else ""
        )
        eta = self.eta_s()
        log.info(
            "%s %s: %s keys, %s bytes, %.0f keys/s%s",
            self.operation,
            what,
            keys,
            done,
            self.rate_keys_s(),
            f", ETA {eta:.0f}s" if eta is not None and what != "done" else "",
        )


class RichProgress(_Base):
    """A rich progress bar: bytes done/total, keys, rate and time remaining."""

    def __init__(self, operation: str) -> None:
        super().__init__(operation)
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as RichBar

        self._bar = RichBar(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TextColumn("{task.fields[keys]} keys"),
            TimeRemainingColumn(),
            transient=False,
        )
        self._task: Any = None

    def start(self, total_bytes: int | None, total_keys: int | None) -> None:
        super().start(total_bytes, total_keys)
        self._bar.start()
        self._task = self._bar.add_task(self.operation, total=total_bytes, keys=0)

    def advance(self, *, done_bytes: int, keys: int) -> None:
        super().advance(done_bytes=done_bytes, keys=keys)
        if self._task is not None:
            self._bar.update(self._task, advance=done_bytes, keys=f"{self.keys:,}")

    def finish(self) -> None:
        if self._task is not None:
            self._bar.update(self._task, completed=self.total_bytes or self.done_bytes)
        self._bar.stop()


def make_progress(operation: str, *, tty: bool | None = None) -> Progress:
    """A bar on a terminal, log lines otherwise."""
    if tty is None:
        tty = sys.stderr.isatty()
    return RichProgress(operation) if tty else LogProgress(operation)
