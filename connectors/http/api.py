"""The daemon's HTTP surface: health, Prometheus metrics, the read API and a few write endpoints.

Read endpoints show trace text and write endpoints change state, so when a token is configured both
require `Authorization: Bearer` (settings refuse a non-loopback address without one). Request bodies
are bounded before they are read: a client cannot make the daemon buffer more than `max_body_bytes`.
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
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: 413 for a body over `max_bytes`, told by Content-Length or counted as it
    streams in; the endpoint never sees more than the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        received = 0
        started = False

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, watched)
        except _BodyTooLarge:
            if not started:
                await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(
            {"error": f"the request body is over {self.max_bytes} bytes (CEGRAPH_HTTP__MAX_BODY_BYTES)"},
            status_code=413,
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)


def create_app(
    *,
    ready: ReadyCheck,
    read_routes: Sequence[tuple[str, Endpoint]] = (),
    write_routes: Sequence[tuple[str, Endpoint]] = (),
    token: str | None = None,
    metrics: bool = True,
    metrics_need_token: bool = False,
    max_body_bytes: int = 1 << 20,
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
        routes.append(
            Route("/metrics", protected(token, metrics_endpoint) if metrics_need_token else metrics_endpoint)
        )
    routes += [Route(path, protected(token, endpoint)) for path, endpoint in read_routes]
    routes += [Route(path, protected(token, endpoint), methods=["POST"]) for path, endpoint in write_routes]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    return app
