"""Refine workers as processes against the real broker: a detect member (`--stages ingest,detect,rollout`)
sends its refinement job to the jobs topic, two `--stages refine` workers share it, the one running
the job is SIGKILLed, the other runs it again from the start, and the detect member publishes one
signed patch, with one end per job in its log."""

from __future__ import annotations

import uuid

from daemon_proc import Daemon, Scenario, patches_of, wait_until
from refinement_fixtures import ARITHMETIC_SLIP, register_and_send

from cegraph.daemon.events import REFINEMENT_FINISHED, REFINEMENT_STARTED
from cegraph.daemon.refine.signing import verify_signature
from cegraph.daemon.store import EventStore
from cegraph.daemon.workflows.registry import apply_patch
from cegraph.schemas.patch import WorkflowPatch

KEY = "workers-test-key"


def test_a_job_whose_refine_worker_is_killed_is_run_by_the_other_and_ends_once(kafka_bootstrap, tmp_path):
    suffix = uuid.uuid4().hex[:8]
    topics = {
        "CEGRAPH_KAFKA__JOBS_TOPIC": f"jobs-{suffix}",
        "CEGRAPH_KAFKA__JOB_RESULTS_TOPIC": f"ends-{suffix}",
    }
    scenario = Scenario(
        kafka_bootstrap, tmp_path, CEGRAPH_STAGES="ingest,detect,rollout", CEGRAPH_PUBLISHER__SIGNING_KEY=KEY,
        CEGRAPH_DETECTOR__LATENCY_TRAIT="false", **topics,
    )  # fmt: skip
    detect = scenario.daemon
    shared = {k: v for k, v in detect.env.items() if k.startswith("CEGRAPH_KAFKA__")}
    workers = []
    for name in ("w1", "w2"):
        (tmp_path / name).mkdir()
        env = {**shared, "CEGRAPH_STAGES": "refine", "CEGRAPH_STORE__PATH": str(tmp_path / name / "s.duckdb")}
        workers.append(Daemon(env, tmp_path / name / "daemon.log"))
    for worker in workers:  # side by side, so they share the jobs topic's partitions
        worker.launch()
    for worker in workers:
        worker.wait_ready()
    detect.start()
    try:
        register_and_send(detect.url, kafka_bootstrap, scenario.spans_topic, ARITHMETIC_SLIP, range(600))

        busy = wait_until(lambda: [w for w in workers if w.stats()["jobs"]["running"]], detect)
        killed = busy[0]
        killed.kill()  # mid-job: not committed, so the job goes to the other worker
        survivor = next(w for w in workers if w is not killed)
        [published] = wait_until(
            lambda: [p for p in patches_of(detect) if p["state"] == "published"], detect, timeout=300
        )
        assert survivor.stats()["jobs"]["done"] >= 1
    finally:
        for process in (detect, *workers):
            process.stop()

    patch = WorkflowPatch.model_validate(published["patch"])
    assert verify_signature(patch, KEY)
    assert apply_patch(ARITHMETIC_SLIP, patch).nodes["solve"].kind == "programmer"
    store = EventStore(scenario.store_path, read_only=True)
    try:
        started = [
            k
            for (k,) in store.query(
                "SELECT payload->>'job_id' FROM events WHERE type = ?", REFINEMENT_STARTED
            )
        ]
        ended = [
            k
            for (k,) in store.query(
                "SELECT payload->>'job_id' FROM events WHERE type = ?", REFINEMENT_FINISHED
            )
        ]
    finally:
        store.close()
    assert started and sorted(ended) == sorted(started), (started, ended)  # each job ended, once
