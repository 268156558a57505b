"""95% intervals for the headline figures by the bootstrap over studies.

Why: with 155 studies the fold-to-fold spread of the Score is about 2 points, so a figure without its interval
invites reading noise as a gain. Points of one study are not independent (one scanner, one patient, one level
count), so the unit resampled is the study: each round draws as many studies as there are, with replacement, and
recomputes the figure on the points of the drawn studies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Final

import numpy as np

ROUNDS: Final[int] = 1000
SEED: Final[int] = 2026


def draws(studies: int, rounds: int = ROUNDS, seed: int = SEED) -> np.ndarray:
    """(rounds, studies) indices of the studies each bootstrap round draws (with replacement)."""
    if studies < 1:
        raise ValueError("the bootstrap needs at least one study")
    return np.random.default_rng(seed).integers(0, studies, size=(rounds, studies))


def interval(values: Sequence[float] | np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap values (NaN rounds, e.g. an AUC of a draw with one class, left out)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return math.nan, math.nan
    tail = (1 - level) / 2 * 100
    return float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))


def bootstrap(
    statistic: Callable[[np.ndarray], float], studies: int, rounds: int = ROUNDS, seed: int = SEED
) -> tuple[float, float, float]:
    """(estimate on all studies, low, high): `statistic` takes the indices of the studies to use (repeats allowed)."""
    estimate = statistic(np.arange(studies))
    low, high = interval([statistic(d) for d in draws(studies, rounds, seed)])
    return float(estimate), low, high


def bootstrap_many(
    statistics: Callable[[np.ndarray], dict[str, float]], studies: int, rounds: int = ROUNDS, seed: int = SEED
) -> dict[str, tuple[float, float, float]]:
    """`bootstrap` for several figures computed together: name -> (estimate, low, high)."""
    estimate = statistics(np.arange(studies))
    values: dict[str, list[float]] = {name: [] for name in estimate}
    for d in draws(studies, rounds, seed):
        for name, value in statistics(d).items():
            values[name].append(value)
    return {name: (float(estimate[name]), *interval(values[name])) for name in estimate}
