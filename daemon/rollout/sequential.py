"""Always-valid comparison of two failure rates, for a canary judge that looks after every execution.

Each arm's failure rate gets a confidence sequence from Robbins' beta-binomial mixture: for a rate
`p`, the ratio of the Beta(a, b)-mixed Bernoulli likelihood to the likelihood at `p` is a nonnegative
martingale with mean 1 when `p` is the true rate, so by Ville's inequality it exceeds 1/alpha at
*any* time with probability at most alpha. The rates where it stays below 1/alpha form an interval
that covers the true rate at every sample size at once, which is what makes peeking after every
execution, stopping early and deciding at a data-dependent time all safe (Robbins 1970; Howard,
Ramdas, McAuliffe and Sekhon 2021, "Time-uniform, nonparametric, nonasymptotic confidence sequences").
The interval depends only on (failures, executions), so the judge recomputes it from counts.

The difference canary - stable is bounded by the two arms' intervals at alpha/2 each (a union
bound): exact at every sample size, whatever the split of traffic and the order of arrival, at the
price of some width (at most sqrt(2) times a two-sample interval; much less with a small canary share,
where the canary's own interval dominates).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

PRIOR = (1.0, 1.0)  # uniform: no failure rate favoured (measured a little tighter than Jeffreys' here)
_BISECTIONS = 60  # the edges to within 2**-60 (32 left log M 2e-6 off near p = 0)


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _log_likelihood(p: float, failures: int, executions: int) -> float:
    successes = executions - failures
    if (p == 0.0 and failures) or (p == 1.0 and successes):
        return -math.inf
    return (failures * math.log(p) if failures else 0.0) + (successes * math.log1p(-p) if successes else 0.0)


@lru_cache(maxsize=65_536)  # the judge and the simulations ask for the same counts again
def rate_interval(failures: int, executions: int, alpha: float) -> tuple[float, float]:
    """Time-uniform (1 - alpha) confidence interval of a Bernoulli rate after `executions` outcomes."""
    if not 0 <= failures <= executions:
        raise ValueError(f"failures must be within [0, executions], not {failures} of {executions}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be within (0, 1), not {alpha}")
    a, b = PRIOR
    # inside: log L(p) > log(mixture likelihood) + log(alpha); L is log-concave, so this is an interval
    threshold = _log_beta(a + failures, b + executions - failures) - _log_beta(a, b) + math.log(alpha)
    estimate = failures / executions if executions else 0.5

    def inside(p: float) -> bool:
        return _log_likelihood(p, failures, executions) > threshold

    def edge(outside: float) -> float:
        if inside(outside):
            return outside
        lo, hi = estimate, outside
        for _ in range(_BISECTIONS):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if inside(mid) else (lo, mid)
        return lo

    return edge(0.0), edge(1.0)


@dataclass(frozen=True, slots=True)
class Arm:
    """What one arm has shown so far: executions, failed ones, and failed ones in the target mode."""

    executions: int = 0
    failures: int = 0
    mode_failures: int = 0

    @property
    def rate(self) -> float:
        return self.failures / self.executions if self.executions else 0.0

    @property
    def mode_rate(self) -> float:
        return self.mode_failures / self.executions if self.executions else 0.0


@dataclass(frozen=True, slots=True)
class Interval:
    lower: float
    upper: float

    def __str__(self) -> str:
        return f"[{self.lower:+.3f}, {self.upper:+.3f}]"


def difference_interval(canary: tuple[int, int], stable: tuple[int, int], alpha: float) -> Interval:
    """Time-uniform (1 - alpha) interval of rate(canary) - rate(stable), from (failures, executions)."""
    c_low, c_high = rate_interval(*canary, alpha / 2)
    s_low, s_high = rate_interval(*stable, alpha / 2)
    return Interval(c_low - s_high, c_high - s_low)


Decision = Literal["promote", "rollback"]
AtLimit = Literal["point_estimate", "rollback", "promote"]


@dataclass(frozen=True, slots=True)
class Verdict:
    decision: Decision | None  # None: keep watching
    reason: str
    overall: Interval
    mode: Interval | None


def judge(
    canary: Arm,
    stable: Arm,
    *,
    alpha: float,
    min_executions: int,
    mode_known: bool,
    at_limit: AtLimit | None = None,
) -> Verdict:
    """The canary judge's rule.

    Roll back when the canary's failure rate is significantly higher; promote when it is
    significantly lower, or when the target mode's rate is significantly lower and the overall rate
    is not significantly higher; otherwise continue. Nothing is decided before both arms have
    `min_executions`. With a target mode, alpha is split between the two comparisons, so the chance
    of any decision about a canary no different from stable stays at most alpha.
    `at_limit` (the maximum duration is reached) forces a decision: the given one, or with
    `point_estimate` promote if the canary's observed rate is no higher than stable's, else roll back.
    """
    share = alpha / 2 if mode_known else alpha
    overall = difference_interval(
        (canary.failures, canary.executions), (stable.failures, stable.executions), share
    )
    mode = (
        difference_interval(
            (canary.mode_failures, canary.executions), (stable.mode_failures, stable.executions), share
        )
        if mode_known
        else None
    )
    rates = f"failure rate {canary.rate:.3f} vs {stable.rate:.3f}, difference in {overall}"
    sample = min(canary.executions, stable.executions)
    if sample >= min_executions:
        if overall.lower > 0:
            return Verdict("rollback", f"canary worse: {rates} (alpha {alpha})", overall, mode)
        if overall.upper < 0:
            return Verdict("promote", f"canary better: {rates} (alpha {alpha})", overall, mode)
        if mode is not None and mode.upper < 0:
            reason = (
                f"target mode lower: mode rate {canary.mode_rate:.3f} vs {stable.mode_rate:.3f}, "
                f"difference in {mode}; overall {rates} (alpha {alpha})"
            )
            return Verdict("promote", reason, overall, mode)
    if at_limit is None:
        return Verdict(None, f"undecided: {rates}", overall, mode)
    if at_limit == "point_estimate":
        decision: Decision = "promote" if canary.rate <= stable.rate else "rollback"
    else:
        decision = at_limit
    return Verdict(
        decision, f"max duration: {rates}, not significant; {at_limit} gives {decision}", overall, mode
    )
