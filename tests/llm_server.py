"""The real model behind the real-model tests: the `llm_server` fixture (imported by conftest.py, so
any test module can ask for it).

Which server, in order: `CEGRAPH_TEST_LLM_URL` (an OpenAI-compatible base URL such as
`http://127.0.0.1:8080/v1`; `CEGRAPH_TEST_LLM_MODEL` names its model, else the first one it lists)
if set; otherwise SmolLM2-135M served by llama.cpp, started from the model venv that `make setup`
makes (ops/llm/local_llm.py), one thread, stopped at the end of the session and killed with the test
process if that dies first. Under `CI=true` a test that needs it fails when no server can be had;
elsewhere it is skipped with the reason.

The model is slow on a busy machine: tests cap their work by counts (few calls, bounded tokens) and
give each request a generous timeout, never a deadline on the whole.
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from needs import unavailable

REQUEST_TIMEOUT_S = 900.0  # one request may wait behind others: the server answers one at a time
MAX_TOKENS = 48  # a cap on every completion of a real-model test
SERVERS_USED: list[str] = []


@dataclass(frozen=True)
class ModelServer:
    base_url: str  # OpenAI-compatible, ending in /v1
    model: str
    kind: str  # "external" or "llama.cpp-local"
    context_tokens: int | None = None  # the model's context window, where known (the local server's)

    def backend(self, *, max_tokens: int | None = MAX_TOKENS):
        """cegraph's OpenAI-compatible backend on this server, every call asking for its model."""
        from cegraph.connectors.llm.openai import OpenAIChatBackend

        return OpenAIChatBackend(
            self.base_url, provider="llama.cpp" if self.kind != "external" else "openai",
            timeout_s=REQUEST_TIMEOUT_S, max_retries=1, model=self.model, max_tokens=max_tokens,
        )  # fmt: skip

    def environment(self) -> dict[str, str]:
        """The `CEGRAPH_LLM__*` settings that point cegraph at this server."""
        return {
            "CEGRAPH_LLM__BACKEND": "openai",
            "CEGRAPH_LLM__BASE_URL": self.base_url,
            "CEGRAPH_LLM__MODEL": self.model,
            "CEGRAPH_LLM__MAX_TOKENS": str(MAX_TOKENS),
            "CEGRAPH_LLM__TIMEOUT_S": str(REQUEST_TIMEOUT_S),
        }


def _first_model(base_url: str) -> str:
    with urllib.request.urlopen(f"{base_url.rstrip('/')}/models", timeout=60) as response:
        return json.load(response)["data"][0]["id"]


@pytest.fixture(scope="session")
def llm_server(request: pytest.FixtureRequest) -> Iterator[ModelServer]:
    external = os.environ.get("CEGRAPH_TEST_LLM_URL")
    if external:
        try:
            model = os.environ.get("CEGRAPH_TEST_LLM_MODEL") or _first_model(external)
        except (OSError, ValueError, KeyError, IndexError) as error:
            unavailable("model server", f"CEGRAPH_TEST_LLM_URL={external} lists no model: {error}")
        SERVERS_USED.append(f"external model {model} at {external} (CEGRAPH_TEST_LLM_URL)")
        yield ModelServer(external.rstrip("/"), model, "external")
        return
    from local_llm import MODEL_ALIAS, N_CTX, LLMStartError, LocalLLM

    server = LocalLLM()
    try:
        base_url = server.start()
    except LLMStartError as error:
        unavailable("model server", str(error))
    request.addfinalizer(server.stop)
    assert server.process is not None
    SERVERS_USED.append(
        f"{MODEL_ALIAS} on llama.cpp started by the fixture (pid {server.process.pid}) at {base_url}"
    )
    yield ModelServer(base_url, MODEL_ALIAS, "llama.cpp-local", N_CTX)
