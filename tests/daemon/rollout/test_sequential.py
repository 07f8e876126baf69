"""The canary judge's statistics: beta-binomial confidence sequences and the decision rule.

The central property: with a canary no different from stable, looking after every execution, the
chance of any decision stays below alpha (seeded simulations), while a naive fixed-sample interval
looked at the same way decides far more often (so the simulation can tell a valid test from an
invalid one)."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cegraph.daemon.rollout.sequential import Arm, difference_interval, judge, rate_interval

counts = st.integers(0, 5_000).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n)))
alphas = st.sampled_from([0.01, 0.05, 0.1, 0.3])


@given(counts, alphas)
def test_the_interval_holds_the_estimate_within_0_1(count, alpha):
    failures, executions = count
    low, high = rate_interval(failures, executions, alpha)
    estimate = failures / executions if executions else 0.5
    assert 0.0 <= low <= estimate <= high <= 1.0


@given(counts, alphas)
def test_the_edges_are_where_the_mixture_martingale_reaches_one_over_alpha(count, alpha):
    """Robbins' mixture: M(p) = mixture likelihood / likelihood at p; p is outside iff M(p) >= 1/alpha."""
    failures, executions = count
    low, high = rate_interval(failures, executions, alpha)
    log_mixture = (
        math.lgamma(1 + failures) + math.lgamma(1 + executions - failures) - math.lgamma(2 + executions)
    )

    def log_m(p: float) -> float:
        return log_mixture - failures * math.log(p) - (executions - failures) * math.log1p(-p)

    for edge, outward in ((low, -1), (high, 1)):
        if 0 < edge < 1:
            assert log_m(edge) == pytest.approx(-math.log(alpha), abs=1e-6)
            beyond = edge + outward * 1e-6
            if 0 < beyond < 1:
                assert log_m(beyond) >= -math.log(alpha) - 1e-9


@given(st.integers(1, 2_000), st.floats(0.05, 0.95), alphas)
def test_more_evidence_narrows_and_a_smaller_alpha_widens(executions, rate, alpha):
    failures = round(rate * executions)
    low, high = rate_interval(failures, executions, alpha)
    more_low, more_high = rate_interval(4 * failures, 4 * executions, alpha)
    assert more_high - more_low < high - low
    strict_low, strict_high = rate_interval(failures, executions, alpha / 10)
    assert strict_low <= low and strict_high >= high


@given(counts, counts, alphas)
def test_swapping_the_arms_mirrors_the_decision(canary, stable, alpha):
    a, b = Arm(canary[1], canary[0]), Arm(stable[1], stable[0])
    forward = judge(a, b, alpha=alpha, min_executions=1, mode_known=False)
    backward = judge(b, a, alpha=alpha, min_executions=1, mode_known=False)
    assert forward.overall.lower == pytest.approx(-backward.overall.upper)
    mirrored = {"promote": "rollback", "rollback": "promote", None: None}
    assert backward.decision == mirrored[forward.decision]


def test_bad_counts_are_refused():
    with pytest.raises(ValueError, match="failures must be within"):
        rate_interval(5, 3, 0.05)
    with pytest.raises(ValueError, match="alpha"):
        rate_interval(1, 3, 1.5)


def test_the_rule():
    worse, same, better = Arm(1_000, 500), Arm(1_000, 350), Arm(1_000, 200)
    assert judge(worse, same, alpha=0.05, min_executions=100, mode_known=False).decision == "rollback"
    assert judge(better, same, alpha=0.05, min_executions=100, mode_known=False).decision == "promote"
    assert judge(same, same, alpha=0.05, min_executions=100, mode_known=False).decision is None
    # nothing before the minimum sample, however clear
    assert judge(worse, same, alpha=0.05, min_executions=1_001, mode_known=False).decision is None
    # the target mode lower and the overall rate not significantly higher: promote
    fixed_mode = Arm(1_000, 340, mode_failures=20)
    with_mode = Arm(1_000, 350, mode_failures=150)
    verdict = judge(fixed_mode, with_mode, alpha=0.05, min_executions=100, mode_known=True)
    assert verdict.decision == "promote" and verdict.reason.startswith("target mode lower")
    assert verdict.mode is not None and verdict.mode.upper < 0
    # the mode lower but the overall rate significantly higher: roll back
    traded = Arm(1_000, 500, mode_failures=20)
    assert judge(traded, with_mode, alpha=0.05, min_executions=100, mode_known=True).decision == "rollback"


@pytest.mark.parametrize(
    ("at_limit", "canary", "expected"),
    [
        ("point_estimate", Arm(300, 100), "promote"),
        ("point_estimate", Arm(300, 106), "rollback"),
        ("rollback", Arm(300, 90), "rollback"),
        ("promote", Arm(300, 110), "promote"),
    ],
)
def test_at_the_maximum_a_decision_is_forced(at_limit, canary, expected):
    verdict = judge(
        canary, Arm(300, 100), alpha=0.05, min_executions=1_000, mode_known=False, at_limit=at_limit
    )
    assert verdict.decision == expected and verdict.reason.startswith("max duration")


def naive_interval(canary: tuple[int, int], stable: tuple[int, int], alpha: float):
    """A fixed-sample Wald interval: valid at one planned look, not at every look."""
    (fc, nc), (fs, ns) = canary, stable
    pc, ps = fc / nc, fs / ns
    z = NormalDist().inv_cdf(1 - alpha / 2)
    half = z * math.sqrt(pc * (1 - pc) / nc + ps * (1 - ps) / ns + 1e-12)
    return pc - ps - half, pc - ps + half


def decides(
    seed: int, rates: tuple[float, float], looks: int, interval, weight: float = 0.3, first: int = 30
):
    """Looks after every execution (from `first` per arm); the first decision, or None."""
    rng = np.random.default_rng(seed)
    to_canary = rng.random(looks) < weight
    failed = rng.random(looks) < np.where(to_canary, rates[0], rates[1])
    arms = {True: [0, 0], False: [0, 0]}
    for arm, fail in zip(to_canary.tolist(), failed.tolist(), strict=True):
        arms[arm][0] += fail
        arms[arm][1] += 1
        if min(arms[True][1], arms[False][1]) < first:
            continue
        low, high = interval(tuple(arms[True]), tuple(arms[False]), 0.05)
        if low > 0 or high < 0:
            return "rollback" if low > 0 else "promote"
    return None


def always_valid(canary, stable, alpha):
    interval = difference_interval(canary, stable, alpha)
    return interval.lower, interval.upper


@pytest.mark.parametrize("rate", [0.05, 0.35])
def test_under_no_difference_looking_after_every_execution_keeps_false_decisions_below_alpha(rate):
    runs = 200
    false = sum(decides(seed, (rate, rate), 2_000, always_valid) is not None for seed in range(runs))
    assert false / runs <= 0.05, f"{false} of {runs} runs decided about a canary equal to stable"


def test_the_simulation_catches_an_interval_that_is_not_always_valid():
    runs = 200
    false = sum(decides(seed, (0.35, 0.35), 2_000, naive_interval) is not None for seed in range(runs))
    assert false / runs > 0.15, "peeking at a fixed-sample interval should decide wrongly often"


def test_a_real_difference_is_found_and_in_the_right_direction():
    outcomes = [decides(seed, (0.50, 0.35), 4_000, always_valid) for seed in range(40)]
    assert outcomes.count("rollback") >= 36 and "promote" not in outcomes
    outcomes = [decides(seed, (0.20, 0.35), 4_000, always_valid) for seed in range(40)]
    assert outcomes.count("promote") >= 36 and "rollback" not in outcomes
