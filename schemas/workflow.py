"""The workflow spec: a versioned DAG of typed nodes that cegraph's runtime executes and its operators edit.

Nodes are a dict keyed by node id and edges a list of `{source, target}`, so RFC 6902 patches address
nodes by stable JSON pointers (`/nodes/<id>/params/temperature`) and rewire edges with a guarded
`test` + `remove` on `/edges/<i>`. A node reads its data through `inputs`: local name -> reference,
where a reference is `input` (the whole task input), `input.<field>`, or the id of an upstream node
(its output text). A list of references means "the first of these that ran" (joins after a route).

`WorkflowSpec.model_validate(data, context={"tools": names})` also checks that every tool and retriever
a node names is registered; `parse_spec` turns every problem into one line that names the node.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

SCHEMA_PATH = Path(__file__).with_name("workflow.schema.json")
EXAMPLES_PATH = Path(__file__).with_name("examples")  # baseline specs of the simulated task families

# semver.org's regular expression (2.0.0), anchored.
SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
INPUT = "input"

NodeId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")]
InputName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]
Reference = Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9_.-]{0,127}$")]


def regular_expression(value: str) -> str:
    """A pattern that Python's `re` compiles (else the error, as a validation message)."""
    try:
        re.compile(value)
    except re.error as error:
        raise ValueError(f"not a regular expression: {error}") from None
    return value


RegularExpression = Annotated[str, StringConstraints(min_length=1), AfterValidator(regular_expression)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputField(_Strict):
    """One field of the task input a workflow accepts."""

    type: Literal["string", "integer", "number", "boolean", "array", "object"] = "string"
    description: str = ""
    required: bool = True


class Edge(_Strict):
    """Execution order: `target` runs after `source`; `when` picks a route node's branch."""

    source: NodeId
    target: NodeId
    when: str | None = Field(None, description="Only on edges out of a route node: the label that takes it.")


class OutputCheck(_Strict):
    """Validation of an LLM node's output; a failing output is retried with the error as feedback."""

    kind: Literal["json", "number"]
    required_keys: list[str] = Field(default_factory=list, description="For json: keys the object must have.")


class LLMParams(_Strict):
    model: str | None = Field(None, description="Model; the spec's default model when unset.")
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    max_tokens: int | None = Field(None, ge=1, le=200_000)
    retries: int = Field(0, ge=0, le=10, description="Extra attempts when validate_output rejects an output.")
    validate_output: OutputCheck | None = None


class EnsembleParams(LLMParams):
    samples: int = Field(5, ge=2, le=25, description="Independent samples; the majority answer wins.")


class ProgrammerParams(LLMParams):
    timeout_s: float = Field(5.0, gt=0, le=120, description="Wall-clock limit of one program run.")


class ToolParams(LLMParams):
    validate_arguments: bool = Field(
        False, description="Check the LLM's arguments against the tool's schema and let it repair them."
    )


class FormatParams(LLMParams):
    output_format: Literal["json", "number", "text"] = "text"


class VerifyParams(LLMParams):
    rounds: int = Field(1, ge=1, le=5, description="Verify-and-regenerate rounds before giving up.")


class TestParams(LLMParams):
    __test__: ClassVar[bool] = False  # not a pytest test class

    rounds: int = Field(2, ge=1, le=5, description="Run-tests-and-fix rounds.")
    timeout_s: float = Field(5.0, gt=0, le=120)


class RetrieveParams(_Strict):
    top_k: int = Field(8, ge=1, le=100)
    hops: int = Field(1, ge=1, le=5, description="Rounds of expansion through the entities found.")


class CodeParams(_Strict):
    timeout_s: float = Field(5.0, gt=0, le=120)


class RouteRule(_Strict):
    label: str = Field(min_length=1)
    pattern: RegularExpression = Field(description="Python regular expression searched in the node's input.")


class RouteParams(_Strict):
    routes: list[RouteRule] = Field(min_length=1)
    default: str = Field(min_length=1, description="Label when no rule matches.")


class _Node(_Strict):
    kind: str  # narrowed to one literal by each node class; declared here so it serializes first
    description: str = ""
    inputs: dict[InputName, Reference | list[Reference]] = Field(default_factory=dict)

    # Input names the node's kind relies on (e.g. a reviewer needs the `answer` it reviews).
    required_inputs: ClassVar[tuple[str, ...]] = ()

    def references(self) -> Iterable[tuple[str, str]]:
        for name, refs in self.inputs.items():
            for ref in [refs] if isinstance(refs, str) else refs:
                yield name, ref

    def placeholders(self) -> set[str]:
        return set()


class _LLMNode(_Node):
    prompt: str = Field("", description="System instructions; `{name}` inserts the input `name`.")
    params: LLMParams = Field(default_factory=LLMParams)

    def placeholders(self) -> set[str]:
        return set(PLACEHOLDER.findall(self.prompt))


class LLMNode(_LLMNode):
    """One chat completion (AFlow's custom generate)."""

    kind: Literal["llm"]


class EnsembleNode(_LLMNode):
    """Self-consistency: several samples, the majority answer."""

    kind: Literal["ensemble"]
    params: EnsembleParams = Field(default_factory=EnsembleParams)


class ProgrammerNode(_LLMNode):
    """The LLM writes a Python program; its printed output is the node's output."""

    kind: Literal["programmer"]
    params: ProgrammerParams = Field(default_factory=ProgrammerParams)


class ReviewNode(_LLMNode):
    """Critiques `answer`; the output starts with `VERDICT: PASS` or `VERDICT: FAIL`."""

    kind: Literal["review"]
    required_inputs: ClassVar[tuple[str, ...]] = ("answer",)


class ReviseNode(_LLMNode):
    """Rewrites `answer` following the critique in `review`."""

    kind: Literal["revise"]
    required_inputs: ClassVar[tuple[str, ...]] = ("answer", "review")


class FormatNode(_LLMNode):
    """Rewrites `answer` in the exact output format."""

    kind: Literal["format"]
    params: FormatParams = Field(default_factory=FormatParams)
    required_inputs: ClassVar[tuple[str, ...]] = ("answer",)


class VerifyNode(_LLMNode):
    """Checks `answer`; on a failing verdict regenerates it with the critique, up to `rounds` times."""

    kind: Literal["verify"]
    params: VerifyParams = Field(default_factory=VerifyParams)
    required_inputs: ClassVar[tuple[str, ...]] = ("answer",)


class TestNode(_LLMNode):
    """Runs `tests` (assert lines) against `code`; failures go back to the LLM for a fix."""

    __test__: ClassVar[bool] = False  # not a pytest test class
    kind: Literal["test"]
    params: TestParams = Field(default_factory=TestParams)
    required_inputs: ClassVar[tuple[str, ...]] = ("code", "tests")


class ToolNode(_LLMNode):
    """The LLM fills the arguments of a registered tool, which is then called."""

    kind: Literal["tool"]
    tool: str = Field(min_length=1)
    params: ToolParams = Field(default_factory=ToolParams)


class RetrieveNode(_Node):
    """A registered retriever, queried with the `query` input."""

    kind: Literal["retrieve"]
    retriever: str = Field(min_length=1)
    params: RetrieveParams = Field(default_factory=RetrieveParams)
    required_inputs: ClassVar[tuple[str, ...]] = ("query",)


class CodeNode(_Node):
    """Fixed Python source, run in the sandbox with the inputs as a JSON object on stdin."""

    kind: Literal["code"]
    source: str = Field(min_length=1)
    params: CodeParams = Field(default_factory=CodeParams)


class RouteNode(_Node):
    """Picks the outgoing branch whose label's pattern matches the node's input first."""

    kind: Literal["route"]
    params: RouteParams


Node = Annotated[
    LLMNode
    | EnsembleNode
    | ProgrammerNode
    | ReviewNode
    | ReviseNode
    | FormatNode
    | VerifyNode
    | TestNode
    | ToolNode
    | RetrieveNode
    | CodeNode
    | RouteNode,
    Field(discriminator="kind"),
]
NODE_KINDS = (
    "llm", "ensemble", "programmer", "review", "revise", "format", "verify", "test", "tool", "retrieve",
    "code", "route",
)  # fmt: skip
LLM_KINDS = frozenset(NODE_KINDS) - {"retrieve", "code", "route"}


# ------------------------------------------------------------------ evaluators
#
# How an execution is judged. Reference checks compare the output with the execution's reference: a
# JSON document that comes with the task or with recorded feedback (`expected`); each check reads the
# part of it its `reference` path names, and judges only executions whose reference has that part.
# An LLM judge and an HTTP evaluator (the user's own service) judge with or without one. Operators
# never edit evaluators: a candidate is judged exactly as the spec it would replace.

ReferencePath = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")]
EvaluatorName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")]


class _Evaluator(_Strict):
    kind: str  # narrowed to one literal by each evaluator class
    name: EvaluatorName = Field(
        description="The `gen_ai.evaluation.name` of its verdicts; unique in the spec."
    )
    reference: ReferencePath | None = Field(
        None,
        description="Dotted path of the part of the reference it compares with; when set, executions "
        "whose reference lacks it are not judged by this evaluator.",
    )


class ExactCheck(_Evaluator):
    """The answer equals the reference text (whitespace collapsed; case ignored unless told)."""

    kind: Literal["exact"]
    reference: ReferencePath
    answer_line: bool = Field(True, description="Compare the last 'Answer:' line when the output has one.")
    case_sensitive: bool = False


class NumericCheck(_Evaluator):
    """The answer is a number within a tolerance of the reference number."""

    kind: Literal["numeric"]
    reference: ReferencePath
    answer_line: bool = Field(True, description="Read the last 'Answer:' line when the output has one.")
    abs_tolerance: float = Field(0.0, ge=0)
    rel_tolerance: float = Field(0.0, ge=0, le=1)


class RegexCheck(_Evaluator):
    """The output matches (or, with `must_match` false, does not match) a regular expression."""

    kind: Literal["regex"]
    pattern: RegularExpression = Field(description="Python regular expression, searched in the output.")
    must_match: bool = True


class JsonSchemaCheck(_Evaluator):
    """The whole output is JSON valid under `json_schema`; with a reference object, its fields must
    also equal the reference's (the score is the share that do)."""

    kind: Literal["json_schema"]
    json_schema: dict[str, Any] = Field(description="A JSON Schema (draft 2020-12) the output must satisfy.")

    @field_validator("json_schema")
    @classmethod
    def _is_a_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import SchemaError

        try:
            Draft202012Validator.check_schema(value)
        except SchemaError as error:
            raise ValueError(f"not a JSON Schema: {error.message}") from None
        return value


class CodeTestsCheck(_Evaluator):
    """The code in the output passes tests (assert lines) run in the sandbox: the spec's `tests`, or
    the list at the `reference` path."""

    kind: Literal["code_tests"]
    tests: list[str] = Field(default_factory=list, description="Assert statements, one per entry.")
    timeout_s: float = Field(5.0, gt=0, le=120)

    @model_validator(mode="after")
    def _has_tests(self) -> CodeTestsCheck:
        if not self.tests and self.reference is None:
            raise ValueError("a code_tests evaluator needs `tests` or a `reference` path to them")
        return self


class LLMJudge(_Evaluator):
    """An LLM grades the output by `criteria` (and the reference when there is one); its reply must
    start with a line `VERDICT: PASS` or `VERDICT: FAIL`, anything else is no verdict."""

    kind: Literal["llm_judge"]
    criteria: str = Field(min_length=1, max_length=4_000, description="What a correct output must be.")
    model: str | None = Field(None, description="The judge's model; the spec's default model when unset.")
    max_tokens: int = Field(120, ge=8, le=4_000)


class HttpEvaluator(_Evaluator):
    """Your own service judges: cegraph POSTs the execution to `url` (docs/real-model.md, "Evaluators")."""

    kind: Literal["http"]
    url: str = Field(pattern=r"^https?://", description="http(s) URL of the evaluation endpoint.")


EvaluatorSpec = Annotated[
    ExactCheck | NumericCheck | RegexCheck | JsonSchemaCheck | CodeTestsCheck | LLMJudge | HttpEvaluator,
    Field(discriminator="kind"),
]
EVALUATOR_KINDS = ("exact", "numeric", "regex", "json_schema", "code_tests", "llm_judge", "http")


class WorkflowSpec(_Strict):
    """A versioned workflow graph; `content_hash` is sha256 over the canonical JSON of everything else."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="cegraph workflow spec")

    id: NodeId = Field(description="Workflow id, stable across versions.")
    version: str = Field(description="Semantic version (semver.org 2.0.0).")
    description: str = ""
    model: str = Field(min_length=1, description="Default model of LLM nodes.")
    input_schema: dict[InputName, InputField] = Field(min_length=1, description="Fields of the task input.")
    entry: NodeId = Field(description="The first node; every node must be reachable from it.")
    output: NodeId = Field(description="The node whose output is the workflow's output.")
    nodes: dict[NodeId, Node] = Field(min_length=1)
    edges: list[Edge] = Field(default_factory=list)
    evaluators: list[EvaluatorSpec] = Field(
        default_factory=list, description="How an execution is judged (outside the operators' reach)."
    )
    content_hash: str | None = Field(
        None,
        pattern=r"^sha256:[0-9a-f]{64}$",
        description="Filled in when absent; a given value must match the content.",
    )

    @field_validator("version")
    @classmethod
    def _semver(cls, value: str) -> str:
        if not SEMVER.match(value):
            raise ValueError(f"{value!r} is not a semantic version such as 1.2.0")
        return value

    @model_validator(mode="after")
    def _graph_is_valid(self, info: ValidationInfo) -> WorkflowSpec:
        tools = (info.context or {}).get("tools") if info else None
        problems = graph_problems(self, None if tools is None else set(tools))
        if problems:
            raise ValueError("\n".join(problems))
        actual = compute_hash(self)
        if self.content_hash is None:
            object.__setattr__(self, "content_hash", actual)
        elif self.content_hash != actual:
            raise ValueError(f"content_hash {self.content_hash} does not match the content ({actual})")
        return self

    def canonical(self) -> dict[str, Any]:
        """The spec as plain JSON data with every default spelled out (what patches apply to). A spec
        without evaluators has no `evaluators` key, so its hash is the one it had before they existed."""
        exclude = {"content_hash"} if self.evaluators else {"content_hash", "evaluators"}
        return self.model_dump(mode="json", exclude=exclude)

    def predecessors(self, node_id: str) -> list[str]:
        return [edge.source for edge in self.edges if edge.target == node_id]

    def topological_levels(self) -> list[list[str]]:
        """Nodes in levels: every node comes after all its predecessors; ties in declaration order."""
        indegree = {node: 0 for node in self.nodes}
        for edge in self.edges:
            indegree[edge.target] += 1
        levels: list[list[str]] = []
        ready = [node for node, degree in indegree.items() if degree == 0]
        while ready:
            levels.append(ready)
            following: list[str] = []
            for node in ready:
                for edge in self.edges:
                    if edge.source == node:
                        indegree[edge.target] -= 1
                        if indegree[edge.target] == 0:
                            following.append(edge.target)
            ready = [node for node in self.nodes if node in following]
        return levels

    def input_model(self) -> type[BaseModel]:
        """A pydantic model of the task input, built from `input_schema`."""
        types: dict[str, Any] = {
            "string": str,
            "integer": int,
            "number": float,
            "boolean": bool,
            "array": list,
            "object": dict,
        }
        fields: dict[str, Any] = {
            name: (types[f.type], ...) if f.required else (types[f.type] | None, None)
            for name, f in self.input_schema.items()
        }
        return create_model(f"{self.id}_input", __config__=ConfigDict(extra="forbid"), **fields)


def canonical_json(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def compute_hash(spec: WorkflowSpec) -> str:
    return "sha256:" + hashlib.sha256(canonical_json(spec.canonical())).hexdigest()


def _find_cycle(nodes: Iterable[str], successors: Mapping[str, list[str]]) -> list[str] | None:
    """A cycle as the list of its nodes (first node repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for succ in successors.get(node, []):
            if state.get(succ) == 1:
                return [*stack[stack.index(succ) :], succ]
            if succ not in state and (cycle := visit(succ)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in nodes:
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def reachable(start: str, successors: Mapping[str, list[str]]) -> set[str]:
    """`start` and every node a path of `successors` leads to from it (graph edges, or merges)."""
    seen, todo = {start}, [start]
    while todo:
        for succ in successors.get(todo.pop(), []):
            if succ not in seen:
                seen.add(succ)
                todo.append(succ)
    return seen


def graph_problems(spec: WorkflowSpec, tools: set[str] | None) -> list[str]:
    """Every structural problem of the spec, one line each, naming the node or edge."""
    problems: list[str] = []
    nodes = spec.nodes
    if INPUT in nodes:
        problems.append(f"node {INPUT!r}: the id is reserved for the task input")
    for field in ("entry", "output"):
        if getattr(spec, field) not in nodes:
            problems.append(f"{field} {getattr(spec, field)!r} is not a node")
    successors: dict[str, list[str]] = {node: [] for node in nodes}
    seen_edges: set[tuple[str, str]] = set()
    for index, edge in enumerate(spec.edges):
        name = f"edge {index} ({edge.source} -> {edge.target})"
        dangling = [end for end in (edge.source, edge.target) if end not in nodes]
        for end in dangling:
            problems.append(f"{name}: node {end!r} is not defined")
        if (edge.source, edge.target) in seen_edges:
            problems.append(f"{name}: duplicate edge")
        seen_edges.add((edge.source, edge.target))
        if not dangling:
            successors[edge.source].append(edge.target)
            problems.extend(_route_edge_problems(name, nodes[edge.source], edge))
    cycle = _find_cycle(nodes, successors)
    if cycle:
        problems.append(f"cycle through nodes {' -> '.join(cycle)}")
        return problems  # reachability and ancestry are meaningless on a cyclic graph
    if spec.entry in nodes:
        if any(edge.target == spec.entry for edge in spec.edges):
            problems.append(f"node {spec.entry!r}: the entry node has an incoming edge")
        from_entry = reachable(spec.entry, successors)
        problems.extend(
            f"node {node!r}: not reachable from the entry {spec.entry!r}"
            for node in nodes
            if node not in from_entry
        )
    for node_id, node in nodes.items():
        problems.extend(_node_problems(spec, node_id, node, successors, tools))
    names = [evaluator.name for evaluator in spec.evaluators]
    problems.extend(
        f"evaluator {name!r}: the name is used by more than one evaluator"
        for name in sorted({n for n in names if names.count(n) > 1})
    )
    return problems


def _route_edge_problems(name: str, source: Any, edge: Edge) -> list[str]:
    if not isinstance(source, RouteNode):
        return [f"{name}: only edges out of a route node may have 'when'"] if edge.when is not None else []
    labels = {rule.label for rule in source.params.routes} | {source.params.default}
    if edge.when is not None and edge.when not in labels:
        return [f"{name}: label {edge.when!r} is not one of route {edge.source!r}'s labels {sorted(labels)}"]
    return []


def _node_problems(
    spec: WorkflowSpec, node_id: str, node: Any, successors: Mapping[str, list[str]], tools: set[str] | None
) -> list[str]:
    problems: list[str] = []
    prefix = f"node {node_id!r}"
    for name, ref in node.references():
        if ref == INPUT:
            continue
        if ref.startswith(INPUT + "."):
            field = ref.removeprefix(INPUT + ".")
            if field not in spec.input_schema:
                problems.append(f"{prefix}: input {name!r} refers to {ref!r}, not a field of input_schema")
        elif ref not in spec.nodes:
            problems.append(f"{prefix}: input {name!r} refers to {ref!r}, which is not defined")
        elif node_id not in reachable(ref, successors) or ref == node_id:
            problems.append(f"{prefix}: input {name!r} refers to {ref!r}, which is not upstream of it")
    missing = [name for name in node.required_inputs if name not in node.inputs]
    if missing:
        problems.append(f"{prefix}: a {node.kind} node needs the inputs {missing}")
    for placeholder in sorted(node.placeholders() - set(node.inputs)):
        problems.append(f"{prefix}: the prompt uses {{{placeholder}}}, which is not one of its inputs")
    named = getattr(node, "tool", None) or getattr(node, "retriever", None)
    if named is not None and tools is not None and named not in tools:
        problems.append(f"{prefix}: {named!r} is not a registered tool (registered: {sorted(tools)})")
    if isinstance(node, RouteNode) and not any(edge.source == node_id for edge in spec.edges):
        problems.append(f"{prefix}: a route node needs outgoing edges")
    return problems


class WorkflowSpecError(ValueError):
    """A spec was refused; `problems` has one line per problem, each naming the node or field."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid workflow spec:\n" + "\n".join(f"  {p}" for p in problems))
        self.problems = problems


def describe(error: ValidationError) -> list[str]:
    """Pydantic's errors as lines that name the node (`node 'x': ...`) rather than a location tuple."""
    lines: list[str] = []
    for item in error.errors():
        loc = [str(part) for part in item["loc"]]
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "union_tag_invalid":
            kind = item.get("ctx", {}).get("tag", "?")
            what, known = ("evaluator", EVALUATOR_KINDS) if loc[0] == "evaluators" else ("node", NODE_KINDS)
            message = f"unknown {what} kind {kind!r} (known kinds: {', '.join(known)})"
            loc = loc[:2]
        elif item["type"] == "union_tag_not_found":
            message = "the node has no 'kind'"
        if len(loc) >= 2 and loc[0] == "nodes":
            # After the node id pydantic repeats the kind tag (`nodes.x.llm.params`): drop it.
            rest = loc[3:] if len(loc) > 2 and loc[2] in NODE_KINDS else loc[2:]
            where = f"node {loc[1]!r}" + (f" ({'.'.join(rest)})" if rest else "")
            lines.append(f"{where}: {message}")
        elif len(loc) >= 2 and loc[0] == "evaluators":
            rest = loc[3:] if len(loc) > 2 and loc[2] in EVALUATOR_KINDS else loc[2:]
            lines.append(f"evaluator {loc[1]}" + (f" ({'.'.join(rest)})" if rest else "") + f": {message}")
        elif loc:
            lines.append(f"{'.'.join(loc)}: {message}")
        else:
            lines.extend(message.splitlines())
    return lines


def parse_spec(data: Mapping[str, Any] | str | bytes, tools: Iterable[str] | None = None) -> WorkflowSpec:
    """Validate a spec (JSON text or data), optionally against the registered tool names."""
    context = {"tools": set(tools)} if tools is not None else None
    try:
        if isinstance(data, str | bytes):
            return WorkflowSpec.model_validate_json(data, context=context)
        return WorkflowSpec.model_validate(data, context=context)
    except ValidationError as error:
        raise WorkflowSpecError(describe(error)) from None


def example_spec(name: str, tools: Iterable[str] | None = None) -> WorkflowSpec:
    """One of the shipped example specs (`schemas/examples/<name>.json`)."""
    return parse_spec((EXAMPLES_PATH / f"{name}.json").read_text(), tools=tools)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a spec document, as checked in at `schemas/workflow.schema.json`."""
    schema = WorkflowSpec.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "cegraph/workflow", **schema}


if __name__ == "__main__":  # regenerate the checked-in schema: python -m cegraph.schemas.workflow
    SCHEMA_PATH.write_text(json.dumps(json_schema(), indent=2) + "\n")
