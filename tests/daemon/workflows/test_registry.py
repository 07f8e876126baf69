"""The workflow registry on a real DuckDB file: registration rules, the projection and its rebuild,
executions linked to the version they ran, and spec diffs and patches as RFC 6902 operations."""

from __future__ import annotations

import asyncio

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cegraph.connectors.otlp.codec import decoder_for
from cegraph.connectors.otlp.span_export import otlp_messages
from cegraph.daemon.events import WORKFLOW_REGISTERED
from cegraph.daemon.ingest.pipeline import IngestPipeline, InMessage
from cegraph.daemon.settings import IngestSettings
from cegraph.daemon.sim import SimWorld
from cegraph.daemon.store import EventStore
from cegraph.daemon.workflows.registry import (
    LATEST,
    PatchError,
    UnknownWorkflowError,
    VersionConflictError,
    WorkflowRegistry,
    apply_patch,
    spec_diff,
    version_key,
)
from cegraph.daemon.workflows.runtime import WorkflowRuntime
from cegraph.schemas.patch import WorkflowPatch
from cegraph.schemas.workflow import WorkflowSpec, example_spec, parse_spec


def variant(spec: WorkflowSpec, version: str, temperature: float = 0.55) -> WorkflowSpec:
    """Another version of `spec` whose first node runs at another temperature."""
    data = spec.canonical()
    data["version"] = version
    data["nodes"][spec.entry]["params"]["temperature"] = temperature
    return parse_spec(data)


@pytest.fixture
def store(tmp_path):
    store = EventStore(tmp_path / "cegraph.duckdb")
    yield store
    store.close()


@pytest.fixture
def registry(store):
    return WorkflowRegistry(store)


BASE = example_spec("arithmetic")


def registered_events(store: EventStore) -> int:
    return store.query("SELECT count(*) FROM events WHERE type = ?", WORKFLOW_REGISTERED)[0][0]


def test_semver_precedence():
    ordered = [
        "0.9.0", "1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta", "1.0.0-beta.2",
        "1.0.0-beta.11", "1.0.0-rc.1", "1.0.0", "1.0.1", "1.2.0", "1.10.0", "2.0.0",
    ]  # fmt: skip  # semver.org's example chain, plus numeric (not textual) order of 1.2 < 1.10
    assert sorted(reversed(ordered), key=version_key) == ordered
    assert version_key("1.0.0+build.1") == version_key("1.0.0+build.2") == version_key("1.0.0")
    with pytest.raises(ValueError, match="not a semantic version"):
        version_key("1.0")


def test_registering_the_same_content_twice_is_a_no_op(store, registry):
    first = registry.register(BASE)
    again = registry.register(parse_spec(BASE.model_dump(mode="json")))
    assert first.created and not again.created
    assert again.version == first.version
    assert registered_events(store) == 1


def test_a_new_version_must_be_greater_than_the_latest(store, registry):
    registry.register(BASE)
    registry.register(variant(BASE, "1.2.0"))
    for version in ("1.1.0", "1.2.0-rc.1", "0.1.0"):
        with pytest.raises(VersionConflictError, match=r"not greater than the latest .* 1\.2\.0"):
            registry.register(variant(BASE, version))
    with pytest.raises(VersionConflictError, match="not greater"):
        registry.register(variant(BASE, "1.2.0+other-build"))
    assert registry.register(variant(BASE, "1.10.0")).created
    assert [v.version for v in registry.versions("arithmetic")] == ["1.0.0", "1.2.0", "1.10.0"]
    assert registered_events(store) == 3


def test_the_same_version_with_other_content_is_refused(registry):
    registry.register(BASE)
    with pytest.raises(VersionConflictError, match=r"arithmetic@1\.0\.0 is already registered with other"):
        registry.register(variant(BASE, "1.0.0", temperature=0.9))


def test_workflows_are_independent_and_latest_is_the_greatest(registry):
    registry.register(variant(BASE, "2.0.0"))
    registry.register(example_spec("qa"))
    assert registry.get("arithmetic").version == "2.0.0"
    assert registry.get("qa", LATEST).spec == example_spec("qa")
    listed = [(v.workflow_id, v.version) for v in registry.versions()]
    assert listed == [("arithmetic", "2.0.0"), ("qa", "1.0.0")]
    with pytest.raises(UnknownWorkflowError, match="no workflow 'nope'"):
        registry.get("nope")
    with pytest.raises(UnknownWorkflowError, match=r"registered: 2\.0\.0"):
        registry.get("arithmetic", "1.0.0")


def test_the_stored_spec_is_the_registered_one(registry):
    spec = variant(BASE, "1.1.0")
    registry.register(spec)
    found = registry.get("arithmetic", "1.1.0")
    assert found.spec == spec
    assert found.content_hash == spec.content_hash


def test_rebuild_recomputes_the_registry(store, registry):
    registry.register(BASE)
    registry.register(variant(BASE, "1.1.0"))
    live = store.projection_digest()
    assert live["workflow_versions"].endswith(":2")
    store.rebuild()
    assert store.projection_digest() == live
    assert [v.version for v in registry.versions()] == ["1.0.0", "1.1.0"]


def test_executions_are_linked_to_the_version_they_ran(store, registry):
    """Runtime spans, ingested like Kafka messages: each execution counts toward its spec version."""
    newer = variant(BASE, "1.1.0")
    registry.register(BASE)
    registry.register(newer)
    world = SimWorld(3)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    runtime = WorkflowRuntime(world.llm(), provider, tools=world.tools())
    tasks = world.tasks("arithmetic", 7)

    async def run() -> None:
        await asyncio.gather(
            *(runtime.execute(BASE if i < 4 else newer, t.input, seed=i) for i, t in enumerate(tasks))
        )

    asyncio.run(run())
    messages = otlp_messages(exporter.get_finished_spans(), partition_by_trace=True)
    pipeline = IngestPipeline(
        store, decoder_for("otlp_proto"), IngestSettings(), spans_topic="spans", feedback_topic="feedback"
    )
    pipeline.handle([InMessage("spans", 0, offset, payload) for offset, (_, payload) in enumerate(messages)])
    pipeline.flush(drain=True)
    counts = {v.version: v.executions for v in registry.versions("arithmetic")}
    assert counts == {"1.0.0": 4, "1.1.0": 3}


def test_diff_and_patch_are_inverse():
    newer = variant(BASE, "1.1.0")
    operations = spec_diff(BASE, newer)
    assert {"op": "replace", "path": "/version", "value": "1.1.0"} in operations
    patch = WorkflowPatch(
        workflow_id="arithmetic", base_version="1.0.0", new_version="1.1.0", operations=operations,
        content_hash=newer.content_hash,
    )  # fmt: skip
    assert apply_patch(BASE, patch) == newer


def _patch(**changes) -> WorkflowPatch:
    newer = variant(BASE, "1.1.0")
    fields = {
        "workflow_id": "arithmetic", "base_version": "1.0.0", "new_version": "1.1.0",
        "operations": spec_diff(BASE, newer), "content_hash": newer.content_hash,
    }  # fmt: skip
    return WorkflowPatch(**{**fields, **changes})


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"base_version": "0.9.0"}, "is for arithmetic@0.9.0"),
        ({"workflow_id": "qa"}, "is for qa@1.0.0"),
        ({"new_version": "1.0.0"}, "not greater than 1.0.0"),
        ({"operations": [{"op": "test", "path": "/model", "value": "other"}]}, "do not apply"),
        ({"operations": [{"op": "remove", "path": "/nodes/nowhere"}]}, "do not apply"),
        ({"operations": [{"op": "replace", "path": "/entry", "value": "ghost"}]}, "refused"),
        ({"operations": [{"op": "replace", "path": "/version", "value": "1.2.0"}]}, "has version 1.2.0"),
        ({"content_hash": "sha256:" + "0" * 64}, "content hash is sha256:"),
    ],
)
def test_a_patch_that_does_not_produce_what_it_announces_is_refused(changes, reason):
    with pytest.raises(PatchError, match=reason):
        apply_patch(BASE, _patch(**changes))
