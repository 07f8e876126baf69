"""Paired statistics for shadow verification: did the candidate spec fail less, on the same inputs?

Current and candidate run on the same replayed inputs and seeds, so each input gives a pair of
outcomes. For a 0/1 outcome (the input failed in the target mode, or failed at all) the exact
McNemar test looks only at the discordant pairs; for a mass (failures per execution) a paired
bootstrap gives a confidence interval of the mean difference. Pure functions, seeded.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


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
    """Percentile interval of mean(candidate - base) over inputs resampled with replacement."""
    if len(base) != len(candidate) or not base:
        raise ValueError("paired outcomes need the same, non-empty inputs on both sides")
    differences = [c - b for b, c in zip(base, candidate, strict=True)]
    rng = random.Random(seed)
    n = len(differences)
    means = sorted(sum(differences[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    tail = (1 - confidence) / 2
    low = means[int(tail * (resamples - 1))]
    high = means[math.ceil((1 - tail) * (resamples - 1))]
    return Interval(sum(differences) / n, low, high)


@dataclass(frozen=True, slots=True)
class Verdict:
    accepted: bool
    reason: str


def judge(
    target: PairedResult, others: dict[str, PairedResult], *, alpha: float, calls: int, budget: int
) -> Verdict:
    """Accept only when the target mode drops significantly, nothing else rises significantly (each
    other outcome at `alpha` divided by their number, Bonferroni), and the budget held."""
    if calls > budget:
        return Verdict(False, f"over budget: {calls} LLM calls > {budget}")
    if target.p_better >= alpha:
        return Verdict(False, f"the target mode did not drop significantly (p={target.p_better:.3g})")
    bound = alpha / max(len(others), 1)
    for name, result in others.items():
        if result.p_worse < bound:
            return Verdict(
                False, f"{name} rose significantly ({result.base_rate:.3f} -> {result.candidate_rate:.3f})"
            )
    return Verdict(
        True, f"target {target.base_rate:.3f} -> {target.candidate_rate:.3f} (p={target.p_better:.3g})"
    )
