"""A stub OpenAI-compatible chat-completions server on 127.0.0.1, speaking the real protocol.

Each request is answered by a `Responder`: by default from a script (`ChatServer.script`, then a
plain answer), or by `scenario_reply`, which picks a behaviour from the `X-Stub-Scenario` request
header so that a client in another process (an instrumented app) chooses what it gets: an answer, a
server error, a truncation, a content-filter stop, a refusal, a tool call, or errors that clear after
a few tries (to exercise the openai SDK's own retries).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SCENARIO_HEADER = "X-Stub-Scenario"
REFUSAL = "I'm sorry, I can't help with that request."
TRUNCATED = "The answer begins with a long preamble that is cut"


@dataclass
class Reply:
    """One answer: status, extra headers, body; `delay_s` before answering."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


Request = tuple[str, dict[str, str], dict]  # path, headers, JSON body
Responder = Callable[[Request], Reply]


def completion(
    text: str | None,
    *,
    prompt_tokens: int = 11,
    completion_tokens: int = 3,
    finish: str = "stop",
    model: str = "local-model-v2",
    refusal: str | None = None,
    tool_calls: list[dict] | None = None,
) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if refusal is not None:
        message["refusal"] = refusal
    if tool_calls is not None:
        message["tool_calls"] = tool_calls
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1764600000,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def error_body(message: str, kind: str = "server_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


class ChatServer:
    """A chat-completions endpoint; `responder` picks each reply (default: the script, then "42")."""

    def __init__(self, responder: Responder | None = None) -> None:
        self.script: deque[Reply] = deque()
        self.requests: list[Request] = []
        self.responder = responder or self._scripted
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                request = (self.path, dict(self.headers), body)
                server.requests.append(request)
                reply = server.responder(request)
                time.sleep(reply.delay_s)
                payload = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
                try:
                    self.send_response(reply.status)
                    for name, value in {"Content-Type": "application/json", **reply.headers}.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting: that is what a timeout test wants

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False  # don't wait for a handler still sleeping for a timeout test
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def _scripted(self, request: Request) -> Reply:
        return self.script.popleft() if self.script else Reply(body=completion("42"))

    def __enter__(self) -> ChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class ScenarioResponder:
    """Answers by the `X-Stub-Scenario` header: `answer`, `server_error`, `rate_limit`, `length`,
    `content_filter`, `refusal`, `tool_call`, or `flaky:<key>:<n>` (a server error for the first n
    requests that carry that key, then an answer)."""

    def __init__(self) -> None:
        self.tries: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(self, request: Request) -> Reply:
        _, headers, body = request
        scenario = next((v for k, v in headers.items() if k.lower() == SCENARIO_HEADER.lower()), "answer")
        model = str(body.get("model", "")) + "-0001"
        last = body["messages"][-1]
        if scenario.startswith("flaky:"):
            _, key, failures = scenario.split(":")
            with self._lock:
                self.tries[key] += 1
                tries = self.tries[key]
            scenario = "server_error" if tries <= int(failures) else "answer"
        if scenario == "server_error":
            return Reply(500, error_body("The server had an error while processing your request."))
        if scenario == "rate_limit":
            return Reply(429, error_body("Rate limit reached for requests", "requests"))
        if scenario == "length":
            return Reply(body=completion(TRUNCATED, completion_tokens=16, finish="length", model=model))
        if scenario == "content_filter":
            return Reply(body=completion(None, completion_tokens=0, finish="content_filter", model=model))
        if scenario == "refusal":
            return Reply(body=completion(None, completion_tokens=9, refusal=REFUSAL, model=model))
        if scenario == "tool_call" and last.get("role") != "tool":
            call = {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})},
            }
            return Reply(body=completion(None, finish="tool_calls", model=model, tool_calls=[call]))
        content = last.get("content") or ""
        text = content if isinstance(content, str) else json.dumps(content)
        return Reply(body=completion(f"Answer to: {text[:80]}", model=model))
