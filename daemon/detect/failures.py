"""Failure labeling: which executions failed, and where (the points of failure).

Each failure is a counterexample, and one execution can hold several (TRAIL averages five):
- hard (`spans.hard_failure_source`): a span with status ERROR, an exception event or `error.type`
  (source "error"), a refusal (`message.refusal`, finish reason `refusal`), or finish reason
  `length` / `content_filter` ("truncated"). A failure that only propagated (the span has a failing
  descendant) is not a failure of its own: the deepest failing span is the point of failure.
- soft: a failed evaluator verdict on a span (that span is the point), a failed verdict on the
  execution as a whole, or failed feedback. Feedback that names a span points there; otherwise the
  point is the last LLM span before the final output (where the answer was made).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from cegraph.daemon.spans import Node

LLM_KINDS = frozenset({"llm"})
AGENT_KINDS = frozenset({"agent", "chain", "workflow"})


@dataclass(frozen=True, slots=True)
class FeedbackSignal:
    trace_id: str
    span_id: str | None
    critique: str
    source: str
    score: float | None = None


@dataclass(slots=True)
class Failure:
    """One counterexample: a point of failure in one execution, with what the failure says."""

    trace_id: str
    span_id: str
    source: str  # "error", "refusal", "truncated", "evaluation", "feedback"
    node: Node
    path: tuple[str, ...]  # node ids from the root to the point of failure
    sibling_index: int  # position among the parent's children, in start order
    retries_before: int  # earlier siblings of the same node id (retries of this step)
    message: str = ""  # error / exception message
    critique: str = ""  # evaluator explanation or feedback text
    agent: str = ""  # node id of the nearest enclosing agent (else chain): whose call this was
    call: str = "only"  # first / middle / last / only: this call among the execution's calls of its node
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def failure_id(self) -> str:
        return f"{self.trace_id}:{self.span_id}:{self.source}"

    @property
    def depth(self) -> int:
        return len(self.path) - 1


class ExecutionGraph:
    """Parent/child structure of one execution's nodes, in start order."""

    def __init__(self, nodes: list[Node]) -> None:
        self.nodes = sorted(nodes, key=lambda n: (n.start_ns, n.span_id))
        self.by_id = {n.span_id: n for n in self.nodes}
        self.children: dict[str, list[Node]] = defaultdict(list)
        for node in self.nodes:
            if node.parent_span_id in self.by_id:
                self.children[node.parent_span_id].append(node)
        self.roots = [n for n in self.nodes if n.parent_span_id not in self.by_id]

    def path(self, node: Node) -> tuple[str, ...]:
        path, seen = [node.node_id], {node.span_id}
        current = self.by_id.get(node.parent_span_id)
        while current is not None and current.span_id not in seen:
            seen.add(current.span_id)
            path.append(current.node_id)
            current = self.by_id.get(current.parent_span_id)
        return tuple(reversed(path))

    def position(self, node: Node) -> tuple[int, int]:
        """(index among siblings, earlier siblings with the same node id)."""
        siblings = self.children.get(node.parent_span_id, self.roots)
        index = next((i for i, s in enumerate(siblings) if s.span_id == node.span_id), 0)
        retries = sum(1 for s in siblings[:index] if s.node_id == node.node_id)
        return index, retries

    def role(self, node: Node) -> tuple[str, str]:
        """(nearest enclosing agent, else chain, and which call of its node this is in the execution).

        Two calls of one node differ by their role: a planner's LLM call and a tool-picking agent's
        call of the same model are separate things, and so are the first call and the last one.
        """
        agent = chain = ""
        seen = {node.span_id}
        current = self.by_id.get(node.parent_span_id)
        while current is not None and current.span_id not in seen and not agent:
            if current.kind == "agent":
                agent = current.node_id
            elif current.kind in AGENT_KINDS and not chain:
                chain = current.node_id
            seen.add(current.span_id)
            current = self.by_id.get(current.parent_span_id)
        agent = agent or chain
        calls = [n.span_id for n in self.nodes if n.node_id == node.node_id]
        index = calls.index(node.span_id)
        if len(calls) == 1:
            call = "only"
        else:
            call = "first" if index == 0 else "last" if index == len(calls) - 1 else "middle"
        return agent, call

    def has_failing_descendant(self, node: Node) -> bool:
        stack = list(self.children.get(node.span_id, ()))
        while stack:
            child = stack.pop()
            if is_hard_failure(child):
                return True
            stack.extend(self.children.get(child.span_id, ()))
        return False

    def answer_node(self) -> Node | None:
        """The last LLM span before the final output; the last span at all when there is no LLM span."""
        ordered = sorted(self.nodes, key=lambda n: (n.end_ns, n.start_ns, n.span_id))
        llm = [n for n in ordered if n.kind in LLM_KINDS]
        if llm:
            return llm[-1]
        leaves = [n for n in ordered if not self.children.get(n.span_id)]
        return (leaves or ordered or [None])[-1]

    def is_root(self, node: Node) -> bool:
        return node.parent_span_id not in self.by_id

    def subject_of_evaluation(self, node: Node) -> Node:
        """What a verdict judges: an EVALUATOR span judges its parent; a verdict on the root (or on a
        parent that is the root) judges the whole execution, so its point is where the answer was made."""
        subject = self.by_id.get(node.parent_span_id) if node.kind == "evaluator" else node
        if subject is None or self.is_root(subject):
            return self.answer_node() or node
        return subject

    def failure(self, node: Node, source: str, *, message: str = "", critique: str = "") -> Failure:
        index, retries = self.position(node)
        agent, call = self.role(node)
        return Failure(
            trace_id=node.trace_id, span_id=node.span_id, source=source, node=node, path=self.path(node),
            sibling_index=index, retries_before=retries, message=message, critique=critique, agent=agent,
            call=call,
        )  # fmt: skip


def is_hard_failure(node: Node) -> bool:
    """From the span's fields, not the stored flag, so nodes stored before a source was known count."""
    return bool(node.hard_failure_source())


def _failure_message(node: Node, source: str) -> str:
    if source == "truncated":
        return f"finish reason {','.join(node.finish_reasons)}"
    if source == "refusal":
        return node.refusal or "refused"
    exception, status = node.exception_message, node.status_message
    if exception and exception in status:  # "InternalServerError: <the exception's message>"
        return exception
    return " ".join(p for p in (exception, status) if p)


def label_failures(nodes: list[Node], feedback: list[FeedbackSignal] = ()) -> list[Failure]:
    """Every point of failure of one execution, in execution order, at most one per (span, source)."""
    if not feedback and not any(
        node.hard_failure_source() or any(e.failed for e in node.evaluations) for node in nodes
    ):
        return []  # most executions: no graph to build
    graph = ExecutionGraph(nodes)
    found: dict[tuple[str, str], Failure] = {}

    def add(failure: Failure) -> None:
        key = (failure.span_id, failure.source)
        if key in found:
            earlier = found[key]
            if failure.critique and failure.critique not in earlier.critique:
                earlier.critique = f"{earlier.critique}\n{failure.critique}".strip()
        else:
            found[key] = failure

    for node in graph.nodes:
        source = node.hard_failure_source()
        if source and not graph.has_failing_descendant(node):
            add(graph.failure(node, source, message=_failure_message(node, source)))
        for evaluation in node.evaluations:
            if evaluation.failed:
                subject = graph.subject_of_evaluation(node)
                add(graph.failure(subject, "evaluation", critique=evaluation.explanation or evaluation.label))
    for signal in feedback:
        target = graph.by_id.get(signal.span_id or "") or graph.answer_node()
        if target is not None:
            add(graph.failure(target, "feedback", critique=signal.critique))
    return sorted(found.values(), key=lambda f: (f.node.start_ns, f.span_id, f.source))
