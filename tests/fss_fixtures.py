"""Hand-built execution graphs and a planted-mode failure stream for the FSS and density tests."""

from __future__ import annotations

import random
from dataclasses import replace

from cegraph.daemon.failures import Failure
from cegraph.daemon.spans import Evaluation, Node, hard_failure_source

BASE = Node(
    trace_id="a" * 32, span_id="0" * 16, parent_span_id="", name="root", kind="workflow", node_id="root",
    workflow_id="wf", workflow_version="1.0.0", track="stable", operation="invoke_workflow", provider="",
    model="", start_ns=0, end_ns=1_000_000_000, status="unset", status_message="", error_type="",
    exception_type="", exception_message="", finish_reasons=[], input_tokens=None, output_tokens=None,
    tool_name="", input_text="", output_text="",
)  # fmt: skip


def node(span: int, parent: int | None, node_id: str, kind: str = "llm", start: int = 0, **fields) -> Node:
    """A node named `node_id` (as a span without a node id of its own); `hard_failed` as `normalize`
    sets it."""
    failed = bool(
        hard_failure_source(
            fields.get("status", "unset"), fields.get("exception_type", ""), fields.get("error_type", ""),
            fields.get("finish_reasons", []), fields.get("refusal", ""),
        )
    )  # fmt: skip
    evaluations = fields.get("evaluations", [])
    return replace(
        BASE, span_id=f"{span:016x}", parent_span_id="" if parent is None else f"{parent:016x}", name=node_id,
        node_id=node_id, kind=kind, start_ns=start, end_ns=start + 10, hard_failed=failed,
        eval_failed=any(e.failed for e in evaluations), **fields,
    )  # fmt: skip


def verdict(passed: bool, explanation: str = "") -> Evaluation:
    return Evaluation("judge", 1.0 if passed else 0.0, "pass" if passed else "fail", explanation)


PLANTED = {
    "calc": ("calc", "tool", "ValueError", "could not convert string to float: '{a},{b}'"),
    "search": ("search", "retrieve", "TimeoutError", "request to the index timed out after {a} s"),
    "format": ("format", "llm", "", ""),
}


def planted_failure(mode: str, rng: random.Random, index: int) -> Failure:
    """A failure of one planted mode: its own node, error semantics and varying details."""
    if mode == "noise":
        node_id = rng.choice(["plan", "answer", "summarise", "route", "lookup"])
        words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "omega", "sigma"]) for _ in range(6))
        failed = node(index, 0, node_id, rng.choice(["llm", "tool"]), output_text=words)
        return Failure(failed.trace_id, failed.span_id, "evaluation", failed, ("root", node_id), 0, 0,
                       critique=rng.choice(["wrong", "not what was asked", "incomplete"]))  # fmt: skip
    node_id, kind, exception, message = PLANTED[mode]
    if mode == "format":
        failed = node(index, 0, node_id, kind, output_text=f"Sure! The total is {rng.randint(1, 10**6)}.")
        critique = f"output is not valid JSON: expected an object with key '{rng.choice(['total', 'name'])}'"
        return Failure(failed.trace_id, failed.span_id, "evaluation", failed, ("root", node_id), 1, 0,
                       critique=critique)  # fmt: skip
    text = message.format(a=rng.randint(1, 999), b=rng.randint(0, 99))
    failed = node(index, 0, node_id, kind, status="error", exception_type=exception, exception_message=text)
    return Failure(failed.trace_id, failed.span_id, "error", failed, ("root", node_id), 0, rng.randint(0, 1),
                   message=text)  # fmt: skip


def planted_stream(count: int, seed: int, modes: dict[str, float]) -> list[tuple[Failure, str]]:
    rng = random.Random(seed)
    names, weights = list(modes), list(modes.values())
    out = []
    for index in range(count):
        mode = rng.choices(names, weights)[0]
        out.append((planted_failure(mode, rng, index + 1), mode))
    return out
