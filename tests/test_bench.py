"""walship bench: pure report/latency/profile logic, and tiny real runs on the embedded cluster."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from walship.shared.bench.latency import percentile, summarize, txn_latencies_s
from walship.shared.bench.profile import top_frames
from walship.shared.bench.report import Check, checks_for, table_rows
from walship.shared.bench.runner import BenchConfig, run_bench
from walship.shared.cli.main import main

# -- pure -----------------------------------------------------------------------


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([7.0], 1) == 7
    with pytest.raises(ValueError):
        percentile([], 50)


def test_latency_maps_each_txn_to_the_first_commit_covering_it() -> None:
    returns = [(10, 1.000), (20, 1.001), (30, 1.002), (40, 1.003)]
    commits = [(20, 1.010), (40, 1.050)]  # one commit covers seqs up to 20, the next up to 40
    latencies, missing = txn_latencies_s(returns, commits)
    assert missing == 0
    assert [round(x * 1000) for x in latencies] == [10, 9, 48, 47]
    late, missing = txn_latencies_s([(50, 2.0)], commits)
    assert late == [] and missing == 1


def test_summarize_drops_warmup() -> None:
    returns = [(10, 0.0), (20, 5.0)]
    commits = [(10, 1.0), (20, 5.002)]
    s = summarize(returns, commits, warmup_s=1.0)
    assert s.count == 1 and round(s.max_ms) == 2
    assert summarize(returns, commits).max_ms == pytest.approx(1000)


def test_checks_judge_values_against_targets() -> None:
    results = {
        "end_to_end": {"entries_per_s": 200_000.0},
        "naive": {"ratio": 9.5},
        "latency": {"p99_ms": 12.0},
        "rss": {"reader_mb": 100.0, "reader_backlog_mb": 300.0},
    }
    by_name = {c.name: c for c in checks_for(results)}
    assert by_name["entries/s"].status == "PASS"
    assert by_name["walship / naive"].status == "MISS"
    assert by_name["p99 append -> apply"].status == "PASS"
    assert by_name["reader peak RSS"].value == 300.0  # the worst reader counts
    assert by_name["reader peak RSS"].status == "MISS"
    assert by_name["restore keys/s"].status == "N/A"
    rows = table_rows(results, checks_for(results))
    rss_rows = {label: status for section, label, _, _, status in rows if section == "rss"}
    assert rss_rows == {"reader MB (live)": "PASS", "reader MB (backlog)": "MISS"}
    assert ("bootstrap", "restore keys/s", "-") in [r[:3] for r in rows]


def test_check_direction() -> None:
    assert Check("s", "n", 5.0, 5.0, "lower", "ms").status == "PASS"
    assert Check("s", "n", 5.1, 5.0, "lower", "ms").status == "MISS"
    assert Check("s", "n", 4.9, 5.0, "higher", "x").status == "MISS"


def test_top_frames_counts_self_and_inclusive_samples() -> None:
    raw = ["main;loop;apply 6\n", "main;loop;decode 3\n", "main;idle 1\n", "garbage\n"]
    rows = {frame: (own, incl) for frame, own, incl in top_frames(raw)}
    assert rows["apply"] == (0.6, 0.6)
    assert rows["decode"] == (0.3, 0.3)
    assert rows["idle"] == (0.1, 0.1)
    assert top_frames([]) == []


# -- real runs (tiny sizes) --------------------------------------------------------


@pytest.mark.kafka
def test_bench_quick_ratio_is_computed_from_measured_rates(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = [
        "bench",
        "--quick",
        "--sections",
        "e2e,transport,naive",
        "--entries",
        "3000",
        "--naive-entries",
        "300",
        "--out",
        str(out),
        "--work-dir",
        str(tmp_path / "work"),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    e2e, naive, transport = doc["end_to_end"], doc["naive"], doc["transport"]
    assert e2e["entries"] == 3000 and naive["entries"] == 300
    assert e2e["entries_per_s"] == pytest.approx(3000 / e2e["elapsed_s"], rel=0.01)
    assert naive["entries_per_s"] == pytest.approx(300 / naive["elapsed_s"], rel=0.01)
    assert naive["ratio"] == pytest.approx(e2e["entries_per_s"] / naive["entries_per_s"], rel=0.01)
    assert transport["messages"] == transport["of_e2e_messages"] == e2e["messages"] > 0
    assert transport["evicted_unread"] == 0
    assert transport["walship_share"] == pytest.approx(
        e2e["entries_per_s"] / transport["entries_per_s"], rel=0.01
    )
    assert e2e["reader_bootstraps"] == 0
    for role in ("writer_mb", "publisher_mb", "reader_mb"):
        assert 10 < doc["rss"][role] < 1024
    statuses = {c["name"]: c["status"] for c in doc["checks"]}
    assert statuses["walship / naive"] in {"PASS", "MISS"}
    assert statuses["restore keys/s"] == "N/A"
    assert "walship / naive" in result.output

    # The CI gate: a floor no run can reach exits 1 (and still writes the JSON).
    failing = [*args, "--sections", "e2e,naive", "--min-ratio", "1000000"]
    result = CliRunner().invoke(main, failing)
    assert result.exit_code == 1
    assert "below --min-ratio" in result.output


@pytest.mark.kafka
def test_bench_other_sections_report_their_shape(tmp_path: Path) -> None:
    config = BenchConfig.quick_config(
        sections=("codec", "latency", "fanout", "bootstrap"),
        work_dir=tmp_path,
        keys=2000,
        codec_entries=2000,
        latency_rate=1000,
        latency_s=2.0,
        latency_warmup_s=0.5,
        fanout_entries=2000,
        fanout_readers=(1, 2),
        snapshot_keys=3000,
    )
    doc = run_bench(config)
    assert doc["codec"]["decode_entries_per_s"] > 0
    lat = doc["latency"]
    assert lat["count"] > 0 and lat["missing"] == 0
    assert 0 < lat["p50_ms"] <= lat["p99_ms"] <= lat["max_ms"]
    assert lat["append_to_kafka_ack"]["count"] > 0
    assert set(doc["fanout"]) >= {"1", "2"}
    assert len(doc["fanout"]["2"]["per_reader"]) == 2
    boot = doc["bootstrap"]
    assert boot["keys"] == 3000 and boot["restored_digest_matches"] is True
    assert boot["restore_keys_per_s"] == pytest.approx(3000 / boot["restore_s"], rel=0.05)
    assert doc["rss"]["reader_backlog_mb"] > 10
