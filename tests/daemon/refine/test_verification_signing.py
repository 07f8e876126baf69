"""Paired verification statistics (exact McNemar, paired bootstrap, the accept rule, what counts as a
fixed counterexample) and patch signatures: one changed byte breaks a signature."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cegraph.daemon.detect.density import NOISE
from cegraph.daemon.refine.operators import Edit, apply_edit
from cegraph.daemon.refine.shadow import ShadowOutcome
from cegraph.daemon.refine.signing import sign, signed_only, verify_signature
from cegraph.daemon.refine.verification import (
    Interval,
    can_show_a_drop,
    compare,
    judge,
    mcnemar,
    paired_bootstrap,
    per_candidate_alpha,
    resample_indices,
)
from cegraph.schemas.patch import Cost, Rationale, Verification, WorkflowPatch
from cegraph.schemas.workflow import example_spec


def test_mcnemar_counts_only_discordant_pairs():
    base = [True] * 30 + [False] * 70
    candidate = [False] * 20 + [True] * 10 + [True] * 2 + [False] * 68
    result = mcnemar(base, candidate)
    assert (result.fixed, result.broken, result.n) == (20, 2, 100)
    assert result.base_rate == 0.30 and result.candidate_rate == 0.12
    # P(X >= 20) for X ~ Bin(22, 1/2) = (C(22,20) + C(22,21) + C(22,22)) / 2^22
    assert result.p_better == pytest.approx((231 + 22 + 1) / 2**22)
    assert result.p_worse > 0.99


@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=60))
@settings(max_examples=200)
def test_mcnemar_is_symmetric_and_p_values_are_probabilities(pairs):
    base, candidate = [b for b, _ in pairs], [c for _, c in pairs]
    forward, backward = mcnemar(base, candidate), mcnemar(candidate, base)
    assert forward.p_better == backward.p_worse and forward.p_worse == backward.p_better
    assert 0 < forward.p_better <= 1 and 0 < forward.p_worse <= 1
    assert forward.change == pytest.approx(-backward.change)


def test_a_round_of_candidates_with_no_effect_accepts_one_at_most_alpha_of_the_time_once_corrected():
    """Eight candidates per round, none better than the current spec (both fail each of 40 inputs
    with probability 1/2, independently): uncorrected, some candidate passes in far more than 5% of
    rounds; at alpha / 8 per candidate, in at most 5%."""
    rng, alpha, rounds, candidates = random.Random(11), 0.05, 2_000, 8
    uncorrected = corrected = 0
    for _ in range(rounds):
        p_values = []
        for _ in range(candidates):
            base = [rng.random() < 0.5 for _ in range(40)]
            p_values.append(mcnemar(base, [rng.random() < 0.5 for _ in range(40)]).p_better)
        uncorrected += min(p_values) < alpha
        corrected += min(p_values) < per_candidate_alpha(alpha, candidates)
    assert uncorrected / rounds > 2 * alpha
    assert corrected / rounds <= alpha
    assert per_candidate_alpha(alpha, 0) == alpha


def plain_bootstrap(base, candidate, *, confidence=0.95, resamples=2_000, seed=0):
    """The loop `paired_bootstrap` was before numpy: the reference it must equal."""
    differences = [c - b for b, c in zip(base, candidate, strict=True)]
    rng = random.Random(seed)
    n = len(differences)
    means = sorted(sum(differences[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    tail = (1 - confidence) / 2
    low = means[int(tail * (resamples - 1))]
    high = means[math.ceil((1 - tail) * (resamples - 1))]
    return Interval(sum(differences) / n, low, high)


outcomes = st.floats(-5, 5, allow_nan=False) | st.sampled_from([0.0, 1.0])


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 16), st.integers(0, 16), st.floats(0.001, 0.2), st.integers(1, 8),
    st.lists(st.booleans(), min_size=32, max_size=32), st.lists(st.booleans(), min_size=32, max_size=32),
)  # fmt: skip
def test_a_round_is_skipped_only_when_no_candidate_could_show_a_drop(
    failing, others, alpha, m, fixes, breaks
):
    """With `failing` inputs in the target mode, no outcome of a candidate (any of them fixed, any of
    the others broken) reaches p < alpha / m exactly when `can_show_a_drop` says so."""
    level = per_candidate_alpha(alpha, m)
    base = [True] * failing + [False] * others
    candidate = [not fixes[i] for i in range(failing)] + breaks[:others]
    if not can_show_a_drop(failing, level):
        assert mcnemar(base, candidate).p_better >= level
    else:
        assert mcnemar(base, [False] * (failing + others)).p_better < level


def test_the_fewest_target_failures_that_can_show_a_drop():
    assert not can_show_a_drop(4, 0.05) and can_show_a_drop(5, 0.05)  # 2^-4 = 0.0625, 2^-5 = 0.031
    assert not can_show_a_drop(7, 0.05 / 8) and can_show_a_drop(8, 0.05 / 8)
    assert not can_show_a_drop(0, 0.5)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(outcomes, outcomes), min_size=1, max_size=150),
    st.integers(0, 2**32 - 1),
    st.integers(1, 300),
    st.sampled_from([0.8, 0.9, 0.95, 0.99]),
)
def test_paired_bootstrap_draws_the_plain_loops_resamples_and_its_numbers(pairs, seed, resamples, level):
    base, candidate = [b for b, _ in pairs], [c for _, c in pairs]
    fast = paired_bootstrap(base, candidate, confidence=level, resamples=resamples, seed=seed)
    assert fast == plain_bootstrap(base, candidate, confidence=level, resamples=resamples, seed=seed)
    rng = random.Random(seed)
    drawn = [[rng.randrange(len(pairs)) for _ in pairs] for _ in range(resamples)]
    assert resample_indices(len(pairs), resamples, seed).tolist() == drawn


def test_paired_bootstrap_covers_a_known_shift():
    rng = random.Random(3)
    base = [rng.random() for _ in range(400)]
    candidate = [b - 0.2 + rng.gauss(0, 0.05) for b in base]
    interval = paired_bootstrap(base, candidate, seed=1)
    assert interval.low < -0.2 < interval.high and interval.high < 0
    assert paired_bootstrap(base, candidate, seed=1) == interval  # seeded


def test_judge_accepts_a_real_improvement_and_refuses_regressions_and_overspending():
    better = mcnemar([True] * 30 + [False] * 70, [False] * 25 + [True] * 5 + [False] * 70)
    flat = mcnemar([True] * 10 + [False] * 90, [True] * 10 + [False] * 90)
    worse = mcnemar([False] * 100, [True] * 20 + [False] * 80)
    assert judge(better, {"efm": flat}, alpha=0.05, calls=100, budget=200).accepted
    assert not judge(flat, {}, alpha=0.05, calls=100, budget=200).accepted
    refused = judge(better, {"other mode": worse}, alpha=0.05, calls=100, budget=200)
    assert not refused.accepted and "other mode rose" in refused.reason
    assert "over budget" in judge(better, {}, alpha=0.05, calls=300, budget=200).reason


def outcomes(*groups: tuple[int, bool, frozenset[str]]) -> list[ShadowOutcome]:
    """(count, failed, modes) groups, in order: one replayed input each."""
    return [
        ShadowOutcome(f"{i:032x}", failed, modes, 1, 0)
        for i, (failed, modes) in enumerate(
            (failed, modes) for count, failed, modes in groups for _ in range(count)
        )
    ]


TARGET, OTHER = frozenset({"m1"}), frozenset({"m2"})
# The sample the real-model benchmark verified on (docs/real-model.md): the base fails on every
# replayed input, 16 counterexamples of the target mode and 34 controls in another mode.
FAILING_BASE = outcomes((16, True, TARGET), (34, True, OTHER))


@pytest.mark.parametrize(
    ("still", "where"), [(frozenset({NOISE}), "in no mode"), (frozenset({"m9"}), "in a new mode"),
                         (OTHER, "in another mode")],
)  # fmt: skip
def test_a_counterexample_that_still_fails_elsewhere_is_not_fixed(still, where):
    """The patch the real-model benchmark accepted by mistake (issue 15): a programmer node turned the
    target mode's wrong answers into failing programs, which the frozen classifier puts in no mode.
    The input still fails: the target mode did not drop, and the candidate is refused."""
    moved = outcomes((16, True, still), (34, True, OTHER))
    report, verdict = compare(FAILING_BASE, moved, [1.0] * 50, TARGET, alpha=0.05, calls=10, budget=100)
    assert not verdict.accepted, where
    assert report.target_before == report.target_after == 16 / 50
    assert "did not drop" in verdict.reason


def test_a_counterexample_that_no_longer_fails_is_fixed():
    fixed = outcomes((16, False, frozenset()), (34, True, OTHER))
    report, verdict = compare(FAILING_BASE, fixed, [1.0] * 50, TARGET, alpha=0.05, calls=10, budget=100)
    assert verdict.accepted, verdict.reason
    assert (report.target_before, report.target_after) == (16 / 50, 0.0)
    assert report.efm_after == 34 / 50


def patch_for(key: str) -> WorkflowPatch:
    base = example_spec("arithmetic")
    spec, ops = apply_edit(base, Edit(operator="programmer", node="solve"), "1.1.0")
    patch = WorkflowPatch(
        workflow_id=base.id, base_version=base.version, new_version="1.1.0", operations=ops,
        content_hash=spec.content_hash, rationale=Rationale(
            job_id="job-7", mode="m3", counterexamples=["ab" * 16], edits=[{"operator": "programmer"}],
            verification=Verification(pairs=80, counterexamples=40, target_before=0.3, target_after=0.0,
                                      target_p=1e-9, efm_before=0.33, efm_after=0.04,
                                      efm_change_low=-0.35, efm_change_high=-0.2),
            cost=Cost(llm_calls=1200, tokens=150_000, wall_s=3.5),
        ),
    )  # fmt: skip
    return sign(patch, key)


def test_a_signed_patch_verifies_and_one_changed_byte_breaks_it():
    patch = patch_for("s3cret")
    assert patch.signature and verify_signature(patch, "s3cret")
    assert not verify_signature(patch, "another key")
    raw = patch.model_dump_json(by_alias=True)
    for position in range(0, len(raw), max(1, len(raw) // 40)):
        changed = raw[:position] + ("X" if raw[position] != "X" else "Y") + raw[position + 1 :]
        try:
            tampered = WorkflowPatch.model_validate_json(changed)
        except ValueError:
            continue  # no longer a patch at all: refused anyway
        assert not verify_signature(tampered, "s3cret"), position


def test_cegraph_patches_verify_passes_a_good_patch_and_fails_one_changed_byte(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    cegraph = str(Path(sys.executable).parent / "cegraph")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CEGRAPH_")}
    env["CEGRAPH_PUBLISHER__SIGNING_KEY"] = "s3cret"
    good = tmp_path / "good.json"
    good.write_text(patch_for("s3cret").model_dump_json(by_alias=True))
    result = subprocess.run([cegraph, "patches", "verify", str(good), "--base", "arithmetic"],
                            env=env, capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    text = good.read_text()
    at = text.index('"1.1.0"') + 3  # one byte of the new version: 1.1.0 -> 1.7.0
    bad = tmp_path / "bad.json"
    bad.write_text(text[:at] + "7" + text[at + 1 :])
    result = subprocess.run([cegraph, "patches", "verify", str(bad), "--base", "arithmetic"],
                            env=env, capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 1 and "signature does not match" in result.stderr
    unsigned_but_valid = tmp_path / "wrong_base.json"
    unsigned_but_valid.write_text(text)
    result = subprocess.run([cegraph, "patches", "verify", str(unsigned_but_valid), "--base", "qa"],
                            env=env, capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 1 and "not for qa" in result.stderr


def test_a_service_with_the_key_runs_only_patches_signed_with_it():
    applied = []
    apply = signed_only(lambda patch: applied.append(patch) or True, "s3cret")
    good = patch_for("s3cret")
    assert apply(good) and applied == [good]
    assert not apply(patch_for("another key")) and not apply(good.model_copy(update={"signature": None}))
    assert applied == [good]


def test_a_candidate_over_the_cost_cap_is_refused_by_its_cost_weighted_to_the_traffic():
    """16 counterexamples (weight 1) fixed by a candidate that doubles their calls; 34 controls stand
    for 10 executions each and cost what they did. Weighted: (32 + 340) / 356 = 1.04 calls per
    execution; unweighted it would be 1.32."""
    fixed = [ShadowOutcome(o.trace_id, False, frozenset(), 2, 0) for o in FAILING_BASE[:16]]
    candidate = fixed + FAILING_BASE[16:]
    weights = [1.0] * 16 + [10.0] * 34
    report, verdict = compare(
        FAILING_BASE, candidate, weights, TARGET, alpha=0.05, calls=10, budget=100, max_calls=1.2
    )
    assert verdict.accepted, verdict.reason
    assert report.calls_before == 1.0 and report.calls_after == pytest.approx(372 / 356)
    _, refused = compare(
        FAILING_BASE, candidate, weights, TARGET, alpha=0.05, calls=10, budget=100, max_calls=1.03
    )
    assert not refused.accepted and "inference cost 1.04 LLM calls per execution" in refused.reason
    _, equal = compare(
        FAILING_BASE, candidate, weights, TARGET, alpha=0.05, calls=10, budget=100, max_calls=372 / 356
    )
    assert equal.accepted, "a cost at the cap is within it"
