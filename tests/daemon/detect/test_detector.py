"""The density stage on executions with planted failure modes: modes found, stable ids, one trigger
per crossing, fading; and the mass arithmetic and trigger rules on their own."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from fss_fixtures import node, planted_failure, verdict
from sklearn.metrics import adjusted_mutual_info_score

from cegraph.daemon.detect.density import NOISE, ModeTracker
from cegraph.daemon.detect.detector import ExecutionInput, FailureDetector
from cegraph.daemon.detect.mass import MassTracker
from cegraph.daemon.detect.trigger import MassTrigger, Observed, node_groups
from cegraph.daemon.events import FAILURE_OBSERVED, MODE_EMERGED, MODE_FADED, MODE_MASS_CROSSED
from cegraph.daemon.settings import DetectorSettings


def execution(
    index: int, mode: str | None, rng: random.Random, at: str | None = None
) -> tuple[ExecutionInput, str | None]:
    """An execution failing in `mode` (at its planted node, or at node `at`), or not at all."""
    trace = f"{index:032x}"
    nodes = [replace(node(1, None, "root", "workflow", 0), trace_id=trace)]
    nodes += [replace(node(2 + i, 1, f"step{i}", "llm", 1 + i), trace_id=trace) for i in range(3)]
    if mode is not None:
        planted = planted_failure(mode, rng, 10)
        failed = replace(planted.node, trace_id=trace, span_id=f"{99:016x}", parent_span_id=f"{1:016x}")
        failed = replace(failed, node_id=at) if at is not None else failed
        if planted.source == "evaluation":  # the judge's verdict travels on the span, as in a trace
            failed = replace(failed, evaluations=[verdict(False, planted.critique)], eval_failed=True)
        nodes.append(replace(failed, start_ns=50))
    return ExecutionInput(trace, "wf", "1.0.0", nodes), mode


def stream(count: int, start: int, rates: dict[str, float], seed: int, at: str | None = None):
    rng = random.Random(seed)
    out = []
    for index in range(start, start + count):
        roll, mode, acc = rng.random(), None, 0.0
        for name, rate in rates.items():
            acc += rate
            if roll < acc:
                mode = name
                break
        out.append(execution(index, mode, rng, at))
    return out


def run(detector: FailureDetector, executions, batch: int = 100):
    events, assigned = [], []
    for start in range(0, len(executions), batch):
        chunk = executions[start : start + batch]
        new_events, assignments = detector.observe([e for e, _ in chunk])
        events.extend(new_events)
        assigned.extend(a.mode for a in assignments)
    truth = [mode for _, mode in executions if mode is not None]
    return events, assigned, truth


def settings(**overrides) -> DetectorSettings:
    values = {"mass_threshold": 0.05, "min_support": 20, "hysteresis": 0.5, "cooldown_s": 0.0,
              "half_life_executions": 1_000} | overrides  # fmt: skip
    return DetectorSettings(**values)


def test_three_planted_modes_plus_noise_are_recovered():
    rates = {"calc": 0.1, "search": 0.1, "format": 0.1, "noise": 0.04}
    executions = stream(8_000, 0, rates, seed=1)
    events, assigned, truth = run(FailureDetector(settings()), executions)
    assert [e.type for e in events].count(FAILURE_OBSERVED) == len(truth)
    planted = [i for i in range(len(truth)) if truth[i] != "noise" and i > len(truth) // 4]
    score = adjusted_mutual_info_score([truth[i] for i in planted], [assigned[i] for i in planted])
    assert score >= 0.9, score


def test_a_new_mode_gets_its_own_id_and_triggers_once():
    before = stream(4_000, 0, {"calc": 0.1, "search": 0.1}, seed=2)
    after = stream(6_000, 4_000, {"calc": 0.1, "search": 0.1, "format": 0.1}, seed=3)
    detector = FailureDetector(settings())
    events, assigned, truth = run(detector, before + after)
    format_ids = {m for m, t in zip(assigned, truth, strict=True) if t == "format"} - {NOISE}
    old_ids = {m for m, t in zip(assigned[len(truth) // 2 :], truth[len(truth) // 2 :], strict=True)
               if t in ("calc", "search")} - {NOISE}  # fmt: skip
    assert len(format_ids) == 1 and format_ids.isdisjoint(old_ids)
    [new_id] = format_ids
    assert any(e.type == MODE_EMERGED and e.payload["mode"] == new_id for e in events)
    crossings = [e for e in events if e.type == MODE_MASS_CROSSED and e.payload["mode"] == new_id]
    assert len(crossings) == 1
    assert crossings[0].payload["mass"] >= 0.05
    assert crossings[0].payload["description"]["node"] == "wf/format"


def test_a_mode_whose_cause_stops_fades_out():
    detector = FailureDetector(settings(), tracker_factory=lambda ids: ModeTracker(half_life=500, ids=ids))
    first = stream(3_000, 0, {"calc": 0.15, "search": 0.15}, seed=4)
    _, assigned, truth = run(detector, first)
    calc_ids = {m for m, t in zip(assigned, truth, strict=True) if t == "calc"} - {NOISE}
    later_events, _, _ = run(detector, stream(12_000, 3_000, {"search": 0.5}, seed=5))
    faded = {e.payload["mode"] for e in later_events if e.type == MODE_FADED}
    assert calc_ids & faded
    assert all(row["mode"] not in calc_ids for row in detector.modes())


def test_mass_is_decayed_failures_over_decayed_executions():
    mass = MassTracker(half_life=10)
    key = ("wf", "1")
    for index in range(100):
        mass.execution(key)
        if index % 4 == 0:
            mass.failure(key, "m1")
    assert mass.mass(key, "m1") == pytest.approx(0.25, abs=0.06)
    for _ in range(100):
        mass.execution(key)
    assert mass.mass(key, "m1") < 0.01  # old failures are forgotten
    assert mass.support(key, "m1") == 25
    mass.failure(key, "m2")
    mass.rename("m2", "m1")
    assert set(mass.masses(key)) == {"m1"} and mass.support(key, "m1") == 26


def test_trigger_fires_once_per_crossing_with_hysteresis_and_cooldown():
    trigger = MassTrigger(threshold=0.1, min_support=5, hysteresis=0.5, cooldown_s=60)
    assert trigger.observe("wf", "1", "m1", 0.2, 4, now=0) is None  # not enough support
    assert trigger.observe("wf", "1", "m1", 0.2, 5, now=1) is not None
    assert trigger.observe("wf", "1", "m1", 0.3, 9, now=100) is None  # still above: no storm
    assert trigger.observe("wf", "1", "m1", 0.07, 9, now=101) is None  # between: not re-armed
    assert trigger.observe("wf", "1", "m1", 0.2, 9, now=102) is None
    assert trigger.observe("wf", "1", "m1", 0.04, 9, now=103) is None  # below threshold*hysteresis
    assert trigger.observe("wf", "1", "m1", 0.2, 9, now=104) is not None  # re-armed
    assert trigger.observe("wf", "1", "m2", 0.5, 9, now=110) is None  # the workflow's cooldown
    assert trigger.observe("wf", "1", "m2", 0.5, 9, now=200) is not None


def test_a_node_whose_modes_cross_together_triggers_once_with_the_modes_joined():
    """Two mechanisms at one node, each under the threshold, over it together: one crossing of the
    heavier mode with the other joined, mass and support theirs together; at another threshold
    that one of them reaches alone, that mode crosses by itself and no group does."""
    executions = stream(4_000, 0, {"calc": 0.035, "search": 0.03}, seed=11, at="tool")
    events, assigned, truth = run(FailureDetector(settings(min_support=20)), executions)
    modes = {
        t: {m for m, t2 in zip(assigned, truth, strict=True) if t2 == t} - {NOISE} for t in ("calc", "search")
    }
    assert len(modes["calc"]) == 1 and len(modes["search"]) == 1 and modes["calc"] != modes["search"]
    crossings = [e.payload for e in events if e.type == MODE_MASS_CROSSED]
    assert len(crossings) == 1
    [crossed] = crossings
    assert {crossed["mode"], *crossed["joined"]} == modes["calc"] | modes["search"]
    assert crossed["mass"] >= 0.05 and crossed["support"] >= 20
    alone = [e.payload for e in run(FailureDetector(settings(mass_threshold=0.025)), executions)[0]
             if e.type == MODE_MASS_CROSSED]  # fmt: skip
    assert alone and all(c["joined"] == [] for c in alone)


def test_node_groups_join_the_modes_under_the_threshold_at_one_node():
    observed = [
        Observed("a", "wf/x", 0.03, 30), Observed("b", "wf/x", 0.025, 20), Observed("c", "wf/x", 0.2, 90),
        Observed("d", "wf/y", 0.04, 40), Observed("e", "wf/z", 0.02, 5), Observed("f", "wf/z", 0.02, 5),
    ]  # fmt: skip
    groups = node_groups(observed, threshold=0.05)
    # x: a and b together (c crosses on its own); y: one mode is no group; z: 0.04 together
    assert [[item.mode for item in group] for group in groups] == [["a", "b"]]


def test_two_workflows_with_the_same_failures_get_modes_of_their_own():
    """The same failure in two workflows is two modes: density, mass, descriptions and ids stay apart."""
    executions = stream(3_000, 0, {"calc": 0.2}, seed=8)
    other = [
        (replace(e, workflow_id="other", nodes=[replace(n, workflow_id="other") for n in e.nodes]), m)
        for e, m in stream(3_000, 3_000, {"calc": 0.2}, seed=8)
    ]
    mixed = [pair for pairs in zip(executions, other, strict=True) for pair in pairs]
    detector = FailureDetector(settings())
    events, _, _ = run(detector, mixed)
    emerged = {e.payload["mode"]: e.payload["workflow_id"] for e in events if e.type == MODE_EMERGED}
    assert set(emerged.values()) == {"wf", "other"}
    rows = detector.modes()
    by_workflow = {row["workflow_id"]: row for row in rows}
    assert by_workflow["wf"]["mode"] != by_workflow["other"]["mode"]
    for row in rows:
        assert emerged[row["mode"]] == row["workflow_id"]
        assert row["description"]["node"].startswith(f"{row['workflow_id']}/")
    observed = [e.payload for e in events if e.type == FAILURE_OBSERVED and e.payload["mode"]]
    assert all(emerged[p["mode"]] == p["workflow_id"] for p in observed)


def test_a_mode_has_a_short_label_naming_its_node_and_error():
    detector = FailureDetector(settings())
    run(detector, stream(2_000, 0, {"calc": 0.2, "search": 0.2}, seed=9))
    labels = {row["description"]["label"] for row in detector.modes()}
    assert any(label.startswith("calc: ValueError") for label in labels), labels
    assert any(label.startswith("search: TimeoutError") and "request" in label for label in labels), labels
    assert all(len(label) < 80 for label in labels)
