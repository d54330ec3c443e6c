"""Kill -9 a process appending with fsync=always at random moments; every append it
reported durable must survive, with the sequence continuing densely after restart."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from walship.producer.wal import WalReader, WalWriter

CHILD = r"""
import asyncio, sys
from pathlib import Path
from walship.producer.wal import FsyncPolicy, WalWriter
from walship.shared.model import Op

async def main(directory: str, tasks: int) -> None:
    async with WalWriter(Path(directory), fsync=FsyncPolicy.ALWAYS, segment_bytes_max=8192) as w:
        print(f"ready {w.last_seq}", flush=True)

        async def run(tag: int) -> None:
            i = 0
            while True:
                n = 1 + i % 3
                key = f"{tag}:{i}".encode()
                t = await w.append([(Op.PUT, key, b"v" * (i % 50))] * n)
                # Reported only after append returned: durable by contract.
                sys.stdout.write(f"{t.first_seq} {t.last_seq} {key.decode()}\n")
                sys.stdout.flush()
                i += 1

        await asyncio.gather(*(run(k) for k in range(tasks)))

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def _run_and_kill(directory: Path, rng: random.Random) -> tuple[int | None, list[str]]:
    """Start the child, kill -9 it at a random moment; (seq it recovered to, lines)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(directory), str(rng.choice([1, 4, 16]))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("ready"):
                ready.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    if rng.random() < 0.15:
        time.sleep(rng.uniform(0.0, 0.4))  # sometimes during start-up / recovery
    else:
        assert ready.wait(20), "child did not start"
        time.sleep(rng.uniform(0.0, 0.25))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    reader.join(5)
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert proc.returncode == -signal.SIGKILL, err
    recovered = None
    if lines and lines[0].startswith("ready"):
        recovered = int(lines[0].split()[1])
    # A line cut by the kill has no newline: it was not reported.
    return recovered, [ln for ln in lines[1:] if ln.endswith("\n")]


def _check(directory: Path, reported: dict[int, tuple[int, str]]) -> int:
    async def recover() -> int:
        async with WalWriter(directory) as w:
            return w.last_seq

    last = asyncio.run(recover())
    with WalReader(directory) as r:
        txns = r.read_from(1, max_bytes=1 << 40)
    # Dense from 1, ending exactly where recovery says.
    seq = 1
    by_first = {}
    for t, _ in txns:
        assert t.first_seq == seq, f"gap: expected {seq}, got {t.first_seq}"
        by_first[t.first_seq] = t
        seq = t.last_seq + 1
    assert seq - 1 == last
    # Every reported-durable append is there, with its content.
    for first, (lst, key) in reported.items():
        t = by_first.get(first)
        assert t is not None, f"reported seq {first} lost (recovered to {last})"
        assert t.last_seq == lst and t.keys[0] == key.encode()
    return last


def _crash_loop(tmp_path: Path, iterations: int, seed: int) -> None:
    rng = random.Random(seed)
    reported: dict[int, tuple[int, str]] = {}
    last = 0
    for _ in range(iterations):
        recovered, lines = _run_and_kill(tmp_path, rng)
        if recovered is not None:
            # The child continued exactly where the last check's recovery ended.
            assert recovered == last
        for line in lines:
            first, lst, key = line.split()
            reported[int(first)] = (int(lst), key)
        last = _check(tmp_path, reported)
        assert last >= max((v[0] for v in reported.values()), default=0)
    assert len(reported) > iterations  # the kills did interrupt real work


def test_kill9_during_appends_loses_nothing_reported_50x(tmp_path: Path) -> None:
    # ~30 s on the 2-core dev box: under the ~40 s bar for a `slow` mark.
    _crash_loop(tmp_path, 50, seed=12)
