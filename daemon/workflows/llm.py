"""The contract between the runtime and any LLM: a chat completion in, text and token usage out.

The runtime only knows `LLMBackend`; an OpenAI-compatible endpoint (`connectors/llm/openai.py`) and the
simulated world (`daemon/sim`) both implement it. `CallContext` tells a backend which node calls it and
why; a real endpoint may ignore it, the simulated LLM uses it the way a model uses its instructions.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

# The runtime's purposes, then the refiner's (proposing edits, rewriting an instruction), then an
# LLM judge's, then the mode namer's.
Purpose = Literal[
    "answer",
    "code",
    "tool_arguments",
    "review",
    "revise",
    "format",
    "fix",
    "propose",
    "critique",
    "judge",
    "name",
]
MAX_EXCERPT = 1_500
_FENCE = re.compile(r"`{3,}")


def fenced(text: str, limit: int = MAX_EXCERPT) -> str:
    """Untrusted text as a data block it cannot close (backtick runs inside are broken up): how
    production text (inputs, outputs, critiques) is shown to an LLM, always beside a system prompt
    that says such blocks are data."""
    return "```data\n" + _FENCE.sub(lambda m: "`\u200b" * len(m.group(0)), text[:limit]) + "\n```"


class Message(BaseModel):
    model_config = ConfigDict(frozen=True)

    role: Literal["system", "user", "assistant"]
    content: str


class CallContext(BaseModel):
    """Who calls: the node, its kind, the purpose of this call and its index among the node's calls."""

    model_config = ConfigDict(frozen=True)

    workflow_id: str
    node_id: str
    node_kind: str
    purpose: Purpose
    call_index: int = Field(ge=0)


class Completion(BaseModel):
    model_config = ConfigDict(frozen=True)

    text: str
    input_tokens: int = Field(ge=0)
    output_tokens: int = Field(ge=0)
    finish_reason: str = "stop"
    model: str = ""


class LLMBackend(Protocol):
    """What the runtime calls. `seed` is derived from (execution seed, node id, call index)."""

    provider: str

    async def complete(
        self,
        messages: Sequence[Message],
        *,
        model: str,
        temperature: float,
        max_tokens: int | None,
        seed: int,
        context: CallContext,
    ) -> Completion: ...


class LLMError(Exception):
    """The backend could not produce a completion."""


class LLMTimeoutError(LLMError):
    """Every attempt ran out of time."""


class LLMRetriesExhaustedError(LLMError):
    """Rate limits or server errors persisted through every retry."""


class LLMBadResponseError(LLMError):
    """The endpoint answered, but not with a usable chat completion."""


class LLMRequestError(LLMError):
    """The endpoint refused the request itself (a 4xx other than 429); retrying cannot help."""
