"""The operator grammar: the only edits cegraph may make to a workflow.

An `Edit` names an operator, the node it targets and the operator's few arguments; nothing else can
be expressed, so a proposer (rules, an LLM, the prompt editor) can only ever choose among these.
Each operator has a precondition (`refusal` says why an edit does not apply), the RFC 6902
operations it makes on the spec's canonical JSON, a cost estimate (extra LLM calls per execution)
and the fewest calls its structure adds to each run of its node (what the cost cap refuses a
candidate on before it runs). `apply_edit` applies the operations and validates the result as a
spec, so an edit that would break the graph is refused, never published.

Graph surgery follows the spec's conventions (schemas/workflow.py): nodes are addressed by JSON
pointer `/nodes/<id>`, edges are rewired with a guarded `test` + `replace` on `/edges/<i>`, and a
node inserted after another takes over its successors, its downstream references and, if it was
the workflow's output, the output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import jsonpatch
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from cegraph.schemas.workflow import Node, WorkflowSpec, WorkflowSpecError, parse_spec

OperatorName = Literal[
    "custom_generate", "format", "review_revise", "ensemble", "programmer", "test", "insert_verifier",
    "add_retrieval", "retry_with_validation", "validate_tool_arguments", "adjust_parameter", "edit_prompt",
]  # fmt: skip
LLM_KINDS = frozenset(
    {"llm", "ensemble", "programmer", "review", "revise", "format", "verify", "test", "tool"}
)
GENERATING_KINDS = frozenset({"llm", "ensemble", "programmer", "revise"})
MAX_INSTRUCTION = 2_000


class Edit(BaseModel):
    """One operator applied to one node: the whole vocabulary a proposer has."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    operator: OperatorName
    node: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
    instruction: str | None = Field(
        None, max_length=MAX_INSTRUCTION, description="custom_generate, edit_prompt"
    )
    output_format: Literal["json", "number", "text"] | None = Field(None, description="format")
    samples: int | None = Field(None, ge=3, le=9, description="ensemble")
    retriever: str | None = Field(None, max_length=64, description="add_retrieval")
    parameter: Literal["temperature", "max_tokens"] | None = Field(None, description="adjust_parameter")
    value: float | None = Field(None, ge=0, le=200_000, description="adjust_parameter")
    required_keys: list[str] = Field(default_factory=list, max_length=20, description="retry_with_validation")


class EditRefused(ValueError):
    """The edit does not apply to this spec, or its result is not a valid spec."""


Operations = list[dict[str, Any]]


def _new_id(doc: dict[str, Any], base: str) -> str:
    candidate, counter = base[:60], 2
    while candidate in doc["nodes"]:
        candidate, counter = f"{base[:57]}_{counter}", counter + 1
    return candidate


def _references(value: str | list[str], target: str) -> bool:
    return target in ([value] if isinstance(value, str) else value)


def _insert_after(doc: dict[str, Any], target: str, new_id: str, node: dict[str, Any]) -> Operations:
    """`node` runs after `target` and takes over everything that used `target`'s output."""
    ops: Operations = [{"op": "add", "path": f"/nodes/{new_id}", "value": node}]
    for index, edge in enumerate(doc["edges"]):
        if edge["source"] == target:
            ops += [
                {"op": "test", "path": f"/edges/{index}/source", "value": target},
                {"op": "replace", "path": f"/edges/{index}/source", "value": new_id},
            ]
    ops.append({"op": "add", "path": "/edges/-", "value": {"source": target, "target": new_id, "when": None}})
    for node_id, other in doc["nodes"].items():
        for name, refs in other.get("inputs", {}).items():
            if node_id != target and _references(refs, target):
                moved = new_id if isinstance(refs, str) else [new_id if r == target else r for r in refs]
                ops.append({"op": "replace", "path": f"/nodes/{node_id}/inputs/{name}", "value": moved})
    if doc["output"] == target:
        ops.append({"op": "replace", "path": "/output", "value": new_id})
    return ops


def _insert_before(
    doc: dict[str, Any], target: str, new_id: str, node: dict[str, Any], name: str
) -> Operations:
    """`node` runs before `target` (after its predecessors) and feeds it as input `name`."""
    ops: Operations = [{"op": "add", "path": f"/nodes/{new_id}", "value": node}]
    for edge in doc["edges"]:
        if edge["target"] == target:
            ops.append({"op": "add", "path": "/edges/-", "value": {**edge, "target": new_id}})
    ops.append({"op": "add", "path": "/edges/-", "value": {"source": new_id, "target": target, "when": None}})
    ops.append({"op": "add", "path": f"/nodes/{target}/inputs/{name}", "value": new_id})
    if doc["entry"] == target:
        ops.append({"op": "replace", "path": "/entry", "value": new_id})
    return ops


def _task_inputs(node: dict[str, Any]) -> dict[str, Any]:
    """The node's inputs that come from the task itself (what a new upstream node can also read)."""
    return {
        name: refs
        for name, refs in node.get("inputs", {}).items()
        if isinstance(refs, str) and refs.startswith("input")
    }


_NODE = TypeAdapter(Node)


def _canonical(node: dict[str, Any]) -> dict[str, Any]:
    """A new node as the spec's canonical JSON spells it (defaults included), so applying the
    operations gives exactly the canonical form of the edited spec."""
    return _NODE.validate_python(node).model_dump(mode="json")


def _llm_node(kind: str, prompt: str, inputs: dict[str, Any], **params: Any) -> dict[str, Any]:
    return _canonical({"kind": kind, "prompt": prompt, "inputs": inputs, "params": params})


def _set_param(target: str, name: str, value: Any) -> dict[str, Any]:
    return {"op": "add", "path": f"/nodes/{target}/params/{name}", "value": value}


# ------------------------------------------------------------------ operators


def _custom_generate(doc: dict[str, Any], edit: Edit) -> Operations:
    node = doc["nodes"][edit.node]
    instruction = (
        edit.instruction
        or "Work out what a correct answer must satisfy, step by step, before anyone answers."
    )
    planner = _llm_node("llm", instruction, _task_inputs(node) or {"task": "input"})
    return _insert_before(doc, edit.node, _new_id(doc, f"{edit.node}_plan"), planner, "plan")


def _format(doc: dict[str, Any], edit: Edit) -> Operations:
    fmt = edit.output_format or "text"
    node = _llm_node("format", f"Return the answer as {fmt}, nothing else.", {"answer": edit.node},
                     output_format=fmt, temperature=0.0)  # fmt: skip
    return _insert_after(doc, edit.node, _new_id(doc, f"{edit.node}_format"), node)


def _review_revise(doc: dict[str, Any], edit: Edit) -> Operations:
    review_id = _new_id(doc, f"{edit.node}_review")
    revise_id = _new_id({"nodes": {**doc["nodes"], review_id: {}}}, f"{edit.node}_revise")
    task = _task_inputs(doc["nodes"][edit.node])  # a reviewer must see the task, not just the answer
    review = _llm_node(
        "review", "Check the answer for mistakes.", {**task, "answer": edit.node}, temperature=0.0
    )
    revise = _llm_node(
        "revise", "Fix the answer as the review says.", {**task, "answer": edit.node, "review": review_id}
    )
    ops = _insert_after(doc, edit.node, revise_id, revise)
    ops.insert(1, {"op": "add", "path": f"/nodes/{review_id}", "value": review})
    ops += [
        {"op": "add", "path": "/edges/-", "value": {"source": edit.node, "target": review_id, "when": None}},
        {"op": "add", "path": "/edges/-", "value": {"source": review_id, "target": revise_id, "when": None}},
    ]
    return ops


def _ensemble(doc: dict[str, Any], edit: Edit) -> Operations:
    return [
        {"op": "replace", "path": f"/nodes/{edit.node}/kind", "value": "ensemble"},
        _set_param(edit.node, "samples", edit.samples or 5),
    ]


def _programmer(doc: dict[str, Any], edit: Edit) -> Operations:
    return [
        {"op": "replace", "path": f"/nodes/{edit.node}/kind", "value": "programmer"},
        _set_param(edit.node, "timeout_s", 5.0),
    ]


def _test(doc: dict[str, Any], edit: Edit) -> Operations:
    node = _llm_node(
        "test", "Fix the code so that the tests pass.", {"code": edit.node, "tests": "input.tests"}
    )
    return _insert_after(doc, edit.node, _new_id(doc, f"{edit.node}_test"), node)


def _insert_verifier(doc: dict[str, Any], edit: Edit) -> Operations:
    inputs = {**_task_inputs(doc["nodes"][edit.node]), "answer": edit.node}
    node = _llm_node("verify", "Verify the answer; correct it if it is wrong.", inputs, temperature=0.0)
    return _insert_after(doc, edit.node, _new_id(doc, f"{edit.node}_verify"), node)


def _add_retrieval(doc: dict[str, Any], edit: Edit) -> Operations:
    query = next(iter(_task_inputs(doc["nodes"][edit.node]).values()), "input")
    node = _canonical({"kind": "retrieve", "retriever": edit.retriever, "inputs": {"query": query}})
    return _insert_before(doc, edit.node, _new_id(doc, f"{edit.node}_retrieve"), node, "context")


def _retry_with_validation(doc: dict[str, Any], edit: Edit) -> Operations:
    check = (
        {"kind": "json", "required_keys": edit.required_keys} if edit.required_keys else {"kind": "number"}
    )
    if edit.output_format == "json":
        check = {"kind": "json", "required_keys": edit.required_keys}
    return [_set_param(edit.node, "validate_output", check), _set_param(edit.node, "retries", 2)]


def _validate_tool_arguments(doc: dict[str, Any], edit: Edit) -> Operations:
    return [_set_param(edit.node, "validate_arguments", True), _set_param(edit.node, "retries", 2)]


def _adjust_parameter(doc: dict[str, Any], edit: Edit) -> Operations:
    assert edit.parameter is not None and edit.value is not None
    value: float | int = int(edit.value) if edit.parameter == "max_tokens" else edit.value
    return [_set_param(edit.node, edit.parameter, value)]


def _edit_prompt(doc: dict[str, Any], edit: Edit) -> Operations:
    return [{"op": "replace", "path": f"/nodes/{edit.node}/prompt", "value": edit.instruction}]


def _kind(doc: dict[str, Any], edit: Edit) -> str:
    return doc["nodes"][edit.node]["kind"]


def _downstream_kinds(doc: dict[str, Any], node: str) -> set[str]:
    return {doc["nodes"][e["target"]]["kind"] for e in doc["edges"] if e["source"] == node}


@dataclass(frozen=True, slots=True)
class Operator:
    """One word of the grammar: what it changes, when it applies, and what it costs."""

    operations: Callable[[dict[str, Any], Edit], Operations]
    precondition: Callable[[dict[str, Any], Edit], str | None]  # why the edit does not apply, or None
    extra_calls: float  # LLM calls per execution it adds on average: the job budget's estimate
    # the fewest LLM calls it adds to every run of its node that completes, from its structure alone
    # (a verifier's one verdict, a reviewer's review and revision): what a candidate's cost is
    # predicted from before it runs; 0 for edits whose extra calls depend on what the node answers
    least_calls: Callable[[dict[str, Any], Edit], int] = lambda doc, edit: 0


def _needs(kinds: frozenset[str] | set[str]) -> Callable[[dict[str, Any], Edit], str | None]:
    return lambda doc, edit: None if _kind(doc, edit) in kinds else f"needs a node of kind {sorted(kinds)}"


def _calls(n: int) -> Callable[[dict[str, Any], Edit], int]:
    return lambda doc, edit: n


def _ensemble_least(doc: dict[str, Any], edit: Edit) -> int:
    """Its samples, less the most calls the node made before (one, and its retries)."""
    return max(0, (edit.samples or 5) - 1 - doc["nodes"][edit.node]["params"].get("retries", 0))


OPERATORS: dict[str, Operator] = {
    "custom_generate": Operator(_custom_generate, _needs(GENERATING_KINDS), 1.0, _calls(1)),
    "format": Operator(
        _format,
        lambda d, e: (
            "already formatted"
            if "format" in _downstream_kinds(d, e.node) or _kind(d, e) == "format"
            else _needs(GENERATING_KINDS)(d, e)
        ),
        1.0,
        _calls(1),
    ),
    "review_revise": Operator(_review_revise, _needs(GENERATING_KINDS), 2.0, _calls(2)),
    "ensemble": Operator(
        _ensemble,
        lambda d, e: _needs({"llm"})(d, e) or ("needs 3 to 9 samples" if e.samples is None else None),
        4.0,
        _ensemble_least,
    ),
    "programmer": Operator(_programmer, _needs({"llm"}), 0.5),
    "test": Operator(
        _test,
        lambda d, e: (
            _needs({"programmer", "llm"})(d, e)
            or (None if "tests" in d["input_schema"] else "the task input has no tests")
        ),
        1.0,
    ),
    "insert_verifier": Operator(_insert_verifier, _needs(GENERATING_KINDS), 1.5, _calls(1)),
    "add_retrieval": Operator(
        _add_retrieval,
        lambda d, e: _needs(GENERATING_KINDS)(d, e) or (None if e.retriever else "needs a retriever name"),
        0.0,
    ),
    "retry_with_validation": Operator(_retry_with_validation, _needs(GENERATING_KINDS | {"format"}), 0.5),
    "validate_tool_arguments": Operator(_validate_tool_arguments, _needs({"tool"}), 0.5),
    "adjust_parameter": Operator(
        _adjust_parameter,
        lambda d, e: (
            _needs(LLM_KINDS)(d, e)
            or (None if e.parameter and e.value is not None else "needs a parameter and a value")
            or ("temperature goes from 0 to 2" if e.parameter == "temperature" and e.value > 2 else None)
        ),
        0.0,
    ),
    "edit_prompt": Operator(
        _edit_prompt,
        lambda d, e: _needs(LLM_KINDS)(d, e) or (None if e.instruction else "needs the new instruction"),
        0.0,
    ),
}


def refusal(spec: WorkflowSpec, edit: Edit) -> str | None:
    """Why `edit` does not apply to `spec`, or None when it does."""
    doc = spec.canonical()
    if edit.node not in doc["nodes"]:
        return f"no node {edit.node!r} in {spec.id}@{spec.version}"
    return OPERATORS[edit.operator].precondition(doc, edit)


def operations(spec: WorkflowSpec, edit: Edit, new_version: str) -> Operations:
    """The RFC 6902 operations of `edit` on `spec`, with the version bump."""
    reason = refusal(spec, edit)
    if reason is not None:
        raise EditRefused(f"{edit.operator} on {edit.node}: {reason}")
    doc = spec.canonical()
    return [
        *OPERATORS[edit.operator].operations(doc, edit),
        {"op": "replace", "path": "/version", "value": new_version},
    ]


def cost(edit: Edit) -> float:
    """Extra LLM calls per execution the edit adds (0 for changes of parameters or prompts)."""
    return OPERATORS[edit.operator].extra_calls


def least_calls(spec: WorkflowSpec, edit: Edit) -> int:
    """The fewest LLM calls `edit` adds to each run of its node that completes (`Operator.least_calls`)."""
    return OPERATORS[edit.operator].least_calls(spec.canonical(), edit)


def apply_edit(
    spec: WorkflowSpec, edit: Edit, new_version: str, tools: list[str] | None = None
) -> tuple[WorkflowSpec, Operations]:
    """The edited spec, validated, and the operations that make it."""
    ops = operations(spec, edit, new_version)
    document = jsonpatch.apply_patch(spec.canonical(), ops)
    try:
        return parse_spec(document, tools=tools), ops
    except WorkflowSpecError as error:
        raise EditRefused(f"{edit.operator} on {edit.node} makes an invalid spec: {error}") from None
