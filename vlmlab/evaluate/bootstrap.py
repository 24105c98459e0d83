"""Percentile bootstrap over evaluation units, vectorised over resamples.

A resample is a row of *counts*: how often each unit (a TextVQA question, a caption image,
an MMBench question group) was drawn, n draws with replacement from n units. Every metric
is a function of such a row (`Statistic.values`), so a mean is a matrix product and a
corpus metric (BLEU, CIDEr-D) is recomputed on the resampled corpus as a whole, never as
an average of per-unit scores it is not.

Paired comparisons apply the same counts to every model: differences and contrasts
(factor effects) are taken resample by resample, so what the items have in common cancels.
A difference is *called* only when its interval excludes 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np


class Statistic(Protocol):
    """A metric over n units, as a function of resample counts."""

    keys: Sequence  # one key per unit, in the order `values` expects them

    def values(self, counts: np.ndarray) -> np.ndarray:
        """counts (B, n) -> the metric on each of the B resamples, (B,)."""


def resample_counts(n: int, samples: int, seed: int) -> np.ndarray:
    """(samples, n) int counts: row b holds how often each unit is drawn in resample b (row sums = n)."""
    if n < 1:
        raise ValueError("bootstrap needs at least one unit")
    idx = np.random.default_rng(seed).integers(0, n, size=(samples, n))
    flat = (idx + n * np.arange(samples)[:, None]).ravel()
    return np.bincount(flat, minlength=samples * n).reshape(samples, n)


def point(stat: Statistic) -> float:
    """The metric on the full set (every unit once)."""
    return float(stat.values(np.ones((1, len(stat.keys))))[0])


def percentile_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """The central `level` percentile interval of bootstrap values (numpy's linear interpolation)."""
    if not 0 < level < 1:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    tail = 50 * (1 - level)
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


@dataclass
class Interval:
    value: float    # the metric (or difference) on the full set
    ci_low: float
    ci_high: float

    @property
    def called(self) -> bool:
        """True when the interval excludes 0 (a difference that is called)."""
        return self.ci_low > 0 or self.ci_high < 0


def interval(stat: Statistic, counts: np.ndarray, level: float) -> Interval:
    return Interval(point(stat), *percentile_interval(stat.values(counts), level))


def contrast(stats: dict[str, Statistic], weights: dict[str, float], counts: np.ndarray, level: float) -> Interval:
    """Paired bootstrap of sum_m weights[m] * metric_m, the same resamples for every model.

    A difference A - B is {A: 1, B: -1}; a main effect averages such differences. The
    models' units must be the same keys in the same order (see `items.align`).
    """
    return contrasts(stats, {"": weights}, counts, level)[""]


def contrasts(stats: dict[str, Statistic], weights: dict[str, dict[str, float]], counts: np.ndarray,
              level: float) -> dict[str, Interval]:
    """Several contrasts of the same models on the same resamples; each model's metric is resampled once."""
    used = list(dict.fromkeys(m for w in weights.values() for m, x in w.items() if x != 0))
    keys = list(stats[used[0]].keys)
    for m in used[1:]:
        if list(stats[m].keys) != keys:
            raise ValueError(f"paired bootstrap: {m} and {used[0]} are not scored on the same items")
    full = {m: point(stats[m]) for m in used}
    boot = {m: stats[m].values(counts) for m in used}
    out = {}
    for name, w in weights.items():
        terms = [m for m, x in w.items() if x != 0]
        value = sum(w[m] * full[m] for m in terms)
        out[name] = Interval(float(value), *percentile_interval(sum(w[m] * boot[m] for m in terms), level))
    return out


class Mean:
    """The mean of one score per unit (TextVQA soft accuracy, MMBench correct/incorrect)."""

    def __init__(self, keys: Sequence, scores: Sequence[float]):
        if len(keys) != len(scores):
            raise ValueError("Mean: one score per key")
        self.keys = list(keys)
        self.scores = np.asarray(scores, dtype=np.float64)

    def values(self, counts: np.ndarray) -> np.ndarray:
        # elementwise product and numpy's fixed-order sum, not a BLAS dot: the same bits on every CPU
        return (counts * self.scores).sum(axis=1) / counts.sum(axis=1)
