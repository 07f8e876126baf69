"""The HTTP surface against an unlucky operator and a hostile client: no open API off loopback by
accident, no unbounded request body, /metrics behind the token when asked."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from cli_runner import run_cli

from cegraph.connectors.http.api import create_app
from cegraph.daemon.demo.process import free_port
from cegraph.daemon.settings import ConfigError, is_loopback, load_settings

TOKEN = "t0ken"


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.0.0.53", True), ("::1", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("10.0.0.7", False), ("cegraph.internal", False),
])  # fmt: skip
def test_which_addresses_count_as_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_a_non_loopback_address_without_a_token_is_refused_naming_both_settings(monkeypatch):
    monkeypatch.setenv("CEGRAPH_HTTP__HOST", "0.0.0.0")
    with pytest.raises(ConfigError) as raised:
        load_settings()
    assert "CEGRAPH_HTTP__HOST" in str(raised.value) and "CEGRAPH_HTTP__TOKEN" in str(raised.value)
    monkeypatch.setenv("CEGRAPH_HTTP__TOKEN", TOKEN)
    assert load_settings().http.host == "0.0.0.0"


def test_the_override_serves_open_with_a_warning(tmp_path):
    env = {"CEGRAPH_HTTP__HOST": "0.0.0.0", "CEGRAPH_HTTP__ALLOW_UNAUTHENTICATED": "true"}
    assert load_settings(**{"http": {"host": "0.0.0.0", "allow_unauthenticated": True}}).http.token is None
    refused = run_cli("run", env={"CEGRAPH_HTTP__HOST": "0.0.0.0"}, cwd=tmp_path)
    assert refused.returncode == 2
    assert "CEGRAPH_HTTP__TOKEN" in refused.stderr and "Traceback" not in refused.stderr
    allowed = run_cli("config", env=env, cwd=tmp_path)
    assert allowed.returncode == 0, allowed.stderr


def test_metrics_need_the_token_only_when_asked(monkeypatch):
    monkeypatch.setenv("CEGRAPH_HTTP__METRICS_NEED_TOKEN", "true")
    with pytest.raises(ConfigError, match="CEGRAPH_HTTP__METRICS_NEED_TOKEN"):
        load_settings()


async def _ready() -> dict[str, bool]:
    return {"store": True}


class Recorder:
    def __init__(self) -> None:
        self.bodies: list[int] = []

    async def __call__(self, request) -> dict:
        body = await request.body()
        self.bodies.append(len(body))
        return {"received": len(body)}


def app_with(recorder: Recorder, **options):
    return create_app(ready=_ready, write_routes=[("/things", recorder)], token=TOKEN, **options)


@pytest.fixture
def served() -> Iterator[tuple[int, Recorder]]:
    """A real uvicorn server on 127.0.0.1, so the limit is seen on a socket, before the body is sent."""
    recorder = Recorder()
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app_with(recorder, max_body_bytes=1 << 20), host="127.0.0.1", port=port,
                       log_level="warning", lifespan="off")
    )  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(1_000):
        if server.started:
            break
        threading.Event().wait(0.02)
    yield port, recorder
    server.should_exit = True
    thread.join(timeout=30)


def test_a_declared_200_mb_body_is_refused_before_a_byte_of_it_is_sent(served):
    port, recorder = served
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            b"POST /things HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 200000000\r\n\r\n"
        )  # fmt: skip
        reply = b""
        while chunk := sock.recv(4096):  # until the server closes: headers and body may come apart
            reply += chunk
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 413"), reply
    assert "CEGRAPH_HTTP__MAX_BODY_BYTES" in reply
    assert recorder.bodies == []


def test_a_streamed_body_is_cut_off_at_the_limit(served):
    port, recorder = served

    def chunks():
        for _ in range(64):
            yield b"x" * (64 << 10)  # 4 MiB in all, no Content-Length

    response = httpx.post(
        f"http://127.0.0.1:{port}/things", content=chunks(), headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=60,
    )  # fmt: skip
    assert response.status_code == 413
    assert recorder.bodies == []


def test_a_body_under_the_limit_reaches_the_endpoint(served):
    port, recorder = served
    response = httpx.post(
        f"http://127.0.0.1:{port}/things", content=b"y" * 1000, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert response.status_code == 200 and response.json() == {"received": 1000}
    assert recorder.bodies == [1000]


async def test_metrics_behind_the_token():
    open_app = app_with(Recorder())
    closed_app = app_with(Recorder(), metrics_need_token=True)
    for app, status in ((open_app, 200), (closed_app, 401)):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://c") as client:
            assert (await client.get("/metrics")).status_code == status
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=closed_app), base_url="http://c",
        headers={"Authorization": f"Bearer {TOKEN}"},
    ) as client:  # fmt: skip
        assert (await client.get("/metrics")).status_code == 200
