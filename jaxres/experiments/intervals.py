"""Means over seeds with their 95 % intervals, differences paired by seed, and the words an
interval allows.

With n seeds the interval is Student's t: mean +- t(0.975, n - 1) * sd / sqrt(n) (sd with
n - 1 degrees of freedom); at n = 3, t = 4.30, so an interval is wide unless the seeds agree.
A difference is paired: computed seed by seed over the seeds both sides have, then
summarized like any other sample. The words come from the interval alone: one side of zero
or the other, or "cannot tell" when it holds zero or has fewer than two seeds. Each verdict is
at 95 % on its own; `holm` says which of a family of them hold with the chance of any false one
kept at 5 % (Holm 1979), since a table of 40 verdicts would show about two by chance alone.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

CONFIDENCE = 0.95
CANNOT_TELL = "cannot tell"


@dataclasses.dataclass(frozen=True)
class Interval:
    """A sample's mean and its two-sided `CONFIDENCE` t-interval [low, high] over n values
    (low = high = NaN when n < 2; everything NaN when n = 0), and p, the two-sided p-value of
    Student's one-sample t-test of mean 0 (NaN when n < 2)."""

    mean: float
    low: float
    high: float
    n: int
    p: float = math.nan

    def to_json(self) -> dict:
        return {k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                for k, v in dataclasses.asdict(self).items()}

    def format(self, scale: float = 1.0, spec: str = ".2f") -> str:
        """"mean [low, high]" (times `scale`), "mean (1 seed)", or "-"."""
        if self.n == 0 or not math.isfinite(self.mean):
            return "-"
        if self.n < 2:
            return f"{format(scale * self.mean, spec)} (1 seed)"
        return f"{format(scale * self.mean, spec)} [{format(scale * self.low, spec)}, {format(scale * self.high, spec)}]"


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The mean of the finite `values` and its t-interval (scipy's Student t quantile)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(finite)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = sum(finite) / n
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    from scipy import stats

    sd = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    if sd > 0:
        p = float(2 * stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))
    else:  # identical values: certain, unless they are all 0
        p = 1.0 if mean == 0 else 0.0
    return Interval(mean, mean - half, mean + half, n, p)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float]) -> Interval:
    """a - b seed by seed (over the seeds both hold a finite value for), as an Interval."""
    seeds = [s for s in a if s in b]
    diffs = [float(a[s]) - float(b[s]) for s in seeds]
    return t_interval([d for d in diffs if math.isfinite(d)])


def verdict(interval: Interval, above: str, below: str) -> str:
    """`above` when the whole interval lies above zero, `below` when below, else "cannot tell"
    (with the reason: the interval holds zero, or fewer than two seeds)."""
    if interval.n < 2 or not math.isfinite(interval.low):
        return f"{CANNOT_TELL} (fewer than 2 seeds)"
    if interval.low > 0:
        return above
    if interval.high < 0:
        return below
    return f"{CANNOT_TELL} (the interval holds 0)"


def holm(pvalues: Sequence[float], alpha: float = 1 - CONFIDENCE) -> list[bool | None]:
    """Holm's step-down procedure over the finite `pvalues` (the family; NaN ones are not tests and
    get None): sorted ascending, the k-th smallest (k = 0, 1, ...) holds while p <= alpha / (m - k),
    and every one after the first that fails does not. The chance that any held one is a false
    difference stays <= alpha, whatever the dependence between the tests."""
    tests = sorted((p, i) for i, p in enumerate(pvalues) if p is not None and math.isfinite(p))
    held: list[bool | None] = [None] * len(pvalues)
    failed = False
    for k, (p, i) in enumerate(tests):
        failed = failed or p > alpha / (len(tests) - k)
        held[i] = not failed
    return held


def geometric_mean(values: Sequence[float]) -> float:
    """exp(mean(log v)) over the finite positive `values` (NaN if none): ratios averaged over seeds."""
    logs = [math.log(v) for v in values if v is not None and math.isfinite(v) and v > 0]
    return math.exp(sum(logs) / len(logs)) if logs else math.nan
