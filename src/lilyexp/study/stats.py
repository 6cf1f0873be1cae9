"""Intervals and verdicts of a study: the mean of a metric over seeds with its 95% interval (Student's t, the
interval reported; a percentile bootstrap over seeds beside it), paired differences per seed, and the verdict
rule: "better" or "worse" only when the interval of the difference excludes 0."""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass

from scipy import stats as scipy_stats

BOOTSTRAP_RESAMPLES = 10_000


@dataclass(frozen=True)
class Estimate:
    """A mean over seeds with its t interval (``low``, ``high``) and a bootstrap interval."""

    mean: float
    sd: float
    n: int
    low: float
    high: float
    boot_low: float
    boot_high: float

    @property
    def halfwidth(self) -> float:
        return (self.high - self.low) / 2

    def as_dict(self) -> dict:
        return {"mean": self.mean, "sd": self.sd, "n": self.n, "ci_t": [self.low, self.high],
                "ci_bootstrap": [self.boot_low, self.boot_high]}


def t_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """mean ± t_{(1+c)/2, n-1} · sd / √n; infinite with fewer than two values."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return -math.inf, math.inf
    half = scipy_stats.t.ppf((1 + confidence) / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean - half, mean + half


def bootstrap_interval(values: list[float], confidence: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap of the mean over seeds (resampled with replacement, a fixed generator). With few
    seeds it is narrower than the t interval: reported beside it, never instead."""
    if len(values) < 2:
        return -math.inf, math.inf
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(resamples))
    tail = (1 - confidence) / 2
    return means[int(tail * resamples)], means[min(resamples - 1, int((1 - tail) * resamples))]


def estimate(values: list[float], confidence: float = 0.95) -> Estimate:
    low, high = t_interval(values, confidence)
    boot_low, boot_high = bootstrap_interval(values, confidence)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return Estimate(statistics.fmean(values), sd, len(values), low, high, boot_low, boot_high)


def paired_differences(values: dict[int, float], reference: dict[int, float]) -> dict[int, float]:
    """Per seed, a method's value minus the reference's, over the seeds both have."""
    return {seed: values[seed] - reference[seed] for seed in sorted(set(values) & set(reference))}


def verdict(difference: Estimate) -> str:
    """"better" / "worse" only when the interval excludes 0; otherwise no detectable difference, with the
    interval's half-width (a true difference must be somewhat larger than it to be found reliably)."""
    if difference.n < 2:
        return "not enough seeds"
    if difference.low > 0:
        return "better"
    if difference.high < 0:
        return "worse"
    return f"no detectable difference (±{difference.halfwidth:.2f})"
