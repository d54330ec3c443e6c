"""Heartbeats and ``walship status``: what operators see per reader."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console
from test_reader import make_reader, make_txns, new_writer, publish
from walship.consumer.cli import render_status
from walship.consumer.heartbeat import (
    Heartbeat,
    HeartbeatPublisher,
    TopicState,
    assess,
    read_heartbeats,
    status_document,
)
from walship.shared.cli.main import main

NOW = 1_700_000_000.0


def beat(reader_id: str, applied: int, **kw: object) -> Heartbeat:
    fields: dict[str, object] = {
        "reader_id": reader_id,
        "applied_seq": applied,
        "lag_seqs": 0,
        "lag_s": 0.0,
        "version": "0.1.0",
        "host": "h",
        "healthy": True,
        "error": None,
        "ts": NOW - 1,
        "interval_s": 5.0,
        "offsets": {},
    }
    fields.update(kw)
    return Heartbeat(**fields)  # type: ignore[arg-type]


STATE = TopicState(
    topic="t",
    partitions=2,
    log_start_offsets={0: 100, 1: 0},
    end_offsets={0: 1100, 1: 50},
    last_seq=500,
)


def test_heartbeat_json_round_trip() -> None:
    b = beat("a", 7, offsets={0: 3, 1: 9}, error="x", healthy=False)
    assert Heartbeat.from_json(b.to_json()) == b
    with pytest.raises(ValueError):
        Heartbeat.from_json(b"{}")
    with pytest.raises(ValueError):
        Heartbeat.from_json(b"not json")


def test_assess_lag_and_warnings() -> None:
    rows = assess(
        {
            "ok": beat("ok", 500, offsets={0: 1100, 1: 50}),
            "behind": beat("behind", 400, lag_s=2.5, offsets={0: 150, 1: 50}),
            "gone": beat("gone", 300, offsets={0: 50}),
            "stalled": beat("stalled", 500, ts=NOW - 60),
            "stopped": beat("stopped", 500, ts=NOW - 60, running=False),
            "sick": beat("sick", 10, healthy=False, error="undecodable message"),
        },
        STATE,
        NOW,
    )
    by_id = {r.reader_id: r for r in rows}
    assert [r.reader_id for r in rows] == sorted(by_id)
    assert by_id["ok"].lag_seqs == 0 and by_id["ok"].warnings == []
    assert by_id["behind"].lag_seqs == 100 and by_id["behind"].lag_s == 2.5
    assert any("near log start" in w for w in by_id["behind"].warnings)
    assert any("bootstrap needed" in w for w in by_id["gone"].warnings)
    # Many partitions near the log start make one warning, not one per partition.
    many = assess(
        {"behind": beat("behind", 400, offsets={0: 150, 1: 150})},
        TopicState(
            **{
                **STATE.__dict__,
                "log_start_offsets": {0: 100, 1: 100},
                "end_offsets": {0: 1100, 1: 1100},
            }
        ),
        NOW,
    )[0]
    assert len(many.warnings) == 1 and "partitions 0 (50 past" in many.warnings[0]
    assert any("stalled" in w for w in by_id["stalled"].warnings)
    assert by_id["stopped"].warnings == ["stopped 60s ago"]
    assert any("unhealthy: undecodable" in w for w in by_id["sick"].warnings)
    assert by_id["ok"].heartbeat_age_s == 1.0


def test_status_document_and_rendering() -> None:
    state = TopicState(**{**STATE.__dict__, "writer_seq": 520, "published_seq": 500})
    doc = status_document({"a": beat("a", 490)}, state, NOW)
    assert doc["writer"] == {"last_seq": 520, "published_seq": 500, "wal_backlog_seqs": 20}
    assert doc["readers"][0]["lag_seqs"] == 30  # the writer's seq is the head
    console = Console(record=True, width=160)
    console.print(render_status(doc))
    text = console.export_text()
    assert "a" in text and "490" in text and "WAL backlog 20" in text


@pytest.mark.kafka
def test_status_json_reports_two_readers(
    kafka_bootstrap: str, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    topic = new_topic(3)
    writer = new_writer()
    txns = make_txns(1, 100, seed=41)
    mid = txns[39].last_seq
    last = txns[-1].last_seq
    applied: dict[str, int] = {}

    async def scenario() -> None:
        await publish(kafka_bootstrap, topic, 3, writer, txns)
        for reader_id, target in (("alpha", last), ("beta", mid)):
            reader = make_reader(tmp_path / f"{reader_id}.db", kafka_bootstrap, topic, reader_id)
            async with reader:
                heartbeat = HeartbeatPublisher(
                    reader.status,
                    topic=topic,
                    client_kwargs={"bootstrap_servers": kafka_bootstrap},
                    interval_ms=200,
                    offsets=reader.stored_offsets,
                )
                async with heartbeat:
                    await asyncio.wait_for(reader.run(until_seq=target), 60)
                assert heartbeat.sent >= 1  # at least the last one, sent on stop
                applied[reader_id] = reader.applied_seq
        assert applied["alpha"] == last and mid <= applied["beta"] < last
        beats = await read_heartbeats({"bootstrap_servers": kafka_bootstrap}, topic)
        assert {b: h.applied_seq for b, h in beats.items()} == applied

    asyncio.run(scenario())
    result = CliRunner().invoke(
        main,
        ["status", "--json", "--bootstrap-servers", kafka_bootstrap, "--topic", topic],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["last_seq"] == last
    readers = {r["reader_id"]: r for r in doc["readers"]}
    assert readers["alpha"]["applied_seq"] == last and readers["alpha"]["lag_seqs"] == 0
    beta = applied["beta"]
    assert readers["beta"]["applied_seq"] == beta and readers["beta"]["lag_seqs"] == last - beta
    # Both readers stopped (their last heartbeat says so): not reported as stalled.
    assert readers["alpha"]["healthy"] and not readers["alpha"]["running"]
    assert [w.split()[0] for w in readers["alpha"]["warnings"]] == ["stopped"]
    text = CliRunner().invoke(
        main, ["status", "--bootstrap-servers", kafka_bootstrap, "--topic", topic]
    )
    assert text.exit_code == 0 and "alpha" in text.output and "beta" in text.output
