"""`walship demo` end to end, small: both replicas (one bootstrapped) equal the writer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kafka


def test_demo_passes_and_late_reader_bootstraps(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "walship.shared.cli.main",
            "demo",
            "--entries",
            "20000",
            "--rate",
            "5000",
            "--timeout",
            "120",
            "--work-dir",
            str(work),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "PASS" in done.stdout
    # reader-2 joined after the log start moved: it must have come from the snapshot.
    assert "now holds snapshot" in (work / "reader-2.log").read_text()
    assert "now holds snapshot" not in (work / "reader-1.log").read_text()
