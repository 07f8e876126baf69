"""Paired statistics for shadow verification: did the candidate spec fail less, on the same inputs?

Current and candidate run on the same replayed inputs and seeds, so each input gives a pair of
outcomes. For a 0/1 outcome (the input failed in the target mode, or failed at all; a counterexample
of the target that still fails, in whatever mode, counts as failing in it) the exact McNemar test
looks only at the discordant pairs; for a mass (failures per execution) a paired bootstrap gives a
confidence interval of the mean difference. Pure functions, seeded.

The accept rule (`judge`) and what it guarantees, as the refiner uses it:
- A candidate is accepted when the one-sided exact McNemar test of its target-mode failures gives
  p < alpha / m, where alpha is `CEGRAPH_REFINER__SIGNIFICANCE` (0.05) and m the number of distinct
  candidates its round verifies at most (`per_candidate_alpha`, Bonferroni; m <= `max_candidates`,
  8), no other outcome (failing at all, each other mode) rises with p < alpha / m / (their number),
  and the job's call budget held. The refiner applies it twice per candidate, on the
  counterexamples alone and then on the whole sample; both must pass.
- Inference cost is a cap, not a test: a candidate whose LLM calls per execution (on the sample,
  weighted to the traffic) are above `max_calls` is refused whatever it fixes. The refiner sets the
  cap from `CEGRAPH_REFINER__MAX_COST_RATIO` and the cost the workflow's earlier patches added.
- A round in which no candidate has an effect accepts one with probability at most alpha, whatever
  the candidates' dependence (Bonferroni; the exact test is conservative besides: simulated with 8
  null candidates on 40 pairs each, 3.8% of rounds accept one, against 23% uncorrected). The price
  is power: a real effect must reach p < 0.00625 with 8 candidates instead of 0.05.
- The winner is not reported on the sample that chose it: the job's patch (all its rounds' edits) is
  tested once more against the base spec on a fresh sample disjoint from the first (the same rule
  at alpha: one pre-planned test), and is dropped when it does not pass there. Its before/after
  figures (`Verification`) are that sample's, free of the winner's curse. A patch with no effect
  passes the confirmation with probability at most alpha whatever chose it (the inputs are other
  ones), so a job publishes one with probability at most alpha times the chance its rounds let it
  through.
- The regression guard only refuses a rise it can show: a real regression smaller than the sample
  can resolve passes it (its power grows with the control half of the sample).
docs/refinement-benchmark.md measures what the rule costs and misses end to end.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from cegraph.schemas.patch import Verification


@dataclass(frozen=True, slots=True)
class PairedResult:
    n: int
    base_rate: float
    candidate_rate: float
    fixed: int  # failed before, not after
    broken: int  # failed after, not before
    p_better: float  # one-sided: the candidate fails less
    p_worse: float  # one-sided: the candidate fails more

    @property
    def change(self) -> float:
        return self.candidate_rate - self.base_rate


def _binomial_tail(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2)."""
    if n == 0:
        return 1.0
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2**n


def mcnemar(base: list[bool], candidate: list[bool]) -> PairedResult:
    """Exact McNemar on paired failure indicators (True = failed)."""
    if len(base) != len(candidate):
        raise ValueError("paired outcomes need the same inputs on both sides")
    fixed = sum(1 for b, c in zip(base, candidate, strict=True) if b and not c)
    broken = sum(1 for b, c in zip(base, candidate, strict=True) if c and not b)
    n = len(base)
    return PairedResult(
        n=n,
        base_rate=sum(base) / n if n else 0.0,
        candidate_rate=sum(candidate) / n if n else 0.0,
        fixed=fixed,
        broken=broken,
        p_better=_binomial_tail(fixed, fixed + broken),
        p_worse=_binomial_tail(broken, fixed + broken),
    )


@dataclass(frozen=True, slots=True)
class Interval:
    mean: float
    low: float
    high: float


def paired_bootstrap(
    base: list[float],
    candidate: list[float],
    *,
    confidence: float = 0.95,
    resamples: int = 2_000,
    seed: int = 0,
) -> Interval:
    """Percentile interval of mean(candidate - base) over inputs resampled with replacement. The
    resamples are those of `random.Random(seed).randrange` (`resample_indices`), each mean summed in
    input order, so the numbers are the same as a plain loop's, bit for bit, in a fraction of the time."""
    if len(base) != len(candidate) or not base:
        raise ValueError("paired outcomes need the same, non-empty inputs on both sides")
    differences = np.asarray(candidate, dtype=float) - np.asarray(base, dtype=float)
    n = len(differences)
    drawn = differences[resample_indices(n, resamples, seed)]
    sums = np.zeros(resamples)
    for column in drawn.T:  # left to right, as `sum` adds them
        sums += column
    means = np.sort(sums / n)
    tail = (1 - confidence) / 2
    low = float(means[int(tail * (resamples - 1))])
    high = float(means[math.ceil((1 - tail) * (resamples - 1))])
    return Interval(sum(differences.tolist()) / n, low, high)


def resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """`resamples` rows of `n` indices below `n`: the draws `random.Random(seed).randrange(n)` makes,
    in order. Its Mersenne Twister state is handed to numpy's, whose raw 32-bit words are cut to
    `n.bit_length()` bits and those at `n` or above rejected, as `randrange` does (n < 2**32)."""
    if not 0 < n < 2**32:
        raise ValueError("between 1 and 2**32 - 1 inputs")
    state = random.Random(seed).getstate()[1]
    generator = np.random.MT19937()
    key = np.array(state[:-1], dtype=np.uint32)
    generator.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": state[-1]}}
    bits = n.bit_length()
    wanted = n * resamples
    kept: list[np.ndarray] = []
    while wanted > 0:
        words = generator.random_raw(wanted * 2**bits // n * 9 // 8 + 64) >> (32 - bits)
        accepted = words[words < n]
        kept.append(accepted[:wanted])
        wanted -= len(kept[-1])
    return np.concatenate(kept).astype(np.intp).reshape(resamples, n)


def per_candidate_alpha(alpha: float, candidates: int) -> float:
    """Bonferroni over a round: each of its `candidates` is tested at alpha / their number, so a round
    in which none helps accepts one with probability at most alpha (whatever their dependence)."""
    return alpha / max(candidates, 1)


def can_show_a_drop(failing: int, alpha: float) -> bool:
    """Whether `failing` paired inputs that fail in the target mode could show a significant drop at
    `alpha` at all: the smallest p the exact McNemar test gives them (every one fixed, none broken) is
    2^-failing. When it cannot, no candidate can pass, and running them would be spent for nothing."""
    return _binomial_tail(failing, failing) < alpha


@dataclass(frozen=True, slots=True)
class Verdict:
    accepted: bool
    reason: str


def over_cap(cost: float, cap: float) -> bool:
    """Whether a cost (calls per execution) is over its cap; a weighted mean's rounding is not a cost."""
    return cost > cap * (1 + 1e-9)


def judge(
    target: PairedResult,
    others: dict[str, PairedResult],
    *,
    alpha: float,
    calls: int,
    budget: int,
    cost: float = 0.0,
    max_cost: float | None = None,
) -> Verdict:
    """Accept only when the target mode drops significantly, nothing else rises significantly (each
    other outcome at `alpha` divided by their number, Bonferroni), the budget held and the candidate's
    inference cost (`cost`, calls per execution) is within `max_cost`."""
    if calls > budget:
        return Verdict(False, f"over budget: {calls} LLM calls > {budget}")
    if target.p_better >= alpha:
        return Verdict(False, f"the target mode did not drop significantly (p={target.p_better:.3g})")
    if max_cost is not None and over_cap(cost, max_cost):
        return Verdict(
            False, f"inference cost {cost:.2f} LLM calls per execution is over the cap of {max_cost:.2f}"
        )
    bound = alpha / max(len(others), 1)
    for name, result in others.items():
        if result.p_worse < bound:
            return Verdict(
                False, f"{name} rose significantly ({result.base_rate:.3f} -> {result.candidate_rate:.3f})"
            )
    return Verdict(
        True, f"target {target.base_rate:.3f} -> {target.candidate_rate:.3f} (p={target.p_better:.3g})"
    )


class Outcome(Protocol):
    """One shadow execution, as the comparison needs it."""

    @property
    def failed(self) -> bool: ...

    @property
    def modes(self) -> frozenset[str]: ...

    @property
    def llm_calls(self) -> int: ...


def weighted_rate(values: Sequence[bool], weights: Sequence[float]) -> float:
    return weighted_mean([float(v) for v in values], weights)


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    total = sum(weights)
    return sum(v * w for v, w in zip(values, weights, strict=True)) / total if total else 0.0


def compare(
    base: Sequence[Outcome],
    candidate: Sequence[Outcome],
    weights: Sequence[float],
    target: frozenset[str],
    *,
    alpha: float,
    calls: int,
    budget: int,
    unassigned: str = "",
    max_calls: float | None = None,
) -> tuple[Verification, Verdict]:
    """The evidence that `candidate` beats `base` on the target modes, paired input by input, and
    the verdict: the target must drop significantly (an input of the target that still fails, in
    whatever mode, has not dropped) and neither any other mode nor failing at all may rise
    significantly. `weights` turn sample rates into rates of the recorded traffic."""
    target_base = [not o.modes.isdisjoint(target) for o in base]
    # A counterexample is fixed only when the candidate no longer fails on it. One that still fails,
    # in another mode or in none (a wrong answer turned into a failing program the frozen modes do
    # not know), is the same input failing: it stays in the target.
    target_candidate = [
        not c.modes.isdisjoint(target) or (was and c.failed)
        for was, c in zip(target_base, candidate, strict=True)
    ]
    target_result = mcnemar(target_base, target_candidate)
    others = {"any failure": mcnemar([o.failed for o in base], [o.failed for o in candidate])}
    # "Nothing else rises": no mode the current spec fails in (besides the target) may rise, and
    # failing at all may not rise. A kind of failure only the candidate has (a new mode, or failures
    # in no mode) is judged by the second test: per mode it would be confounded, because a failure
    # the candidate moves from the target to a new look (counted above as still in the target) would
    # count again as new. For the same reason, per mode only failures on inputs that did not fail
    # before (or failed in that mode) count.
    for mode in sorted(set().union(*(b.modes for b in base)) - target - {unassigned}):
        others[f"mode {mode}"] = mcnemar(
            [mode in b.modes for b in base],
            [
                mode in c.modes and (mode in b.modes or not b.failed)
                for b, c in zip(base, candidate, strict=True)
            ],
        )
    calls_before = weighted_mean([o.llm_calls for o in base], weights)
    calls_after = weighted_mean([o.llm_calls for o in candidate], weights)
    verdict = judge(
        target_result, others, alpha=alpha, calls=calls, budget=budget, cost=calls_after, max_cost=max_calls
    )
    n = len(base)
    scale = [w * n / sum(weights) for w in weights] if n else []
    efm = (
        paired_bootstrap([o.failed * s for o, s in zip(base, scale, strict=True)],
                         [o.failed * s for o, s in zip(candidate, scale, strict=True)])
        if n else Interval(0.0, 0.0, 0.0)
    )  # fmt: skip
    worst = min(others.items(), key=lambda item: item[1].p_worse)
    report = Verification(
        pairs=n,
        counterexamples=sum(target_base),
        target_before=weighted_rate(target_base, weights),
        target_after=weighted_rate(target_candidate, weights),
        target_p=target_result.p_better,
        efm_before=weighted_rate([o.failed for o in base], weights),
        efm_after=weighted_rate([o.failed for o in candidate], weights),
        efm_change_low=efm.low,
        efm_change_high=efm.high,
        worst_other=worst[0],
        worst_other_p=worst[1].p_worse,
        calls_before=calls_before,
        calls_after=calls_after,
    )
    return report, verdict
