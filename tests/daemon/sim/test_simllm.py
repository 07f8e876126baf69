"""The simulated world's failure mechanisms: each one shows at its documented rate in the baseline spec,
depends on the input and the parameters as documented, and falls significantly under the operator
that mitigates it. Baseline and variant run on the same tasks with the same seeds, as the verifier will
pair them, so they are compared with an exact one-sided McNemar test; rates on different task sets with
a two-proportion z-test.

Expected rates are computed here from `Rates` and each task's own features, independently of how
SimLLM draws them, so a mechanism that drifted from its documentation fails its test.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from statistics import fmean

import jsonpatch
from opentelemetry.sdk.trace import TracerProvider
from sim_fixtures import truth_output

from cegraph.daemon.refine.operators import Edit, apply_edit
from cegraph.daemon.sim import Rates, SimWorld, Task
from cegraph.daemon.sim.coding import TEMPLATES
from cegraph.daemon.workflows.llm import CallContext, Message
from cegraph.daemon.workflows.runtime import ExecutionResult, NodeRun, WorkflowRuntime
from cegraph.schemas.workflow import WorkflowSpec, example_spec, parse_spec

RATES = Rates()


def spec(name: str, *operations: dict) -> WorkflowSpec:
    """An example spec, changed by RFC 6902 operations (what an operator's patch does)."""
    base = example_spec(name).canonical()
    return parse_spec(jsonpatch.apply_patch(base, list(operations)))


def param(node: str, name: str, value: object) -> dict:
    return {"op": "replace", "path": f"/nodes/{node}/params/{name}", "value": value}


def insert_after(node: str, new: str, body: dict) -> list[dict]:
    """Insert `new` after the output node `node` and make it the output."""
    return [
        {"op": "add", "path": f"/nodes/{new}", "value": body},
        {"op": "add", "path": "/edges/-", "value": {"source": node, "target": new}},
        {"op": "replace", "path": "/output", "value": new},
    ]


async def run(world: SimWorld, workflow: WorkflowSpec, tasks: Sequence[Task]) -> list[ExecutionResult]:
    runtime = WorkflowRuntime(world.llm(), TracerProvider(), tools=world.tools(), sandbox=world.sandbox)
    return list(
        await asyncio.gather(
            *(
                runtime.execute(workflow, t.input, seed=i, evaluator=world.evaluator(t))
                for i, t in enumerate(tasks)
            )
        )
    )


def count(results: Sequence[ExecutionResult], failure: Callable[[ExecutionResult], bool]) -> int:
    return sum(1 for result in results if failure(result))


def explained(prefix: str) -> Callable[[ExecutionResult], bool]:
    return lambda r: r.evaluation is not None and r.evaluation.explanation.startswith(prefix)


def failed(result: ExecutionResult) -> bool:
    return result.failed


def p_greater(k1: int, n1: int, k2: int, n2: int) -> float:
    """One-sided p-value of a two-proportion z-test that rate 1 exceeds rate 2 (independent samples)."""
    pooled = (k1 + k2) / (n1 + n2)
    if pooled in (0.0, 1.0):
        return 1.0
    z = (k1 / n1 - k2 / n2) / math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    return 0.5 * math.erfc(z / math.sqrt(2))


def p_fewer(
    baseline: Sequence[ExecutionResult],
    variant: Sequence[ExecutionResult],
    failure: Callable[[ExecutionResult], bool],
) -> float:
    """One-sided exact McNemar test that the variant fails less often than the baseline on the same
    tasks and seeds: of the pairs where exactly one fails, how unlikely so many are the baseline's."""
    pairs = list(zip(map(failure, baseline), map(failure, variant), strict=True))
    worse, better = sum(b and not v for b, v in pairs), sum(v and not b for b, v in pairs)
    n = worse + better
    return sum(math.comb(n, k) for k in range(worse, n + 1)) / 2**n if n else 1.0


def assert_near(observed: int, n: int, expected: float, slack: float = 0.0) -> None:
    """The observed rate lies within 3.5 standard errors (plus `slack`) of the documented one."""
    error = math.sqrt(max(expected * (1 - expected), 0.01) / n)
    assert abs(observed / n - expected) <= 3.5 * error + slack, (
        f"rate {observed / n:.3f} vs documented {expected:.3f}"
    )


# --- arithmetic: carry slips, random slips, truncation, tool arguments ---


def carry_slip_probability(world: SimWorld, task: Task) -> float:
    problem = world.families["arithmetic"].find(task.input["question"])
    total, survive = problem.start, 1.0
    for op, value in problem.steps:
        digits = len(str(max(abs(total), value)))
        survive *= 1 - RATES.carry_slip_per_digit * (digits - 1)
        total = {"+": total + value, "-": total - value, "*": total * value}[op]
    return 1 - survive


MENTAL = ("arithmetic", param("solve", "temperature", 0.0), param("solve", "max_tokens", None))


async def test_carry_slips_grow_with_digits_and_a_programmer_removes_them():
    world = SimWorld(11)
    five, two = world.tasks("arithmetic", 200, digits=5), world.tasks("arithmetic", 200, start=200, digits=2)
    baseline = spec(*MENTAL)
    slips = explained("calculation error")
    on_five, on_two = await run(world, baseline, five), await run(world, baseline, two)
    assert_near(count(on_five, slips), 200, fmean(carry_slip_probability(world, t) for t in five))
    assert_near(count(on_two, slips), 200, fmean(carry_slip_probability(world, t) for t in two))
    assert p_greater(count(on_five, slips), 200, count(on_two, slips), 200) < 0.001

    program = {"kind": "programmer", "inputs": {"question": "input.question"}}
    programmer = spec("arithmetic", {"op": "replace", "path": "/nodes/solve", "value": program})
    programmed = await run(world, programmer, five)
    assert count(programmed, slips) == 0
    assert p_fewer(on_five, programmed, failed) < 0.001
    assert_near(count(programmed, failed), 200, RATES.random_slip(0.0))

    # Systematic: sampling the same model again repeats the slip, so self-consistency does not help.
    ensemble = spec(
        *MENTAL,
        {"op": "replace", "path": "/nodes/solve/kind", "value": "ensemble"},
        {"op": "add", "path": "/nodes/solve/params/samples", "value": 5},
        param("solve", "temperature", 0.7),
    )
    assert p_fewer(on_five, await run(world, ensemble, five), slips) > 0.05


async def test_random_slips_grow_with_temperature_and_self_consistency_removes_them():
    world = SimWorld(12)
    tasks = world.tasks("arithmetic", 250, digits=2, steps=2)
    misread = explained("misread number")
    hot = await run(world, spec(*MENTAL, param("solve", "temperature", 1.0)), tasks)
    cold = await run(world, spec(*MENTAL), tasks)
    # a misread that happens to equal another number of the question reads as a plain wrong result
    assert_near(count(hot, misread), 250, RATES.random_slip(1.0), slack=0.02)
    assert p_fewer(hot, cold, misread) < 0.001

    ensemble = spec(
        *MENTAL,
        param("solve", "temperature", 1.0),
        {"op": "replace", "path": "/nodes/solve/kind", "value": "ensemble"},
        {"op": "add", "path": "/nodes/solve/params/samples", "value": 5},
    )
    voted = await run(world, ensemble, tasks)
    assert p_fewer(hot, voted, misread) < 0.001
    assert count(voted, misread) <= 5
    assert all(run.llm_calls == 5 for result in voted for run in result.nodes)


async def test_an_inserted_verifier_catches_random_slips_but_not_systematic_ones():
    world = SimWorld(21)
    tasks = world.tasks("arithmetic", 200, digits=3)
    hot = spec(*MENTAL, param("solve", "temperature", 1.0))
    verifier = {
        "kind": "verify",
        "inputs": {"question": "input.question", "answer": "solve"},
        "params": {"rounds": 2},
    }
    checked_spec = spec(
        *MENTAL, param("solve", "temperature", 1.0), *insert_after("solve", "verify", verifier)
    )
    baseline, checked = await run(world, hot, tasks), await run(world, checked_spec, tasks)
    misread = explained("misread number")
    assert p_fewer(baseline, checked, misread) < 0.001
    # the verifier recomputes with the same blind spots, so it passes the model's own carry slips
    slips = explained("calculation error")
    assert count(checked, slips) >= count(baseline, slips) - 3
    assert any(result.nodes[1].llm_calls > 1 for result in checked), "some answers were regenerated"


def truncated(result: ExecutionResult) -> bool:
    return any("length" in run.finish_reasons for run in result.nodes)


async def test_truncation_falls_when_max_tokens_is_raised():
    world = SimWorld(13)
    tasks = world.tasks("arithmetic", 250)
    tight = await run(world, spec("arithmetic"), tasks)  # max_tokens 64, a chatty chain of thought
    cut = count(tight, truncated)
    assert 0.05 <= cut / 250 <= 0.2, cut
    assert all(explained("missing answer")(r) for r in tight if truncated(r)), (
        "truncation has its own signature"
    )
    roomy = await run(world, spec("arithmetic", param("solve", "max_tokens", 256)), tasks)
    assert count(roomy, truncated) == 0 and count(roomy, explained("missing answer")) == 0
    assert p_fewer(tight, roomy, truncated) < 0.001


def argument_error_probability(task: Task) -> float:
    numbers = [int(n.replace(",", "")) for n in re.findall(r"\d[\d,]*", task.input["question"])]
    separators = 1 - (1 - RATES.separator_copy) ** sum(n >= 1000 for n in numbers)
    times = RATES.times_sign if task.features["multiplies"] else 0.0
    return 1 - (1 - separators) * (1 - times) * (1 - RATES.wrong_argument_name)


async def test_tool_argument_errors_fall_with_argument_validation():
    world = SimWorld(14)
    tasks = world.tasks("arithmetic", 250)
    bad_arguments = lambda r: r.error_type == "cegraph.daemon.workflows.tools.ToolArgumentError"  # noqa: E731
    plain = await run(world, spec("arithmetic-calculator"), tasks)
    assert_near(count(plain, bad_arguments), 250, fmean(argument_error_probability(t) for t in tasks))
    validated = await run(
        world,
        spec(
            "arithmetic-calculator",
            param("calculate", "validate_arguments", True),
            param("calculate", "retries", 2),
        ),
        tasks,
    )
    assert count(validated, bad_arguments) <= 3
    assert p_fewer(plain, validated, bad_arguments) < 0.001
    assert any(r.nodes[0].llm_calls > 1 for r in validated), "the repairs happened"


# --- extraction: format violations ---


def violation_probability(task: Task, temperature: float) -> float:
    return (
        RATES.format_violation_base
        + RATES.format_violation_per_distractor * task.features["distractors"]
        + RATES.format_violation_per_temperature * temperature
    )


async def test_format_violations_fall_with_a_format_node_or_a_validated_retry():
    world = SimWorld(15)
    tasks = world.tasks("extraction", 250)
    violations = explained("format violation")
    baseline = await run(world, spec("extraction"), tasks)
    assert_near(count(baseline, violations), 250, fmean(violation_probability(t, 0.7) for t in tasks))

    chatty, terse = (
        world.tasks("extraction", 250, distractors=4),
        world.tasks("extraction", 250, distractors=0),
    )
    on_chatty, on_terse = (
        await run(world, spec("extraction"), chatty),
        await run(world, spec("extraction"), terse),
    )
    assert p_greater(count(on_chatty, violations), 250, count(on_terse, violations), 250) < 0.01

    formatter = {"kind": "format", "inputs": {"answer": "extract"}, "params": {"output_format": "json"}}
    formatted = await run(world, spec("extraction", *insert_after("extract", "format", formatter)), tasks)
    assert count(formatted, violations) <= 250 * RATES.format_node_violation + 5
    assert p_fewer(baseline, formatted, violations) < 0.001

    check = {"kind": "json", "required_keys": ["customer", "company", "product", "quantity", "due_date"]}
    retried = await run(
        world,
        spec("extraction", param("extract", "validate_output", check), param("extract", "retries", 2)),
        tasks,
    )
    unformatted = lambda r: violations(r) or (r.error_type or "").endswith("OutputValidationError")  # noqa: E731
    assert count(retried, unformatted) <= 5
    assert p_fewer(baseline, retried, unformatted) < 0.001

    prompt = "Extract the order. Reply with JSON only: keys customer, company, product, quantity, due_date."
    instructed_spec = spec("extraction", {"op": "replace", "path": "/nodes/extract/prompt", "value": prompt})
    instructed = await run(world, instructed_spec, tasks)
    assert p_fewer(baseline, instructed, violations) < 0.001


# --- multi-hop QA: hallucinations ---


def hallucination_probability(world: SimWorld, task: Task) -> float:
    known = math.prod(world.kb.popularity[entity] for entity in task.truth["chain"][:-1])
    return 1 - known


async def test_hallucinations_grow_with_hops_and_fall_with_retrieval():
    world = SimWorld(16)
    tasks = world.tasks("qa", 300)
    hallucinated = explained("hallucination")
    closed_book = spec("qa", param("answer", "temperature", 0.0))
    baseline = await run(world, closed_book, tasks)
    # facts are shared between questions, so outcomes are correlated: a little slack
    expected = fmean(hallucination_probability(world, t) for t in tasks)
    assert_near(count(baseline, hallucinated), 300, expected, slack=0.03)

    three, two = world.tasks("qa", 250, hops=3), world.tasks("qa", 250, start=300, hops=2)
    on_three, on_two = await run(world, closed_book, three), await run(world, closed_book, two)
    assert p_greater(count(on_three, hallucinated), 250, count(on_two, hallucinated), 250) < 0.01

    retrieval = spec(
        "qa",
        param("answer", "temperature", 0.0),
        {
            "op": "add",
            "path": "/nodes/search",
            "value": {
                "kind": "retrieve",
                "retriever": "kb_search",
                "inputs": {"query": "input.question"},
                "params": {"hops": 3, "top_k": 10},
            },
        },
        {"op": "replace", "path": "/entry", "value": "search"},
        {"op": "add", "path": "/edges/-", "value": {"source": "search", "target": "answer"}},
        {"op": "add", "path": "/nodes/answer/inputs/context", "value": "search"},
    )
    grounded = await run(world, retrieval, tasks)
    assert count(grounded, hallucinated) == 0
    assert p_fewer(baseline, grounded, hallucinated) < 0.001


# --- coding: bugs ---


async def test_code_bugs_fall_with_a_test_node_and_with_review_and_revise():
    world = SimWorld(17)
    tasks = world.tasks("coding", 150)
    bug_rate = fmean(
        RATES.code_bug_per_difficulty * t.features["difficulty"] + RATES.code_bug_per_temperature * 0.7
        for t in tasks
    )
    baseline = await run(world, spec("coding"), tasks)
    assert all(explained("tests failed")(r) for r in baseline if r.failed)
    assert_near(count(baseline, failed), 150, bug_rate)

    def public_test_failed(result: ExecutionResult) -> bool:  # a logic bug: the public tests catch it
        return result.failed and any(test in result.evaluation.explanation for test in result.input["tests"])

    tester = {"kind": "test", "inputs": {"task": "input.task", "code": "write", "tests": "input.tests"}}
    tested = await run(world, spec("coding", *insert_after("write", "test", tester)), tasks)
    assert count(tested, public_test_failed) <= 2
    assert p_fewer(baseline, tested, public_test_failed) < 0.001
    assert count(tested, failed) <= count(baseline, failed)

    reviewer = {"kind": "review", "inputs": {"task": "input.task", "answer": "write"}}
    reviser = {"kind": "revise", "inputs": {"task": "input.task", "answer": "write", "review": "review"}}
    review = [
        {"op": "add", "path": "/nodes/review", "value": reviewer},
        {"op": "add", "path": "/edges/-", "value": {"source": "write", "target": "review"}},
        *insert_after("review", "revise", reviser),
    ]
    revised = await run(world, spec("coding", *review), tasks)
    assert p_fewer(baseline, revised, failed) < 0.001


async def test_the_coding_ground_truth_is_sound():
    """The reference passes every hidden test; each bug fails one; only logic bugs fail the public ones."""
    world = SimWorld(18)
    coding = world.families["coding"]
    seen: dict[str, Task] = {}
    for task in world.tasks("coding", 200):
        seen.setdefault(task.features["function"], task)
    assert set(seen) == {template.function for template in TEMPLATES}
    for task in seen.values():
        problem = coding.find(task.input["task"])
        assert (await world.sandbox.run_tests(problem.correct, task.truth["tests"])).passed
        for bug in problem.template.bugs:
            source = problem.render(bug.source)
            assert not (await world.sandbox.run_tests(source, task.truth["tests"])).passed, bug.critique
            public = (await world.sandbox.run_tests(source, task.input["tests"])).passed
            assert public == (bug.kind == "edge"), (task.features["function"], bug.critique)


# --- the world as a whole ---


async def test_the_evaluators_pass_the_truth_and_fail_a_wrong_answer():
    world = SimWorld(19)
    for family in ("arithmetic", "extraction", "qa", "coding"):
        for task in world.tasks(family, 5):
            right = ExecutionResult(
                trace_id="0" * 32,
                workflow_id="w",
                workflow_version="1.0.0",
                track="stable",
                seed=0,
                input=task.input,
                output=truth_output(world, task),
                nodes=[NodeRun(node_id="n", kind="llm", status="ok")],
            )
            [verdict] = await world.evaluator(task).evaluate(right)
            assert verdict.passed and verdict.score == 1.0, (family, verdict)
            wrong = right.model_copy(update={"output": "Answer: 7"})
            [verdict] = await world.evaluator(task).evaluate(wrong)
            assert verdict.passed is False


async def test_simllm_depends_only_on_its_inputs_and_seed():
    world = SimWorld(20)
    llm = world.llm()
    task = world.task("arithmetic", 0, digits=4)
    messages = [
        Message(role="system", content="Solve it."),
        Message(role="user", content=task.input["question"]),
    ]
    context = CallContext(workflow_id="w", node_id="solve", node_kind="llm", purpose="answer", call_index=0)

    async def answer(seed: int, world_llm=llm) -> str:
        completion = await world_llm.complete(
            messages, model="sim-1", temperature=1.0, max_tokens=None, seed=seed, context=context
        )
        return completion.text

    first = [await answer(seed) for seed in range(20)]
    shuffled = list(range(20))
    random.Random(0).shuffle(shuffled)
    again = dict(zip(shuffled, await asyncio.gather(*(answer(seed) for seed in shuffled)), strict=True))
    assert first == [again[seed] for seed in range(20)]
    assert first == [await answer(seed, SimWorld(20).llm()) for seed in range(20)], "a fresh world agrees"
    assert len(set(first)) > 3
    unknown = [Message(role="user", content="What is the meaning of life?")]
    reply = await llm.complete(
        unknown, model="sim-1", temperature=0, max_tokens=None, seed=1, context=context
    )
    assert reply.text == "I cannot tell what the task is."


def test_a_replayed_input_gets_the_ground_truth_its_task_was_generated_with():
    world = SimWorld(7)
    for family in world.families:
        for task in world.tasks(family, 40):
            replayed = world.task_for_input(task.input)
            assert replayed is not None, task.input
            assert (replayed.family, replayed.truth) == (task.family, task.truth)
    assert world.task_for_input({"question": "What is the meaning of life?"}) is None


# --- how the judge speaks: paraphrased critiques, bare labels, flipped verdicts ---


async def test_a_paraphrasing_judge_names_no_mechanism_and_a_labelling_one_only_pass_or_fail():
    from cegraph.daemon.sim.judging import GENERIC, PARAPHRASES, Judging
    from cegraph.daemon.sim.refiner_model import ADVICE, REWRITES

    # the rule proposer reads no words (signature features only): the refiner model's are what is left
    words = {w for w, _ in ADVICE} | {w for w, _ in REWRITES}
    for phrase in [*GENERIC, *(p for options in PARAPHRASES.values() for p in options)]:
        assert not [w for w in words if w in phrase.lower()], phrase
    spec = example_spec("service", tools=list(SimWorld(0).tools()))
    tasks = [SimWorld(0).task(f, i) for f in ("arithmetic", "extraction", "qa") for i in range(60)]
    worded = await run(SimWorld(0), spec, tasks)
    paraphrased = await run(SimWorld(0, judging=Judging("paraphrased")), spec, tasks)
    labels = await run(SimWorld(0, judging=Judging("labels")), spec, tasks)
    assert count(worded, failed) >= 10  # enough failures for the comparison to mean something
    assert [r.failed for r in worded] == [r.failed for r in paraphrased] == [r.failed for r in labels]
    said = {r.evaluation.explanation for r in paraphrased if r.failed}
    assert len(said) >= 6 and not any(w in text.lower() for text in said for w in words)
    bare = {(r.evaluation.explanation, r.evaluation.node_id) for r in labels if r.failed}
    assert bare == {("failed", None)}


async def test_a_noisy_judge_flips_about_its_share_of_verdicts_the_same_way_every_time():
    from cegraph.daemon.sim.judging import Judging

    spec = example_spec("service", tools=list(SimWorld(0).tools()))
    tasks = [SimWorld(0).task(f, i) for f in ("arithmetic", "extraction", "qa") for i in range(150)]
    truth = await run(SimWorld(0), spec, tasks)
    noisy = await run(SimWorld(0, judging=Judging(flip=0.15)), spec, tasks)
    again = await run(SimWorld(0, judging=Judging(flip=0.15)), spec, tasks)
    flipped = sum(a.failed != b.failed for a, b in zip(truth, noisy, strict=True))
    assert_near(flipped, len(tasks), 0.15)
    assert [r.failed for r in noisy] == [r.failed for r in again]


# --- the benchmark's targeting scenarios: where a failure shows and what fixes it ---


def ran(result: ExecutionResult) -> str:
    """The answering node the router sent the execution to."""
    (node,) = (n.node_id for n in result.nodes if n.status != "skipped" and n.node_id in ("solve", "answer"))
    return node


async def test_a_problem_the_router_does_not_recognize_fails_at_answer_and_a_program_there_fixes_it():
    world = SimWorld(23)
    service = example_spec("service", tools=list(world.tools()))
    routed = world.tasks("arithmetic", 200, digits=5)
    misrouted = world.tasks("arithmetic", 200, digits=5, opening="holds")
    assert all(world.task_for_input(t.input).truth == t.truth for t in misrouted)
    on_solve, on_answer = await run(world, service, routed), await run(world, service, misrouted)
    assert {ran(r) for r in on_solve} == {"solve"} and {ran(r) for r in on_answer} == {"answer"}
    blamed = Counter(r.evaluation.node_id for r in on_answer if r.failed)
    assert count(on_answer, failed) > 20 and set(blamed) == {"answer"}
    assert {r.evaluation.name for r in on_answer} == {"arithmetic.exact_match"}
    fixed, _ = apply_edit(service, Edit(node="answer", operator="programmer"), "1.1.0")
    assert p_fewer(on_answer, await run(world, fixed, misrouted), failed) < 0.001


async def test_a_hot_answer_node_has_two_mechanisms_that_need_different_fixes():
    world = SimWorld(24)
    hot = Edit(node="answer", operator="adjust_parameter", parameter="temperature", value=0.8)
    service, _ = apply_edit(example_spec("service", tools=list(world.tools())), hot, "1.0.0")
    tasks = world.tasks("qa", 300)
    hallucinated, wrong_entity = explained("hallucination"), explained("wrong entity")
    baseline = await run(world, service, tasks)
    assert count(baseline, hallucinated) > 30 and count(baseline, wrong_entity) > 15
    edits = {
        "retrieval": Edit(node="answer", operator="add_retrieval", retriever="kb_search"),
        "ensemble": Edit(node="answer", operator="ensemble", samples=5),
    }
    variants = {
        name: await run(world, apply_edit(service, edit, "1.1.0")[0], tasks) for name, edit in edits.items()
    }
    assert p_fewer(baseline, variants["retrieval"], hallucinated) < 0.01
    assert p_fewer(baseline, variants["retrieval"], wrong_entity) > 0.05
    assert p_fewer(baseline, variants["ensemble"], wrong_entity) < 0.001
    assert p_fewer(baseline, variants["ensemble"], hallucinated) > 0.05
