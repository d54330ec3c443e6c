"""Progress log lines (no terminal): counts, rate and ETA, never 'None'."""

from __future__ import annotations

import logging

import pytest
from walship.shared.snapshot.progress import LogProgress


def test_log_lines_with_known_totals_show_eta(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="walship.shared.snapshot.progress")
    p = LogProgress("bootstrap", interval_s=0)
    p.start(total_bytes=1000, total_keys=100)
    p.advance(done_bytes=500, keys=50)
    p.finish()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "bootstrap: starting (100 keys, 1000 bytes)"
    assert lines[1].startswith("bootstrap progress: 50/100 keys, 500/1000 bytes,")
    assert "ETA" in lines[1]
    assert lines[-1].startswith("bootstrap done: 50/100 keys, 500/1000 bytes,")
    assert "ETA" not in lines[-1]


def test_log_lines_with_unknown_totals(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="walship.shared.snapshot.progress")
    p = LogProgress("snapshot create", interval_s=0)
    p.start(total_bytes=None, total_keys=None)
    p.advance(done_bytes=2048, keys=10)
    p.finish()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "snapshot create: starting"
    assert lines[-1].startswith("snapshot create done: 10 keys, 2048 bytes,")
    assert not any("None" in line or "?" in line for line in lines)
