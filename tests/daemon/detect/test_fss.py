"""Failure labeling, the signature featurizer and the mode tracker, on hand-built and planted data."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from fss_fixtures import mechanism_stream, node, planted_stream, verdict
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.cluster import AgglomerativeClustering
from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score, homogeneity_score

from cegraph.daemon.detect.density import NOISE, MicroClusters, ModeTracker, average_linkage, unit
from cegraph.daemon.detect.failures import FeedbackSignal, label_failures
from cegraph.daemon.detect.signature import (
    DIM,
    STRUCTURE_DIM,
    SignatureFeaturizer,
    describe,
    normalize_message,
)

# ------------------------------------------------------------------ labeling


def test_the_deepest_failing_span_is_the_point_of_a_propagated_error():
    nodes = [
        node(1, None, "root", "workflow", 0, status="error"),
        node(2, 1, "plan", "llm", 1),
        node(3, 1, "tool", "tool", 2, status="error", exception_type="ValueError", exception_message="bad"),
        node(
            4, 3, "parse", "code", 3, status="error", exception_type="ValueError", exception_message="bad x"
        ),
    ]
    failures = label_failures(nodes)
    assert [(f.node.node_id, f.source) for f in failures] == [("parse", "error")]
    assert failures[0].path == ("root", "tool", "parse")
    assert failures[0].depth == 2
    assert failures[0].message == "bad x"


def test_independent_errors_are_separate_counterexamples_in_execution_order():
    nodes = [
        node(1, None, "root", "workflow", 0),
        node(3, 1, "b", "tool", 5, error_type="RateLimit"),
        node(2, 1, "a", "tool", 1, status="error"),
    ]
    assert [f.node.node_id for f in label_failures(nodes)] == ["a", "b"]


def test_truncation_is_a_hard_failure():
    nodes = [node(1, None, "root", "workflow"), node(2, 1, "write", "llm", 1, finish_reasons=["length"])]
    assert [(f.node.node_id, f.source) for f in label_failures(nodes)] == [("write", "truncated")]


def test_a_refusal_is_a_hard_failure_with_its_text_as_the_message():
    nodes = [
        node(1, None, "root", "workflow"),
        node(2, 1, "answer", "llm", 1, refusal="I can't help with that.", finish_reasons=["stop"]),
        node(3, 1, "other", "llm", 2, finish_reasons=["refusal"]),
    ]
    assert [(f.node.node_id, f.source, f.message) for f in label_failures(nodes)] == [
        ("answer", "refusal", "I can't help with that."),
        ("other", "refusal", "refused"),
    ]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["unset", "ok", "error"]),
            st.sampled_from(["", "openai.InternalServerError"]),
            st.sampled_from([[], ["stop"], ["length"], ["content_filter"], ["refusal"], ["tool_calls"]]),
            st.sampled_from(["", "no"]),
            st.sampled_from([None, True, False]),
        ),
        min_size=1,
        max_size=7,
    ),
    st.randoms(use_true_random=False),
)
def test_an_execution_has_failures_exactly_when_a_node_is_failed(spans, rng):
    """The labels and the `executions` table (`hard_failed OR eval_failed`, which `stats` and the
    canary judge count) agree on which executions failed, on any graph."""
    nodes = [node(1, None, "root", "workflow")]
    for index, (status, error, finish, refusal, passed) in enumerate(spans, start=2):
        verdicts = [] if passed is None else [verdict(passed)]
        nodes.append(
            node(index, rng.randrange(1, index), f"n{index}", "llm", index, status=status, error_type=error,
                 finish_reasons=finish, refusal=refusal, evaluations=verdicts)
        )  # fmt: skip
    assert bool(label_failures(nodes)) == any(n.hard_failed or n.eval_failed for n in nodes)


def test_a_verdict_on_the_whole_execution_points_at_the_last_llm_span():
    nodes = [
        node(1, None, "root", "workflow", 0, evaluations=[verdict(False, "wrong total")]),
        node(2, 1, "draft", "llm", 1),
        node(3, 1, "answer", "llm", 5),
        node(4, 1, "log", "tool", 9),
    ]
    [failure] = label_failures(nodes)
    assert (failure.node.node_id, failure.source, failure.critique) == ("answer", "evaluation", "wrong total")


def test_a_verdict_on_a_span_points_at_that_span_and_a_pass_is_no_failure():
    nodes = [
        node(1, None, "root", "workflow", 0, evaluations=[verdict(True)]),
        node(2, 1, "extract", "llm", 1, evaluations=[verdict(False, "missing field date")]),
    ]
    [failure] = label_failures(nodes)
    assert failure.node.node_id == "extract" and failure.critique == "missing field date"


def test_an_openinference_evaluator_judges_its_parent():
    nodes = [
        node(1, None, "root", "chain", 0),
        node(2, 1, "retrieve", "retrieve", 1),
        node(3, 2, "relevance", "evaluator", 2, evaluations=[verdict(False, "unrelated documents")]),
    ]
    [failure] = label_failures(nodes)
    assert failure.node.node_id == "retrieve"


def test_feedback_names_its_span_or_falls_back_to_the_answer():
    nodes = [
        node(1, None, "root", "workflow", 0),
        node(2, 1, "search", "tool", 1),
        node(3, 1, "answer", "llm", 2),
    ]
    named = FeedbackSignal("a" * 32, f"{2:016x}", "used the wrong tool", "annotation")
    unnamed = FeedbackSignal("a" * 32, None, "thumbs down", "user")
    failures = label_failures(nodes, [named, unnamed])
    assert [(f.node.node_id, f.critique) for f in failures] == [
        ("search", "used the wrong tool"), ("answer", "thumbs down"),
    ]  # fmt: skip


def test_retries_and_sibling_position():
    nodes = [
        node(1, None, "root", "workflow", 0),
        node(2, 1, "call", "tool", 1, status="error"),
        node(3, 1, "call", "tool", 2, status="error"),
    ]
    second = label_failures(nodes)[1]
    assert (second.sibling_index, second.retries_before) == (1, 1)


# ------------------------------------------------------------------ signatures


def test_messages_are_normalised_so_occurrences_of_one_error_match():
    one = normalize_message("Timeout after 30 s calling 'search' for trace 4bf92f3577b34da6a3ce929d0e0e4736")
    two = normalize_message("Timeout after 5 s calling 'lookup' for trace 00f067aa0ba902b7ab12cd34ef567890")
    assert one == two


def test_signature_shape_blocks_and_determinism():
    stream = planted_stream(200, seed=3, modes={"calc": 1, "search": 1, "format": 1})
    first, second = SignatureFeaturizer(), SignatureFeaturizer()
    a = [first.learn_transform_one(f)[0] for f, _ in stream]
    b = [second.learn_transform_one(f)[0] for f, _ in stream]
    assert all(v.shape == (DIM,) for v in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    structure = np.linalg.norm(a[0][:STRUCTURE_DIM])
    assert 0 < structure <= 0.55 + 1e-9


def test_a_place_every_failure_shares_weighs_nothing():
    """A single-LLM-node agent: the node feature is in every failure, so it ties nothing together."""
    one_node = planted_stream(300, seed=3, modes={"format": 1})
    featurizer = SignatureFeaturizer()
    shared = [featurizer.learn_transform_one(f)[0][:STRUCTURE_DIM] for f, _ in one_node][-1]
    mixed = planted_stream(300, seed=3, modes={"calc": 1, "search": 1, "format": 1})
    featurizer = SignatureFeaturizer()
    specific = [featurizer.learn_transform_one(f)[0][:STRUCTURE_DIM] for f, _ in mixed][-1]
    assert np.linalg.norm(shared) < 0.2 < np.linalg.norm(specific)


def test_same_mode_is_closer_than_other_modes():
    stream = planted_stream(300, seed=5, modes={"calc": 1, "search": 1, "format": 1})
    featurizer = SignatureFeaturizer()
    vectors = [(featurizer.learn_transform_one(f)[0], mode) for f, mode in stream]
    by_mode: dict[str, list[np.ndarray]] = {}
    for vector, mode in vectors[100:]:
        by_mode.setdefault(mode, []).append(vector)
    centres = {mode: np.mean(vs, axis=0) for mode, vs in by_mode.items()}
    for mode, vs in by_mode.items():
        within = np.mean([np.linalg.norm(v - centres[mode]) for v in vs])
        across = min(np.linalg.norm(centres[mode] - centres[o]) for o in centres if o != mode)
        assert within < across / 2, (mode, within, across)


def test_describe_names_the_features():
    failure = planted_stream(1, seed=1, modes={"calc": 1})[0][0]
    parts = describe(failure)
    assert "node=wf/calc" in parts.structure and "source=error" in parts.structure
    assert "err=valueerror" in parts.text_terms and "convert" in parts.text_terms
    assert parts.traits[7] == 1.0  # has an exception


def test_idf_discounts_terms_every_failure_shares():
    featurizer = SignatureFeaturizer()
    for failure, _ in planted_stream(300, seed=2, modes={"calc": 1, "search": 1}):
        featurizer.learn_one(failure)
    assert featurizer.idf("convert") > featurizer.idf("to")  # "to" is in both modes' messages


# ------------------------------------------------------------------ modes


def run_tracker(stream, tracker: ModeTracker, batch: int = 50) -> list[str]:
    featurizer = SignatureFeaturizer()
    assigned: list[str] = []
    for start in range(0, len(stream), batch):
        for failure, _ in stream[start : start + batch]:
            tracker.learn_one(featurizer.learn_transform_one(failure)[0])
        assigned.extend(tracker.assign()[0])
    return assigned


def test_planted_modes_are_found():
    stream = planted_stream(3_000, seed=11, modes={"calc": 0.3, "search": 0.3, "format": 0.3, "noise": 0.1})
    assigned = run_tracker(stream, ModeTracker())
    truth = [mode for _, mode in stream]
    planted = [i for i in range(1_000, len(stream)) if truth[i] != "noise"]
    score = adjusted_mutual_info_score([truth[i] for i in planted], [assigned[i] for i in planted])
    assert score >= 0.9, score
    found = {assigned[i] for i in planted} - {NOISE}
    assert len(found) == 3


def test_mode_ids_stay_stable_and_a_new_mode_gets_a_new_id():
    early = planted_stream(1_500, seed=4, modes={"calc": 1, "search": 1})
    late = planted_stream(1_500, seed=5, modes={"calc": 1, "search": 1, "format": 1})
    tracker = ModeTracker()
    assigned = run_tracker(early + late, tracker)
    truth = [mode for _, mode in early + late]

    def ids_of(mode: str, lo: int, hi: int) -> set[str]:
        return {assigned[i] for i in range(lo, hi) if truth[i] == mode} - {NOISE}

    for mode in ("calc", "search"):
        assert len(ids_of(mode, 500, 3_000)) == 1, mode  # the same id before and after the new mode
    new = ids_of("format", 2_000, 3_000)
    assert len(new) == 1 and new.isdisjoint(ids_of("calc", 0, 3_000) | ids_of("search", 0, 3_000))


def test_ids_and_members_stay_put_when_the_data_does_not_change():
    """Reclustering the same micro-clusters again changes nothing: no mode emerges, merges or fades,
    and every micro-cluster keeps its mode."""
    stream = mechanism_stream(600, 3, {"carry": 1, "misread": 1, "format": 1})
    tracker = ModeTracker()
    run_tracker(stream, tracker)
    before = dict(tracker._micro_mode)
    for _ in range(3):
        assert tracker.assign() == ([], [])
        assert tracker._micro_mode == before


def test_a_member_stays_in_its_mode_while_the_mode_holds_together():
    """Failures at 0, 26 and 54 degrees make one mode; then 81 and 108 degrees arrive beside the mode at
    135. Agglomerated from scratch, the failure at 54 degrees would now go with them (its mean distance
    to 54..135 is the smaller); its mode still holds together under the cut, so it stays in it."""

    def at(degrees: float) -> np.ndarray:
        return np.array([np.cos(np.radians(degrees)), np.sin(np.radians(degrees))])

    tracker = ModeTracker()
    for degrees in (0, 26, 54, 135):
        for _ in range(3):
            tracker.learn_one(at(degrees))
    first, _ = tracker.assign()
    assert first[0] == first[3] == first[6] != first[9] != NOISE
    for degrees in (81, 108):
        for _ in range(3):
            tracker.learn_one(at(degrees))
    tracker.assign()
    assert tracker.classify(at(54)) == first[0] and tracker.classify(at(135)) == first[9]
    assert tracker.classify(at(108)) == first[9]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.floats(-1, 1), min_size=3, max_size=3), min_size=2, max_size=25),
    st.floats(0.05, 1.5),
)
def test_average_linkage_from_single_points_is_the_textbook_one(points, cut):
    """From single points, `average_linkage` parts the points as scikit-learn's average linkage does."""
    vectors = np.array([unit(np.array(p)) for p in points if np.linalg.norm(p) > 1e-3])
    if len(vectors) < 2:
        return
    distances = np.clip(1.0 - vectors @ vectors.T, 0.0, 2.0)
    np.fill_diagonal(distances, 0.0)
    ours = np.zeros(len(vectors), dtype=np.int64)
    for label, group in enumerate(average_linkage(distances, [[i] for i in range(len(vectors))], cut)):
        ours[group] = label
    theirs = (
        AgglomerativeClustering(
            n_clusters=None, distance_threshold=cut, metric="precomputed", linkage="average"
        )
        .fit(distances)
        .labels_
    )
    assert adjusted_rand_score(theirs, ours) == pytest.approx(1.0)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.floats(-1, 1), min_size=3, max_size=3), min_size=2, max_size=25),
    st.floats(0.05, 1.5),
    st.randoms(use_true_random=False),
)
def test_average_linkage_only_joins_what_was_apart(points, cut, rng):
    """From an earlier partition, every earlier group ends whole inside one group, and no two groups
    that remain are closer on average than the cut."""
    vectors = np.array([unit(np.array(p)) for p in points if np.linalg.norm(p) > 1e-3])
    if len(vectors) < 2:
        return
    distances = np.clip(1.0 - vectors @ vectors.T, 0.0, 2.0)
    np.fill_diagonal(distances, 0.0)
    earlier: dict[int, list[int]] = {}
    for row in range(len(vectors)):
        earlier.setdefault(rng.randrange(len(vectors)), []).append(row)
    result = average_linkage(distances, list(earlier.values()), cut)
    assert sorted(row for group in result for row in group) == list(range(len(vectors)))
    home = {row: index for index, group in enumerate(result) for row in group}
    assert all(len({home[row] for row in group}) == 1 for group in earlier.values())
    for a, one in enumerate(result):
        for other in result[a + 1 :]:
            assert distances[np.ix_(one, other)].mean() >= cut - 1e-9


def test_a_mode_whose_cause_stops_fades():
    tracker = ModeTracker(half_life=300)
    before = planted_stream(600, seed=6, modes={"calc": 1, "search": 1})
    after = planted_stream(4_000, seed=7, modes={"search": 1})
    featurizer = SignatureFeaturizer()
    changes = []
    for start in range(0, len(before + after), 50):
        for failure, _ in (before + after)[start : start + 50]:
            tracker.learn_one(featurizer.learn_transform_one(failure)[0])
        changes.extend(tracker.assign()[1])
    assert [c.kind for c in changes].count("emerged") >= 2
    assert any(c.kind == "faded" for c in changes)
    assert len(tracker.modes) == 1


def run_mechanisms(stream) -> list[str]:
    return run_tracker(stream, ModeTracker())


def test_two_mechanisms_on_one_node_are_two_modes():
    """Carry slips and misread operands, both in `solve`, each in varying words: they need different
    fixes, so no mode may hold both."""
    homogeneity = []
    for seed in range(5):
        stream = mechanism_stream(1_200, seed, {"carry": 1, "misread": 1})
        assigned = run_mechanisms(stream)
        truth = [m for _, m in stream][400:]
        modes = assigned[400:]
        majority = {
            mechanism: Counter(m for m, t in zip(modes, truth, strict=True) if t == mechanism).most_common(1)[
                0
            ][0]
            for mechanism in ("carry", "misread")
        }
        assert majority["carry"] != majority["misread"] and NOISE not in majority.values(), seed
        homogeneity.append(homogeneity_score(truth, modes))
    assert sum(homogeneity) / len(homogeneity) >= 0.8, homogeneity


def test_a_late_mode_emerges_within_a_bounded_number_of_failures():
    for seed in range(5):
        stream = mechanism_stream(2_000, seed, {"carry": 1, "format": 1, "hallucination": 1},
                                  late={"hallucination": 1_000})  # fmt: skip
        assigned = run_mechanisms(stream)
        earlier = set(assigned[:1_000]) - {NOISE}
        late = [mode for mode, (_, truth) in zip(assigned, stream, strict=True) if truth == "hallucination"]
        own = Counter(late).most_common(1)[0][0]
        assert own not in earlier and own != NOISE, seed
        assert late.index(own) < 50, (seed, late.index(own))  # within one batch of its start
        assert late.count(own) / len(late) >= 0.5, seed


# ------------------------------------------------------------------ each dimension


def _failure(**fields):
    from dataclasses import replace

    failure = planted_stream(1, seed=1, modes={"calc": 1})[0][0]
    failure.node = replace(failure.node, **fields)
    return failure


def test_structure_block_reflects_where_not_what():
    featurizer = SignatureFeaturizer()
    here = featurizer.transform_one(_failure(exception_message="x"))[:STRUCTURE_DIM]
    same_place = featurizer.transform_one(_failure(exception_message="something else entirely"))[
        :STRUCTURE_DIM
    ]
    elsewhere = featurizer.transform_one(_failure(node_id="other"))[:STRUCTURE_DIM]
    assert np.allclose(here, same_place) and not np.allclose(here, elsewhere)


def test_traits_tokens_finish_reason_exception_and_latency():
    from cegraph.daemon.detect.signature import TEXT_DIM

    featurizer = SignatureFeaturizer()
    start = STRUCTURE_DIM + TEXT_DIM
    for latency in (100, 110, 90, 105, 95, 100):
        featurizer.learn_one(_failure(start_ns=0, end_ns=latency * 1_000_000))
    slow = featurizer.transform_one(
        _failure(start_ns=0, end_ns=400 * 1_000_000, input_tokens=1000, finish_reasons=["length"])
    )[start:] / 0.25  # fmt: skip
    assert slow[0] == pytest.approx(np.log1p(1000) / 10)
    assert slow[2] == pytest.approx(1.0)  # far slower than the node's norm: clipped at +3 sigma
    assert list(slow[3:7]) == [1.0, 0.0, 0.0, 0.0] and slow[7] == 1.0
    typical = featurizer.transform_one(_failure(start_ns=0, end_ns=100 * 1_000_000))[start:] / 0.25
    assert abs(typical[2]) < 0.2


def test_semantics_take_the_new_part_of_the_input_and_unwrap_messages():
    from cegraph.daemon.detect.signature import new_input

    messages = (
        '[{"role": "system", "content": "You are a helpful agent. ' + "rules " * 500 + '"},'
        ' {"role": "user", "content": "Observation: the file was not found"}]'
    )
    assert new_input(messages).endswith("Observation: the file was not found")
    assert "rules rules" not in new_input(messages)[-200:]
    parts = describe(
        _failure(input_text=messages, output_text='{"role": "assistant", "content": "retrying"}')
    )
    assert (
        "observation" in parts.text_terms
        and "retrying" in parts.text_terms
        and "role" not in parts.text_terms
    )


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.floats(-1, 1), min_size=4, max_size=4), min_size=1, max_size=60),
    st.integers(min_value=2, max_value=8),
)
def test_micro_clusters_stay_within_capacity_and_lose_no_weight(points, capacity):
    """The per-failure cost is bounded by `capacity`; merging the lightest keeps every failure's weight,
    and every id handed out still leads to a live micro-cluster."""
    micro = MicroClusters(radius=0.1, decay=1.0, capacity=capacity, fade_below=0.0)
    handed = []
    for point in points:
        vector = np.array(point)
        if np.linalg.norm(vector) < 1e-6:
            continue
        handed.append(micro.learn_one(unit(vector)))
        assert len(micro) <= capacity
    assert micro.current_weights().sum() == pytest.approx(len(handed))
    live = set(micro.ids.tolist())
    assert all(micro.resolve(micro_id) in live for micro_id in handed)


def test_without_the_latency_trait_a_signature_does_not_depend_on_durations():
    """A simulated run's durations are the machine's pace: with `latency=False` two runs that differ
    only in how long each span took get the same signatures."""
    quick, slow = SignatureFeaturizer(latency=False), SignatureFeaturizer(latency=False)
    for index, latency in enumerate((100, 110, 90, 105, 95, 100)):
        quick.learn_one(_failure(start_ns=0, end_ns=latency * 1_000_000))
        slow.learn_one(_failure(start_ns=0, end_ns=(latency + 50 * index) * 1_000_000))
    late = _failure(start_ns=0, end_ns=900 * 1_000_000)
    assert np.array_equal(quick.transform_one(late), slow.transform_one(late))
    timed = SignatureFeaturizer()
    for latency in (100, 110, 90, 105, 95, 100):
        timed.learn_one(_failure(start_ns=0, end_ns=latency * 1_000_000))
    assert not np.array_equal(timed.transform_one(late), quick.transform_one(late))
