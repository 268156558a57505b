"""Calibration of P(abnormal): a monotone map fitted on out-of-fold outputs, and its expected calibration error.

Why: the graded model's probability is a good ranking (AUC) but not a frequency: at 0.5 it called three of four
normal vertebrae degenerated (issue 26). A radiologist reads the number, so it must mean what it says. Every map
here is monotone, so the ranking, and with it the paper's AUC and Score, is unchanged (isotonic regression can tie
neighbouring scores, which moves the AUC by a hair; `ccfnet evaluate` measures it).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Final, Literal

import numpy as np

Method = Literal["identity", "temperature", "platt", "isotonic"]
METHODS: Final[tuple[Method, ...]] = ("temperature", "platt", "isotonic")  # simplest first
ECE_BINS: Final[int] = 10
_EPS: Final[float] = 1e-6


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(q / (1 - q))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass(frozen=True)
class Calibration:
    """p -> sigmoid(scale x logit(p) + bias) (temperature: bias 0, scale 1/T; platt: both), or for `isotonic` the
    piecewise-linear map through (knots_x, knots_y); `identity` leaves p alone."""

    method: Method = "identity"
    scale: float = 1.0
    bias: float = 0.0
    knots_x: tuple[float, ...] = ()
    knots_y: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.method not in ("identity", *METHODS):
            raise ValueError(f"unknown calibration method {self.method!r}")
        if self.method == "isotonic" and (len(self.knots_x) != len(self.knots_y) or not self.knots_x):
            raise ValueError("an isotonic calibration needs as many knots_y as knots_x, at least one")
        if not (math.isfinite(self.scale) and math.isfinite(self.bias)) or self.scale <= 0:
            raise ValueError(f"calibration scale must be positive and finite, not {self.scale}")

    def __call__(self, probabilities: np.ndarray) -> np.ndarray:
        p = np.asarray(probabilities, dtype=np.float64)
        if self.method == "identity":
            return p
        if self.method == "isotonic":
            return np.interp(p, self.knots_x, self.knots_y)
        return _sigmoid(self.scale * _logit(p) + self.bias)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["knots_x"], data["knots_y"] = list(self.knots_x), list(self.knots_y)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        return cls(
            method=data.get("method", "identity"),
            scale=float(data.get("scale", 1.0)),
            bias=float(data.get("bias", 0.0)),
            knots_x=tuple(float(v) for v in data.get("knots_x", ())),
            knots_y=tuple(float(v) for v in data.get("knots_y", ())),
        )


def _nll(logits: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.logaddexp(0.0, logits) - y * logits))


def fit_temperature(probabilities: np.ndarray, targets: np.ndarray) -> Calibration:
    """The temperature (scale of the logit, no bias) of least log loss: a golden-section search on log scale."""
    x, y = _logit(probabilities), np.asarray(targets, dtype=np.float64)
    lo, hi = math.log(0.05), math.log(20.0)
    golden = (math.sqrt(5) - 1) / 2
    for _ in range(80):
        a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
        if _nll(math.exp(a) * x, y) < _nll(math.exp(b) * x, y):
            hi = b
        else:
            lo = a
    return Calibration("temperature", scale=math.exp((lo + hi) / 2))


def fit_platt(probabilities: np.ndarray, targets: np.ndarray) -> Calibration:
    """Scale and bias of the logit by logistic regression (Newton's method; a tiny ridge keeps it finite)."""
    x, y = _logit(probabilities), np.asarray(targets, dtype=np.float64)
    design = np.stack([x, np.ones_like(x)], axis=1)
    w = np.array([1.0, 0.0])
    for _ in range(50):
        p = _sigmoid(design @ w)
        gradient = design.T @ (p - y) + 1e-6 * w
        hessian = (design * (p * (1 - p))[:, None]).T @ design + 1e-6 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        w = w - step
        if np.abs(step).max() < 1e-10:
            break
    if w[0] <= 0:  # an inverted ranking is no calibration: fall back to the temperature
        return fit_temperature(probabilities, targets)
    return Calibration("platt", scale=float(w[0]), bias=float(w[1]))


def fit_isotonic(probabilities: np.ndarray, targets: np.ndarray) -> Calibration:
    """Isotonic regression (pool adjacent violators), stored as knots at each block's mean score, interpolated."""
    order = np.argsort(probabilities, kind="mergesort")
    p = np.asarray(probabilities, dtype=np.float64)[order]
    y = np.asarray(targets, dtype=np.float64)[order]
    means: list[float] = []
    weights: list[float] = []
    centres: list[float] = []
    for score, target in zip(p, y, strict=True):
        means.append(float(target))
        weights.append(1.0)
        centres.append(float(score))
        while len(means) > 1 and means[-2] >= means[-1]:
            total = weights[-2] + weights[-1]
            means[-2] = (means[-2] * weights[-2] + means[-1] * weights[-1]) / total
            centres[-2] = (centres[-2] * weights[-2] + centres[-1] * weights[-1]) / total
            weights[-2] = total
            del means[-1], weights[-1], centres[-1]
    knots_x = [0.0, *centres, 1.0]
    knots_y = [means[0], *means, means[-1]]
    return Calibration("isotonic", knots_x=tuple(knots_x), knots_y=tuple(knots_y))


FITTERS: Final = {"temperature": fit_temperature, "platt": fit_platt, "isotonic": fit_isotonic}


def fit(method: Method, probabilities: np.ndarray, targets: np.ndarray) -> Calibration:
    """A calibration of `method` fitted on (probabilities, 0/1 targets)."""
    if method == "identity":
        return Calibration()
    p, y = np.asarray(probabilities, dtype=np.float64), np.asarray(targets, dtype=np.float64)
    if p.shape != y.shape or p.size == 0:
        raise ValueError("calibration needs as many targets as probabilities, at least one")
    if len(np.unique(y)) < 2:
        raise ValueError("calibration needs both normal and abnormal examples")
    return FITTERS[method](p, y)


def reliability(probabilities: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Per equal-width bin of the probability: how many points, their mean probability, the share abnormal."""
    p, y = np.asarray(probabilities, dtype=np.float64), np.asarray(targets, dtype=np.float64)
    which = np.minimum((p * bins).astype(int), bins - 1)
    rows = []
    for b in range(bins):
        members = which == b
        n = int(members.sum())
        rows.append({
            "low": b / bins,
            "high": (b + 1) / bins,
            "n": n,
            "mean_probability": float(p[members].mean()) if n else math.nan,
            "share_abnormal": float(y[members].mean()) if n else math.nan,
        })
    return rows


def expected_calibration_error(probabilities: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE over `bins` equal-width bins: the mean |share abnormal - mean probability|, weighted by bin size."""
    rows = reliability(probabilities, targets, bins)
    total = sum(r["n"] for r in rows)
    if not total:
        return math.nan
    return float(sum(r["n"] * abs(r["share_abnormal"] - r["mean_probability"]) for r in rows if r["n"]) / total)
