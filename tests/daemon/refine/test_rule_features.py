"""The rule proposer on signature features: what each fact of a failure maps to, and that the
wording of a critique (or an evaluator's name) changes nothing it proposes."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from cegraph.daemon.refine.proposers import (
    RULES,
    Counterexample,
    Facts,
    ModeContext,
    RuleProposer,
    failure_features,
    mode_features,
    rule_arguments,
)
from cegraph.daemon.refine.refiner import _facts
from cegraph.daemon.sim import SimWorld
from cegraph.schemas.workflow import example_spec

SERVICE = example_spec("service", tools=list(SimWorld(0).tools()))
KINDS = {e.name: e.kind for e in SERVICE.evaluators}


def with_evaluators(spec, evaluators: list[dict]):
    doc = spec.canonical() | {"evaluators": evaluators}
    doc.pop("content_hash", None)
    return type(spec).model_validate(doc)


def renamed(spec, names: dict[str, str]):
    """The same spec with its evaluators under other names (their kinds unchanged)."""
    evaluators = spec.canonical()["evaluators"]
    return with_evaluators(spec, [e | {"name": names.get(e["name"], e["name"])} for e in evaluators])


def proposed(spec, node: str, examples: list[Counterexample], retrievers=("kb",)) -> list[tuple[str, str]]:
    context = ModeContext(spec, "m", node, {}, examples, list(retrievers))
    out = asyncio.run(RuleProposer().propose(context))
    return [(p.edit.operator, p.edit.node) for p in out.proposals]


def test_each_fact_of_a_failure_becomes_its_feature():
    tool = Facts("tool", error="cegraph.daemon.workflows.tools.ToolArgumentError")
    assert "error=tool_arguments" in failure_features(tool, KINDS)
    assert "error=output" in failure_features(Facts("llm", error="pydantic_core.ValidationError"), KINDS)
    assert "error=code" in failure_features(Facts("programmer", error="SyntaxError"), KINDS)
    assert "error=other" in failure_features(Facts("llm", error="openai.RateLimitError"), KINDS)
    cut = failure_features(Facts("llm", finish_reasons=("length",)), KINDS)
    assert "finish=length" in cut and "node=llm" in cut
    assert "finish=stop" not in failure_features(Facts("llm", finish_reasons=("stop",)), KINDS)
    judged = failure_features(Facts("llm", evaluators=("arithmetic.exact_match", "nobody.declared")), KINDS)
    assert {"evaluator=numeric", "evaluator=undeclared"} <= judged
    assert {"after=route", "retried"} <= failure_features(
        Facts("llm", after_router=True, retried=True), KINDS
    )
    assert "sampling=hot" in failure_features(Facts("llm", hot=True), KINDS)
    assert "sampling=hot" not in failure_features(Facts("llm"), KINDS)


def test_a_failure_on_a_node_that_samples_hot_is_also_sampled_cold_at_no_extra_cost():
    """The service's `extract` samples at 0.7, its `answer` at 0.2 (`HOT_TEMPERATURE` is 0.5); what
    the failures say comes first, the node's heat after it."""
    judged = '[{"name": "qa.exact_match", "score": 0.0, "label": "fail", "explanation": "x"}]'
    hot = _facts(SERVICE, "extract", "llm", "", [], judged, False)
    assert hot.hot and not _facts(SERVICE, "answer", "llm", "", [], judged, False).hot
    chosen = rule_arguments(SERVICE, [hot])
    cool = ({"operator": "adjust_parameter", "parameter": "temperature", "value": 0.0}, "sampling=hot")
    features = [feature for _, feature in chosen]
    assert cool in chosen and chosen.index(cool) > max(
        i for i, f in enumerate(features) if f == "evaluator=exact"
    )
    cold = [a for a, _ in rule_arguments(SERVICE, [_facts(SERVICE, "answer", "llm", "", [], judged, False)])]
    assert all(a.get("parameter") != "temperature" for a in cold)


def test_a_features_share_is_the_share_of_the_modes_failures_that_carry_it():
    facts = [Facts("llm", evaluators=("arithmetic.exact_match",))] * 3 + [
        Facts("llm", finish_reasons=("length",))
    ]
    shares = mode_features(SERVICE, facts)
    assert (
        shares["evaluator=numeric"] == 0.75 and shares["finish=length"] == 0.25 and shares["node=llm"] == 1.0
    )
    assert mode_features(SERVICE, []) == {}


def test_the_evaluators_declared_kind_decides_not_a_word_of_its_name():
    facts = [Facts("llm", evaluators=("arithmetic.exact_match",))]
    [first, *_] = rule_arguments(SERVICE, facts)
    assert first == ({"operator": "programmer"}, "evaluator=numeric")
    # the same name declared as an LLM judge: no programmer, a critic first
    evaluators = SERVICE.canonical()["evaluators"]
    judge = {"kind": "llm_judge", "name": "arithmetic.exact_match", "criteria": "correct"}
    judged = with_evaluators(SERVICE, [judge, *evaluators[1:]])
    operators = [a["operator"] for a, _ in rule_arguments(judged, facts)]
    assert operators[0] == "review_revise" and "programmer" not in operators
    # and a numeric check under a name that says nothing still picks the programmer
    plain = renamed(SERVICE, {"arithmetic.exact_match": "check-1"})
    assert rule_arguments(plain, [Facts("llm", evaluators=("check-1",))])[0][0] == {"operator": "programmer"}


def test_the_feature_most_failures_carry_comes_first_and_generic_repairs_last():
    facts = [Facts("llm", evaluators=("qa.exact_match",))] * 2 + [
        Facts("llm", evaluators=("arithmetic.exact_match",))
    ]
    chosen = rule_arguments(SERVICE, facts)
    features = [feature for _, feature in chosen]
    assert features.index("evaluator=exact") < features.index("evaluator=numeric")
    assert [f for f in features[-3:]] == ["", "", ""]


def test_after_retries_no_further_retry_is_proposed():
    facts = [Facts("llm", evaluators=("arithmetic.exact_match",), retried=True)]
    assert "retry_with_validation" not in [a["operator"] for a, _ in rule_arguments(SERVICE, facts)]
    fresh = [Facts("llm", evaluators=("arithmetic.exact_match",))]
    assert "retry_with_validation" in [a["operator"] for a, _ in rule_arguments(SERVICE, fresh)]


def test_a_truncated_node_gets_twice_its_own_token_limit_and_at_least_the_rules():
    examples = [Counterexample("t", "solve", "", Facts("llm", finish_reasons=("length",)))]

    def raised(limit: int) -> tuple[str, float | None]:
        doc = SERVICE.canonical()
        doc["nodes"]["solve"]["params"]["max_tokens"] = limit
        doc.pop("content_hash", None)
        context = ModeContext(type(SERVICE).model_validate(doc), "m", "solve", {}, examples, [])
        [edit] = [p.edit for p in asyncio.run(RuleProposer().propose(context)).proposals if p.edit.parameter]
        return edit.node, edit.value

    assert raised(900) == ("solve", 1800)
    assert raised(400) == ("solve", 1024)


def test_a_failing_span_knows_its_kind_in_the_spec_and_the_router_above_it():
    facts = _facts(SERVICE, "answer", "llm", "", ["stop"], '[{"name": "qa.exact_match", "score": 0.0, '
                   '"label": "fail", "explanation": "x"}]', False)  # fmt: skip
    assert facts == Facts("llm", "", ("stop",), ("qa.exact_match",), after_router=True, retried=False)
    assert not _facts(SERVICE, "route", "chain", "", [], "[]", True).after_router
    assert _facts(None, "gone", "tool", "E", None, "", True) == Facts("tool", "E", (), (), False, True)


def test_every_rule_key_is_one_a_failure_can_carry():
    keys = {feature for feature, _ in RULES}
    prefixes = ("error=", "finish=", "evaluator=", "after=", "sampling=")
    assert all(key.startswith(prefixes) for key in keys) and len(keys) == len(RULES)


critiques = st.text(max_size=80) | st.sampled_from(
    ["calculation error in step 2", "hallucination: not in the knowledge base", "format violation: json",
     "failed", "the total is off", "TOOLARGUMENTERROR arguments", "truncated at max_tokens length"]
)  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(st.lists(critiques, min_size=3, max_size=3), st.sampled_from(["solve", "extract", "answer"]))
def test_a_critiques_wording_changes_nothing_the_rules_propose(texts, node):
    evaluator = {
        "solve": "arithmetic.exact_match",
        "extract": "extraction.fields",
        "answer": "qa.exact_match",
    }
    facts = Facts("llm", evaluators=(evaluator[node],), after_router=True)
    worded = [Counterexample(f"t{i}", node, text, facts) for i, text in enumerate(texts)]
    bare = [Counterexample(f"t{i}", node, "failed", facts) for i in range(3)]
    assert proposed(SERVICE, node, worded) == proposed(SERVICE, node, bare)
    # nor does the evaluator's name
    names = {e.name: f"e{i}" for i, e in enumerate(SERVICE.evaluators)}
    other = [Counterexample(c.trace_id, node, c.text, Facts("llm", evaluators=(names[evaluator[node]],),
                                                            after_router=True)) for c in worded]  # fmt: skip
    assert proposed(renamed(SERVICE, names), node, other) == proposed(SERVICE, node, bare)
