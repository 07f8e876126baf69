"""The traffic generator without Kafka: rate, the deterministic canary split, and the rules by which it
follows patches and rollout decisions (a decision that does not fit is ignored with the reason logged)."""

from __future__ import annotations

import asyncio
import logging
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider

from cegraph.daemon.sim import SimWorld
from cegraph.daemon.sim.traffic import TrafficGenerator, infer_family
from cegraph.daemon.workflows.registry import spec_diff
from cegraph.daemon.workflows.runtime import WorkflowRuntime
from cegraph.schemas.patch import WorkflowPatch
from cegraph.schemas.rollout import RolloutDecision
from cegraph.schemas.workflow import WorkflowSpec, WorkflowSpecError, example_spec, parse_spec

BASE = example_spec("arithmetic")
CEGRAPH = str(Path(sys.executable).parent / "cegraph")


def variant(base: WorkflowSpec, version: str, **params) -> WorkflowSpec:
    data = base.canonical()
    data["version"] = version
    data["nodes"]["solve"]["params"].update(params or {"temperature": 0.1})
    return parse_spec(data)


def patch_to(base: WorkflowSpec, new: WorkflowSpec, **changes) -> WorkflowPatch:
    fields = {
        "workflow_id": base.id, "base_version": base.version, "new_version": new.version,
        "operations": spec_diff(base, new), "content_hash": new.content_hash,
    }  # fmt: skip
    return WorkflowPatch(**{**fields, **changes})


def generator(seed: int = 0, family: str = "arithmetic", **options) -> TrafficGenerator:
    """Spans go to a provider without processors: nowhere."""
    world = SimWorld(seed)
    runtime = WorkflowRuntime(world.llm(), TracerProvider(), tools=world.tools())
    return TrafficGenerator(runtime, world, BASE, family=family, seed=seed, **options)


def decide(decision: str, version: str) -> RolloutDecision:
    return RolloutDecision(workflow_id="arithmetic", version=version, decision=decision, reason="test")


def within_binomial(hits: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(hits - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


async def test_the_canary_split_follows_the_weight_and_the_seed():
    canary = variant(BASE, "1.1.0")
    runs = [
        await generator(seed, canary=canary, canary_weight=0.25, rate=100_000).run(count=400)
        for seed in (7, 7, 8)
    ]
    canary_runs = [s.counts[("canary", "1.1.0")].executions for s in runs]
    assert all(within_binomial(hits, 400, 0.25) for hits in canary_runs)
    assert runs[0].counts == runs[1].counts, "the same seed gives the same traffic and the same split"
    assert runs[0].counts != runs[2].counts
    assert sum(c.executions for c in runs[0].counts.values()) == 400
    assert runs[0].started == runs[0].finished == 400


async def test_the_rate_and_the_duration_bound_the_traffic():
    begin = time.monotonic()
    snapshot = await generator(rate=100).run(count=20)
    assert time.monotonic() - begin >= 0.19  # the 20th starts 0.19 s after the first
    assert snapshot.finished == 20
    assert (await generator(rate=50).run(duration_s=0.3)).started == 15


async def test_cancelling_stops_at_once():
    traffic = generator(rate=1_000)
    running = asyncio.create_task(traffic.run())
    await asyncio.sleep(0.2)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert traffic.snapshot().started > 0


def test_refused_arguments():
    with pytest.raises(ValueError, match="unknown task family 'poetry'"):
        generator(family="poetry")
    with pytest.raises(ValueError, match=r"within \[0, 1\]"):
        generator(canary_weight=1.5)
    with pytest.raises(WorkflowSpecError, match="another version of arithmetic"):
        generator(canary=example_spec("qa"))
    with pytest.raises(WorkflowSpecError, match="another version"):
        generator(canary=BASE)


def test_a_patch_starts_the_canary_and_a_promotion_makes_it_stable(caplog):
    caplog.set_level(logging.INFO, "cegraph.traffic")
    traffic = generator(canary_weight=0.2)
    newer = variant(BASE, "1.1.0")
    assert traffic.apply_patch(patch_to(BASE, newer))
    assert traffic.canary == newer and traffic.snapshot().canary_weight == 0.2
    assert not traffic.apply_patch(patch_to(BASE, newer)), "a redelivered patch changes nothing"
    assert not traffic.apply_rollout(decide("promote", "1.2.0"))
    assert "the canary is 1.1.0" in caplog.text
    assert traffic.apply_rollout(decide("promote", "1.1.0"))
    assert traffic.stable == newer and traffic.canary is None
    assert traffic.snapshot().canary_weight == 0.0

    newest = variant(newer, "1.2.0", max_tokens=256)
    assert traffic.apply_patch(patch_to(newer, newest))
    assert traffic.apply_rollout(decide("rollback", "1.2.0"))
    assert traffic.stable == newer and traffic.canary is None
    assert not traffic.apply_rollout(decide("rollback", "1.2.0"))
    assert "no canary runs" in caplog.text


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"base_version": "0.9.0"}, "the patch is for arithmetic@0.9.0"),
        ({"content_hash": "sha256:" + "1" * 64}, "content hash is"),
        ({"operations": [{"op": "remove", "path": "/nodes/solve"}]}, "the patched spec is refused"),
        ({"operations": [{"op": "test", "path": "/model", "value": "gpt-x"}]}, "do not apply"),
    ],
)
def test_a_patch_that_does_not_fit_is_ignored_with_the_reason(caplog, changes, reason):
    traffic = generator()
    assert not traffic.apply_patch(patch_to(BASE, variant(BASE, "1.1.0"), **changes))
    assert traffic.canary is None
    assert reason in caplog.text


def test_a_patch_naming_a_tool_the_runtime_lacks_is_ignored(caplog):
    data = BASE.canonical()
    data["version"] = "1.1.0"
    data["nodes"]["solve"] = {"kind": "tool", "tool": "abacus", "inputs": {"question": "input.question"}}
    newer = parse_spec(data)
    assert not generator().apply_patch(patch_to(BASE, newer))
    assert "'abacus' is not a registered tool" in caplog.text


def test_decisions_for_other_workflows_are_not_ours():
    traffic = generator()
    other = WorkflowPatch(
        workflow_id="qa", base_version="1.0.0", new_version="1.1.0", content_hash="sha256:" + "0" * 64,
        operations=[{"op": "replace", "path": "/version", "value": "1.1.0"}],
    )  # fmt: skip
    assert not traffic.apply_patch(other)
    assert not traffic.apply_rollout(RolloutDecision(workflow_id="qa", version="1.0.0", decision="promote"))
    assert traffic.canary is None and traffic.stable == BASE


def test_the_family_comes_from_the_workflow_id():
    families = SimWorld(0).families
    assert infer_family(example_spec("arithmetic-calculator"), families) == "arithmetic"
    assert infer_family(example_spec("qa"), families) == "qa"
    assert infer_family(parse_spec({**BASE.canonical(), "id": "support-bot"}), families) is None


def test_the_command_without_kafka(tmp_path):
    result = subprocess.run(
        [CEGRAPH, "simulate", "--workflow", "arithmetic", "--count", "40", "--rate", "2000/s",
         "--sink", "stdout-summary", "--seed", "4"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "40 executions" in result.stdout
    assert "stable" in result.stdout and "1.0.0" in result.stdout
    for args, message in [
        (("--workflow", "arithmetic", "--rate", "fast"), "not a positive rate"),
        (("--workflow", "arithmetic", "--count", "1", "--duration", "1"), "not both"),
        (("--workflow", str(tmp_path / "missing.json")), "neither a spec file nor an example"),
    ]:
        refused = subprocess.run(
            [CEGRAPH, "simulate", "--sink", "stdout-summary", *args],
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
        )  # fmt: skip
        assert refused.returncode != 0
        assert message in " ".join(refused.stderr.split())
