"""Read endpoints over the judge and the store: `GET /canaries` and `GET /executions/{trace_id}`.

Both show trace-derived data, so `create_app` puts them behind the bearer token with the other reads.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from cegraph.connectors.http.api import Endpoint
from cegraph.daemon.rollout.canary import CanaryJudge
from cegraph.daemon.store import EventStore


def inspection_routes(store: EventStore, judge: CanaryJudge) -> list[tuple[str, Endpoint]]:
    async def canaries(_: Request) -> list[dict[str, Any]]:
        return await asyncio.to_thread(judge.canaries)

    async def execution(request: Request) -> Any:
        trace_id = request.path_params["trace_id"].lower()
        found = await asyncio.to_thread(store.execution, trace_id)
        if found is None:
            return JSONResponse({"error": f"no execution with trace id {trace_id!r}"}, status_code=404)
        return found

    return [("/canaries", canaries), ("/executions/{trace_id}", execution)]
