"""The real model a benchmark talks to: an OpenAI-compatible endpoint it is given, or the local
SmolLM2-135M on llama.cpp (ops/llm/local_llm.py) started for the run and stopped after it."""

from __future__ import annotations

import json
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def model_server(url: str | None, who: str) -> Iterator[tuple[str, bool]]:
    """(base URL, whether it is the local server started here). Exits with one line saying why when
    `url` lists no model or the local server cannot be started, before any work is done."""
    if url is not None:
        try:
            with urllib.request.urlopen(f"{url.rstrip('/')}/models", timeout=30) as response:
                json.load(response)["data"][0]["id"]
        except (OSError, ValueError, KeyError, IndexError) as error:
            raise SystemExit(f"{who}: no model server at {url}: {error}") from None
        yield url.rstrip("/"), False
        return
    sys.path.insert(0, str(ROOT / "ops" / "llm"))
    from local_llm import LLMStartError, LocalLLM

    server = LocalLLM()
    try:
        base_url = server.start()
    except LLMStartError as error:
        first = str(error).splitlines()[0]
        raise SystemExit(f"{who}: the local model server did not start: {first}") from None
    try:
        yield base_url, True
    finally:
        server.stop()
