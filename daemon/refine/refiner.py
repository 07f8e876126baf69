"""Propose-and-Verify for one triggered failure mode, in shadow; greedy over candidate edits.

A job replays a stratified sample of recorded executions (the mode's counterexamples and control)
through the current spec once, then, round by round: the proposers suggest edits, each admissible
candidate runs on the same inputs and seeds, the paired comparison against the current spec decides
(`verification.compare`: the target mode must drop significantly, nothing else may rise
significantly, the call budget must hold, the candidate's inference cost must stay within
`CEGRAPH_REFINER__MAX_COST_RATIO`), and the best accepted candidate becomes the current spec
of the next round. It stops when no candidate helps, after `max_rounds`, or when the budget would
be exceeded. Every step is an event; the accepted edits become one patch, signed and written to the
outbox (`PatchCreated`) together with the job's end and the refine stage's checkpoint in one
transaction (`daemon/refine/jobs.py`), so a job that dies before that point leaves no patch and no
end, and is run again from the start.

What a job reads from the log (the base spec, the replay sample, the recorded failures) is gathered
where the log is (`JobReader`), so the `Refiner` itself touches no store: it runs in the process that
holds the log or in a refine worker that got the job from the jobs topic (`daemon/refine/remote.py`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from cegraph.daemon.detect.detector import ModeClassifier
from cegraph.daemon.detect.stage import target_modes
from cegraph.daemon.events import (
    CANDIDATE_VERIFIED,
    FAILURE_OBSERVED,
    PATCH_CREATED,
    Event,
    FailureObservedPayload,
    PatchCreatedPayload,
    ProposalRejectedPayload,
    RefinementFinishedPayload,
)
from cegraph.daemon.refine.operators import EditRefused, apply_edit, cost, least_calls
from cegraph.daemon.refine.proposers import (
    HOT_TEMPERATURE,
    MAX_EXCERPT,
    Counterexample,
    Facts,
    ModeContext,
    Proposal,
    Proposals,
    Proposer,
)
from cegraph.daemon.refine.replay import ReplaySample, ReplayStore, needed
from cegraph.daemon.refine.shadow import ShadowOutcome, ShadowRunner
from cegraph.daemon.refine.text_policy import screen_edit
from cegraph.daemon.refine.verification import (
    Verdict,
    can_show_a_drop,
    compare,
    over_cap,
    per_candidate_alpha,
    weighted_mean,
)
from cegraph.daemon.settings import RefinerSettings
from cegraph.daemon.spans import Evaluation
from cegraph.daemon.store import EventStore
from cegraph.daemon.workflows.registry import UnknownWorkflowError, WorkflowRegistry, version_key
from cegraph.schemas.patch import Cost, Rationale, Verification, WorkflowPatch
from cegraph.schemas.workflow import WorkflowSpec

log = logging.getLogger("cegraph.refiner")

MIN_COUNTEREXAMPLES = 5  # in each of the selection and the confirmation sample
EXAMPLES_SHOWN = 8  # counterexamples a proposer sees
GOOD_ENOUGH = 0.25  # a candidate that leaves at most this share of the target mode ends its round


@dataclass(frozen=True)
class JobEnd:
    """How a job ended: its `RefinementFinished` payload, and the patch (unsigned) and patched spec when
    it made one; the refine stage signs and registers them (`daemon/refine/jobs.py`)."""

    finished: dict[str, Any]
    patch: WorkflowPatch | None = None
    spec: WorkflowSpec | None = None


@dataclass(frozen=True)
class JobInputs:
    """What a job reads from the log, read once when it starts."""

    base: WorkflowSpec | None  # None: the version is not registered (`missing` says why)
    sample: ReplaySample
    target: list[str]  # the mode and the modes merged into it
    failures: list[tuple[str, str]]  # (trace, node) of the counterexamples' recorded failures, log order
    counterexamples: list[Counterexample]
    versions: dict[str, str]  # the workflow's registered versions and their content hashes
    fresh: ReplaySample  # disjoint from `sample`: where the winner's effect is confirmed and reported
    missing: str = ""
    cost_so_far: float = 1.0  # the base's inference cost over its cost before cegraph's patches


@dataclass(frozen=True)
class Job:
    job_id: str
    workflow_id: str
    workflow_version: str
    mode: str
    until_seq: int  # the detector had seen the log up to here when the job started
    description: dict[str, Any]
    joined: tuple[str, ...] = ()  # modes targeted with `mode`: a node's crossing (`node_groups`)

    @classmethod
    def of(cls, fields: dict[str, Any]) -> Job:
        """A job from its `RefinementStarted` payload (which has more keys) or its job message (lists
        come back where the job has tuples)."""
        return cls(
            fields["job_id"], fields["workflow_id"], fields["workflow_version"], fields["mode"],
            fields["until_seq"], fields.get("description") or {}, tuple(fields.get("joined") or ()),
        )  # fmt: skip


Record = Callable[[list[Event]], None]


@dataclass
class _Spent:
    record: Record  # where a job's steps on the way go as they happen
    calls: int = 0
    tokens: int = 0
    rejected: Counter[str] = field(default_factory=Counter)  # per proposer
    text_rejected: Counter[str] = field(default_factory=Counter)  # per text policy rule

    def add_runs(self, outcomes: list[ShadowOutcome]) -> None:
        self.calls += sum(o.llm_calls for o in outcomes)
        self.tokens += sum(o.tokens for o in outcomes)

    def add_proposals(self, proposals: Proposals) -> None:
        self.calls += proposals.llm_calls
        self.tokens += proposals.tokens


@dataclass(frozen=True)
class _Step:
    proposal: Proposal
    spec: WorkflowSpec
    outcomes: list[ShadowOutcome]
    report: Verification


class JobReader:
    """A job's inputs from the log it was started from."""

    def __init__(self, store: EventStore, registry: WorkflowRegistry, replay: ReplayStore, *, sample: int):
        self.store = store
        self.registry = registry
        self.replay = replay
        self.sample_size = sample

    def read(self, job: Job) -> JobInputs:
        target = target_modes(self.store, job.mode, job.joined)
        sample, fresh = self.replay.samples(
            job.workflow_id, job.workflow_version, target, self.sample_size, until_seq=job.until_seq
        )
        versions = {v.version: v.content_hash for v in self.registry.versions(job.workflow_id)}
        try:
            base, missing = self.registry.get(job.workflow_id, job.workflow_version).spec, ""
        except UnknownWorkflowError as error:
            base, missing = None, f"{error}: register the spec (`cegraph workflows register`) to refine it"
        failures = self._failures(sample, target)
        examples = self._counterexamples(failures, base)
        so_far = lineage_cost(self.patch_costs(job.workflow_id), job.workflow_version)
        return JobInputs(base, sample, target, failures, examples, versions, fresh, missing, so_far)

    def patch_costs(self, workflow_id: str) -> dict[str, tuple[str, float, float]]:
        """Each patched version of the workflow: its base version and the calls per execution its
        confirmation measured before and after."""
        patch = PatchCreatedPayload.json("patch")
        verification = f"{patch}->'rationale'->'verification'"
        rows = self.store.query(
            f"SELECT {patch}->>'new_version', {patch}->>'base_version', "
            f"coalesce(({verification}->>'calls_before')::DOUBLE, 0), "
            f"coalesce(({verification}->>'calls_after')::DOUBLE, 0) "
            "FROM events WHERE type = ? AND key = ? ORDER BY seq",
            PATCH_CREATED, workflow_id,
        )  # fmt: skip
        return {new: (base, before, after) for new, base, before, after in rows}

    def _failures(self, sample: ReplaySample, target: list[str]) -> list[tuple[str, str]]:
        traces = [item.trace_id for item in sample.of("target")]
        observed = FailureObservedPayload
        rows = self.store.query(
            f"SELECT {observed.sql('trace_id')}, {observed.sql('node_id')} FROM events WHERE type = ? "
            f"AND {observed.sql('trace_id')} IN (SELECT unnest(?)) "
            f"AND list_contains(?, {observed.sql('mode')}) ORDER BY seq",
            FAILURE_OBSERVED, traces, target,
        )  # fmt: skip
        return [(trace, node) for trace, node in rows]

    def _counterexamples(
        self, failures: list[tuple[str, str]], spec: WorkflowSpec | None
    ) -> list[Counterexample]:
        """What the recorded failures said (verdicts, errors, outputs and inputs of the failing spans)
        and what they are (`Facts`: their evaluators, error classes, finish reasons, nodes)."""
        rows = self.store.query(
            "SELECT trace_id, node_id, kind, coalesce(nullif(exception_type, ''), error_type), "
            "finish_reasons, retry, status_message, exception_message, evaluations::VARCHAR, "
            "left(input_text, 500), left(output_text, 500) FROM ("
            "  SELECT *, row_number() OVER (PARTITION BY trace_id, node_id ORDER BY start_ns) > 1 AS retry"
            "  FROM event_spans WHERE trace_id IN (SELECT unnest(?))"
            ") WHERE hard_failed OR eval_failed",
            [trace for trace, _ in failures[:EXAMPLES_SHOWN]],
        )
        return [
            Counterexample(
                trace, node, "\n".join(part for part in parts if part and part != "[]"),
                _facts(spec, node, kind, error, finish, parts[2], retry),
            )
            for trace, node, kind, error, finish, retry, *parts in rows
        ]  # fmt: skip


def _facts(
    spec: WorkflowSpec | None, node: str, kind: str, error: str, finish, evaluations: str, retry: bool
) -> Facts:
    """A failing span's signature facts: its kind in the spec, whether a router is upstream of it, whether
    the spec has it sample hot."""
    failed = [Evaluation(**e) for e in orjson.loads(evaluations or "[]")]
    upstream: set[str] = set()
    todo = [node]
    while spec is not None and todo:
        for source in spec.predecessors(todo.pop()):
            if source not in upstream:
                upstream.add(source)
                todo.append(source)
    nodes = spec.nodes if spec is not None else {}
    temperature = getattr(getattr(nodes.get(node), "params", None), "temperature", None)
    return Facts(
        node_kind=nodes[node].kind if node in nodes else kind or "",
        error=error or "",
        finish_reasons=tuple(finish or ()),
        evaluators=tuple(e.name for e in failed if e.failed),
        after_router=any(nodes[n].kind == "route" for n in upstream if n in nodes),
        retried=bool(retry),
        hot=isinstance(temperature, int | float) and temperature >= HOT_TEMPERATURE,
    )


class Refiner:
    def __init__(
        self,
        runner: ShadowRunner,
        proposers: list[Proposer],
        settings: RefinerSettings,
        *,
        retrievers: list[str] | None = None,
        clock=time.monotonic,
    ) -> None:
        self.runner = runner
        self.proposers = proposers
        self.settings = settings
        self.retrievers = retrievers or []
        self.clock = clock

    async def run(self, job: Job, inputs: JobInputs, classifier: ModeClassifier, record: Record) -> JobEnd:
        """Run the job to its end, its steps on the way through `record`; returns its end, for the
        refine stage to append with its checkpoint."""
        started = self.clock()
        spent = _Spent(record)

        def finish(
            outcome: str, reason: str, patch: WorkflowPatch | None = None, spec=None, waiting_for: int = 0
        ) -> JobEnd:
            cost = Cost(llm_calls=spent.calls, tokens=spent.tokens, wall_s=self.clock() - started)
            return self._finish(job, outcome, reason, cost, patch, spec, spent, waiting_for)

        base, sample = inputs.base, inputs.sample
        if base is None:
            return finish("skipped", inputs.missing)
        missing = needed(MIN_COUNTEREXAMPLES) - sample.population["target"]
        if missing > 0:
            return finish(
                "waiting",
                f"{sample.population['target']} replayable counterexamples, {needed(MIN_COUNTEREXAMPLES)} "
                f"needed ({MIN_COUNTEREXAMPLES} each to choose and to confirm on; "
                f"{sample.unreplayable} executions had no replayable input): tried again after "
                f"{missing} more failure(s) of the mode",
                waiting_for=missing,
            )
        fresh = inputs.fresh.items
        target = frozenset(inputs.target)
        items = sample.items
        baseline = await self.runner.run(base, items, classifier)
        spent.add_runs(baseline)
        base_per_item = sum(o.llm_calls for o in baseline) / len(items)
        weights = [item.weight for item in items]
        max_calls = self._max_calls([o.llm_calls for o in baseline], weights, inputs.cost_so_far)
        current, current_outcomes, steps = base, baseline, []
        examples = inputs.counterexamples
        for round_ in range(1, self.settings.max_rounds + 1):
            failing = sum(1 for outcome in current_outcomes if outcome.modes & target)
            if not failing:
                stop = "the target mode is gone from the replayed inputs"
                break
            if not can_show_a_drop(failing, self.settings.significance):
                stop = f"{failing} replayed input(s) left in the target mode: too few to show a drop"
                break
            context = ModeContext(
                current,
                job.mode,
                _failing_node(inputs.failures, current),
                job.description,
                examples,
                self.retrievers,
            )
            proposals = await self._propose(job, round_, context, spent)
            best, over_budget = await self._round(
                job, round_, current, current_outcomes, proposals, items, classifier, target, spent,
                (len(fresh), base_per_item), max_calls,
            )  # fmt: skip
            if best is not None:
                steps.append(best)
                current, current_outcomes = best.spec, best.outcomes
            if over_budget or best is None:
                stop = (
                    f"the budget of {self.settings.max_llm_calls} LLM calls"
                    if over_budget
                    else "no candidate helped"
                )
                break
        else:
            stop = f"{self.settings.max_rounds} rounds"
        if not steps:
            return finish("no_patch", stop)
        report, verdict = await self._confirm(base, current, inputs.fresh, classifier, target, spent)
        if not verdict.accepted:
            return finish(
                "no_patch", f"{len(steps)} edit(s) not confirmed on fresh replays: {verdict.reason}"
            )
        spec, patch = self._patch(job, base, steps, report, inputs, spent, started)
        return finish(
            "patched",
            f"{len(steps)} edit(s); target mode {report.target_before:.3f} -> {report.target_after:.3f}; "
            f"stopped: {stop}",
            patch,
            spec,
        )

    def fail(self, job: Job, reason: str) -> JobEnd:
        """End a job that raised: it is not run again (a job whose process died is)."""
        return self._finish(job, "failed", reason, Cost(llm_calls=0, tokens=0, wall_s=0.0))

    def _finish(self, job, outcome, reason, cost, patch=None, spec=None, spent=None, waiting_for=0) -> JobEnd:
        spent = spent or _Spent(lambda _: None)
        finished = RefinementFinishedPayload(
            job_id=job.job_id,
            workflow_id=job.workflow_id,
            workflow_version=job.workflow_version,
            mode=job.mode,
            outcome=outcome,
            reason=reason,
            finished_at=time.time(),
            cost=cost.model_dump(),
            rejected=dict(spent.rejected),
            text_rejected=dict(spent.text_rejected),
            patch=None
            if patch is None
            else {"new_version": patch.new_version, "content_hash": patch.content_hash},
            waiting_for=waiting_for,
        )
        log.info(
            "job %s (%s@%s, mode %s): %s, %s",
            job.job_id,
            job.workflow_id,
            job.workflow_version,
            job.mode,
            outcome,
            reason,
        )
        return JobEnd(finished.event(job.workflow_id).payload, patch, spec)

    async def _confirm(self, base, spec, fresh, classifier, target, spent) -> tuple[Verification, Verdict]:
        """The patch re-tested against the base spec on the fresh sample: one pre-planned test at
        alpha, on inputs that chose nothing, so its figures are not inflated by the selection. Its
        cost is measured here, not capped again: the next job's cap reads this measurement
        (`lineage_cost`), so a patch that came out a little over corrects the next one."""
        before = await self.runner.run(base, fresh.items, classifier)
        spent.add_runs(before)
        after = await self.runner.run(spec, fresh.items, classifier)
        spent.add_runs(after)
        weights = [item.weight for item in fresh.items]
        return self._compare(before, after, weights, target, spent.calls, self.settings.significance)

    def _max_calls(self, base_calls: list[int], weights: list[float], cost_so_far: float) -> float | None:
        """The most calls per execution a candidate may cost: the cap over the cost before cegraph's
        patches, of which the base has used `cost_so_far`, and never less than the base's own (an edit
        that adds no cost is not refused for a cost its predecessors reached)."""
        if self.settings.max_cost_ratio is None:
            return None
        allowed = max(1.0, self.settings.max_cost_ratio / cost_so_far)
        return weighted_mean(base_calls, weights) * allowed

    async def _round(
        self,
        job,
        round_,
        current,
        current_outcomes,
        proposals,
        items,
        classifier,
        target,
        spent,
        confirm,
        max_calls,
    ):
        """Verify the round's candidates against `current`; the best accepted one, and whether the
        budget stopped the round. `confirm`: the fresh sample's size and the base spec's calls per item,
        to keep the winner's confirmation within the budget; `max_calls`: the cost cap (on the whole
        sample: the counterexamples alone do not say what a candidate costs the traffic)."""
        weights = [item.weight for item in items]
        per_item = sum(o.llm_calls for o in current_outcomes) / max(len(items), 1)
        best: _Step | None = None
        candidates = self._candidates(
            job, round_, current, proposals, spent, (current_outcomes, weights, max_calls)
        )
        alpha = per_candidate_alpha(self.settings.significance, len(candidates))
        if not can_show_a_drop(sum(1 for o in current_outcomes if o.modes & target), alpha):
            return None, False  # at this multiplicity no candidate could pass: none is run
        for proposal, candidate, floor in candidates:
            run_cost = per_item + cost(proposal.edit)
            # the winner's confirmation on the fresh sample (the base spec and the winner) is reserved
            reserve = confirm[0] * (confirm[1] + run_cost)
            if spent.calls + len(items) * run_cost + reserve > self.settings.max_llm_calls:
                return best, True
            # Counterexamples first: a candidate that does not lower the target mode on them is
            # refused without running the control half (most candidates stop here).
            first = [i for i, item in enumerate(items) if item.stratum == "target"]
            rest = [i for i, item in enumerate(items) if item.stratum != "target"]
            early = await self.runner.run(candidate, [items[i] for i in first], classifier)
            spent.add_runs(early)
            report, verdict = self._compare(
                [current_outcomes[i] for i in first], early, [weights[i] for i in first], target,
                spent.calls, alpha,
            )  # fmt: skip
            outcomes, placed = None, dict(zip(first, early, strict=True))
            if verdict.accepted:
                verdict = _cost_first(
                    verdict, proposal.edit.node, floor, placed, current_outcomes, weights, max_calls
                )
            if verdict.accepted:
                late = await self.runner.run(candidate, [items[i] for i in rest], classifier)
                spent.add_runs(late)
                placed |= dict(zip(rest, late, strict=True))
                outcomes = [placed[i] for i in range(len(items))]
                report, verdict = self._compare(
                    current_outcomes, outcomes, weights, target, spent.calls, alpha, max_calls
                )
            spent.record(
                [
                    Event(
                        CANDIDATE_VERIFIED,
                        job.workflow_id,
                        {
                            "job_id": job.job_id,
                            "round": round_,
                            "proposer": proposal.proposer,
                            "edit": proposal.edit.model_dump(exclude_none=True),
                            "why": proposal.why,
                            "accepted": verdict.accepted,
                            "reason": verdict.reason,
                            "verification": report.model_dump(),
                            "llm_calls": spent.calls,
                            "alpha": alpha,
                            "candidates": len(candidates),
                        },
                    )
                ]
            )
            if verdict.accepted and outcomes is not None and (best is None or _better(report, best.report)):
                best = _Step(proposal, candidate, outcomes, report)
                if report.target_after <= report.target_before * GOOD_ENOUGH:
                    break  # first good enough: verifying the rest would rarely pay for itself
        return best, False

    def _candidates(
        self, job, round_, current, proposals, spent, cap
    ) -> list[tuple[Proposal, WorkflowSpec, int]]:
        """The round's distinct candidate specs with their edits' `least_calls`, at most
        `max_candidates`, fixed before any is tested (their number is the round's multiplicity).
        `cap`: the current spec's outcomes on the sample, their weights and the cost cap; an edit
        whose structure alone puts it over the cap is refused here, before it costs a call or a
        share of the round's alpha."""
        outcomes, weights, max_calls = cap
        found: list[tuple[Proposal, WorkflowSpec, int]] = []
        tried: set[str | None] = {current.content_hash}
        for proposal in proposals:
            if len(found) >= self.settings.max_candidates:
                break
            edit = proposal.edit
            try:
                candidate, _ = apply_edit(current, edit, current.version)
            except EditRefused as error:
                self._reject(job, round_, spent, proposal.proposer, str(error), edit.model_dump_json())
                continue
            floor = least_calls(current, edit)
            if max_calls is not None and floor > 0:
                predicted = _predicted_calls(outcomes, weights, edit.node, floor)
                if over_cap(predicted, max_calls):
                    reason = _over_cap(predicted, "its structure", floor, edit.node, max_calls)
                    self._reject(job, round_, spent, proposal.proposer, reason, edit.model_dump_json())
                    continue
            if candidate.content_hash not in tried:
                tried.add(candidate.content_hash)
                found.append((proposal, candidate, floor))
        return found

    def _compare(self, base, candidate, weights, target, calls, alpha, max_calls=None):
        pairs = [
            (b, c, w) for b, c, w in zip(base, candidate, weights, strict=True) if not (b.error or c.error)
        ]
        return compare(
            [p[0] for p in pairs],
            [p[1] for p in pairs],
            [p[2] for p in pairs],
            target,
            alpha=alpha,
            calls=calls,
            budget=self.settings.max_llm_calls,
            max_calls=max_calls,
        )

    async def _propose(self, job: Job, round_: int, context: ModeContext, spent: _Spent) -> list[Proposal]:
        """Every proposer's edits; each edit's free text passes the text policy here, the one way from a
        proposer to verification and so to a patch."""
        gathered = Proposals()
        for proposer in self.proposers:
            gathered.extend(await proposer.propose(context))
        spent.add_proposals(gathered)
        for rejection in gathered.rejections:
            self._reject(job, round_, spent, rejection.proposer, rejection.reason, rejection.excerpt)
        admitted = []
        for proposal in gathered.proposals:
            violation = screen_edit(context.spec, proposal.edit)
            if violation is None:
                admitted.append(proposal)
                continue
            spent.text_rejected[violation.rule] += 1
            self._reject(
                job, round_, spent, proposal.proposer, violation.reason, proposal.why[:MAX_EXCERPT],
                text_policy={
                    "rule": violation.rule,
                    "base_version": context.spec.version,
                    "edit": proposal.edit.model_dump(exclude_none=True),
                    "rejected_at": time.time(),
                },
            )  # fmt: skip
        return admitted

    def _reject(
        self,
        job: Job,
        round_: int,
        spent: _Spent,
        proposer: str,
        reason: str,
        excerpt: str,
        *,
        text_policy: dict[str, Any] | None = None,
    ) -> None:
        """A `ProposalRejected` event; `text_policy` (the rule, the edit and the version it was for) marks a
        rejection by the text policy, which `cegraph patches list` shows."""
        spent.rejected[proposer] += 1
        rejected = ProposalRejectedPayload(job.job_id, round_, proposer, reason, excerpt, text_policy)
        spent.record([rejected.event(job.workflow_id)])

    def _patch(self, job, base, steps, report, inputs, spent, started):
        """The patched spec and its patch (its figures: `report`, the fresh sample's): the steps' edits
        replayed on `base` at the new version."""
        sample = inputs.sample
        spec, ops, version = _versioned(base, steps, inputs.versions)
        rationale = Rationale(
            job_id=job.job_id,
            mode=job.mode,
            mode_description=job.description,
            counterexamples=[item.trace_id for item in sample.of("target")],
            edits=[
                {"proposer": s.proposal.proposer, **s.proposal.edit.model_dump(exclude_none=True)}
                for s in steps
            ],
            verification=report,
            cost=Cost(llm_calls=spent.calls, tokens=spent.tokens, wall_s=self.clock() - started),
        )
        patch = WorkflowPatch(
            workflow_id=base.id,
            base_version=base.version,
            new_version=version,
            operations=ops,
            content_hash=spec.content_hash,
            rationale=rationale,
        )
        return spec, patch


def _cost_first(
    verdict: Verdict,
    node: str,
    floor: int,
    early: dict[int, ShadowOutcome],
    current: list[ShadowOutcome],
    weights: list[float],
    max_calls: float | None,
) -> Verdict:
    """Refuse a candidate whose cost the counterexamples already show to be over the cap, before its
    controls run: each control where the edited node completed is given the least extra calls a
    counterexample where it completed showed, and never less than the operator's own `floor` (an
    ensemble, a reviewer or a verifier adds the same calls to every run of its node; an edit whose
    extra calls vary, like a retry, shows a least of 0 and is run in full)."""
    extra = [early[i].llm_calls - current[i].llm_calls for i in early if node in current[i].completed]
    least = max(floor, min(extra, default=0))
    if max_calls is None or least <= 0:
        return verdict
    predicted = _predicted_calls(current, weights, node, least, early)
    if not over_cap(predicted, max_calls):
        return verdict
    return Verdict(False, _over_cap(predicted, "the counterexamples", least, node, max_calls))


def _predicted_calls(
    current: list[ShadowOutcome],
    weights: list[float],
    node: str,
    least: int,
    measured: dict[int, ShadowOutcome] | None = None,
) -> float:
    """A candidate's calls per execution on the sample, predicted from the current spec's: what
    `measured` (by input index) shows, else `least` more wherever `node` completed."""
    measured = measured or {}
    calls = [
        measured[i].llm_calls if i in measured else o.llm_calls + (least if node in o.completed else 0)
        for i, o in enumerate(current)
    ]
    return weighted_mean(calls, weights)


def _over_cap(predicted: float, source: str, least: int, node: str, max_calls: float) -> str:
    return (
        f"inference cost {predicted:.2f} LLM calls per execution (predicted from {source}: "
        f"{least} more per run of {node}) is over the cap of {max_calls:.2f}"
    )


def lineage_cost(patches: dict[str, tuple[str, float, float]], version: str) -> float:
    """`version`'s inference cost over that of the first version up its patch chain that no patch made:
    the product of each patch's after / before (a patch that did not measure them counts 1)."""
    ratio, seen = 1.0, set()
    while version in patches and version not in seen:
        seen.add(version)
        version, before, after = patches[version]
        if before > 0:
            ratio *= after / before
    return ratio


def _failing_node(failures: list[tuple[str, str]], spec: WorkflowSpec) -> str:
    """The node most counterexample failures are on (one of the spec's; else its output)."""
    counts = Counter(node for _, node in failures)
    return next((node for node, _ in counts.most_common() if node in spec.nodes), spec.output)


def _versioned(base: WorkflowSpec, steps: list[_Step], taken: dict[str, str]):
    """The next free minor version after the latest registered one, or the version a first run of
    this job already registered with this very content (a job run again after a crash)."""
    latest = max(taken, key=version_key, default=base.version)
    major, minor = (int(part) for part in base.version.split(".")[:2])
    while True:
        minor += 1
        version = f"{major}.{minor}.0"
        spec, ops = base, []
        for step in steps:
            spec, step_ops = apply_edit(spec, step.proposal.edit, version)
            ops += step_ops
        if taken.get(version) == spec.content_hash or (
            version not in taken and version_key(version) > version_key(latest)
        ):
            return spec, ops, version


def _better(report: Verification, other: Verification) -> bool:
    return (report.target_after, report.efm_after) < (other.target_after, other.efm_after)
