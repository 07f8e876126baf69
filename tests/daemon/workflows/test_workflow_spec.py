"""The workflow spec: what it accepts, the errors it gives (naming the node), its hash, its JSON Schema,
and that RFC 6902 patches can insert nodes and rewire edges."""

from __future__ import annotations

import copy
import json

import jsonpatch
import pytest

from cegraph.daemon.sim import SimWorld
from cegraph.schemas.workflow import (
    EXAMPLES_PATH,
    SCHEMA_PATH,
    SEMVER,
    WorkflowSpecError,
    compute_hash,
    example_spec,
    json_schema,
    parse_spec,
)

TOOLS = ["calculator", "kb_search"]


def spec_data(**changes: object) -> dict:
    data = {
        "id": "triage",
        "version": "1.0.0",
        "model": "sim-1",
        "input_schema": {"question": {"type": "string"}},
        "entry": "draft",
        "output": "final",
        "nodes": {
            "draft": {
                "kind": "llm",
                "prompt": "Answer: {question}",
                "inputs": {"question": "input.question"},
            },
            "review": {"kind": "review", "inputs": {"question": "input.question", "answer": "draft"}},
            "final": {"kind": "revise", "inputs": {"answer": "draft", "review": "review"}},
        },
        "edges": [{"source": "draft", "target": "review"}, {"source": "review", "target": "final"}],
    }
    data.update(changes)
    return data


def problems(data: dict, tools: list[str] | None = TOOLS) -> list[str]:
    with pytest.raises(WorkflowSpecError) as caught:
        parse_spec(data, tools=tools)
    return caught.value.problems


def test_the_example_specs_are_valid_against_the_simulated_tools():
    names = set(SimWorld(0).tools())
    assert names == set(TOOLS)
    specs = {
        path.stem: parse_spec(path.read_text(), tools=names) for path in sorted(EXAMPLES_PATH.glob("*.json"))
    }
    assert set(specs) == {"arithmetic", "arithmetic-calculator", "extraction", "qa", "coding", "service"}
    assert all(spec.content_hash and spec.content_hash.startswith("sha256:") for spec in specs.values())


def test_a_valid_spec_fills_in_defaults_and_orders_levels():
    spec = parse_spec(spec_data())
    assert spec.nodes["draft"].params.temperature == 0.0
    assert spec.topological_levels() == [["draft"], ["review"], ["final"]]
    assert spec.predecessors("final") == ["review"]


def test_unknown_node_kind_is_refused_naming_the_node():
    data = spec_data()
    data["nodes"]["review"]["kind"] = "oracle"
    [line] = problems(data)
    assert line.startswith("node 'review': unknown node kind 'oracle'")
    assert "llm" in line and "ensemble" in line


def test_a_cycle_names_the_nodes_in_it():
    data = spec_data(edges=[*spec_data()["edges"], {"source": "final", "target": "review"}])
    assert "cycle through nodes review -> final -> review" in problems(data)


def test_a_dangling_edge_names_the_missing_node():
    data = spec_data(edges=[*spec_data()["edges"], {"source": "final", "target": "publish"}])
    assert problems(data) == ["edge 2 (final -> publish): node 'publish' is not defined"]


def test_unreachable_node_and_undefined_inputs_are_named():
    data = spec_data()
    data["nodes"]["orphan"] = {"kind": "llm", "inputs": {"x": "input.missing", "y": "nowhere", "z": "final"}}
    found = problems(data)
    assert "node 'orphan': not reachable from the entry 'draft'" in found
    assert "node 'orphan': input 'x' refers to 'input.missing', not a field of input_schema" in found
    assert "node 'orphan': input 'y' refers to 'nowhere', which is not defined" in found
    assert "node 'orphan': input 'z' refers to 'final', which is not upstream of it" in found


def test_an_input_must_come_from_upstream():
    data = spec_data()
    data["nodes"]["draft"]["inputs"]["hint"] = "review"
    assert "node 'draft': input 'hint' refers to 'review', which is not upstream of it" in problems(data)


def test_prompt_placeholders_and_required_inputs_must_be_inputs():
    data = spec_data()
    data["nodes"]["draft"]["prompt"] = "Answer {question} in {language}"
    del data["nodes"]["final"]["inputs"]["review"]
    data["edges"] = [*data["edges"], {"source": "draft", "target": "final"}]
    found = problems(data)
    assert "node 'draft': the prompt uses {language}, which is not one of its inputs" in found
    assert "node 'final': a revise node needs the inputs ['review']" in found


def test_every_referenced_tool_must_be_registered():
    data = spec_data(
        nodes={"calc": {"kind": "tool", "tool": "abacus", "inputs": {"question": "input.question"}}},
        entry="calc",
        output="calc",
        edges=[],
    )
    assert problems(data) == [
        "node 'calc': 'abacus' is not a registered tool (registered: ['calculator', 'kb_search'])"
    ]
    assert parse_spec(data, tools=None).nodes["calc"].tool == "abacus"  # no registry given: structure only


def test_field_errors_name_the_node_and_the_field():
    data = spec_data()
    data["nodes"]["draft"]["params"] = {"temperature": 3.5}
    data["nodes"]["review"]["tool"] = "calculator"
    found = problems(data)
    assert "node 'draft' (params.temperature): Input should be less than or equal to 2" in found
    assert "node 'review' (tool): Extra inputs are not permitted" in found


def test_route_edges_need_known_labels():
    data = spec_data(
        nodes={
            "route": {
                "kind": "route",
                "inputs": {"q": "input.question"},
                "params": {"routes": [{"label": "math", "pattern": r"\d"}], "default": "prose"},
            },
            "a": {"kind": "llm", "inputs": {"q": "input.question"}},
        },
        entry="route",
        output="a",
        edges=[{"source": "route", "target": "a", "when": "poetry"}],
    )
    assert problems(data) == [
        "edge 0 (route -> a): label 'poetry' is not one of route 'route''s labels ['math', 'prose']"
    ]


@pytest.mark.parametrize("version", ["1.0", "01.2.3", "1.2.3.4", "v1.2.3", "1.2.3-"])
def test_versions_must_be_semantic(version):
    assert problems(spec_data(version=version)) == [
        f"version: {version!r} is not a semantic version such as 1.2.0"
    ]


def test_semver_accepts_prereleases_and_build_metadata():
    assert SEMVER.match("1.2.3-rc.1+build.5") and SEMVER.match("0.0.0") and SEMVER.match("10.20.30-alpha")


def test_the_content_hash_covers_everything_but_itself():
    spec = parse_spec(spec_data())
    again = parse_spec(json.loads(spec.model_dump_json()))  # the hash travels with the document
    assert again.content_hash == spec.content_hash == compute_hash(spec)
    changed = spec_data()
    changed["nodes"]["draft"]["prompt"] = "Answer briefly: {question}"
    assert parse_spec(changed).content_hash != spec.content_hash
    assert parse_spec(spec_data(version="1.0.1")).content_hash != spec.content_hash
    tampered = {**spec.model_dump(mode="json"), "description": "edited after hashing"}
    [line] = problems(tampered)
    assert line.startswith(f"content_hash {spec.content_hash} does not match the content")


def test_the_checked_in_json_schema_is_the_generated_one():
    checked_in = json.loads(SCHEMA_PATH.read_text())
    assert checked_in == json_schema(), "regenerate with: python -m cegraph.schemas.workflow"
    assert set(checked_in["properties"]) >= {
        "id",
        "version",
        "nodes",
        "edges",
        "input_schema",
        "content_hash",
    }


def test_a_json_patch_inserts_a_node_and_rewires_edges():
    """Insert a format node between extract and the output, the way an operator's patch would."""
    base = example_spec("extraction")
    node = {"kind": "format", "inputs": {"answer": "extract"}, "params": {"output_format": "json"}}
    patch = jsonpatch.JsonPatch(
        [
            {"op": "add", "path": "/nodes/format", "value": node},
            {"op": "add", "path": "/edges/-", "value": {"source": "extract", "target": "format"}},
            {"op": "replace", "path": "/output", "value": "format"},
            {"op": "replace", "path": "/version", "value": "1.1.0"},
        ]
    )
    patched = parse_spec(patch.apply(base.canonical()), tools=TOOLS)
    assert patched.output == "format" and patched.topological_levels() == [["extract"], ["format"]]
    assert patched.content_hash != base.content_hash


def test_a_guarded_patch_removes_an_edge_and_refuses_a_stale_base():
    base = parse_spec(spec_data())
    rewire = [
        {"op": "test", "path": "/edges/1", "value": {"source": "review", "target": "final", "when": None}},
        {"op": "remove", "path": "/edges/1"},
        {"op": "add", "path": "/edges/-", "value": {"source": "draft", "target": "final"}},
        {"op": "remove", "path": "/nodes/final/inputs/review"},
        {"op": "replace", "path": "/nodes/final/kind", "value": "format"},
    ]
    document = base.canonical()
    document["nodes"]["final"]["params"] = {"output_format": "text"}
    patched = parse_spec(jsonpatch.apply_patch(document, rewire))
    assert [(e.source, e.target) for e in patched.edges] == [("draft", "review"), ("draft", "final")]
    stale = copy.deepcopy(document)
    stale["edges"].reverse()
    with pytest.raises(jsonpatch.JsonPatchTestFailed):
        jsonpatch.apply_patch(stale, rewire)


def test_the_input_model_checks_task_inputs():
    model = example_spec("coding").input_model()
    assert model.model_validate({"task": "t", "tests": ["assert True"]}).model_dump() == {
        "task": "t",
        "tests": ["assert True"],
    }
    with pytest.raises(ValueError, match="tests"):
        model.model_validate({"task": "t"})
