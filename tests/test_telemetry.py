"""Telemetry: trace context through Kafka headers, OTEL_* configuration, metrics."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import ClassVar

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY, generate_latest
from walship.shared import telemetry as tm
from walship.shared.errors import ConfigError
from walship.shared.telemetry import (
    context_from_traceparent,
    extract_context,
    inject_headers,
    setup_telemetry,
    traceparent_of_current,
)


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    telemetry = setup_telemetry("walship-test")
    exporter = InMemorySpanExporter()
    telemetry.tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()


def test_setup_is_idempotent(spans: InMemorySpanExporter) -> None:
    first = setup_telemetry("walship-test")
    assert setup_telemetry("another-name") is first
    assert "metrics:prometheus" in first.exporters
    assert trace.get_tracer_provider() is first.tracer_provider


def test_kafka_headers_carry_trace_and_parent(spans: InMemorySpanExporter) -> None:
    spans.clear()
    tracer = setup_telemetry("walship-test").tracer("test")
    with tracer.start_as_current_span("publish") as producer_span:
        headers = inject_headers()
    assert all(isinstance(k, str) and isinstance(v, bytes) for k, v in headers)
    assert "traceparent" in dict(headers)
    # A reader in another process sees only the headers.
    with tracer.start_as_current_span("apply", context=extract_context(headers)) as reader_span:
        pass
    sent, received = producer_span.get_span_context(), reader_span.get_span_context()
    assert received.trace_id == sent.trace_id
    finished = {s.name: s for s in spans.get_finished_spans()}
    parent = finished["apply"].parent
    assert parent is not None and parent.span_id == sent.span_id and parent.is_remote


def test_headers_from_an_explicit_context_and_none_without_span(
    spans: InMemorySpanExporter,
) -> None:
    assert inject_headers() == []
    tracer = setup_telemetry("walship-test").tracer("test")
    with tracer.start_as_current_span("append"):
        ctx = trace.set_span_in_context(trace.get_current_span())
    headers = inject_headers(ctx)
    extracted = trace.get_current_span(extract_context(headers)).get_span_context()
    assert extracted.span_id == trace.get_current_span(ctx).get_span_context().span_id


def test_extract_tolerates_foreign_and_broken_headers(spans: InMemorySpanExporter) -> None:
    assert not trace.get_current_span(extract_context([])).get_span_context().is_valid
    assert not trace.get_current_span(extract_context(None)).get_span_context().is_valid
    junk = [("traceparent", b"garbage"), ("other", None), ("x", b"\xff\xfe")]
    assert not trace.get_current_span(extract_context(junk)).get_span_context().is_valid
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    upper = [("TraceParent", tp.encode())]
    span_context = trace.get_current_span(extract_context(upper)).get_span_context()
    assert span_context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C


def test_traceparent_roundtrip_through_wal_string(spans: InMemorySpanExporter) -> None:
    assert traceparent_of_current() is None
    tracer = setup_telemetry("walship-test").tracer("test")
    with tracer.start_as_current_span("append") as span:
        tp = traceparent_of_current()
    assert tp is not None
    sc = span.get_span_context()
    assert tp == f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{sc.trace_flags:02x}"
    parent = trace.get_current_span(context_from_traceparent(tp)).get_span_context()
    assert (parent.trace_id, parent.span_id) == (sc.trace_id, sc.span_id)
    assert not trace.get_current_span(context_from_traceparent("nope")).get_span_context().is_valid
    assert not trace.get_current_span(context_from_traceparent(None)).get_span_context().is_valid


def test_metrics_reach_prometheus(spans: InMemorySpanExporter) -> None:
    counter = (
        setup_telemetry("walship-test")
        .meter("test")
        .create_counter("walship_test_batches", unit="1", description="test counter")
    )
    counter.add(3, {"topic": "t"})
    text = generate_latest(REGISTRY).decode()
    assert "walship_test_batches_total{" in text
    line = next(x for x in text.splitlines() if x.startswith("walship_test_batches_total{"))
    assert 'topic="t"' in line and line.endswith(" 3.0")


@pytest.mark.parametrize(
    ("env", "traces", "metrics"),
    [
        ({}, [], []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, ["otlp"], ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, ["otlp"], []),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"},
            [],
            ["otlp"],
        ),
        (
            {"OTEL_TRACES_EXPORTER": "console,otlp", "OTEL_METRICS_EXPORTER": "prometheus"},
            ["console", "otlp"],
            [],
        ),
    ],
)
def test_exporter_selection(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], traces: list[str], metrics: list[str]
) -> None:
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert tm._exporter_names("traces") == traces
    assert tm._exporter_names("metrics") == metrics


def test_unsupported_otel_settings_are_config_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER"):
        tm._exporter_names("traces")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    with pytest.raises(ConfigError, match="http/protobuf"):
        tm._otlp_span_exporter()


class _Collector(BaseHTTPRequestHandler):
    paths: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        _Collector.paths.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


_CHILD = """
from walship.shared.telemetry import setup_telemetry
t = setup_telemetry("child")
with t.tracer("x").start_as_current_span("s"):
    pass
t.meter("x").create_counter("c").add(1)
t.shutdown()
"""


def _run_child(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return subprocess.run(
        [sys.executable, "-c", _CHILD],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_otlp_export_goes_to_the_configured_endpoint() -> None:
    _Collector.paths = []
    server = HTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        result = _run_child({"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint})
        assert result.returncode == 0, result.stderr
    finally:
        server.shutdown()
        server.server_close()
    assert "/v1/traces" in _Collector.paths and "/v1/metrics" in _Collector.paths


def test_no_exporter_configured_prints_nothing() -> None:
    result = _run_child({})
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
