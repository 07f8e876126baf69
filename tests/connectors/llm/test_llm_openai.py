"""The OpenAI-compatible backend against a real HTTP server on 127.0.0.1 that speaks the protocol."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
from openai_stub import ChatServer, Reply, completion
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cegraph.connectors.llm.openai import OpenAIChatBackend, retry_after_s
from cegraph.daemon.workflows.llm import (
    CallContext,
    LLMBadResponseError,
    LLMRequestError,
    LLMRetriesExhaustedError,
    LLMTimeoutError,
    Message,
)
from cegraph.daemon.workflows.runtime import WorkflowRuntime
from cegraph.schemas.workflow import parse_spec

CONTEXT = CallContext(workflow_id="w", node_id="n", node_kind="llm", purpose="answer", call_index=0)
MESSAGES = [Message(role="system", content="Be brief."), Message(role="user", content="What is 6 * 7?")]


@pytest.fixture
def server() -> Iterator[ChatServer]:
    with ChatServer() as running:
        yield running


async def complete(backend: OpenAIChatBackend, **overrides: Any):
    options = {
        "model": "local-model",
        "temperature": 0.2,
        "max_tokens": 50,
        "seed": 2**40 + 5,
        "context": CONTEXT,
    }
    try:
        return await backend.complete(MESSAGES, **{**options, **overrides})
    finally:
        await backend.aclose()


async def test_a_round_trip_sends_the_request_and_records_usage(server):
    server.script.append(
        Reply(body=completion("Answer: 42", prompt_tokens=17, completion_tokens=4, finish="length"))
    )
    result = await complete(OpenAIChatBackend(server.url, api_key="sk-test-key"))
    assert (result.text, result.input_tokens, result.output_tokens) == ("Answer: 42", 17, 4)
    assert result.finish_reason == "length" and result.model == "local-model-v2"
    [(path, headers, body)] = server.requests
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == "Bearer sk-test-key"
    assert body == {
        "model": "local-model",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 6 * 7?"},
        ],
        "temperature": 0.2,
        "seed": (2**40 + 5) % 2**31,
        "max_tokens": 50,
    }


async def test_a_429_is_retried_after_retry_after_and_then_succeeds(server):
    server.script.extend(
        [
            Reply(429, {"error": {"message": "slow down"}}, {"Retry-After": "0.3"}),
            Reply(body=completion("ok")),
        ]
    )
    started = time.monotonic()
    result = await complete(OpenAIChatBackend(server.url, backoff_s=0.01))
    assert result.text == "ok" and len(server.requests) == 2
    assert time.monotonic() - started >= 0.3, "Retry-After must be honoured"


async def test_server_errors_back_off_and_then_give_up(server):
    server.script.extend([Reply(503, {"error": "overloaded"}) for _ in range(3)])
    with pytest.raises(LLMRetriesExhaustedError, match=r"failed on all 3 attempts; last: HTTP 503"):
        await complete(OpenAIChatBackend(server.url, max_retries=2, backoff_s=0.01))
    assert len(server.requests) == 3


async def test_a_timeout_surfaces_as_a_clear_error(server):
    server.script.extend([Reply(body=completion("late"), delay_s=1.5) for _ in range(2)])
    started = time.monotonic()
    with pytest.raises(LLMTimeoutError, match=r"timed out on all 2 attempts \(no answer within 0.3s\)"):
        await complete(OpenAIChatBackend(server.url, timeout_s=0.3, max_retries=1, backoff_s=0.01))
    assert time.monotonic() - started < 1.5
    assert len(server.requests) == 2


async def test_a_client_error_is_not_retried(server):
    server.script.append(Reply(400, {"error": {"message": "unknown model"}}))
    with pytest.raises(LLMRequestError, match="HTTP 400"):
        await complete(OpenAIChatBackend(server.url))
    assert len(server.requests) == 1


@pytest.mark.parametrize("body", [b"<html>gateway</html>", {"choices": []}, {"object": "error"}])
async def test_a_200_without_a_completion_is_a_bad_response(server, body):
    server.script.append(Reply(200, body))
    with pytest.raises(LLMBadResponseError, match="without a usable chat completion"):
        await complete(OpenAIChatBackend(server.url))


def test_retry_after_reads_seconds_and_http_dates():
    assert retry_after_s("2.5") == 2.5
    assert retry_after_s(None) is None and retry_after_s("soon") is None
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < (retry_after_s(future) or 0) <= 30


async def test_the_runtime_runs_unchanged_against_the_endpoint(server):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    backend = OpenAIChatBackend(server.url, provider="vllm")
    spec = parse_spec(
        {
            "id": "echo",
            "version": "1.0.0",
            "model": "local-model",
            "input_schema": {"question": {}},
            "entry": "ask",
            "output": "ask",
            "nodes": {"ask": {"kind": "llm", "inputs": {"q": "input.question"}}},
        }
    )
    result = await WorkflowRuntime(backend, provider).execute(spec, {"question": "6 * 7?"}, seed=1)
    await backend.aclose()
    assert result.output == "42"
    [span] = [span for span in exporter.get_finished_spans() if span.parent is not None]
    assert span.attributes["gen_ai.provider.name"] == "vllm"
    assert span.attributes["gen_ai.response.model"] == "local-model-v2"
    assert (span.attributes["gen_ai.usage.input_tokens"], span.attributes["gen_ai.usage.output_tokens"]) == (
        11,
        3,
    )


def test_one_backend_serves_successive_event_loops(server):
    """The daemon runs each refinement job on an event loop of its own, with the same backend: pooled
    connections of a finished loop must not be reused by the next one."""
    server.httpd.RequestHandlerClass.protocol_version = "HTTP/1.1"  # keep-alive, so connections pool
    backend = OpenAIChatBackend(server.url, max_retries=0)
    options = {"model": "m", "temperature": 0.0, "max_tokens": 5, "seed": 1, "context": CONTEXT}
    for _ in range(3):
        assert asyncio.run(backend.complete(MESSAGES, **options)).text == "42"
    assert len(server.requests) == 3


async def test_the_model_override_and_the_token_cap_shape_every_request(server):
    backend = OpenAIChatBackend(server.url, model="served-model", max_tokens=32)
    await complete(backend, max_tokens=50)
    await complete(OpenAIChatBackend(server.url, model="served-model", max_tokens=32), max_tokens=None)
    await complete(OpenAIChatBackend(server.url, max_tokens=32), max_tokens=8)
    bodies = [body for _, _, body in server.requests]
    assert [(b["model"], b["max_tokens"]) for b in bodies] == [
        ("served-model", 32), ("served-model", 32), ("local-model", 8)
    ]  # fmt: skip
