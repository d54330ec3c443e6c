"""OpenTelemetry setup and W3C trace context in Kafka headers.

``setup_telemetry`` is configured the standard way, by OTEL_* variables:

- Traces: ``OTEL_TRACES_EXPORTER`` (``otlp``, ``console``, ``none``; comma list).
  Unset, it is ``otlp`` when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
  ``..._TRACES_ENDPOINT``) is set and ``none`` otherwise, so a plain run prints
  nothing. OTLP uses the http/protobuf exporter (the ``otlp`` extra), which
  reads the endpoint, headers and timeouts from the usual variables itself.
- Metrics: always a Prometheus reader (served at /metrics by the health
  server); plus OTLP or console per ``OTEL_METRICS_EXPORTER``, defaulting like
  traces.
- ``OTEL_SERVICE_NAME`` wins over the service name passed in (operators rename
  services without code changes); ``OTEL_RESOURCE_ATTRIBUTES``,
  ``OTEL_TRACES_SAMPLER`` and ``OTEL_PROPAGATORS`` are honoured by the SDK.

A batch's trace follows it through Kafka in its message headers
(``inject_headers`` / ``extract_context``) and through the WAL as a traceparent
string (``traceparent_of_current`` / ``context_from_traceparent``).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from walship.shared.errors import ConfigError

log = logging.getLogger(__name__)

TRACEPARENT = "traceparent"
_W3C = TraceContextTextMapPropagator()
_HTTP_PROTOBUF = "http/protobuf"


@dataclass
class Telemetry:
    """The process's providers. ``exporters`` names what is configured (for logs)."""

    service_name: str
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    exporters: list[str] = field(default_factory=list)
    _shut_down: bool = False

    def tracer(self, name: str) -> trace.Tracer:
        return self.tracer_provider.get_tracer(name)

    def meter(self, name: str) -> metrics.Meter:
        return self.meter_provider.get_meter(name)

    def flush(self) -> None:
        """Export what is buffered now (a service calls this when it stops)."""
        if not self._shut_down:
            self.tracer_provider.force_flush()
            self.meter_provider.force_flush()

    def shutdown(self) -> None:
        """Flush and stop exporters (idempotent). Telemetry is not set up again after.

        Runs at interpreter exit. A command that ends calls :meth:`flush`
        instead, so another command in the same process (an embedding
        application, a test) still records spans and metrics.
        """
        if self._shut_down:
            return
        self._shut_down = True
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


_lock = threading.Lock()
_telemetry: Telemetry | None = None


def _exporter_names(kind: str) -> list[str]:
    """Exporters requested for ``kind`` ("traces" or "metrics") by OTEL_* variables."""
    explicit = os.environ.get(f"OTEL_{kind.upper()}_EXPORTER", "").strip()
    if explicit:
        names = [n.strip().lower() for n in explicit.split(",") if n.strip()]
    elif os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        f"OTEL_EXPORTER_OTLP_{kind.upper()}_ENDPOINT"
    ):
        names = ["otlp"]
    else:
        names = []
    allowed = {"otlp", "console", "none"} | ({"prometheus"} if kind == "metrics" else set())
    for name in names:
        if name not in allowed:
            raise ConfigError(
                f"OTEL_{kind.upper()}_EXPORTER={explicit!r}: walship supports "
                f"{', '.join(sorted(allowed))}"
            )
    return [n for n in names if n not in ("none", "prometheus")]


def _check_protocol(kind: str) -> None:
    for var in (f"OTEL_EXPORTER_OTLP_{kind.upper()}_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        value = os.environ.get(var, "").strip()
        if value:
            if value != _HTTP_PROTOBUF:
                raise ConfigError(
                    f"{var}={value!r}: walship exports OTLP over http/protobuf "
                    "(usually port 4318); set it to http/protobuf"
                )
            return


def _otlp_span_exporter() -> SpanExporter:
    _check_protocol("traces")
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise ConfigError(
            "OTLP trace export is configured but its exporter is not installed "
            "(pip install 'walship[otlp]')"
        ) from exc
    exporter: SpanExporter = OTLPSpanExporter()
    return exporter


def _otlp_metric_reader() -> MetricReader:
    _check_protocol("metrics")
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    except ImportError as exc:
        raise ConfigError(
            "OTLP metric export is configured but its exporter is not installed "
            "(pip install 'walship[otlp]')"
        ) from exc
    return PeriodicExportingMetricReader(OTLPMetricExporter())


def _resource(service_name: str, instance_id: str | None) -> Resource:
    attributes: dict[str, Any] = {
        SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME") or service_name,
    }
    if instance_id:
        # Tells apart the readers of one stream in a trace (they share service.name).
        attributes["service.instance.id"] = instance_id
    with contextlib.suppress(PackageNotFoundError):
        attributes[SERVICE_VERSION] = version("walship")
    return Resource.create(attributes)


def setup_telemetry(service_name: str, *, instance_id: str | None = None) -> Telemetry:
    """Configure tracing and metrics once per process; later calls return the same.

    Raises ConfigError for OTEL_* settings walship cannot honour.
    """
    global _telemetry
    with _lock:
        if _telemetry is not None:
            if _telemetry.service_name != service_name:
                log.debug(
                    "telemetry already set up as %r; ignoring %r",
                    _telemetry.service_name,
                    service_name,
                )
            return _telemetry
        # Validate everything before touching global state.
        trace_names = _exporter_names("traces")
        metric_names = _exporter_names("metrics")
        span_exporters: list[tuple[str, SpanExporter]] = []
        for name in trace_names:
            span_exporters.append(
                (name, _otlp_span_exporter() if name == "otlp" else ConsoleSpanExporter())
            )
        from opentelemetry.exporter.prometheus import PrometheusMetricReader

        readers: list[tuple[str, MetricReader]] = [("prometheus", PrometheusMetricReader())]
        for name in metric_names:
            reader = (
                _otlp_metric_reader()
                if name == "otlp"
                else PeriodicExportingMetricReader(ConsoleMetricExporter())
            )
            readers.append((name, reader))

        resource = _resource(service_name, instance_id)
        tracer_provider = TracerProvider(resource=resource)
        for _, exporter in span_exporters:
            tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
        meter_provider = MeterProvider(resource=resource, metric_readers=[r for _, r in readers])
        trace.set_tracer_provider(tracer_provider)
        metrics.set_meter_provider(meter_provider)
        _telemetry = Telemetry(
            service_name=service_name,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            exporters=[f"traces:{n}" for n, _ in span_exporters]
            + [f"metrics:{n}" for n, _ in readers],
        )
        atexit.register(_telemetry.shutdown)
        log.debug("telemetry: %s", ", ".join(_telemetry.exporters))
        return _telemetry


# --- trace context in Kafka headers and WAL records -----------------------------


def inject_headers(ctx: Context | None = None) -> list[tuple[str, bytes]]:
    """Kafka headers carrying ``ctx`` (default: the current context).

    Uses the global propagator (W3C traceparent/tracestate, plus baggage by
    default; see OTEL_PROPAGATORS). Empty when there is no active span.
    """
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=ctx)
    return [(key, value.encode("ascii", "replace")) for key, value in carrier.items()]


def extract_context(headers: Sequence[tuple[str, bytes | None]] | None) -> Context:
    """The trace context carried in Kafka headers (an empty context if none)."""
    carrier: dict[str, str] = {}
    for key, value in headers or ():
        if value is not None:
            # Header names are case-insensitive; the first occurrence wins.
            carrier.setdefault(key.lower(), value.decode("latin-1"))
    return propagate.extract(carrier, context=Context())


def traceparent_of_current() -> str | None:
    """The W3C traceparent of the current span, or None without a valid span."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier, context=otel_context.get_current())
    return carrier.get(TRACEPARENT)


def context_from_traceparent(tp: str | None) -> Context:
    """A context whose remote parent is ``tp`` (empty if ``tp`` is None or invalid)."""
    if not tp:
        return Context()
    return _W3C.extract({TRACEPARENT: tp}, context=Context())
