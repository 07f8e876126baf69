"""The workflow registry over HTTP: `GET /workflows`, `GET /workflows/{id}`, `GET /workflows/{id}/{version}`
and `POST /workflows`.

`cegraph workflows` goes through these while the daemon runs, since DuckDB then refuses any other
process. A refused spec answers 400 with the validation message; a version that does not increase,
or one already registered with other content, answers 409.
"""

from __future__ import annotations

import asyncio
from typing import Any, NamedTuple

from starlette.requests import Request
from starlette.responses import JSONResponse

from cegraph.connectors.http.api import Endpoint
from cegraph.daemon.workflows.registry import UnknownWorkflowError, VersionConflictError, WorkflowRegistry
from cegraph.schemas.workflow import WorkflowSpecError, parse_spec


class WorkflowRoutes(NamedTuple):
    read: list[tuple[str, Endpoint]]
    write: list[tuple[str, Endpoint]]


def _error(status: int, error: Exception) -> JSONResponse:
    return JSONResponse({"error": str(error)}, status_code=status)


def workflow_routes(registry: WorkflowRegistry) -> WorkflowRoutes:
    """The registry's endpoints, for `create_app`; DuckDB calls run off the event loop."""

    async def all_versions(_: Request) -> list[dict[str, Any]]:
        versions = await asyncio.to_thread(registry.versions)
        return [v.model_dump(mode="json") for v in versions]

    async def versions_of(request: Request) -> Any:
        try:
            versions = await asyncio.to_thread(registry.versions_of, request.path_params["workflow_id"])
        except UnknownWorkflowError as error:
            return _error(404, error)
        return [v.model_dump(mode="json") for v in versions]

    async def show(request: Request) -> Any:
        params = request.path_params
        try:
            found = await asyncio.to_thread(registry.get, params["workflow_id"], params["version"])
        except UnknownWorkflowError as error:
            return _error(404, error)
        return found.model_dump(mode="json")

    async def register(request: Request) -> Any:
        try:
            spec = parse_spec(await request.body())
        except WorkflowSpecError as error:
            return _error(400, error)
        try:
            registration = await asyncio.to_thread(registry.register, spec)
        except VersionConflictError as error:
            return _error(409, error)
        status = 201 if registration.created else 200
        return JSONResponse(registration.model_dump(mode="json"), status_code=status)

    return WorkflowRoutes(
        read=[
            ("/workflows", all_versions),
            ("/workflows/{workflow_id}", versions_of),
            ("/workflows/{workflow_id}/{version}", show),
        ],
        write=[("/workflows", register)],
    )
