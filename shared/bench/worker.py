"""Entry point of one bench process: ``python -m walship.shared.bench.worker ROLE PARAMS_JSON``.

Protocol on stdout (lines prefixed with ``PROTOCOL_PREFIX``; anything else is
ignored): ``{"event": "ready"}`` once the role has set up (imports done,
clients connected), then — after the orchestrator writes a line on stdin —
``{"event": "result", ...}`` with the role's figures, ``peak_rss_bytes`` and
``cpu_s`` (CPU seconds after the go line).
Logs go to stderr (the orchestrator keeps them in a file).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import resource
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from walship.shared.bench.rss import self_peak_rss_bytes

PROTOCOL_PREFIX = "WALSHIP-BENCH "

Gate = Callable[[], Awaitable[None]]
Role = Callable[[dict[str, Any], Gate], Coroutine[Any, Any, dict[str, Any]]]

_cpu_at_go_s: float | None = None

# role name -> "module:function"; imported lazily so each process loads only what it runs.
ROLES: dict[str, str] = {
    "naive-producer": "walship.shared.bench.naive:producer_role",
    "naive-consumer": "walship.shared.bench.naive:consumer_role",
    "raw-producer": "walship.shared.bench.transport:producer_role",
    "raw-consumer": "walship.shared.bench.transport:consumer_role",
    "writer": "walship.shared.bench.pipeline:writer_role",
    "publisher": "walship.shared.bench.pipeline:publisher_role",
    "reader": "walship.shared.bench.pipeline:reader_role",
    "codec": "walship.shared.bench.pipeline:codec_role",
    "snapshot": "walship.shared.bench.snapshot_bench:snapshot_role",
}


def cpu_s() -> float:
    """User+system CPU seconds of this process so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def emit(event: str, **fields: Any) -> None:
    print(PROTOCOL_PREFIX + json.dumps({"event": event, **fields}), flush=True)


def _exit_when_orphaned() -> None:
    """Thread: stdin reaches EOF when the orchestrator dies; never outlive it."""
    while sys.stdin.readline():
        pass
    os._exit(1)


async def _gate() -> None:
    emit("ready")
    line = await asyncio.to_thread(sys.stdin.readline)
    if not line:  # the orchestrator went away
        raise SystemExit(1)
    global _cpu_at_go_s
    _cpu_at_go_s = cpu_s()
    threading.Thread(target=_exit_when_orphaned, name="bench-orphan-watch", daemon=True).start()


def load_role(name: str) -> Role:
    if name not in ROLES:
        raise SystemExit(f"unknown bench role {name!r} (known: {', '.join(sorted(ROLES))})")
    module_name, attr = ROLES[name].split(":")
    role: Role = getattr(importlib.import_module(module_name), attr)
    return role


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        raise SystemExit("usage: python -m walship.shared.bench.worker ROLE PARAMS_JSON")
    logging.basicConfig(
        level=logging.WARNING, format=f"%(asctime)s {args[0]} %(levelname)s %(name)s: %(message)s"
    )
    role = load_role(args[0])
    params: dict[str, Any] = json.loads(args[1])
    result: dict[str, Any] = asyncio.run(role(params, _gate))
    result["peak_rss_bytes"] = self_peak_rss_bytes()
    # CPU spent after "go" (set-up excluded): where the 2 cores went.
    result["cpu_s"] = round(cpu_s() - (_cpu_at_go_s or 0.0), 2)
    emit("result", **result)


if __name__ == "__main__":
    main()
