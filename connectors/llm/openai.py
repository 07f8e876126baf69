"""An OpenAI-compatible chat-completions backend (OpenAI, vLLM, Ollama, llama.cpp server, ...).

`POST {base_url}/chat/completions` with httpx. Rate limits (429) and server errors (5xx), timeouts and
dropped connections are retried with exponential backoff and full jitter; a `Retry-After` header is
honoured (never waiting less than it asks, never more than `max_backoff_s`). What cannot succeed
surfaces as one of the `LLMError` subclasses of `cegraph.daemon.workflows.llm`, never as an httpx exception.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Sequence
from typing import Any

import httpx
from pydantic import BaseModel, Field, ValidationError

from cegraph.connectors.llm.loop_client import LoopClient
from cegraph.daemon.workflows.llm import (
    CallContext,
    Completion,
    LLMBadResponseError,
    LLMRequestError,
    LLMRetriesExhaustedError,
    LLMTimeoutError,
    Message,
)


class _Content(BaseModel):
    content: str | None = None


class _Choice(BaseModel):
    message: _Content
    finish_reason: str | None = None


class _Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _ChatCompletion(BaseModel):
    model: str = ""
    choices: list[_Choice] = Field(min_length=1)
    usage: _Usage = Field(default_factory=_Usage)


def retry_after_s(value: str | None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class OpenAIChatBackend:
    """The runtime's `LLMBackend` over an OpenAI-compatible endpoint."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        provider: str = "openai",
        timeout_s: float = 60.0,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        model: str | None = None,
        max_tokens: int | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        """`model` replaces every caller's model name (one server, one model: llama.cpp, Ollama);
        `max_tokens` caps every completion, and bounds those that asked for no limit."""
        self.provider = provider
        self.model = model
        self.max_tokens = max_tokens
        self.url = base_url.rstrip("/") + "/chat/completions"
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = httpx.Timeout(timeout_s)
        self._timeout_s = timeout_s
        self._max_retries = max_retries
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._client = LoopClient(client)
        self._jitter = random.Random()

    async def complete(
        self,
        messages: Sequence[Message],
        *,
        model: str,
        temperature: float,
        max_tokens: int | None,
        seed: int,
        context: CallContext,
    ) -> Completion:
        model = self.model or model
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "temperature": temperature,
            "seed": seed % 2**31,  # some servers (llama.cpp) take 32-bit seeds only
        }
        limits = [limit for limit in (max_tokens, self.max_tokens) if limit is not None]
        if limits:
            body["max_tokens"] = min(limits)
        attempts = self._max_retries + 1
        failure = ""
        timed_out = False
        for attempt in range(attempts):
            wait: float | None = None
            try:
                response = await self._client.get().post(
                    self.url, json=body, headers=self._headers, timeout=self._timeout
                )
            except httpx.TimeoutException:
                timed_out, failure = True, f"no answer within {self._timeout_s:g}s"
            except httpx.TransportError as error:
                timed_out, failure = False, f"{type(error).__name__}: {error}"
            else:
                if response.status_code == 200:
                    return self._parse(response, model)
                if response.status_code != 429 and response.status_code < 500:
                    raise LLMRequestError(
                        f"{self.url} refused the request: HTTP {response.status_code}: {response.text[:300]}"
                    )
                timed_out, failure = False, f"HTTP {response.status_code}: {response.text[:200]}"
                wait = retry_after_s(response.headers.get("Retry-After"))
            if attempt < attempts - 1:
                await asyncio.sleep(self._delay(attempt, wait))
        if timed_out:
            raise LLMTimeoutError(f"{self.url} timed out on all {attempts} attempts ({failure})")
        raise LLMRetriesExhaustedError(f"{self.url} failed on all {attempts} attempts; last: {failure}")

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        jittered = self._jitter.uniform(0, min(self._max_backoff_s, self._backoff_s * 2**attempt))
        return min(self._max_backoff_s, max(retry_after or 0.0, jittered))

    def _parse(self, response: httpx.Response, model: str) -> Completion:
        try:
            data = _ChatCompletion.model_validate_json(response.content)
        except ValidationError as error:
            raise LLMBadResponseError(
                f"{self.url} answered 200 without a usable chat completion: {error.errors()[0]['msg']}: "
                f"{response.text[:200]!r}"
            ) from None
        choice = data.choices[0]
        return Completion(
            text=choice.message.content or "",
            input_tokens=data.usage.prompt_tokens,
            output_tokens=data.usage.completion_tokens,
            finish_reason=choice.finish_reason or "stop",
            model=data.model or model,
        )

    async def aclose(self) -> None:
        await self._client.aclose()
