"""Composition root of the daemon: wires the Kafka connectors, the HTTP API and the core together."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from starlette.applications import Starlette

from cegraph.connectors.http_api import create_app
from cegraph.connectors.kafka_client import make_broker
from cegraph.daemon.settings import Settings

log = logging.getLogger("cegraph")


def build(settings: Settings) -> Starlette:
    broker = make_broker(settings.kafka)

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await broker.start()
        log.info("connected to Kafka at %s", settings.kafka.bootstrap_servers)
        try:
            yield
        finally:
            await broker.stop()

    async def ready() -> dict[str, bool]:
        return {"kafka": bool(await broker.ping(timeout=2.0))}

    token = settings.http.token.get_secret_value() if settings.http.token else None
    return create_app(ready=ready, token=token, metrics=settings.metrics.enabled, lifespan=lifespan)


def serve(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    uvicorn.run(
        build(settings),
        host=settings.http.host,
        port=settings.http.port,
        log_level=settings.log_level.lower(),
        lifespan="on",
    )
