"""The registry over HTTP (the daemon's Starlette app, called through httpx's ASGI transport) and
`cegraph workflows`, on the DuckDB file and through a running API that holds the file, as the daemon
does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest
import uvicorn
from typer.testing import CliRunner

from cegraph.connectors.http.api import create_app
from cegraph.connectors.http.workflows import workflow_routes
from cegraph.daemon.app import build
from cegraph.daemon.cli.main import app as cli_app
from cegraph.daemon.demo.process import free_port
from cegraph.daemon.settings import Settings, StoreSettings
from cegraph.daemon.store import EventStore
from cegraph.daemon.workflows.registry import WorkflowRegistry
from cegraph.schemas.workflow import example_spec

CEGRAPH = str(Path(sys.executable).parent / "cegraph")
TOKEN = "test-token"
BASE = example_spec("arithmetic").model_dump(mode="json")


def version(spec: dict, new_version: str, temperature: float = 0.55) -> dict:
    data = json.loads(json.dumps(spec))
    data.pop("content_hash")
    data["version"] = new_version
    data["nodes"]["solve"]["params"]["temperature"] = temperature
    return data


async def _ready() -> dict[str, bool]:
    return {"store": True}


def registry_app(store: EventStore, token: str | None = TOKEN):
    routes = workflow_routes(WorkflowRegistry(store))
    return create_app(
        ready=_ready, read_routes=routes.read, write_routes=routes.write, token=token, metrics=False
    )


@pytest.fixture
def store(tmp_path) -> Iterator[EventStore]:
    store = EventStore(tmp_path / "cegraph.duckdb")
    yield store
    store.close()


def asgi_client(app, token: str | None = None) -> httpx.AsyncClient:
    """Requests straight into the ASGI app (no server, no lifespan)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    transport = httpx.ASGITransport(app=app)
    return httpx.AsyncClient(transport=transport, base_url="http://cegraph", headers=headers)


@pytest.fixture
async def client(store) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(registry_app(store), TOKEN) as client:
        yield client


async def test_register_over_http(client):
    created = await client.post("/workflows", json=BASE)
    assert created.status_code == 201
    assert created.json()["created"] is True
    assert created.json()["version"]["content_hash"] == BASE["content_hash"]
    again = await client.post("/workflows", json=BASE)
    assert again.status_code == 200
    assert again.json()["created"] is False
    assert (await client.post("/workflows", json=version(BASE, "1.1.0"))).status_code == 201


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "Invalid JSON"),
        (
            json.dumps({**BASE, "content_hash": None, "output": "ghost"}).encode(),
            "output 'ghost' is not a node",
        ),
        (
            json.dumps(
                {**BASE, "content_hash": None, "edges": [{"source": "solve", "target": "solve"}]}
            ).encode(),
            "cycle through nodes solve -> solve",
        ),
    ],
)
async def test_a_bad_spec_answers_400_with_the_validation_message(client, body, fragment):
    response = await client.post("/workflows", content=body)
    assert response.status_code == 400
    assert fragment in response.json()["error"]


async def test_a_version_that_does_not_increase_or_changes_content_answers_409(client):
    await client.post("/workflows", json=version(BASE, "1.2.0"))
    lower = await client.post("/workflows", json=version(BASE, "1.1.0"))
    assert lower.status_code == 409
    assert "not greater than the latest registered version 1.2.0" in lower.json()["error"]
    changed = await client.post("/workflows", json=version(BASE, "1.2.0", temperature=0.9))
    assert changed.status_code == 409
    assert "already registered with other content" in changed.json()["error"]


async def test_read_routes(client):
    await client.post("/workflows", json=BASE)
    await client.post("/workflows", json=version(BASE, "1.1.0"))
    await client.post("/workflows", json=example_spec("qa").model_dump(mode="json"))
    everything = (await client.get("/workflows")).json()
    assert [(v["workflow_id"], v["version"], v["executions"]) for v in everything] == [
        ("arithmetic", "1.0.0", 0), ("arithmetic", "1.1.0", 0), ("qa", "1.0.0", 0),
    ]  # fmt: skip
    assert [v["version"] for v in (await client.get("/workflows/arithmetic")).json()] == ["1.0.0", "1.1.0"]
    latest = (await client.get("/workflows/arithmetic/latest")).json()
    assert latest["version"] == latest["spec"]["version"] == "1.1.0"
    assert (await client.get("/workflows/arithmetic/1.0.0")).json()["spec"] == BASE
    assert (await client.get("/workflows/nope")).status_code == 404
    missing = await client.get("/workflows/arithmetic/9.9.9")
    assert missing.status_code == 404
    assert "registered: 1.0.0, 1.1.0" in missing.json()["error"]


async def test_reads_and_writes_need_the_token(store):
    async with asgi_client(registry_app(store)) as anonymous:
        assert (await anonymous.post("/workflows", json=BASE)).status_code == 401
        assert (await anonymous.get("/workflows")).status_code == 401
    async with asgi_client(registry_app(store, token=None)) as open_api:
        assert (await open_api.post("/workflows", json=BASE)).status_code == 201


async def test_the_daemon_serves_the_registry(tmp_path):
    """`build` wires the routes; Kafka is only touched by the lifespan, which this client doesn't run."""
    daemon = build(Settings(store=StoreSettings(path=tmp_path / "daemon.duckdb")))
    async with asgi_client(daemon) as client:
        assert (await client.post("/workflows", json=BASE)).status_code == 201
        versions = (await client.get("/workflows/arithmetic")).json()
    assert versions[0]["content_hash"] == BASE["content_hash"]


# ---------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def cli_env(tmp_path, monkeypatch) -> dict[str, str]:
    """A store in tmp_path and a port where no daemon answers, so commands use the file."""
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith("CEGRAPH_")]:
        monkeypatch.delenv(name)
    return {"CEGRAPH_STORE__PATH": str(tmp_path / "cli.duckdb"), "CEGRAPH_HTTP__PORT": str(free_port())}


class Ran(NamedTuple):
    exit_code: int
    output: str


def cli(env: dict[str, str], *args: str) -> Ran:
    """Run in-process; keeps only the exit code and output (an exception's frames would hold the store)."""
    result = CliRunner().invoke(cli_app, list(args), env=env)
    return Ran(result.exit_code, result.output)


def test_cli_on_the_store_file(tmp_path, cli_env):
    newer = tmp_path / "arithmetic-1.1.0.json"
    newer.write_text(json.dumps(version(BASE, "1.1.0")))
    first = cli(cli_env, "workflows", "register", "arithmetic")
    assert first.exit_code == 0, first.output
    assert "registered arithmetic@1.0.0" in first.output
    again = cli(cli_env, "workflows", "register", "arithmetic", "--json")
    assert json.loads(again.output)["created"] is False
    assert cli(cli_env, "workflows", "register", str(newer)).exit_code == 0

    listed = json.loads(cli(cli_env, "workflows", "list", "--json").output)
    assert [v["version"] for v in listed] == ["1.0.0", "1.1.0"]
    assert "1.1.0" in cli(cli_env, "workflows", "list", "arithmetic").output
    shown = json.loads(cli(cli_env, "workflows", "show", "arithmetic@1.0.0", "--json").output)
    assert shown["spec"] == BASE
    assert json.loads(cli(cli_env, "workflows", "show", "arithmetic", "--json").output)["version"] == "1.1.0"
    diff = json.loads(cli(cli_env, "workflows", "diff", "arithmetic@1.0.0", "arithmetic@1.1.0").output)
    assert diff == [
        {"op": "replace", "path": "/version", "value": "1.1.0"},
        {"op": "replace", "path": "/nodes/solve/params/temperature", "value": 0.55},
    ]


def test_cli_refusals_exit_1_with_the_reason(tmp_path, cli_env):
    cli(cli_env, "workflows", "register", "arithmetic")
    clash = tmp_path / "clash.json"
    clash.write_text(json.dumps(version(BASE, "1.0.0", temperature=0.9)))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**BASE, "content_hash": None, "entry": "ghost"}))
    for args, reason in [
        (("register", str(clash)), "already registered with other content"),
        (("register", str(bad)), "entry 'ghost' is not a node"),
        (("register", "no-such-thing"), "neither a spec file nor an example"),
        (("show", "nope"), "no workflow 'nope' is registered"),
        (("diff", "arithmetic@1.0.0", "arithmetic@2.0.0"), "arithmetic@2.0.0 is not registered"),
    ]:
        result = cli(cli_env, "workflows", *args)
        assert result.exit_code == 1, args
        assert reason in " ".join(result.output.split()), args


@pytest.fixture
def serving(tmp_path) -> Iterator[tuple[EventStore, int]]:
    """The registry API on a real port with its store held open, as `cegraph run` holds it."""
    store = EventStore(tmp_path / "held.duckdb")
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(registry_app(store), port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120  # a bound for a server that never starts, not a pace
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "the registry API did not start"
    yield store, port
    server.should_exit = True
    thread.join(timeout=10)
    store.close()


def test_cli_goes_through_the_daemon_while_it_holds_the_store(tmp_path, serving):
    """Another process can't open the held DuckDB file: these commands succeed only through HTTP."""
    store, port = serving
    env = {k: v for k, v in os.environ.items() if not k.startswith("CEGRAPH_")} | {
        "CEGRAPH_STORE__PATH": str(tmp_path / "held.duckdb"),
        "CEGRAPH_HTTP__PORT": str(port),
        "CEGRAPH_HTTP__TOKEN": TOKEN,
    }

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [CEGRAPH, "workflows", *args], env=env, capture_output=True, text=True, timeout=60
        )

    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps(version(BASE, "1.1.0")))
    assert run("register", "arithmetic").returncode == 0
    assert run("register", str(newer)).returncode == 0
    refused = run("register", "arithmetic-calculator")  # another workflow: fine
    assert refused.returncode == 0, refused.stderr
    lower = tmp_path / "lower.json"
    lower.write_text(json.dumps(version(BASE, "1.0.1")))
    conflict = run("register", str(lower))
    assert conflict.returncode == 1
    assert "409" in conflict.stderr and "not greater" in conflict.stderr
    assert [v.version for v in WorkflowRegistry(store).versions("arithmetic")] == ["1.0.0", "1.1.0"]
    listed = json.loads(run("list", "--json").stdout)
    assert [(v["workflow_id"], v["version"]) for v in listed] == [
        ("arithmetic", "1.0.0"), ("arithmetic", "1.1.0"), ("arithmetic-calculator", "1.0.0"),
    ]  # fmt: skip
    diff = json.loads(run("diff", "arithmetic@1.0.0", "arithmetic").stdout)
    assert {"op": "replace", "path": "/version", "value": "1.1.0"} in diff
    assert httpx.get(f"http://127.0.0.1:{port}/workflows").status_code == 401  # the token is required
