"""The HTTP shadow target: your own service runs the candidate spec, cegraph reads its trace.

The protocol (docs/operating.md, "the shadow endpoint") is one request per replayed input:

    POST <CEGRAPH_REFINER__SHADOW_URL>
    {"workflow": <the spec's canonical JSON>, "input": {...}, "seed": 123, "replay_of": "<trace id>"}

and the answer is the trace of that execution as an OTLP/JSON `ExportTraceServiceRequest` (200,
`application/json`), with the evaluator's verdict as a `gen_ai.evaluation.result` event where the
service has one. The service must not let a shadow run touch production state. Any other status,
or a body that is not a trace, leaves the input out of the comparison (`ShadowError`).

`shadow_endpoint` is the reference implementation, serving any `ShadowTarget` (the built-in
runtime): a service that embeds cegraph's runtime can mount it as is.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson
from opentelemetry.sdk.trace import ReadableSpan
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cegraph.connectors.otlp.codec import DecodeError, decode_json
from cegraph.connectors.otlp.span_export import otlp_json
from cegraph.daemon.refine.replay import ReplayItem
from cegraph.daemon.refine.shadow import ShadowError
from cegraph.daemon.spans import SpanRecord
from cegraph.schemas.workflow import WorkflowSpec, WorkflowSpecError, parse_spec


class ShadowRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    workflow: dict[str, Any] = Field(description="The spec to run, as its canonical JSON.")
    input: dict[str, Any]
    seed: int
    replay_of: str = Field("", description="The recorded execution this input comes from.")


class HttpShadowTarget:
    def __init__(self, url: str, *, timeout_s: float = 60.0, client: httpx.AsyncClient | None = None) -> None:
        self.url = url
        self._client = client or httpx.AsyncClient(timeout=timeout_s)

    async def run(self, spec: WorkflowSpec, item: ReplayItem) -> list[SpanRecord]:
        request = ShadowRequest(
            workflow=spec.canonical(), input=item.input, seed=item.seed, replay_of=item.trace_id
        )
        try:
            response = await self._client.post(self.url, json=request.model_dump(mode="json"))
        except httpx.HTTPError as error:
            raise ShadowError(f"{self.url}: {type(error).__name__}: {error}") from None
        if response.status_code != 200:
            raise ShadowError(f"{self.url} answered {response.status_code}: {response.text[:200]}")
        try:
            return decode_json(response.content)
        except DecodeError as error:
            raise ShadowError(f"{self.url} did not answer with an OTLP/JSON trace: {error}") from None

    async def aclose(self) -> None:
        await self._client.aclose()


RunSpans = Callable[[WorkflowSpec, ReplayItem], Awaitable[list[ReadableSpan]]]


def shadow_endpoint(run: RunSpans, path: str = "/shadow") -> Starlette:
    """A Starlette app answering the protocol with `run(spec, item) -> list[ReadableSpan]`."""

    async def handle(request: Request) -> Response:
        try:
            body = ShadowRequest.model_validate(orjson.loads(await request.body()))
            spec = parse_spec(body.workflow)
        except (orjson.JSONDecodeError, ValidationError, WorkflowSpecError) as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        item = ReplayItem(body.replay_of, body.seed, body.input, "target", 1.0)
        spans = await run(spec, item)
        return Response(otlp_json(spans), media_type="application/json")

    return Starlette(routes=[Route(path, handle, methods=["POST"])])
