"""The inference-cost cap (`CEGRAPH_REFINER__MAX_COST_RATIO`): a candidate that fixes the mode but
makes the workflow cost more than the cap allows over its cost before cegraph's patches is refused
in a job's rounds, and the cost earlier patches added counts against it."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from refinement_fixtures import ARITHMETIC_SLIP

from cegraph.daemon.refine.operators import Edit
from cegraph.daemon.refine.proposers import Proposal, Proposals
from cegraph.daemon.refine.refiner import Job, JobInputs, Refiner, lineage_cost
from cegraph.daemon.refine.replay import ReplayItem, ReplaySample
from cegraph.daemon.refine.shadow import ShadowOutcome
from cegraph.daemon.settings import RefinerSettings

TARGET = "m1"
PROGRAMMER = Edit(operator="programmer", node="solve")
ENSEMBLE = Edit(operator="ensemble", node="solve", samples=5)
COST = {"llm": 1, "programmer": 1, "ensemble": 5}  # calls per input of `solve` by its kind


class KindRunner:
    """The shadow runs of a world where any change of `solve`'s kind fixes the target mode's inputs,
    and each input costs what the node kind costs (`cost`, by default an ensemble its five samples).
    `runs` counts the inputs each kind was run on, by stratum."""

    def __init__(self, cost: dict[str, int] = COST) -> None:
        self.cost = cost
        self.runs: Counter[tuple[str, str]] = Counter()

    async def run(self, spec, items, classifier) -> list[ShadowOutcome]:
        kind = spec.nodes["solve"].kind
        self.runs.update((kind, item.stratum) for item in items)
        return [
            ShadowOutcome(
                item.trace_id,
                failed := (item.stratum == "target" and kind == "llm"),
                frozenset({TARGET}) if failed else frozenset(),
                self.cost[kind],
                0,
                completed=frozenset({"solve"}),
            )
            for item in items
        ]


class Fixed:
    name = "fixed"

    def __init__(self, *edits: Edit) -> None:
        self.edits = edits

    async def propose(self, context) -> Proposals:
        return Proposals([Proposal(edit, self.name, "test") for edit in self.edits])


def sample(prefix: str, target: int, control: int) -> ReplaySample:
    items = [
        ReplayItem(f"{prefix}{stratum}{i:04d}", i, {"question": "2 + 2"}, stratum, weight)
        for stratum, count, weight in (("target", target, 1.0), ("control", control, 3.0))
        for i in range(count)
    ]
    return ReplaySample(items, {"target": target * 2, "control": control * 2}, 0)


def run_job(*edits: Edit, cost_so_far: float = 1.0, ratio: float | None = 1.2, cost=COST) -> dict:
    runner = KindRunner(cost)
    refiner = Refiner(runner, [Fixed(*edits)], RefinerSettings(max_cost_ratio=ratio))
    job = Job("job-1", ARITHMETIC_SLIP.id, ARITHMETIC_SLIP.version, TARGET, 0, {})
    inputs = JobInputs(
        ARITHMETIC_SLIP, sample("a", 20, 20), [TARGET], [], [], {ARITHMETIC_SLIP.version: "x"},
        sample("b", 12, 12), cost_so_far=cost_so_far,
    )  # fmt: skip
    recorded = []
    end = asyncio.run(refiner.run(job, inputs, None, recorded.extend))
    verified = [e.payload for e in recorded if e.type == "CandidateVerified"]
    rejected = [e.payload for e in recorded if e.type == "ProposalRejected"]
    return {
        "end": end, "verified": {v["edit"]["operator"]: v for v in verified}, "runs": runner.runs,
        "rejected": rejected,
    }  # fmt: skip


def test_a_fix_that_costs_five_times_as_much_is_refused_before_it_runs_and_one_at_the_same_cost_is_patched():
    result = run_job(ENSEMBLE, PROGRAMMER)
    # an ensemble of five adds four calls to every run of `solve`: over the cap from its structure, so
    # it is not run at all and takes no share of the round's alpha
    assert "ensemble" not in result["verified"] and not result["runs"]["ensemble", "target"]
    [rejected] = result["rejected"]
    assert "inference cost 5.00 LLM calls per execution (predicted from its structure" in rejected["reason"]
    assert "over the cap of 1.20" in rejected["reason"]
    assert result["verified"]["programmer"]["candidates"] == 1
    assert result["end"].finished["outcome"] == "patched"
    assert result["end"].finished["rejected"] == {"fixed": 1}
    assert result["end"].spec.nodes["solve"].kind == "programmer"
    verification = result["end"].patch.rationale.verification
    assert verification.calls_before == verification.calls_after == 1.0


def test_a_fix_whose_extra_calls_only_its_runs_show_is_refused_before_its_controls_run():
    """A programmer's calls depend on its answers (no structural floor); its counterexamples show
    two more per run of `solve`, which predicts the whole sample over the cap."""
    result = run_job(PROGRAMMER, cost=COST | {"programmer": 3})
    programmer = result["verified"]["programmer"]
    assert not programmer["accepted"] and not result["rejected"]
    assert (
        "inference cost 3.00 LLM calls per execution (predicted from the counterexamples: 2 more"
        in (programmer["reason"])
    )
    assert result["runs"]["programmer", "target"] == 20 and result["runs"]["programmer", "control"] == 0
    assert result["end"].finished["outcome"] == "no_patch"


def test_without_a_cap_the_first_fix_found_is_taken_whatever_it_costs():
    result = run_job(ENSEMBLE, PROGRAMMER, ratio=None)
    assert result["verified"]["ensemble"]["accepted"]
    assert result["end"].spec.nodes["solve"].kind == "ensemble"
    assert result["end"].patch.rationale.verification.calls_after == 5.0


def test_the_cost_earlier_patches_added_counts_against_the_cap_but_a_fix_at_no_extra_cost_passes():
    """The base already costs 1.5 times its version before cegraph's patches, over the cap of 1.2: a
    candidate that adds any cost is refused, one at the base's cost is not."""
    result = run_job(ENSEMBLE, PROGRAMMER, cost_so_far=1.5)
    assert "over the cap of 1.00" in result["rejected"][0]["reason"]
    assert result["end"].finished["outcome"] == "patched"
    assert result["end"].spec.nodes["solve"].kind == "programmer"


def test_lineage_cost_multiplies_each_patchs_measured_cost_up_to_a_version_no_patch_made():
    patches = {
        "1.1.0": ("1.0.0", 2.0, 2.2),
        "1.2.0": ("1.1.0", 2.2, 2.4),
        "1.3.0": ("1.2.0", 0.0, 0.0),  # a patch of a version that did not measure its cost counts 1
    }
    assert lineage_cost(patches, "1.0.0") == 1.0
    assert lineage_cost(patches, "1.1.0") == pytest.approx(1.1)
    assert lineage_cost(patches, "1.3.0") == pytest.approx(1.2)
    assert lineage_cost({"a": ("b", 1.0, 2.0), "b": ("a", 1.0, 2.0)}, "a") == 4.0  # a loop ends
