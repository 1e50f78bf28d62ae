"""Bootstrap intervals over requests: how far a study's figure could move with another sample of requests.

A study's regret is a mean over its test requests of a paired difference (the golden layer's
performance minus the pick's, request by request). Resampling the requests with replacement
(the same resample for both layers: a paired bootstrap) and taking the 2.5th and 97.5th
percentiles of the resampled means (numpy's default linear interpolation) gives a 95% interval.
Every interval of a study comes from the same seeded resamples, so it is reproducible, and B
defaults to 2,000 resamples (at 30 requests the 97.5th percentile of 2,000 draws moves by about
one request's share between seeds; fewer would blur what an interval says).
"""

from __future__ import annotations

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


def resample_indices(n: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """(resamples, n) row indices, each row a draw of n requests with replacement."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def percentile_interval(draws: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The central ``level`` interval of bootstrap draws (NaN draws ignored; NaN if none is finite)."""
    finite = draws[np.isfinite(draws)]
    if finite.size == 0:
        return float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def mean_interval(values: np.ndarray, resamples: int = RESAMPLES, seed: int = 0,
                  level: float = LEVEL) -> tuple[float, float]:
    """Interval of the mean of per-request ``values`` (a paired difference is one value per request)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    return percentile_interval(values[resample_indices(values.size, resamples, seed)].mean(axis=1), level)
