"""The parts of Propose-and-Verify on their own: the grammar parse of an LLM's answer, job
scheduling from the log, the replay sample, and the HTTP shadow protocol."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import orjson
import uvicorn
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from otel_traces import make_traces, to_messages
from refinement_fixtures import ARITHMETIC_SLIP, EndsAtOnce, run_tasks

from cegraph.connectors.otlp.codec import decoder_for
from cegraph.connectors.shadow.http import HttpShadowTarget, shadow_endpoint
from cegraph.connectors.shadow.runtime import RuntimeShadowTarget, sim_evaluator_for
from cegraph.daemon.demo.process import free_port
from cegraph.daemon.detect.detector import FailureDetector
from cegraph.daemon.detect.stage import target_modes
from cegraph.daemon.embedded import EmbeddedDaemon
from cegraph.daemon.events import (
    CANARY_DECIDED,
    CANARY_STARTED,
    MODE_MASS_CROSSED,
    MODE_MERGED,
    REFINEMENT_STARTED,
    Event,
    FailureObservedPayload,
)
from cegraph.daemon.ingest.normalize import TextPolicy, normalize
from cegraph.daemon.ingest.pipeline import IngestPipeline, InMessage
from cegraph.daemon.refine.jobs import RefinementScheduler, RefinementStage
from cegraph.daemon.refine.operators import OPERATORS, Edit, apply_edit
from cegraph.daemon.refine.proposers import parse_edits
from cegraph.daemon.refine.refiner import JobEnd
from cegraph.daemon.refine.replay import ReplayItem, ReplayStore, needed, split
from cegraph.daemon.refine.shadow import ShadowRunner
from cegraph.daemon.runner import StageRunner
from cegraph.daemon.settings import DetectorSettings, IngestSettings, load_settings
from cegraph.daemon.sim import SimWorld
from cegraph.daemon.store import EventStore
from cegraph.daemon.workflows.registry import WorkflowRegistry
from cegraph.schemas.feedback import Feedback

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=20,
)
entries = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {
            "operator": st.sampled_from([*OPERATORS, "add_code_node", "run_shell"]),
            "node": st.text(max_size=70),
        },
        optional={
            "instruction": st.text(max_size=50),
            "samples": st.integers(-5, 20),
            "code": st.text(max_size=20),
        },
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(entries, max_size=6), st.text(max_size=30))
def test_an_answer_parses_into_grammar_edits_or_rejections_never_anything_else(edits, noise):
    answer = noise + json.dumps({"edits": edits}) + noise.replace("{", "").replace("}", "")
    for item, problem in parse_edits(answer, limit=4):
        if problem is None:
            assert isinstance(item, Edit) and item.operator in OPERATORS
        else:
            assert not isinstance(item, Edit) and problem


def test_out_of_grammar_answers_are_rejected_with_the_reason():
    [(_, whole)] = parse_edits("Sure! I will add a node that runs your shell.", limit=4)
    assert whole.startswith("not a JSON object")
    answer = orjson.dumps({"edits": [
        {"operator": "add_code_node", "node": "solve", "code": "import os"},
        {"operator": "edit_prompt", "node": "solve", "instruction": "x", "code": "import os"},
        {"operator": "programmer", "node": "solve"},
    ]}).decode()  # fmt: skip
    (_, unknown), (_, extra), (edit, ok) = parse_edits(answer, limit=4)
    assert "not in the operator grammar" in unknown and "operator" in unknown
    assert "code" in extra and ok is None and edit == Edit(operator="programmer", node="solve")


def crossed(store: EventStore, workflow: str, mode: str) -> None:
    payload = {"workflow_id": workflow, "workflow_version": "1.0.0", "mode": mode, "mass": 0.2}
    store.append([Event(MODE_MASS_CROSSED, mode, payload)])


def refine_stage(store: EventStore, refiner, now: list[float], cooldown_s: float = 60) -> StageRunner:
    scheduler = RefinementScheduler(store, cooldown_s=cooldown_s, clock=lambda: now[0])
    return StageRunner(store, RefinementStage(scheduler, refiner, WorkflowRegistry(store)))


def started(runner: StageRunner) -> str | None:
    """Step until a job starts (its id) or there is nothing to do (None); runs no job."""
    while (step := runner.step()) is not None:
        for event in step.events:
            if event.type == REFINEMENT_STARTED:
                return f"{event.payload['workflow_id']}/{event.payload['mode']}/{event.payload['job_id']}"
    return None


def test_jobs_come_from_the_log_one_per_workflow_after_its_cooldown(tmp_path):
    store = EventStore(tmp_path / "s.duckdb")
    now = [1_000.0]
    refiner = EndsAtOnce(now)
    try:
        crossed(store, "a", "m1")
        crossed(store, "a", "m1")  # the later trigger of the same mode supersedes the first
        crossed(store, "b", "m2")
        assert started(refine_stage(store, refiner, now)) == "a/m1/job-2"
        # the process dies here, the job started and not finished: the next one runs it first
        runner = refine_stage(store, refiner, now)
        assert started(runner) == "b/m2/job-3" and refiner.ran == ["job-2"]
        crossed(store, "a", "m3")
        assert started(runner) is None  # "a" is cooling down; b's job ran meanwhile
        assert refiner.ran == ["job-2", "job-3"]
        now[0] += 61
        store.append([Event(CANARY_STARTED, "a@1.1.0", {"workflow_id": "a", "version": "1.1.0"})])
        assert started(runner) is None  # one change at a time: "a" has a canary being judged
        store.append([Event(CANARY_DECIDED, "a@1.1.0", {"workflow_id": "a", "decision": "promote"})])
        assert started(runner).startswith("a/m3/")
        assert started(runner) is None and len(refiner.ran) == 3  # ran, found nothing
        now[0] += 61
        crossed(store, "a", "m3")  # the same mass again: nothing helped last time, so no new job
        assert started(runner) is None
        heavier = {"workflow_id": "a", "workflow_version": "1.0.0", "mode": "m3", "mass": 0.35}
        store.append([Event(MODE_MASS_CROSSED, "m3", heavier)])
        assert started(runner).startswith("a/m3/")  # much heavier now: worth another job
        assert started(runner) is None and len(refiner.ran) == 4
        restarted = refine_stage(store, refiner, now)
        assert started(restarted) is None and len(refiner.ran) == 4  # nothing runs twice
    finally:
        store.close()


def failed(store: EventStore, workflow: str, mode: str, count: int) -> None:
    observed = [FailureObservedPayload(f"f{i}", f"t{i}", None, "evaluation", "solve", mode, workflow, "1.0.0")
                for i in range(count)]  # fmt: skip
    store.append([payload.event(mode) for payload in observed])


def test_a_job_with_too_few_counterexamples_waits_and_is_tried_again_after_that_many_failures(tmp_path):
    store = EventStore(tmp_path / "s.duckdb")
    now = [1_000.0]
    refiner = EndsAtOnce(now)
    refiner.outcome, refiner.waiting_for = "waiting", 3
    try:
        crossed(store, "a", "m1")
        runner = refine_stage(store, refiner, now)
        assert started(runner) == "a/m1/job-1"
        assert started(runner) is None and refiner.ran == ["job-1"]
        [(outcome,)] = store.query("SELECT payload->>'outcome' FROM events WHERE type = 'RefinementFinished'")
        assert outcome == "waiting"  # an end an operator sees, not a failure
        failed(store, "a", "m1", 2)
        failed(store, "a", "m2", 5)  # another mode's failures do not count
        failed(store, "b", "m1", 5)  # nor another workflow's
        assert started(runner) is None
        runner = refine_stage(store, refiner, now)  # the wait survives a restart (the checkpoint)
        assert started(runner) is None
        refiner.outcome = "no_patch"
        failed(store, "a", "m1", 1)  # the third: no cooldown after a job that only waited
        [(third,)] = store.query("SELECT max(seq) FROM events")
        assert started(runner) == f"a/m1/job-{third}"
        assert started(runner) is None and refiner.ran == ["job-1", f"job-{third}"]
        failed(store, "a", "m1", 10)
        assert started(runner) is None  # ended without waiting: nothing more to wait for
    finally:
        store.close()


class KeepsJobs(EndsAtOnce):
    def __init__(self, now: list[float]) -> None:
        super().__init__(now)
        self.jobs: list = []

    def submit(self, job) -> JobEnd:
        self.jobs.append(job)
        return super().submit(job)


def test_a_nodes_crossing_targets_its_joined_modes_in_the_job_and_in_its_wait(tmp_path):
    """A crossing of a node's modes together starts one job whose target is them all (and what was
    merged into them); a wait for counterexamples counts the failures of any of them."""
    store = EventStore(tmp_path / "s.duckdb")
    now = [1_000.0]
    refiner = KeepsJobs(now)
    refiner.outcome, refiner.waiting_for = "waiting", 3
    try:
        store.append([Event(MODE_MERGED, "m4", {"mode": "m4", "into": "m3", "workflow_id": "a"})])
        payload = {"workflow_id": "a", "workflow_version": "1.0.0", "mode": "m1", "mass": 0.06,
                   "joined": ["m2", "m3"]}  # fmt: skip
        store.append([Event(MODE_MASS_CROSSED, "m1", payload)])
        runner = refine_stage(store, refiner, now)
        assert started(runner) == "a/m1/job-2"
        assert started(runner) is None
        [job] = refiner.jobs
        assert job.joined == ("m2", "m3")
        assert target_modes(store, job.mode, job.joined) == ["m1", "m2", "m3", "m4"]
        failed(store, "a", "m2", 1)
        failed(store, "a", "m4", 1)  # merged into a joined mode: its failures are the target's
        failed(store, "a", "m9", 5)  # not in the target
        assert started(runner) is None
        refiner.outcome = "no_patch"
        failed(store, "a", "m1", 1)
        assert started(runner) is not None and refiner.jobs[-1].joined == ("m2", "m3")
    finally:
        store.close()


def test_a_skipped_job_sets_no_cooldown_so_the_next_mode_of_its_workflow_starts_at_once(tmp_path):
    # the real refine stage and refiner, with an hour's cooldown on the wall clock: the workflow's
    # version is not registered, so each job ends as soon as it has read its inputs
    settings = load_settings(store={"path": str(tmp_path / "s.duckdb")}, refiner={"cooldown_s": 3_600})
    daemon = EmbeddedDaemon(settings)
    try:
        crossed(daemon.store, "a", "m1")
        crossed(daemon.store, "a", "m2")
        ended = daemon.refine()
        assert [(job["mode"], job["outcome"]) for job in ended] == [("m1", "skipped"), ("m2", "skipped")]
        assert all("register the spec" in job["reason"] for job in ended)
    finally:
        daemon.close()


@given(st.integers(0, 10_000))
def test_a_stratum_is_split_between_the_two_samples_five_of_every_thirteen_to_confirmation(rows):
    choose, confirm = split(rows)
    assert choose + confirm == rows and confirm == rows * 5 // 13
    assert needed(5) == 13 and min(split(13)) >= 5 and min(split(12)) < 5


def slipping_daemon(tmp_path) -> tuple[EmbeddedDaemon, str]:
    """A daemon that has seen 300 arithmetic-slip executions, and the mode whose mass crossed."""
    daemon = EmbeddedDaemon(load_settings(store={"path": str(tmp_path / "s.duckdb")}))
    try:
        asyncio.run(run_tasks(ARITHMETIC_SLIP, range(300), SimpleSpanProcessor(daemon.exporter())))
        daemon.pump(drain=True)
        [(mode,)] = daemon.store.query(
            "SELECT DISTINCT payload->>'mode' FROM events WHERE type = 'ModeMassCrossed'"
        )
    except BaseException:
        daemon.close()
        raise
    return daemon, mode


def test_a_replay_sample_is_half_counterexamples_and_weights_stand_for_the_traffic(tmp_path):
    daemon, mode = slipping_daemon(tmp_path)
    try:
        replay = ReplayStore(daemon.store, retention=10_000)
        sample, fresh = replay.samples("arithmetic-slip", "1.0.0", [mode], 40, until_seq=daemon.stage.cursor)
        again = replay.samples("arithmetic-slip", "1.0.0", [mode], 40, until_seq=daemon.stage.cursor)
        other = replay.samples("arithmetic-slip", "1.0.0", [mode], 40, until_seq=daemon.stage.cursor, seed=1)
        failed = dict(daemon.store.query("SELECT trace_id, hard_failed OR eval_failed FROM executions"))
        seeds = dict(daemon.store.query("SELECT trace_id, seed FROM event_spans WHERE seed IS NOT NULL"))
    finally:
        daemon.close()
    assert len(sample.of("target")) == 20 and len(sample.items) == 40
    assert sum(sample.population.values()) == 300 and sample.unreplayable == 0
    for stratum, size in sample.population.items():
        drawn = sample.of(stratum)
        assert abs(sum(item.weight for item in drawn) - size) < 1e-6
    assert all(failed[item.trace_id] for item in sample.of("target"))
    assert not any(failed[item.trace_id] for item in sample.of("success"))
    assert all(item.seed == seeds[item.trace_id] and "question" in item.input for item in sample.items)
    # the confirmation sample a winner is confirmed on: disjoint, drawn from 5 of every 13 of each
    # stratum, its weights standing for the same traffic
    chosen = {item.trace_id for item in sample.items}
    assert len(fresh.of("target")) == 20 and not {item.trace_id for item in fresh.items} & chosen
    for stratum, size in fresh.population.items():
        assert abs(sum(item.weight for item in fresh.of(stratum)) - size) < 1e-6
    # the same seed draws the same two samples; another seed other ones, disjoint again
    assert again == (sample, fresh) and other != (sample, fresh)
    assert not {item.trace_id for item in other[0].items} & {item.trace_id for item in other[1].items}


def test_scarce_counterexamples_are_split_between_the_two_samples_not_all_taken_by_the_first(tmp_path):
    daemon, mode = slipping_daemon(tmp_path)
    try:
        sample, fresh = ReplayStore(daemon.store, retention=10_000).samples(
            "arithmetic-slip", "1.0.0", [mode], 400, until_seq=daemon.stage.cursor
        )
    finally:
        daemon.close()
    for stratum, rows in sample.population.items():
        assert (len(sample.of(stratum)), len(fresh.of(stratum))) == split(rows)


def test_the_http_shadow_protocol_gives_the_same_executions_as_the_built_in_runtime():
    world = SimWorld(0)
    direct = RuntimeShadowTarget(world.llm(), tools=world.tools(), evaluator_for=sim_evaluator_for(world))
    served = RuntimeShadowTarget(world.llm(), tools=world.tools(), evaluator_for=sim_evaluator_for(world))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(shadow_endpoint(served.run_spans), host="127.0.0.1", port=port,
                                           log_level="warning"))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    items = [
        ReplayItem(f"t{i}", i, world.task("arithmetic", i, digits=5).input, "target", 1.0) for i in range(12)
    ]

    async def both():
        remote = HttpShadowTarget(f"http://127.0.0.1:{port}/shadow")
        try:
            return [
                (await direct.run(ARITHMETIC_SLIP, item), await remote.run(ARITHMETIC_SLIP, item))
                for item in items
            ]
        finally:
            await remote.aclose()

    try:
        pairs = asyncio.run(both())
    finally:
        server.should_exit = True
        thread.join(10)

    def summary(spans):
        nodes = sorted((normalize(span, TextPolicy()) for span in spans), key=lambda n: n.node_id)
        return [(n.node_id, n.status, n.output_text, n.eval_failed, n.seed) for n in nodes]

    assert any(any(n[3] for n in summary(a)) for a, _ in pairs)  # some fail: the verdict travels too
    for local, remote in pairs:
        assert summary(local) == summary(remote)


def test_a_trigger_of_the_version_a_promotion_replaced_never_starts(tmp_path):
    """Right after a promotion, executions of the replaced version are still being stored: the job must
    refine the promoted version, not the one it replaced (whose patch no service would run)."""
    store = EventStore(tmp_path / "s.duckdb")
    now = [0.0]
    scheduler = RefinementScheduler(store, cooldown_s=0, clock=lambda: now[0])
    runner = refine_stage(store, EndsAtOnce(now), now, cooldown_s=0)
    try:
        promoted = {"workflow_id": "a", "version": "1.1.0", "decision": "promote"}
        store.append([Event(CANARY_STARTED, "a@1.1.0", {"workflow_id": "a", "version": "1.1.0"})])
        store.append([Event(CANARY_DECIDED, "a@1.1.0", promoted)])
        pipeline = IngestPipeline(
            store, decoder_for("otlp_proto"), IngestSettings(), spans_topic="s", feedback_topic="f"
        )
        late = make_traces(3, workflow="a", version="1.0.0")  # the old stable, still arriving
        pipeline.handle([InMessage("s", 0, i, m.value) for i, m in enumerate(to_messages(late))])
        pipeline.flush(drain=True)
        assert scheduler.stable_version("a") == "1.1.0"
        crossed(store, "a", "m1")  # measured on 1.0.0
        assert started(runner) is None
        newer = {"workflow_id": "a", "workflow_version": "1.1.0", "mode": "m1", "mass": 0.2}
        store.append([Event(MODE_MASS_CROSSED, "m1", newer)])
        assert started(runner).startswith("a/m1/")
        [(version,)] = store.query(
            "SELECT payload->>'workflow_version' FROM events WHERE type = ?", REFINEMENT_STARTED
        )
        assert version == "1.1.0"
    finally:
        store.close()


def test_a_replayed_input_carries_the_latest_expected_output_its_feedback_gave(tmp_path):
    settings = load_settings(store={"path": str(tmp_path / "s.duckdb")})
    daemon = EmbeddedDaemon(settings)
    try:
        asyncio.run(run_tasks(ARITHMETIC_SLIP, range(120), SimpleSpanProcessor(daemon.exporter())))
        daemon.pump(drain=True)
        [(mode,)] = daemon.store.query(
            "SELECT DISTINCT payload->>'mode' FROM events WHERE type = 'ModeMassCrossed'"
        )
        traces = [t for (t,) in daemon.store.query("SELECT trace_id FROM executions ORDER BY trace_id")]
        feedback = [
            (traces[0], {"arithmetic": {"answer": 1}}),
            (traces[0], {"arithmetic": {"answer": 2}}),  # the later correction wins
            (traces[1], None),  # feedback without an expected output gives no reference
            (traces[2], "Answer: 7"),
        ]
        messages = [
            InMessage(
                settings.kafka.feedback_topic, 0, offset,
                Feedback(trace_id=trace, outcome="failed", expected=expected).model_dump_json().encode(),
            )
            for offset, (trace, expected) in enumerate(feedback)
        ]  # fmt: skip
        daemon.pipeline.handle(messages)
        daemon.pipeline.flush(drain=True)
        samples = ReplayStore(daemon.store, retention=10_000).samples(
            "arithmetic-slip", "1.0.0", [mode], 120, until_seq=daemon.stage.cursor
        )
    finally:
        daemon.close()
    references = {item.trace_id: item.reference for sample in samples for item in sample.items}
    assert references[traces[0]] == {"arithmetic": {"answer": 2}}
    assert references[traces[1]] is None and references[traces[2]] == "Answer: 7"
    assert sum(reference is not None for reference in references.values()) == 2


def test_a_shadow_run_counts_every_completion_an_ensemble_samples_and_a_retry_each_one():
    """The cost of a candidate is what the model was asked for: five samples are five calls."""
    world = SimWorld(0)
    spec = apply_edit(ARITHMETIC_SLIP, Edit(operator="ensemble", node="solve", samples=5), "1.1.0")[0]
    target = RuntimeShadowTarget(world.llm(), tools=world.tools(), evaluator_for=sim_evaluator_for(world))
    items = [ReplayItem(f"t{i}", i, world.task("arithmetic", i).input, "target", 1.0) for i in range(6)]

    async def run():
        runs = [await target.runtime.execute(spec, item.input, seed=item.seed) for item in items]
        outcomes = await ShadowRunner(target).run(
            spec, items, FailureDetector(DetectorSettings()).classifier()
        )
        return runs, outcomes

    runs, outcomes = asyncio.run(run())
    expected = [sum(node.llm_calls for node in run.nodes) for run in runs]
    assert [outcome.llm_calls for outcome in outcomes] == expected
    assert min(expected) >= 5  # the five samples, not the one span they share
    # and which nodes completed, named as the spec names them (what a cost prediction of an edit reads)
    for run, outcome in zip(runs, outcomes, strict=True):
        assert {node.node_id for node in run.nodes if node.status == "ok"} == set(spec.nodes)
        assert frozenset(spec.nodes) <= outcome.completed
