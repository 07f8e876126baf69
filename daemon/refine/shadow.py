"""Shadow runs: a spec executed on replayed inputs, off production, and what its traces say.

A `ShadowTarget` runs one spec on one replayed input and returns the spans of that execution: the
built-in runtime on the configured LLM (`connectors/shadow/runtime.py`) or the user's own service
behind an HTTP endpoint (`connectors/shadow/http.py`). The spans then take the production path:
`normalize`, failure labelling, and the detector's modes (a frozen `ModeClassifier`), so a shadow
failure is counted in the mode its production twin would be in. Calls and tokens are read from the
spans too, so every target is costed the same way: one call per completion (an ensemble's samples and
a node's retries each count), and an LLM judge's calls ride on its verdict events.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from cegraph.daemon.detect.detector import ModeClassifier
from cegraph.daemon.ingest.normalize import TextPolicy, distinct_node_ids, normalize
from cegraph.daemon.refine.replay import ReplayItem
from cegraph.daemon.spans import SpanRecord
from cegraph.schemas.workflow import WorkflowSpec

log = logging.getLogger("cegraph.shadow")

LLM_OPERATIONS = frozenset({"chat", "text_completion", "generate_content"})
EVALUATION_EVENT = "gen_ai.evaluation.result"


class ShadowTarget(Protocol):
    """Runs `spec` on one replayed input, with its recorded seed, and returns the execution's spans.
    Raises `ShadowError` when it cannot (the pair is then left out, not counted as a failure)."""

    async def run(self, spec: WorkflowSpec, item: ReplayItem) -> list[SpanRecord]: ...


class ShadowError(Exception):
    """A shadow target could not run an input."""


@dataclass(frozen=True, slots=True)
class ShadowOutcome:
    trace_id: str  # of the recorded execution replayed
    failed: bool
    modes: frozenset[str]  # modes of its failures; NOISE for failures in none
    llm_calls: int
    tokens: int
    error: str | None = None  # the target could not run it
    # the node ids it ran to the end without an error (what the nodes after them need to run), named
    # as ingest names them: where a cost prediction adds an edit's calls
    completed: frozenset[str] = frozenset()


def outcome_of(trace_id: str, spans: list[SpanRecord], classifier: ModeClassifier, policy: TextPolicy):
    # named as ingest names a stored execution's nodes, so a replay's failures land on the same nodes
    nodes = distinct_node_ids([normalize(span, policy) for span in spans])
    failures = classifier.classify(nodes)
    # one call per completion: an ensemble's samples and a node's retries each count (a span records
    # one finish reason per completion; a span without any is one call)
    calls = sum(max(1, len(node.finish_reasons)) for node in nodes if node.operation in LLM_OPERATIONS)
    tokens = sum((node.input_tokens or 0) + (node.output_tokens or 0) for node in nodes)
    for span in spans:  # an LLM judge's calls are the verifier's cost too
        for event in span.events:
            if event.name == EVALUATION_EVENT:
                calls += int(event.attributes.get("cegraph.evaluation.llm_calls", 0))
                tokens += int(event.attributes.get("cegraph.evaluation.tokens", 0))
    modes = frozenset(mode for _, mode in failures)
    return ShadowOutcome(
        trace_id, bool(failures), modes, calls, tokens,
        completed=frozenset(n.node_id for n in nodes if n.status != "error"),
    )  # fmt: skip


class ShadowRunner:
    """Runs a spec over a sample, `concurrency` inputs at a time."""

    def __init__(
        self, target: ShadowTarget, policy: TextPolicy | None = None, *, concurrency: int = 8
    ) -> None:
        self.target = target
        self.policy = policy or TextPolicy()
        self.concurrency = concurrency

    async def run(
        self, spec: WorkflowSpec, items: Sequence[ReplayItem], classifier: ModeClassifier
    ) -> list[ShadowOutcome]:
        slots = asyncio.Semaphore(self.concurrency)

        async def one(item: ReplayItem) -> ShadowOutcome:
            async with slots:
                try:
                    spans = await self.target.run(spec, item)
                except ShadowError as error:
                    log.warning("shadow run of %s on %s failed: %s", spec.version, item.trace_id, error)
                    return ShadowOutcome(item.trace_id, False, frozenset(), 0, 0, str(error))
            return outcome_of(item.trace_id, spans, classifier, self.policy)

        return list(await asyncio.gather(*(one(item) for item in items)))
