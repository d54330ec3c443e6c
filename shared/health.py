"""Health, readiness and Prometheus metrics over HTTP, for Kubernetes probes.

A deliberately tiny HTTP/1.1 server on ``asyncio.start_server`` (no extra
dependency): GET or HEAD of

- ``/healthz``: 200 when the component works, else 503 (liveness: restart me),
- ``/readyz``: 200 when it should get traffic/be counted, else 503,
- ``/metrics``: Prometheus text from ``prometheus_client``.

Probe bodies are JSON ``{"status": "ok"|"unhealthy"|"ready"|"not ready", "reason": ...}``.
Every response closes the connection; probes and scrapers open one per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from walship.shared.errors import ConfigError
from walship.shared.lifecycle import AsyncService

log = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, str]]

_REQUEST_TIMEOUT_S = 5.0
_HEADERS_MAX = 100
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def _always_ok() -> tuple[bool, str]:
    return True, "ok"


class HealthServer(AsyncService):
    """Serve /healthz, /readyz and /metrics; ``port=0`` picks a free port (see ``.port``)."""

    def __init__(
        self,
        port: int,
        host: str = "0.0.0.0",
        *,
        health: Check = _always_ok,
        ready: Check = _always_ok,
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self._requested_port = port
        self.host = host
        self._health = health
        self._ready = ready
        self._registry = registry
        self._server: asyncio.Server | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The port actually listened on (known after ``start()``)."""
        if self._port is None:
            raise RuntimeError("HealthServer.port is known only after start()")
        return self._port

    async def start(self) -> None:
        if self._server is not None:
            return
        try:
            self._server = await asyncio.start_server(self._handle, self.host, self._requested_port)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve health and metrics: {exc.strerror or exc}",
                host=self.host,
                port=self._requested_port,
            ) from exc
        self._port = self._server.sockets[0].getsockname()[1]
        log.info("health and metrics on http://%s:%d", self.host, self._port)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        await server.wait_closed()

    # -- request handling ---------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(_REQUEST_TIMEOUT_S):
                    method, path = await self._read_request(reader)
            except TimeoutError:
                await self._respond(writer, 408, b"request timeout\n", "text/plain", head=False)
                return
            except ValueError as exc:
                await self._respond(writer, 400, f"{exc}\n".encode(), "text/plain", head=False)
                return
            status, body, content_type = self._route(method, path)
            await self._respond(writer, status, body, content_type, head=method == "HEAD")
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    @staticmethod
    async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str]:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            raise ValueError("request line too long") from None
        parts = line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            raise ValueError("malformed request line")
        for _ in range(_HEADERS_MAX):
            try:
                header = await reader.readuntil(b"\n")
            except asyncio.LimitOverrunError:
                raise ValueError("header too long") from None
            if header in (b"\r\n", b"\n"):
                return parts[0].upper(), parts[1].split("?", 1)[0]
        raise ValueError("too many headers")

    def _route(self, method: str, path: str) -> tuple[int, bytes, str]:
        if path not in ("/healthz", "/readyz", "/metrics"):
            return 404, b"not found; try /healthz, /readyz or /metrics\n", "text/plain"
        if method not in ("GET", "HEAD"):
            return 405, b"only GET and HEAD\n", "text/plain"
        if path == "/metrics":
            try:
                return 200, generate_latest(self._registry), CONTENT_TYPE_LATEST
            except Exception:
                log.exception("collecting metrics failed")
                return 500, b"collecting metrics failed\n", "text/plain"
        check, good, bad = (
            (self._health, "ok", "unhealthy")
            if path == "/healthz"
            else (self._ready, "ready", "not ready")
        )
        try:
            passed, reason = check()
        except Exception as exc:
            # A failing check is itself a reason to report unhealthy/not ready.
            log.exception("%s check failed", path)
            passed, reason = False, f"check failed: {type(exc).__name__}: {exc}"
        body = json.dumps({"status": good if passed else bad, "reason": reason}).encode() + b"\n"
        return (200 if passed else 503), body, "application/json"

    @staticmethod
    async def _respond(
        writer: asyncio.StreamWriter, status: int, body: bytes, content_type: str, *, head: bool
    ) -> None:
        header = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\n"
            "Connection: close\r\n\r\n"
        ).encode("latin-1")
        writer.write(header if head else header + body)
        await writer.drain()
