"""The health server answers real HTTP requests."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter
from walship.shared.errors import ConfigError
from walship.shared.health import HealthServer


def _get(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), err.read()


async def fetch(
    server: HealthServer, path: str, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    return await asyncio.to_thread(_get, f"http://127.0.0.1:{server.port}{path}", method)


async def test_probes_follow_the_checks() -> None:
    state = {"healthy": True, "ready": False}
    server = HealthServer(
        0,
        "127.0.0.1",
        health=lambda: (state["healthy"], "ok" if state["healthy"] else "stream stopped at seq 42"),
        ready=lambda: (state["ready"], "lag 0" if state["ready"] else "lag 5000 > 1000"),
    )
    async with server:
        assert server.port > 0
        status, headers, body = await fetch(server, "/healthz")
        assert status == 200 and headers["Content-Type"] == "application/json"
        assert json.loads(body) == {"status": "ok", "reason": "ok"}
        status, _, body = await fetch(server, "/readyz")
        assert status == 503 and json.loads(body) == {
            "status": "not ready",
            "reason": "lag 5000 > 1000",
        }
        state.update(healthy=False, ready=True)
        status, _, body = await fetch(server, "/healthz?verbose=1")
        assert status == 503 and json.loads(body)["reason"] == "stream stopped at seq 42"
        status, _, _ = await fetch(server, "/readyz")
        assert status == 200
        status, headers, body = await fetch(server, "/readyz", "HEAD")
        assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0


async def test_metrics_and_errors() -> None:
    registry = CollectorRegistry()
    Counter("walship_probe_hits", "hits", registry=registry).inc(7)

    def broken() -> tuple[bool, str]:
        raise RuntimeError("replica file vanished")

    async with HealthServer(0, "127.0.0.1", health=broken, registry=registry) as server:
        status, headers, body = await fetch(server, "/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        assert b"walship_probe_hits_total 7.0" in body
        status, _, body = await fetch(server, "/healthz")
        assert status == 503 and "replica file vanished" in json.loads(body)["reason"]
        assert (await fetch(server, "/nope"))[0] == 404
        assert (await fetch(server, "/healthz", "POST"))[0] == 405


async def test_malformed_and_silent_clients_do_not_hang_the_server() -> None:
    async with HealthServer(0, "127.0.0.1") as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"garbage\r\n\r\n")
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), 5)
        assert response.startswith(b"HTTP/1.1 400 ")
        writer.close()
        # A client that connects and leaves without a request.
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.close()
        assert (await fetch(server, "/healthz"))[0] == 200


async def test_start_stop_idempotent_and_port_in_use() -> None:
    server = HealthServer(0, "127.0.0.1")
    with pytest.raises(RuntimeError):
        _ = server.port
    await server.start()
    await server.start()
    port = server.port
    with pytest.raises(ConfigError, match="cannot serve"):
        await HealthServer(port, "127.0.0.1").start()
    await server.stop()
    await server.stop()
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", port))
