"""Tools and retrievers a workflow's `tool` and `retrieve` nodes call, looked up by name.

A tool declares its arguments as a pydantic model: its JSON Schema is what the LLM is shown, and the
same model is what the runtime validates the LLM's arguments with when a node asks for validation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel


class ToolArgumentError(Exception):
    """A tool was called with arguments it cannot use."""


@runtime_checkable
class Tool(Protocol):
    name: str
    description: str
    arguments: type[BaseModel]

    async def call(self, arguments: Mapping[str, Any]) -> str:
        """The tool's result as text; raises `ToolArgumentError` on unusable arguments."""
        ...


@runtime_checkable
class Retriever(Protocol):
    name: str

    async def retrieve(self, query: str, *, top_k: int, hops: int) -> list[str]: ...


Registry = Mapping[str, Tool | Retriever]
