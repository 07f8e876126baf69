"""The patch and rollout messages: their checked-in JSON Schemas, and RFC 6902 operations that carry
exactly the members their `op` takes."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from cegraph.schemas.export import CONTRACTS, json_schema, schema_path
from cegraph.schemas.patch import PatchOperation, WorkflowPatch
from cegraph.schemas.rollout import RolloutDecision


@pytest.mark.parametrize("name", sorted(CONTRACTS))
def test_the_checked_in_json_schema_is_the_generated_one(name):
    checked_in = json.loads(schema_path(name).read_text())
    assert checked_in == json_schema(name), "regenerate with: python -m cegraph.schemas.export"


def test_operations_serialize_as_rfc6902():
    operations = [
        {"op": "add", "path": "/nodes/check", "value": None},
        {"op": "remove", "path": "/edges/0"},
        {"op": "replace", "path": "/nodes/solve/params/temperature", "value": 0.2},
        {"op": "move", "from": "/nodes/a", "path": "/nodes/b"},
        {"op": "copy", "from": "/nodes/a", "path": "/nodes/c"},
        {"op": "test", "path": "/version", "value": "1.0.0"},
    ]
    patch = WorkflowPatch(
        workflow_id="arithmetic", base_version="1.0.0", new_version="1.1.0", operations=operations,
        content_hash="sha256:" + "a" * 64,
    )  # fmt: skip
    assert patch.json_patch() == operations
    assert WorkflowPatch.model_validate_json(patch.model_dump_json()) == patch


@pytest.mark.parametrize(
    ("operation", "problem"),
    [
        ({"op": "add", "path": "/x"}, "needs a 'value'"),
        ({"op": "move", "path": "/x"}, "needs a 'from'"),
        ({"op": "rename", "path": "/x"}, "Input should be 'add'"),
        ({"op": "remove", "path": "x"}, "should match pattern"),
    ],
)
def test_a_malformed_operation_is_refused(operation, problem):
    with pytest.raises(ValidationError, match=problem):
        PatchOperation.model_validate(operation)


def test_versions_and_hashes_are_checked():
    with pytest.raises(ValidationError, match="should match pattern"):
        RolloutDecision(workflow_id="arithmetic", version="v2", decision="promote")
    with pytest.raises(ValidationError, match="should match pattern"):
        WorkflowPatch(
            workflow_id="arithmetic", base_version="1.0.0", new_version="1.1.0", content_hash="md5:x",
            operations=[{"op": "remove", "path": "/x"}],
        )  # fmt: skip
