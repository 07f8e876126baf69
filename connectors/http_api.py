"""The daemon's HTTP surface: health, Prometheus metrics, the read API and a few write endpoints.

Read endpoints show trace text and write endpoints change state, so when a token is configured both
require `Authorization: Bearer`.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

ReadyCheck = Callable[[], Awaitable[dict[str, bool]]]
# Returns a Response, or data that is sent as JSON.
Endpoint = Callable[[Request], Awaitable[Any]]


def bearer_ok(request: Request, token: str | None) -> bool:
    if token is None:
        return True
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(given.encode(), token.encode())


def protected(token: str | None, endpoint: Endpoint) -> Callable:
    """Wrap an endpoint: 401 with a JSON reason when the bearer token is missing or wrong."""

    async def guarded(request: Request) -> Response:
        if not bearer_ok(request, token):
            return JSONResponse(
                {"error": "a valid bearer token is required"},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="cegraph"'},
            )
        result = await endpoint(request)
        return result if isinstance(result, Response) else JSONResponse(result)

    return guarded


def create_app(
    *,
    ready: ReadyCheck,
    read_routes: Sequence[tuple[str, Endpoint]] = (),
    write_routes: Sequence[tuple[str, Endpoint]] = (),
    token: str | None = None,
    metrics: bool = True,
    registry: CollectorRegistry = REGISTRY,
    lifespan: Callable[[Starlette], AbstractAsyncContextManager[None]] | None = None,
) -> Starlette:
    async def healthz(_: Request) -> Response:
        return PlainTextResponse("ok")

    async def readyz(_: Request) -> Response:
        checks = await ready()
        return JSONResponse(checks, status_code=200 if all(checks.values()) else 503)

    async def metrics_endpoint(_: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    routes = [Route("/healthz", healthz), Route("/readyz", readyz)]
    if metrics:
        routes.append(Route("/metrics", metrics_endpoint))
    routes += [Route(path, protected(token, endpoint)) for path, endpoint in read_routes]
    routes += [Route(path, protected(token, endpoint), methods=["POST"]) for path, endpoint in write_routes]
    return Starlette(routes=routes, lifespan=lifespan)
