"""The bench report: figures beside their targets (pure), a rich table and the JSON file."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rich.table import Table

Better = Literal["higher", "lower"]

# Targets on the reference 2-core machine (the numbers).
E2E_ENTRIES_PER_S_MIN = 150_000
RATIO_VS_NAIVE_MIN = 10.0
DECODE_ENTRIES_PER_S_MIN = 1_000_000
LATENCY_P99_MS_MAX = 50.0
RESTORE_KEYS_PER_S_MIN = 200_000  # 1,000,000 keys in <= 5 s
READER_RSS_MB_MAX = 256.0


@dataclass(frozen=True)
class Check:
    section: str
    name: str
    value: float | None  # None: the section did not run
    target: float
    better: Better
    unit: str

    @property
    def status(self) -> str:
        if self.value is None:
            return "N/A"
        ok = self.value >= self.target if self.better == "higher" else self.value <= self.target
        return "PASS" if ok else "MISS"

    def to_json(self) -> dict[str, Any]:
        return {
            "section": self.section,
            "name": self.name,
            "value": self.value,
            "target": self.target,
            "better": self.better,
            "unit": self.unit,
            "status": self.status,
        }


def _get(results: Mapping[str, Any], *path: str) -> float | None:
    node: Any = results
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return float(node) if isinstance(node, int | float) else None


def checks_for(results: Mapping[str, Any]) -> list[Check]:
    """The issue's targets, each with the measured figure (or None when not run)."""
    reader_rss = [
        v
        for v in (_get(results, "rss", "reader_mb"), _get(results, "rss", "reader_backlog_mb"))
        if v is not None
    ]
    return [
        Check(
            "end_to_end",
            "entries/s",
            _get(results, "end_to_end", "entries_per_s"),
            E2E_ENTRIES_PER_S_MIN,
            "higher",
            "entries/s",
        ),
        Check(
            "naive",
            "walship / naive",
            _get(results, "naive", "ratio"),
            RATIO_VS_NAIVE_MIN,
            "higher",
            "x",
        ),
        Check(
            "codec",
            "decode entries/s (1 core)",
            _get(results, "codec", "decode_entries_per_s"),
            DECODE_ENTRIES_PER_S_MIN,
            "higher",
            "entries/s",
        ),
        Check(
            "latency",
            "p99 append -> apply",
            _get(results, "latency", "p99_ms"),
            LATENCY_P99_MS_MAX,
            "lower",
            "ms",
        ),
        Check(
            "bootstrap",
            "restore keys/s",
            _get(results, "bootstrap", "restore_keys_per_s"),
            RESTORE_KEYS_PER_S_MIN,
            "higher",
            "keys/s",
        ),
        Check(
            "rss",
            "reader peak RSS",
            max(reader_rss) if reader_rss else None,
            READER_RSS_MB_MAX,
            "lower",
            "MB",
        ),
    ]


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}"
    return str(value)


# What each section shows in the table: (label, path inside the section).
ROWS: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "end_to_end": [
        ("entries", ("entries",)),
        ("entries/s", ("entries_per_s",)),
        ("MB/s (key+value)", ("mb_per_s",)),
        ("writer entries/s", ("writer_entries_per_s",)),
        ("publisher entries/s", ("publisher_entries_per_s",)),
        ("Kafka messages", ("messages",)),
        ("wire MB", ("wire_mb",)),
    ],
    "naive": [
        ("entries", ("entries",)),
        ("entries/s", ("entries_per_s",)),
        ("MB/s (key+value)", ("mb_per_s",)),
        ("walship / naive", ("ratio",)),
    ],
    "transport": [
        ("messages", ("messages",)),
        ("wire MB/s", ("mb_per_s",)),
        ("as entries/s", ("entries_per_s",)),
        ("walship share of ceiling", ("walship_share",)),
    ],
    "codec": [
        ("encode entries/s (1 core)", ("encode_entries_per_s",)),
        ("decode entries/s (1 core)", ("decode_entries_per_s",)),
        ("decode MB/s", ("decode_mb_per_s",)),
    ],
    "latency": [
        ("offered entries/s", ("offered_entries_per_s",)),
        ("transactions measured", ("count",)),
        ("p50 ms", ("p50_ms",)),
        ("p99 ms", ("p99_ms",)),
        ("max ms", ("max_ms",)),
    ],
    "bootstrap": [
        ("keys", ("keys",)),
        ("create s", ("create_s",)),
        ("create keys/s", ("create_keys_per_s",)),
        ("create MB/s", ("create_mb_per_s",)),
        ("restore s", ("restore_s",)),
        ("restore keys/s", ("restore_keys_per_s",)),
        ("restore MB/s", ("restore_mb_per_s",)),
    ],
    "fanout": [],  # one row per reader count that ran (see _fanout_rows)
    "rss": [
        ("writer MB", ("writer_mb",)),
        ("publisher MB", ("publisher_mb",)),
        ("reader MB (live)", ("reader_mb",)),
        ("reader MB (backlog)", ("reader_backlog_mb",)),
    ],
}


def table_rows(
    results: Mapping[str, Any], checks: Sequence[Check]
) -> list[tuple[str, str, str, str, str]]:
    """(section, figure, value, target, status) rows, in report order.

    A row whose figure has a target is judged on its own value (the reader's
    RSS appears twice, live and on a backlog, each against the same target).
    """
    rows: list[tuple[str, str, str, str, str]] = []
    for section, specs in ROWS.items():
        data = results.get(section)
        if not isinstance(data, Mapping):
            continue
        if section == "fanout":
            rows.extend(_fanout_rows(data))
            continue
        for label, path in specs:
            node: Any = data
            for part in path:
                node = node.get(part) if isinstance(node, Mapping) else None
            if node is None:  # not measured in this run (a check without value shows below)
                continue
            check = _check_for_row(checks, section, path)
            if check is None:
                rows.append((section, label, _fmt(node), "", ""))
                continue
            value = float(node) if isinstance(node, int | float) else None
            judged = Check(section, label, value, check.target, check.better, check.unit)
            rows.append((section, label, _fmt(node), _target(check), judged.status))
    for c in checks:  # targets that were not measured still show up, as N/A
        if c.value is None:
            rows.append((c.section, c.name, "-", _target(c), c.status))
    return rows


def _target(check: Check) -> str:
    return f"{'>=' if check.better == 'higher' else '<='} {_fmt(check.target)} {check.unit}"


def _fanout_rows(data: Mapping[str, Any]) -> list[tuple[str, str, str, str, str]]:
    rows = []
    for n in sorted((k for k in data if k.isdigit()), key=int):
        run = data[n]
        label = f"{n} reader(s): entries/s per reader / total"
        value = (
            f"{_fmt(run.get('per_reader_entries_per_s'))} / {_fmt(run.get('total_entries_per_s'))}"
        )
        rows.append(("fanout", label, value, "", ""))
    return rows


_CHECKED_FIELDS: dict[tuple[str, str], str] = {
    ("end_to_end", "entries_per_s"): "entries/s",
    ("naive", "ratio"): "walship / naive",
    ("codec", "decode_entries_per_s"): "decode entries/s (1 core)",
    ("latency", "p99_ms"): "p99 append -> apply",
    ("bootstrap", "restore_keys_per_s"): "restore keys/s",
    ("rss", "reader_mb"): "reader peak RSS",
    ("rss", "reader_backlog_mb"): "reader peak RSS",
}


def _check_for_row(checks: Sequence[Check], section: str, path: tuple[str, ...]) -> Check | None:
    name = _CHECKED_FIELDS.get((section, path[-1]))
    if name is None:
        return None
    return next((c for c in checks if c.section == section and c.name == name), None)


def render_table(results: Mapping[str, Any], checks: Sequence[Check], title: str) -> Table:
    table = Table(title=title)
    for column, justify in (
        ("section", "left"),
        ("figure", "left"),
        ("value", "right"),
        ("target", "right"),
        ("", "center"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    styles = {"PASS": "[green]PASS[/]", "MISS": "[red]MISS[/]", "N/A": "[yellow]N/A[/]"}
    for section, label, value, target, status in table_rows(results, checks):
        table.add_row(section, label, value, target, styles.get(status, status))
    return table


def write_json(path: Path, results: Mapping[str, Any], checks: Sequence[Check]) -> None:
    doc = dict(results)
    doc["checks"] = [c.to_json() for c in checks]
    path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
