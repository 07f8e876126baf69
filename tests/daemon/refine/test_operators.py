"""The operator grammar: each operator's precondition, its RFC 6902 operations and the spec they make,
which must validate (and run); anything outside the grammar is refused."""

from __future__ import annotations

import asyncio

import jsonpatch
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider
from pydantic import ValidationError

from cegraph.daemon.refine.operators import (
    OPERATORS,
    Edit,
    EditRefused,
    apply_edit,
    cost,
    least_calls,
    refusal,
)
from cegraph.daemon.sim import SimWorld
from cegraph.daemon.workflows.runtime import WorkflowRuntime
from cegraph.schemas.workflow import example_spec

TOOLS = ["calculator", "kb_search"]


def run_once(spec, family: str) -> None:
    """The edited spec executes end to end on the simulated world."""
    world = SimWorld(2)
    runtime = WorkflowRuntime(world.llm(), TracerProvider(), tools=world.tools())
    [task] = world.tasks(family, 1)
    result = asyncio.run(runtime.execute(spec, task.input, seed=1, evaluator=world.evaluator(task)))
    assert result.output is not None


CASES = [
    ("arithmetic", Edit(operator="custom_generate", node="solve"), "arithmetic"),
    ("extraction", Edit(operator="format", node="extract", output_format="json"), "extraction"),
    ("arithmetic", Edit(operator="review_revise", node="solve"), "arithmetic"),
    ("arithmetic", Edit(operator="ensemble", node="solve", samples=5), "arithmetic"),
    ("arithmetic", Edit(operator="programmer", node="solve"), "arithmetic"),
    ("coding", Edit(operator="test", node="write"), "coding"),
    ("arithmetic", Edit(operator="insert_verifier", node="solve"), "arithmetic"),
    ("qa", Edit(operator="add_retrieval", node="answer", retriever="kb_search"), "qa"),
    (
        "extraction",
        Edit(
            operator="retry_with_validation",
            node="extract",
            output_format="json",
            required_keys=["customer", "quantity"],
        ),
        "extraction",
    ),
    ("arithmetic-calculator", Edit(operator="validate_tool_arguments", node="calculate"), "arithmetic"),
    (
        "arithmetic",
        Edit(operator="adjust_parameter", node="solve", parameter="temperature", value=0.0),
        "arithmetic",
    ),
    ("qa", Edit(operator="edit_prompt", node="answer", instruction="Answer with the name only."), "qa"),
]


def test_every_operator_is_covered():
    assert {edit.operator for _, edit, _ in CASES} == set(OPERATORS)


@pytest.mark.parametrize(("example", "edit", "family"), CASES, ids=[edit.operator for _, edit, _ in CASES])
def test_each_operator_makes_a_valid_spec_that_runs(example, edit, family):
    base = example_spec(example, tools=TOOLS)
    assert refusal(base, edit) is None
    spec, ops = apply_edit(base, edit, "1.1.0", tools=TOOLS)
    assert spec.version == "1.1.0" and spec.content_hash != base.content_hash
    assert jsonpatch.apply_patch(base.canonical(), ops) == spec.canonical()  # the operations are the edit
    assert cost(edit) >= 0
    run_once(spec, family)


@pytest.mark.parametrize(("example", "edit", "family"), CASES, ids=[edit.operator for _, edit, _ in CASES])
def test_an_edits_least_calls_are_what_it_adds_at_least_to_each_run_where_its_node_completed(
    example, edit, family
):
    """The cost cap refuses a candidate on `least_calls` before running it, so it must never be more
    than the edit adds: the same tasks and seeds on the base spec and the edited one."""
    base = example_spec(example, tools=TOOLS)
    spec, _ = apply_edit(base, edit, "1.1.0", tools=TOOLS)
    world = SimWorld(3)
    runtime = WorkflowRuntime(world.llm(), TracerProvider(), tools=world.tools())

    async def calls(spec, task, seed) -> tuple[int, bool]:
        result = await runtime.execute(spec, task.input, seed=seed, evaluator=world.evaluator(task))
        completed = any(n.node_id == edit.node and n.status == "ok" for n in result.nodes)
        return sum(node.llm_calls for node in result.nodes), completed

    least, compared = least_calls(base, edit), 0
    for seed, task in enumerate(world.tasks(family, 6)):
        (before, completed), (after, _) = (
            asyncio.run(calls(base, task, seed)),
            asyncio.run(calls(spec, task, seed)),
        )
        if completed:
            assert after - before >= least, (seed, before, after)
            compared += 1
    assert compared > 0
    structural = {"custom_generate": 1, "format": 1, "review_revise": 2, "ensemble": 4, "insert_verifier": 1}
    assert least == structural.get(edit.operator, 0)


def test_an_ensemble_of_a_node_that_retries_adds_its_samples_less_the_retries_it_replaces():
    base = example_spec("arithmetic", tools=TOOLS)
    retrying = apply_edit(base, Edit(operator="retry_with_validation", node="solve"), "1.1.0")[0]
    ensemble = Edit(operator="ensemble", node="solve", samples=7)
    assert least_calls(base, ensemble) == 6 and least_calls(retrying, ensemble) == 4


def test_insertion_after_rewires_successors_references_and_output():
    base = example_spec("arithmetic", tools=TOOLS)
    spec, _ = apply_edit(base, Edit(operator="review_revise", node="solve"), "1.1.0")
    assert spec.output == "solve_revise"
    # the reviewer and the reviser see the task as well as the answer
    assert spec.nodes["solve_review"].inputs == {"question": "input.question", "answer": "solve"}
    assert spec.nodes["solve_revise"].inputs == {
        "question": "input.question",
        "answer": "solve",
        "review": "solve_review",
    }
    assert {(e.source, e.target) for e in spec.edges} == {
        ("solve", "solve_review"), ("solve", "solve_revise"), ("solve_review", "solve_revise"),
    }  # fmt: skip
    formatted, _ = apply_edit(
        spec, Edit(operator="format", node="solve_revise", output_format="number"), "1.2.0"
    )
    assert formatted.output == "solve_revise_format"


def test_insertion_before_becomes_the_entry_and_feeds_the_target():
    base = example_spec("qa", tools=TOOLS)
    spec, _ = apply_edit(base, Edit(operator="add_retrieval", node="answer", retriever="kb_search"), "1.1.0")
    assert spec.entry == "answer_retrieve"
    assert spec.nodes["answer"].inputs["context"] == "answer_retrieve"
    assert spec.nodes["answer_retrieve"].inputs == {"query": "input.question"}


@pytest.mark.parametrize(
    ("example", "edit", "reason"),
    [
        ("qa", Edit(operator="ensemble", node="nowhere", samples=5), "no node"),
        ("arithmetic-calculator", Edit(operator="ensemble", node="calculate", samples=5), "kind"),
        ("arithmetic", Edit(operator="test", node="solve"), "no tests"),
        ("qa", Edit(operator="add_retrieval", node="answer"), "retriever"),
        ("arithmetic", Edit(operator="validate_tool_arguments", node="solve"), "kind"),
        (
            "arithmetic",
            Edit(operator="adjust_parameter", node="solve", parameter="temperature", value=5),
            "0 to 2",
        ),
    ],
)
def test_preconditions_refuse_with_a_reason(example, edit, reason):
    base = example_spec(example, tools=TOOLS)
    assert reason in (refusal(base, edit) or "")
    with pytest.raises(EditRefused, match=reason):
        apply_edit(base, edit, "1.1.0")


def test_formatting_twice_is_refused():
    base = example_spec("extraction", tools=TOOLS)
    spec, _ = apply_edit(base, Edit(operator="format", node="extract", output_format="json"), "1.1.0")
    assert "already formatted" in refusal(spec, Edit(operator="format", node="extract"))


def test_nothing_outside_the_grammar_can_be_expressed():
    with pytest.raises(ValidationError):
        Edit(operator="add_code_node", node="solve")
    with pytest.raises(ValidationError):
        Edit(operator="edit_prompt", node="solve", instruction="x", source="import os; os.system('rm -rf /')")
    with pytest.raises(ValidationError):
        Edit(operator="edit_prompt", node="../../etc", instruction="x")
    with pytest.raises(ValidationError):
        Edit(operator="edit_prompt", node="solve", instruction="x" * 5_000)


def test_a_prompt_that_names_an_input_the_node_lacks_is_refused():
    base = example_spec("qa", tools=TOOLS)
    with pytest.raises(EditRefused, match="invalid spec"):
        apply_edit(
            base,
            Edit(operator="edit_prompt", node="answer", instruction="Use {api_key} and answer."),
            "1.1.0",
        )


@given(st.lists(st.tuples(st.sampled_from(sorted(OPERATORS)), st.integers(0, 20)), min_size=1, max_size=5),
       st.sampled_from(["arithmetic", "extraction", "qa", "coding", "arithmetic-calculator"]))  # fmt: skip
@settings(max_examples=60, deadline=None)
def test_an_edit_whose_precondition_holds_always_makes_a_valid_spec(steps, example):
    """Preconditions are sufficient: chains of applicable edits never produce a spec that is refused."""
    spec = example_spec(example, tools=TOOLS)
    arguments = {
        "instruction": "Answer carefully.", "output_format": "json", "samples": 3, "retriever": "kb_search",
        "parameter": "max_tokens", "value": 256, "required_keys": ["a"],
    }  # fmt: skip
    for minor, (operator, pick) in enumerate(steps, start=1):
        node = sorted(spec.nodes)[pick % len(spec.nodes)]
        edit = Edit(operator=operator, node=node, **arguments)
        if refusal(spec, edit) is None:
            spec, _ = apply_edit(spec, edit, f"1.{minor}.0", tools=TOOLS)
            assert spec.version == f"1.{minor}.0"
        else:
            with pytest.raises(EditRefused):
                apply_edit(spec, edit, f"1.{minor}.0", tools=TOOLS)
