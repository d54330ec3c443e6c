"""One trace per batch: the writer's append, the publish and every reader's apply.

The main test runs the real commands as separate processes (``walship writer
load``, ``walship producer run`` and two ``walship consumer run``) exporting
OTLP/HTTP to a small receiver in this process, and follows each Kafka message
from the append span through the publish span to both readers' apply spans.
An in-process variant checks the same chain with an in-memory exporter.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from walship.consumer import Replica
from walship.shared.telemetry import setup_telemetry, traceparent_of_current

ENTRIES = 300
TXN_ENTRIES = 10
# Small messages: a few transactions each, spread over all partitions.
MESSAGE_BYTES_MAX = 4096
# OTLP's span kinds (opentelemetry/proto/trace/v1/trace.proto).
_OTLP_KIND = {4: SpanKind.PRODUCER, 5: SpanKind.CONSUMER, 1: SpanKind.INTERNAL}


@dataclass(frozen=True)
class Span:
    """A finished span, from OTLP or the SDK, with ids as hex strings."""

    service: str
    instance: str | None
    name: str
    kind: SpanKind
    trace_id: str
    span_id: str
    parent_id: str | None
    attributes: dict[str, Any]
    links: tuple[tuple[str, str], ...]  # (trace id, span id)

    def attr(self, name: str) -> Any:
        assert name in self.attributes, f"{self.name} span lacks {name}: {self.attributes}"
        return self.attributes[name]


def _value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    return getattr(v, which) if which else None


def _attrs(kvs: Sequence[KeyValue]) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


def spans_of_request(request: ExportTraceServiceRequest) -> list[Span]:
    out: list[Span] = []
    for resource_spans in request.resource_spans:
        resource = _attrs(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                out.append(
                    Span(
                        service=str(resource.get("service.name")),
                        instance=resource.get("service.instance.id"),
                        name=s.name,
                        kind=_OTLP_KIND.get(s.kind, SpanKind.INTERNAL),
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_id=s.parent_span_id.hex() or None,
                        attributes=_attrs(s.attributes),
                        links=tuple((lk.trace_id.hex(), lk.span_id.hex()) for lk in s.links),
                    )
                )
    return out


def span_of_sdk(s: ReadableSpan) -> Span:
    ctx = s.get_span_context()
    assert ctx is not None
    return Span(
        service=str(s.resource.attributes.get("service.name")),
        instance=None,
        name=s.name,
        kind=s.kind,
        trace_id=f"{ctx.trace_id:032x}",
        span_id=f"{ctx.span_id:016x}",
        parent_id=f"{s.parent.span_id:016x}" if s.parent is not None else None,
        attributes=dict(s.attributes or {}),
        links=tuple(
            (f"{lk.context.trace_id:032x}", f"{lk.context.span_id:016x}") for lk in s.links
        ),
    )


class OtlpReceiver:
    """An OTLP/HTTP (protobuf) trace endpoint on loopback that keeps what it receives."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path == "/v1/traces":
                    request = ExportTraceServiceRequest()
                    request.ParseFromString(body)
                    with receiver.lock:
                        receiver.spans.extend(spans_of_request(request))
                    reply = ExportTraceServiceResponse().SerializeToString()
                else:
                    reply = b""
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def received(self) -> list[Span]:
        with self.lock:
            return list(self.spans)

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


# --- the checks, shared by both variants ------------------------------------------


def check_batch_traces(spans: Sequence[Span], last_seq: int, reader_ids: Sequence[str]) -> int:
    """Every published message is one trace: append -> publish -> one apply per reader.

    Returns the number of messages (traces) verified.
    """
    appends = [s for s in spans if s.name == "walship.append"]
    publishes = sorted(
        (s for s in spans if s.name == "walship.publish"), key=lambda s: s.attr("walship.first_seq")
    )
    applies = [s for s in spans if s.name == "walship.apply"]
    by_id = {s.span_id: s for s in spans}
    assert len(appends) == last_seq // TXN_ENTRIES
    assert len(publishes) > 1, "expected several messages"

    # The messages carry every sequence exactly once (no faults: nothing is resent).
    expected_first = 1
    for p in publishes:
        assert p.kind is SpanKind.PRODUCER
        first, last = p.attr("walship.first_seq"), p.attr("walship.last_seq")
        assert first == expected_first
        assert p.attr("walship.entries") == last - first + 1
        assert 0 < p.attr("walship.bytes") <= MESSAGE_BYTES_MAX
        assert p.attr("walship.body_bytes") >= p.attr("walship.bytes") // 2
        assert p.attr("walship.offset") >= 0 and p.attr("walship.partition") >= 0
        expected_first = last + 1
    assert expected_first == last_seq + 1

    linked = {span_id for p in publishes for _trace, span_id in p.links}
    parents = {p.parent_id for p in publishes}
    for a in appends:
        assert a.parent_id is None, "load generator appends start their own traces"
        assert a.attr("walship.last_seq") - a.attr("walship.first_seq") + 1 == TXN_ENTRIES
        assert a.attr("walship.entries") == TXN_ENTRIES and a.attr("walship.bytes") > 0
        # Each append is the parent of its message's span, or linked from it.
        assert a.span_id in parents or a.span_id in linked

    for p in publishes:
        # The publish span continues the trace of its message's first append.
        append = by_id[p.parent_id] if p.parent_id else None
        assert append is not None and append.name == "walship.append"
        assert append.trace_id == p.trace_id
        assert append.attr("walship.first_seq") == p.attr("walship.first_seq")
        children = [a for a in applies if a.parent_id == p.span_id]
        assert sorted(a.attr("walship.reader_id") for a in children) == sorted(reader_ids), (
            f"message {p.attributes}: apply spans {[a.attributes for a in children]}"
        )
        for a in children:
            assert a.trace_id == p.trace_id
            assert a.kind is SpanKind.CONSUMER
            for name in ("walship.first_seq", "walship.last_seq", "walship.entries"):
                assert a.attr(name) == p.attr(name), name
            assert a.attr("walship.partition") == p.attr("walship.partition")
            assert a.attr("walship.offset") == p.attr("walship.offset")
            assert a.attr("messaging.kafka.offset") == p.attr("walship.offset")
    # No apply span is orphaned: each belongs to one publish span.
    assert len(applies) == len(publishes) * len(reader_ids)
    return len(publishes)


# --- across processes ----------------------------------------------------------------


def _env(receiver: OtlpReceiver, instance: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "WALSHIP_"))}
    env.update(
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
        OTEL_METRICS_EXPORTER="none",
        OTEL_BSP_SCHEDULE_DELAY="100",
        WALSHIP_LOG_LEVEL="warning",
    )
    if instance:
        env["OTEL_RESOURCE_ATTRIBUTES"] = f"service.instance.id={instance}"
    env.update(extra)
    return env


def _walship(*args: str) -> list[str]:
    return [sys.executable, "-m", "walship.shared.cli.main", *args]


def _run(args: list[str], env: dict[str, str], timeout_s: float = 60) -> None:
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, f"{args[3:5]} exited {done.returncode}: {done.stderr}"


def _wait_applied(path: Path, seq: int, proc: subprocess.Popen[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"reader exited early: {proc.communicate()[1]}"
        if path.exists():
            with Replica(path) as replica:
                if replica.applied_seq >= seq:
                    return
        time.sleep(0.1)
    raise AssertionError(f"{path} did not reach seq {seq} in {timeout_s} s")


@pytest.mark.kafka
def test_one_trace_per_message_across_processes(
    kafka_bootstrap: str, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    topic = new_topic(3)
    kafka = ["--bootstrap-servers", kafka_bootstrap, "--topic", topic]
    writer_dir = tmp_path / "writer"
    with OtlpReceiver() as receiver:
        _run(
            _walship(
                "writer", "load", "--data-dir", str(writer_dir), "--entries", str(ENTRIES),
                "--txn-entries", str(TXN_ENTRIES), "--keys", "50", "--json",
            ),
            _env(receiver, "writer"),
        )  # fmt: skip
        _run(
            _walship(
                "producer", "run", *kafka, "--partitions", "3", "--data-dir", str(writer_dir),
                "--until-caught-up",
            ),
            _env(
                receiver,
                "producer",
                WALSHIP_PRODUCER__MESSAGE_BYTES_MAX=str(MESSAGE_BYTES_MAX),
            ),
        )  # fmt: skip
        reader_cmd = ["consumer", "run", *kafka]
        # r1 exits on its own; r2 runs until SIGTERM with an export delay far beyond
        # the test, so its spans arrive only if the SIGTERM path flushes telemetry.
        r1 = subprocess.Popen(
            _walship(
                *reader_cmd, "--data-dir", str(tmp_path / "r1"), "--reader-id", "r1",
                "--until-seq", str(ENTRIES),
            ),
            env=_env(receiver, ""), stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        r2 = subprocess.Popen(
            _walship(*reader_cmd, "--data-dir", str(tmp_path / "r2"), "--reader-id", "r2"),
            env=_env(receiver, "", OTEL_BSP_SCHEDULE_DELAY="600000"),
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            _wait_applied(tmp_path / "r2" / "state.db", ENTRIES, r2, timeout_s=60)
            r2.send_signal(signal.SIGTERM)
            assert r2.wait(timeout=30) == 0, r2.communicate()[1]
            assert r1.wait(timeout=60) == 0, r1.communicate()[1]
        finally:
            for proc in (r1, r2):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        spans = receiver.received()

    services = {s.name: s.service for s in spans}
    assert services == {
        "walship.append": "walship-writer",
        "walship.publish": "walship-producer",
        "walship.apply": "walship-reader",
    }
    # Readers name themselves: service.instance.id is the reader id, unasked.
    for s in spans:
        if s.name == "walship.apply":
            assert s.instance == s.attr("walship.reader_id")
    assert check_batch_traces(spans, ENTRIES, ["r1", "r2"]) >= 3


# --- in one process, with the SDK's in-memory exporter --------------------------------


@pytest.fixture
def memory_spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    processor = SimpleSpanProcessor(exporter)
    setup_telemetry("walship-test").tracer_provider.add_span_processor(processor)
    yield exporter
    # The provider keeps its processors; a shut-down exporter just drops spans.
    exporter.shutdown()


async def test_append_span_is_a_child_of_the_callers_trace(
    memory_spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    from walship.producer.wal import WalReader
    from walship.producer.writer import Writer
    from walship.shared.model import Op

    tracer = setup_telemetry("walship-test").tracer("test")
    async with Writer(tmp_path) as writer:
        with tracer.start_as_current_span("request") as request:
            caller = traceparent_of_current()
        # The caller's context travels as a string, like a request header would.
        txn = await writer.append([(Op.PUT, b"k", b"v")], traceparent=caller)
        untraced = await writer.append([(Op.PUT, b"k2", b"v2")])
    spans = {
        s.attributes["walship.first_seq"]: s
        for s in memory_spans.get_finished_spans()
        if s.name == "walship.append" and s.attributes
    }
    child = spans[txn.first_seq]
    assert child.parent is not None and child.parent.span_id == request.get_span_context().span_id
    assert child.context is not None
    assert child.context.trace_id == request.get_span_context().trace_id
    root = spans[untraced.first_seq]
    assert root.parent is None
    with WalReader(tmp_path / "wal") as reader:
        stored = [tp for _txn, tp in reader.read_from(1, max_bytes=1 << 20)]
    # The WAL holds the append spans' own contexts, which the publisher continues.
    for tp, span in zip(stored, (child, root), strict=True):
        assert span.context is not None
        sc = span.context
        assert tp == f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{sc.trace_flags:02x}"


@pytest.mark.kafka
async def test_one_trace_per_message_in_process(
    memory_spans: InMemorySpanExporter,
    kafka_bootstrap: str,
    new_topic: Callable[..., str],
    tmp_path: Path,
) -> None:
    from walship.consumer.applier import SqliteApplier
    from walship.consumer.reader import Reader
    from walship.producer.loadgen import run_load
    from walship.producer.publisher import Publisher
    from walship.producer.writer import Writer

    topic = new_topic(3)
    data_dir = tmp_path / "writer"
    async with Writer(data_dir) as writer:
        await run_load(writer, entries=ENTRIES, txn_entries=TXN_ENTRIES, keys=50, seed=3)
    async with Publisher(
        data_dir,
        topic=topic,
        partitions=3,
        producer_kwargs={"bootstrap_servers": kafka_bootstrap},
        message_bytes_max=MESSAGE_BYTES_MAX,
    ) as publisher:
        await asyncio.wait_for(publisher.run(until_caught_up=True), 60)

    async def read(reader_id: str) -> None:
        async with Reader(
            SqliteApplier(tmp_path / f"{reader_id}.db"),
            topic=topic,
            reader_id=reader_id,
            client_kwargs={"bootstrap_servers": kafka_bootstrap},
        ) as reader:
            await asyncio.wait_for(reader.run(until_seq=ENTRIES), 60)

    await asyncio.gather(read("a"), read("b"))
    finished = [span_of_sdk(s) for s in memory_spans.get_finished_spans()]
    assert check_batch_traces(finished, ENTRIES, ["a", "b"]) >= 3
