"""One httpx client per event loop.

An `httpx.AsyncClient` keeps its pooled connections on the event loop that opened them, and a client
used again from another loop fails on them. cegraph runs several loops in one process (the daemon's,
one per refinement job, one per demo tick), so anything that outlives a loop asks for the client of
the loop it runs on.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

import httpx


class LoopClient:
    def __init__(self, client: httpx.AsyncClient | None = None, **options: Any) -> None:
        """`client`: always that one (a test's); else a new `httpx.AsyncClient(**options)` per loop."""
        self._fixed = client
        self._options = options
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
            weakref.WeakKeyDictionary()
        )

    def get(self) -> httpx.AsyncClient:
        if self._fixed is not None:
            return self._fixed
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = self._clients[loop] = httpx.AsyncClient(**self._options)
        return client

    async def aclose(self) -> None:
        """Close the client of the running loop (the others went with their loops)."""
        if self._fixed is not None:
            await self._fixed.aclose()
            return
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()
