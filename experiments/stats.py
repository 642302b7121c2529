"""The statistics every figure over seeds rests on, from scipy and statsmodels.

- `Stat`: values over seeds, with the 95% confidence interval of their mean
  (Student's t).
- `PairedTest`: a difference between two optimizers paired by seed (the same
  seed gives both the same initial weights and data order): its mean and
  interval, a paired t-test's p-value, the p-value corrected for every
  comparison of its family (Holm), and the smallest difference that many
  seeds could have detected (80% power, two-sided, at the strictest level
  Holm applies to the family).

One value is no spread: it has no interval, no p-value and no verdict.
"""

import math
import statistics
from dataclasses import dataclass, replace

LEVEL = 0.05  # two-sided: 95% intervals, differences called at corrected p below 0.05
POWER = 0.8  # for the smallest detectable difference


def t_quantile(df: int, level: float = LEVEL) -> float:
    from scipy import stats

    return float(stats.t.ppf(1 - level / 2, df))


@dataclass(frozen=True)
class Stat:
    """Values over seeds: n, mean, sample standard deviation, lowest, highest."""

    n: int
    mean: float
    std: float
    low: float
    high: float

    def interval(self) -> tuple[float, float] | None:
        """95% confidence interval of the mean (None for one value)."""
        if self.n < 2:
            return None
        half = t_quantile(self.n - 1) * self.std / math.sqrt(self.n)
        return self.mean - half, self.mean + half

    def percent(self) -> str:
        """"99.12 ± 0.05% (n=3)"; one value without ±."""
        if self.n == 1:
            return f"{100 * self.mean:.2f}% (n=1)"
        return f"{100 * self.mean:.2f} ± {100 * self.std:.2f}% (n={self.n})"


def stat(values: list[float | None]) -> Stat | None:
    present = [v for v in values if v is not None and math.isfinite(v)]
    if not present:
        return None
    std = statistics.stdev(present) if len(present) > 1 else 0.0
    return Stat(len(present), statistics.fmean(present), std, min(present), max(present))


@dataclass(frozen=True)
class PairedTest:
    """A paired difference over seeds and how sure it is."""

    diff: Stat
    p: float | None  # the paired t-test's (None for one seed)
    p_corrected: float | None = None  # Holm's, over the family it was judged in
    detectable: float | None = None  # the smallest |difference| the family's test could detect with POWER

    @property
    def verdict(self) -> str:
        """higher / lower where the corrected test says so, else no difference
        detected; one seed gives no verdict."""
        p = self.p_corrected if self.p_corrected is not None else self.p
        if p is None:
            return "one seed: no verdict"
        if p < LEVEL:
            return "higher" if self.diff.mean > 0 else "lower"
        return "no difference detected"


def paired_test(diffs: list[float]) -> PairedTest | None:
    """The paired t-test of differences over seeds (a one-sample t-test of the differences against 0)."""
    diff = stat(diffs)
    if diff is None:
        return None
    if diff.n < 2:
        return PairedTest(diff, None)
    if diff.std == 0:  # every seed the same difference: no spread to test against
        return PairedTest(diff, 0.0 if diff.mean != 0 else 1.0)
    from scipy import stats

    return PairedTest(diff, float(stats.ttest_1samp(diffs, 0.0).pvalue))


def judged_together(tests: list[PairedTest | None]) -> list[PairedTest | None]:
    """The tests of one family (every peer compared at a batch size) with their
    p-values corrected by Holm's step-down method, and each one's smallest
    detectable difference at the family's strictest level (LEVEL / its size)."""
    present = [t for t in tests if t is not None and t.p is not None]
    if not present:
        return tests
    from statsmodels.stats.multitest import multipletests

    corrected = iter(multipletests([t.p for t in present], alpha=LEVEL, method="holm")[1])
    level = LEVEL / len(present)
    out = []
    for t in tests:
        if t is None or t.p is None:
            out.append(t)
        else:
            out.append(replace(t, p_corrected=float(next(corrected)),
                               detectable=smallest_detectable(t.diff.std, t.diff.n, level)))
    return out


def smallest_detectable(std: float, n: int, level: float, power: float = POWER) -> float | None:
    """The smallest mean difference a two-sided paired t-test of `n` seeds at
    `level` detects with `power`, given the differences' standard deviation."""
    if n < 2 or std == 0:
        return None
    from scipy import optimize, stats

    # The test's power at a true difference of `effect` standard deviations, from the noncentral t.
    # (statsmodels' TTestPower.solve_power stops short of the power for a few seeds at strict levels,
    # 4 seeds at 0.01 giving 77%, and its power turns NaN for large effects at 2-3 seeds.)
    df, critical = n - 1, t_quantile(n - 1, level)

    def shortfall(effect: float) -> float:
        shift = effect * math.sqrt(n)
        # The lower tail as the upper tail of the mirrored shift: scipy's cdf turns NaN far out in it.
        return float(stats.nct.sf(critical, df, shift) + stats.nct.sf(critical, df, -shift)) - power

    high = 1.0
    while shortfall(high) < 0:
        high *= 2
        if high > 1e6:
            return None
    return optimize.brentq(shortfall, 0.0, high, xtol=1e-9) * std
