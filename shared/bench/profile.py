"""Profiles of bench workers: py-spy (sampling, whole process incl. threads) and its summary.

``walship bench --profile DIR`` runs every worker under ``py-spy record``
(raw collapsed stacks, ``DIR/<section>-<worker>.txt``; load them in
speedscope or flamegraph.pl) and writes ``...-top.txt`` with the frames that
hold the most samples. Process RSS sampled while profiling is py-spy's, but
each worker's self-reported ``ru_maxrss`` stays right.
"""

from __future__ import annotations

import collections
import shutil
from collections.abc import Iterable
from pathlib import Path

from walship.shared.errors import ConfigError

SAMPLE_RATE_HZ = 250


def py_spy_prefix(output: Path) -> list[str]:
    """The command prefix that runs a worker under py-spy, writing ``output``."""
    exe = shutil.which("py-spy")
    if exe is None:
        venv_bin = Path(__import__("sys").executable).parent / "py-spy"
        if not venv_bin.exists():
            raise ConfigError("--profile needs py-spy (pip install 'walship[dev]')")
        exe = str(venv_bin)
    return [exe, "record", "-o", str(output), "-f", "raw", "-r", str(SAMPLE_RATE_HZ), "--"]


def top_frames(collapsed: Iterable[str], n: int = 25) -> list[tuple[str, float, float]]:
    """(frame, self share, inclusive share) of the ``n`` frames with most self samples.

    ``collapsed`` are lines ``frame;frame;...;leaf COUNT`` (py-spy's raw format).
    """
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in collapsed:
        stack, _, count_text = line.rstrip("\n").rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        frames = stack.split(";")
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    if samples == 0:
        return []
    return [(f, c / samples, total[f] / samples) for f, c in own.most_common(n)]


def summarize_file(raw: Path, n: int = 25) -> Path:
    """Write ``<raw>-top.txt`` next to a py-spy raw profile; returns its path."""
    with raw.open() as f:
        rows = top_frames(f, n)
    out = raw.with_name(raw.stem + "-top.txt")
    lines = [f"{'self':>6} {'incl':>6}  frame"]
    lines += [f"{own:6.1%} {incl:6.1%}  {frame}" for frame, own, incl in rows]
    out.write_text("\n".join(lines) + "\n")
    return out
