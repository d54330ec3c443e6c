"""A reader started while Kafka is unreachable waits for it instead of exiting."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from walship.consumer.cli import Backoff
from walship.shared.devcluster import DevCluster

ENTRIES = 2000


def walship(*args: str) -> list[str]:
    return [sys.executable, "-m", "walship.shared.cli.main", *args]


def make_env(cluster: DevCluster, topic: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WALSHIP_", "OTEL_"))}
    env.update(
        {
            "OTEL_TRACES_EXPORTER": "none",
            "OTEL_METRICS_EXPORTER": "none",
            "WALSHIP_KAFKA__BOOTSTRAP_SERVERS": cluster.bootstrap_servers,
            "WALSHIP_TOPIC__NAME": topic,
            "WALSHIP_TOPIC__PARTITIONS": "3",
            "WALSHIP_TOPIC__REPLICATION_FACTOR": "1",
        }
    )
    return env


def fill(cluster: DevCluster, tmp_path: Path) -> tuple[str, dict[str, str]]:
    topic = f"rs-{uuid.uuid4().hex[:8]}"
    cluster.create_topic(topic, 3)
    cluster.create_topic(f"{topic}.readers", 1)
    env = make_env(cluster, topic)
    wd = str(tmp_path / "writer")
    load = ["writer", "load", "--data-dir", wd, "--entries", str(ENTRIES), "--json"]
    for args in (load, ["producer", "run", "--data-dir", wd, "--until-caught-up"]):
        out = subprocess.run(walship(*args), env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
    return topic, env


def test_backoff_doubles_up_to_the_cap_and_resets() -> None:
    b = Backoff(0.5, 3.0)
    assert [b.next_delay_s() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    b.reset()
    assert b.next_delay_s() == 0.5


def wait_for(proc: subprocess.Popen[bytes], log: Path, text: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        assert proc.poll() is None, f"reader exited {proc.returncode}:\n{log.read_text()}"
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not logged after {timeout_s}s:\n{log.read_text()[-3000:]}")


@pytest.mark.kafka
def test_reader_started_while_kafka_is_down_waits_then_catches_up(
    devcluster: DevCluster, tmp_path: Path
) -> None:
    _topic, env = fill(devcluster, tmp_path)
    for broker in devcluster.broker_ids:
        devcluster.broker_down(broker)
    log = tmp_path / "reader.log"
    replica = tmp_path / "replica"
    args = ["consumer", "run", "--data-dir", str(replica), "--reader-id", "late"]
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            walship(*args, "--until-seq", str(ENTRIES)), env=env, stdout=f, stderr=f
        )
    try:
        wait_for(proc, log, "retrying in", 30)
        time.sleep(3)
        assert proc.poll() is None, f"reader exited {proc.returncode}:\n{log.read_text()}"
        text = log.read_text()
        assert "Kafka is unavailable" in text, text
        assert "Traceback" not in text, text
        for broker in devcluster.broker_ids:
            devcluster.broker_up(broker)
        assert proc.wait(timeout=90) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = subprocess.run(
        walship("digest", "--db", str(replica / "state.db")), env=env, capture_output=True
    )
    assert out.returncode == 0 and f'"seq": {ENTRIES}'.encode() in out.stdout, out


@pytest.mark.kafka
def test_sigterm_stops_a_reader_waiting_for_kafka_promptly(
    devcluster: DevCluster, tmp_path: Path
) -> None:
    topic = f"rs-{uuid.uuid4().hex[:8]}"
    devcluster.create_topic(topic, 3)
    env = make_env(devcluster, topic)
    for broker in devcluster.broker_ids:
        devcluster.broker_down(broker)
    log = tmp_path / "reader.log"
    args = ["consumer", "run", "--data-dir", str(tmp_path / "r"), "--reader-id", "w"]
    with open(log, "wb") as f:
        proc = subprocess.Popen(walship(*args), env=env, stdout=f, stderr=f)
    try:
        wait_for(proc, log, "retrying in", 30)
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert proc.wait(timeout=10) == 0, log.read_text()[-3000:]
        assert time.monotonic() - started < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_non_retriable_error_still_exits_1(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WALSHIP_", "OTEL_"))}
    env.update({"OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none"})
    # The data dir cannot be created (a file is in the way): a config error, exit 2.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = subprocess.run(
        walship("consumer", "run", "--data-dir", str(blocker / "d")),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and "retrying" not in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
