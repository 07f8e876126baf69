"""The patches over HTTP: `GET /patches`, `GET /patches/rejected` (edits the text policy refused) and
`POST /patches/{workflow_id}/{version}/approve`.

`cegraph patches` goes through these while the daemon runs, since DuckDB then refuses any other
process. Approving lets a patch that carries free text be published, so the approve endpoint exists
only behind a token: without `CEGRAPH_HTTP__TOKEN` it answers 403 (approve with the daemon stopped,
`cegraph patches approve` then writes to the store itself). It answers 404 for an unknown patch and
409 for one that awaits no approval.
"""

from __future__ import annotations

import asyncio
from typing import Any, NamedTuple

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse

from cegraph.connectors.http.api import Endpoint
from cegraph.daemon.refine.patch_outbox import (
    ApprovalError,
    PatchOutbox,
    UnknownPatchError,
    patch_rows,
    rejected_rows,
)


class PatchRoutes(NamedTuple):
    read: list[tuple[str, Endpoint]]
    write: list[tuple[str, Endpoint]]


def patch_routes(outbox: PatchOutbox, *, token: str | None) -> PatchRoutes:
    """The outbox's endpoints, for `create_app`; DuckDB calls run off the event loop."""

    async def patches(_: Request) -> list[dict[str, Any]]:
        return await asyncio.to_thread(patch_rows, outbox)

    async def rejected(_: Request) -> list[dict[str, Any]]:
        return await asyncio.to_thread(rejected_rows, outbox.store)

    async def approve(request: Request) -> Any:
        if token is None:
            return JSONResponse(
                {"error": "approving over HTTP needs CEGRAPH_HTTP__TOKEN on the daemon"}, status_code=403
            )
        try:
            body = orjson.loads(await request.body() or b"{}")
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("approved_by", ""), str):
            return JSONResponse({"error": 'the body is {"approved_by": "<who>"}'}, status_code=400)
        params = request.path_params
        who = body.get("approved_by") or "unknown"
        try:
            patch = await asyncio.to_thread(outbox.approve, params["workflow_id"], params["version"], who)
        except ApprovalError as error:
            status = 404 if isinstance(error, UnknownPatchError) else 409
            return JSONResponse({"error": str(error)}, status_code=status)
        return {"workflow_id": patch.workflow_id, "new_version": patch.new_version, "approved_by": who}

    return PatchRoutes(
        read=[("/patches", patches), ("/patches/rejected", rejected)],
        write=[("/patches/{workflow_id}/{version}/approve", approve)],
    )
