"""TRAIL's annotations as cegraph feedback, and the human categories behind them (kept apart, for scoring).

Each annotated error becomes a feedback record naming the failing span; the category stays out, so the
daemon must find modes without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cegraph.connectors.trail.model import TrailError, TrailTrace
from cegraph.connectors.trail.otlp import span_id_bytes, trace_id_bytes

FEEDBACK_SOURCE = "trail-annotation"


@dataclass(frozen=True)
class GoldLabel:
    """The human judgement behind one feedback record: for scoring modes, never sent to the daemon."""

    trace_id: str
    span_id: str | None
    category: str
    leaf: str | None
    impact: str


def _located_span_hex(error: TrailError, known: set[str]) -> str | None:
    return span_id_bytes(error.location).hex() if error.location in known else None


def annotations_to_feedback(trace: TrailTrace, *, with_critique: bool = False) -> list[dict[str, Any]]:
    """One `cegraph.feedback` record per annotated error, naming the span the annotation points at.

    The category stays out (see `gold_labels`, same order): the daemon must find modes without it. With
    `with_critique`, the annotation's description is sent as critique text, as an LLM judge's
    explanation would be. A location that names no span of the tree gives `span_id` None.
    """
    trace_hex = trace_id_bytes(trace.trace_id).hex()
    known = trace.span_ids()
    return [
        {
            "trace_id": trace_hex,
            "span_id": _located_span_hex(error, known),
            "outcome": "failed",
            "score": None,
            "critique": error.description if with_critique else "",
            "source": FEEDBACK_SOURCE,
        }
        for error in trace.errors
    ]


def gold_labels(trace: TrailTrace) -> list[GoldLabel]:
    """The gold category of each annotated error, in the order of `annotations_to_feedback`."""
    trace_hex = trace_id_bytes(trace.trace_id).hex()
    known = trace.span_ids()
    return [
        GoldLabel(trace_hex, _located_span_hex(error, known), error.category, error.leaf, error.impact)
        for error in trace.errors
    ]
