"""Sends the canary judge's decisions to `cegraph.rollouts`, keyed by workflow id, through the outbox.

Each pending decision is published and acknowledged by the broker before `RolloutPublished` is
recorded; a crash in between publishes it again at the next start (at least once). Consumers treat a
repeated decision as a no-op: it is about a version that is no longer their canary.
"""

from __future__ import annotations

import asyncio
import logging

from faststream.kafka import KafkaBroker

from cegraph.daemon.rollout.canary import CanaryJudge, RolloutOutbox, canary_key

log = logging.getLogger("cegraph.rollouts")


class RolloutPublisher:
    def __init__(self, outbox: RolloutOutbox, broker: KafkaBroker, topic: str) -> None:
        self.outbox = outbox
        self.broker = broker
        self.topic = topic

    async def publish_pending(self) -> int:
        """Publish every decision not yet marked as published; returns how many were sent."""
        sent = 0
        for decision in await asyncio.to_thread(self.outbox.pending):
            key = canary_key(decision.workflow_id, decision.version)
            metadata = await self.broker.publish(
                decision.model_dump_json(exclude_none=True).encode(),
                topic=self.topic,
                key=decision.workflow_id.encode(),
                headers={"content-type": "application/json", "cegraph.canary": key},
            )
            await asyncio.to_thread(
                self.outbox.published, decision, metadata.topic, metadata.partition, metadata.offset
            )
            log.info("published %s of %s to %s[%d]@%d", decision.decision, key, self.topic,
                     metadata.partition, metadata.offset)  # fmt: skip
            sent += 1
        return sent


async def judge_periodically(judge: CanaryJudge, publisher: RolloutPublisher, interval_s: float) -> None:
    """The judge on a loop of its own, off ingest's path: a look takes a few queries and never holds a
    flush back for long; what it decides is published right after."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await asyncio.to_thread(judge.step)
            await publisher.publish_pending()
        except Exception:  # the log holds what was decided; the next look publishes it
            log.exception("the canary judge failed; it looks again in %.1f s", interval_s)
