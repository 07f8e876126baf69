"""What the `cegraph` commands share: the consoles, validated settings, specs named on the command line,
and reading state through the running daemon's HTTP API or else from the DuckDB file.

While the daemon runs, DuckDB refuses every other process, even read-only: a command asks the daemon
first and opens the file only when no daemon answers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console

from cegraph.daemon.settings import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from cegraph.daemon.store import EventStore
    from cegraph.schemas.workflow import WorkflowSpec

T = TypeVar("T")

out = Console()
err = Console(stderr=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def fail(message: str) -> NoReturn:
    err.print(f"[bold red]cegraph:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def settings_or_exit() -> Settings:
    try:
        return load_settings()
    except ConfigError as error:
        err.print(f"[bold red]cegraph:[/] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def from_daemon(settings: Settings, path: str, body: Any = None) -> Any | None:
    """GET an endpoint of the running daemon, or POST `body` as JSON; None when no daemon answers."""
    import httpx

    host = "127.0.0.1" if settings.http.host in ("0.0.0.0", "::") else settings.http.host
    headers = (
        {"Authorization": f"Bearer {settings.http.token.get_secret_value()}"} if settings.http.token else {}
    )
    url = f"http://{host}:{settings.http.port}{path}"
    try:
        if body is None:
            response = httpx.get(url, headers=headers, timeout=10)
        else:
            response = httpx.post(url, json=body, headers=headers, timeout=10)
    except httpx.TransportError:
        return None
    if not response.is_success:
        fail(f"the daemon answered {response.status_code} to {path}: {response.text}")
    return response.json()


def open_store(settings: Settings, *, read_only: bool) -> EventStore:
    from cegraph.daemon.store import EventStore, StoreError

    if read_only and not settings.store.path.exists():
        fail(f"no store at {settings.store.path} (CEGRAPH_STORE__PATH)")
    try:
        return EventStore.configured(settings.store, read_only=read_only)
    except StoreError as error:
        fail(str(error))


def from_daemon_or_store(settings: Settings, path: str, read: Callable[[EventStore], T]) -> T | Any:
    """The daemon's answer to GET `path` while it runs, else `read` over the DuckDB file."""
    data = from_daemon(settings, path)
    if data is not None:
        return data
    store = open_store(settings, read_only=True)
    try:
        return read(store)
    finally:
        store.close()


def load_spec(source: str) -> WorkflowSpec:
    """A spec from a JSON file, or a shipped example by name; a refused spec exits naming each problem."""
    from cegraph.schemas.workflow import EXAMPLES_PATH, WorkflowSpecError, example_spec, parse_spec

    examples = sorted(path.stem for path in EXAMPLES_PATH.glob("*.json"))
    try:
        if Path(source).is_file():
            return parse_spec(Path(source).read_bytes())
        if source in examples:
            return example_spec(source)
    except WorkflowSpecError as error:
        fail(f"{source}: {error}")
    fail(f"{source} is neither a spec file nor an example ({', '.join(examples)})")
