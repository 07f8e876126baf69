"""The replay store: inputs and seeds of recorded executions, and the samples shadow runs replay.

Nothing is copied: a workflow root span carries its task input (`input.value`) and seed
(`cegraph.seed`), and the span log keeps both, so the store is a query over the log. Retention is a
bound on what may be replayed: the most recent `retention` executions of a workflow version. Inputs
are what ingest stored: redacted (a masked e-mail address is replayed masked) and cut to
`CEGRAPH_INGEST__MAX_TEXT_CHARS`; an input that was cut is no longer JSON and is not replayed.

A sample for a mode is stratified: half its counterexamples, half control (successes, and failures
of other modes or of none), each stratum ordered by a seeded hash of the trace id. A job draws two
disjoint samples: the selection sample its candidates are chosen on, and the confirmation sample
its winner is confirmed and reported on. Each stratum is split between them before anything is
drawn (`split`: 5 of every 13 rows to confirmation), so scarce counterexamples are shared rather
than all taken by the first sample. Each item carries the weight (stratum size / items drawn from
it) that turns sample rates back into rates of the recorded traffic, and the expected output of the
latest feedback on its execution that has one (`expected`): the reference its replays are judged
against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson

from cegraph.daemon.events import (
    FAILURE_OBSERVED,
    FEEDBACK_RECEIVED,
    FailureObservedPayload,
    FeedbackReceivedPayload,
)
from cegraph.daemon.store import EventStore

Stratum = Literal["target", "other", "success"]
_FB, _FO = FeedbackReceivedPayload, FailureObservedPayload

# $1 workflow, $2 version, $3 first seq not yet seen by the detector, $4 retention, $5 the target's
# mode ids, $6 the sampling salt
REPLAYABLE = f"""
WITH roots AS (
    SELECT trace_id, seq, seed, input_text
    FROM event_spans
    WHERE NOT amended AND workflow_id = $1 AND workflow_version = $2
      AND operation = 'invoke_workflow' AND seed IS NOT NULL AND (parent_span_id = '' OR parent_is_remote)
      AND seq < $3
    ORDER BY seq DESC LIMIT $4
),
expected AS (
    SELECT {_FB.sql("trace_id")} AS trace_id, arg_max({_FB.json("expected")}, seq) AS expected
    FROM events
    WHERE type = '{FEEDBACK_RECEIVED}' AND coalesce(json_type({_FB.json("expected")}), 'NULL') <> 'NULL'
    GROUP BY 1
),
observed AS (
    SELECT {_FO.sql("trace_id")} AS trace_id,
           bool_or(list_contains($5, {_FO.sql("mode")})) AS in_target
    FROM events WHERE type = '{FAILURE_OBSERVED}'
      AND {_FO.sql("workflow_id")} = $1 AND {_FO.sql("workflow_version")} = $2
    GROUP BY 1
)
SELECT r.trace_id, r.seed, r.input_text, f.expected::VARCHAR AS reference_text,
       CASE WHEN o.trace_id IS NULL THEN 'success' WHEN o.in_target THEN 'target' ELSE 'other' END AS stratum,
       hash(r.trace_id || $6) AS draw
FROM roots r LEFT JOIN observed o USING (trace_id) LEFT JOIN expected f USING (trace_id)
"""


@dataclass(frozen=True, slots=True)
class ReplayItem:
    trace_id: str
    seed: int
    input: dict[str, Any]
    stratum: Stratum
    weight: float  # recorded executions this item stands for
    reference: Any = None  # the expected output from recorded feedback, when there is one


@dataclass(frozen=True)
class ReplaySample:
    items: list[ReplayItem]
    population: dict[str, int]  # replayable executions per stratum
    unreplayable: int  # inputs that were cut or are not JSON objects

    def of(self, stratum: Stratum) -> list[ReplayItem]:
        return [item for item in self.items if item.stratum == stratum]


def _input(text: str | None) -> dict[str, Any] | None:
    try:
        value = orjson.loads(text or "")
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


class ReplayStore:
    def __init__(self, store: EventStore, *, retention: int) -> None:
        self.store = store
        self.retention = retention

    def samples(
        self, workflow_id: str, version: str, target: list[str], size: int, *, until_seq: int, seed: int = 0
    ) -> tuple[ReplaySample, ReplaySample]:
        """The selection and the confirmation sample, up to `size` items each from their parts of
        each stratum: half the counterexamples of the `target` modes (`target_modes`), the rest
        control in proportion to successes and other failures (at least one of each when there are
        any)."""
        rows = self.store.query_dicts(
            REPLAYABLE,
            workflow_id, version, until_seq, self.retention, target, f"/{seed}",
        )  # fmt: skip
        strata: dict[str, list[dict[str, Any]]] = {"target": [], "other": [], "success": []}
        unreplayable = 0
        for row in sorted(rows, key=lambda r: r["draw"]):
            row["input"] = _input(row["input_text"])
            if row["input"] is None:
                unreplayable += 1
            else:
                strata[row["stratum"]].append(row)
        population = {name: len(rows_) for name, rows_ in strata.items()}
        cuts = {name: split(len(rows_))[0] for name, rows_ in strata.items()}
        selection = {name: rows_[: cuts[name]] for name, rows_ in strata.items()}
        confirmation = {name: rows_[cuts[name] :] for name, rows_ in strata.items()}
        return (
            ReplaySample(_draw(selection, population, size), population, unreplayable),
            ReplaySample(_draw(confirmation, population, size), population, unreplayable),
        )


HOLDOUT = (5, 13)  # of every 13 rows of a stratum, 5 are kept for the confirmation sample


def split(rows: int) -> tuple[int, int]:
    """How many of a stratum's `rows` (in draw order) the selection and the confirmation sample may
    draw from: the first ones and the rest."""
    held = rows * HOLDOUT[0] // HOLDOUT[1]
    return rows - held, held


def needed(minimum: int) -> int:
    """The fewest rows a stratum can have for both samples to get at least `minimum` of them."""
    rows = minimum
    while min(split(rows)) < minimum:
        rows += 1
    return rows


def _draw(strata: dict[str, list[dict[str, Any]]], population: dict[str, int], size: int) -> list[ReplayItem]:
    """Up to `size` items from `strata` (rows in draw order), half of them counterexamples; each
    weighs the whole stratum's executions over the items drawn from it."""
    quota = {"target": min(len(strata["target"]), size // 2)}
    control = size - quota["target"]
    controls = len(strata["other"]) + len(strata["success"])
    for name in ("other", "success"):
        share = round(control * len(strata[name]) / controls) if controls else 0
        quota[name] = min(len(strata[name]), max(share, 1 if strata[name] else 0))
    return [
        ReplayItem(
            row["trace_id"], int(row["seed"]), row["input"], name, population[name] / quota[name],  # type: ignore[arg-type]
            None if row["reference_text"] is None else orjson.loads(row["reference_text"]),
        )
        for name, rows_ in strata.items()
        for row in rows_[: quota[name]]
    ]  # fmt: skip
