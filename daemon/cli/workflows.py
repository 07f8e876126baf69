"""`cegraph workflows`: register, list, show and diff workflow spec versions.

Through the daemon's HTTP API while it runs (DuckDB then refuses other processes), else on the
DuckDB file directly.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import quote

import typer
from rich.table import Table

from cegraph.daemon.cli.common import (
    JsonFlag,
    fail,
    from_daemon,
    from_daemon_or_store,
    load_spec,
    open_store,
    out,
    settings_or_exit,
)

if TYPE_CHECKING:
    from cegraph.daemon.settings import Settings
    from cegraph.daemon.store import EventStore

workflows = typer.Typer(
    name="workflows",
    help="The workflow registry: spec versions stored as events, linked to the executions that ran them.",
    no_args_is_help=True,
)

Reference = Annotated[str, typer.Argument(help="ID or ID@VERSION (the latest version when omitted).")]


def _registered(settings: Settings, reference: str) -> dict[str, Any]:
    """A registered version with its spec, as the daemon's `GET /workflows/{id}/{version}` shows it."""
    from cegraph.daemon.workflows.registry import LATEST, RegistryError, WorkflowRegistry

    workflow_id, _, version = reference.partition("@")
    version = version or LATEST
    path = f"/workflows/{quote(workflow_id, safe='')}/{quote(version, safe='')}"
    try:
        return from_daemon_or_store(
            settings,
            path,
            lambda store: WorkflowRegistry(store).get(workflow_id, version).model_dump(mode="json"),
        )
    except RegistryError as error:
        fail(str(error))


def _when(timestamp: str) -> str:
    """An ISO timestamp to the second, for tables."""
    return timestamp[:19].replace("T", " ")


@workflows.command()
def register(
    file: Annotated[str, typer.Argument(help="Spec JSON file, or the name of a shipped example.")],
    as_json: JsonFlag = False,
) -> None:
    """Register a spec version; the same content again is a no-op, a new version must be greater."""
    from cegraph.daemon.workflows.registry import RegistryError, WorkflowRegistry

    spec = load_spec(file)
    settings = settings_or_exit()
    data = from_daemon(settings, "/workflows", body=spec.model_dump(mode="json"))
    if data is None:
        store = open_store(settings, read_only=False)
        try:
            data = WorkflowRegistry(store).register(spec).model_dump(mode="json")
        except RegistryError as error:
            fail(str(error))
        finally:
            store.close()
    if as_json:
        out.print_json(json.dumps(data))
        return
    version = data["version"]
    name = f"{version['workflow_id']}@{version['version']}"
    if data["created"]:
        out.print(f"registered {name} ({version['content_hash']})", soft_wrap=True)
    else:
        out.print(f"{name} is already registered with this content: nothing changed", soft_wrap=True)


@workflows.command("list")
def list_versions(
    workflow_id: Annotated[str | None, typer.Argument(help="Only this workflow's versions.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Registered versions, oldest first, with the number of stored executions that ran each."""
    from cegraph.daemon.workflows.registry import RegistryError, WorkflowRegistry

    settings = settings_or_exit()
    path = "/workflows" if workflow_id is None else f"/workflows/{quote(workflow_id, safe='')}"

    def read(store: EventStore) -> list[dict[str, Any]]:
        registry = WorkflowRegistry(store)
        found = registry.versions() if workflow_id is None else registry.versions_of(workflow_id)
        return [v.model_dump(mode="json") for v in found]

    try:
        rows = from_daemon_or_store(settings, path, read)
    except RegistryError as error:
        fail(str(error))
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table("workflow", "version", "content hash", "registered at", "executions", title="workflows")
    for row in rows:
        table.add_row(
            row["workflow_id"],
            row["version"],
            row["content_hash"].removeprefix("sha256:")[:12],
            _when(row["registered_at"]),
            str(row["executions"]),
        )
    out.print(table)


@workflows.command()
def show(reference: Reference, as_json: JsonFlag = False) -> None:
    """A registered version: its identity, executions and the spec."""
    data = _registered(settings_or_exit(), reference)
    if as_json:
        out.print_json(json.dumps(data))
        return
    out.print(
        f"{data['workflow_id']}@{data['version']}  {data['content_hash']}  registered "
        f"{_when(data['registered_at'])}  executions {data['executions']}",
        soft_wrap=True,
    )
    out.print_json(json.dumps(data["spec"]))


@workflows.command()
def diff(old: Reference, new: Reference) -> None:
    """The RFC 6902 JSON Patch that turns OLD into NEW (over the canonical specs)."""
    from cegraph.daemon.workflows.registry import spec_diff
    from cegraph.schemas.workflow import parse_spec

    settings = settings_or_exit()
    before, after = (parse_spec(_registered(settings, ref)["spec"]) for ref in (old, new))
    out.print_json(json.dumps(spec_diff(before, after)))
