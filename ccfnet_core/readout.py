"""How a prediction is read for a person: calibrated probabilities, a threshold per structure kind, the disc grade
word, the Schmorl's node flag and the level check, all fitted out of fold and carried in the model card.

Why (issue 26): the model gives a point and a P(abnormal) per structure; what a radiologist reads is a word and a
percentage. The word must come from an operating point someone chose for a stated aim, not from 0.5; the percentage
must be calibrated; the disc grade must be said only where the data support it ("abnormal" otherwise); and a study
whose levels may be counted off by one must say so. `ccfnet_core.fit_readout` fits a `Readout` on out-of-fold
outputs and writes it into the card (`ModelCard.readout`); `read` applies it to one raw prediction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Final

import numpy as np

from ccfnet_core.calibration import Calibration
from ccfnet_core.sample import Prediction
from ccfnet_core.structures import (
    DISC_LABELS,
    NUM_STRUCTURES,
    UNSPECIFIED_GRADE,
    StructureType,
    predicted_label,
    structure_type,
)

ABNORMAL_UNSPECIFIED: Final[str] = UNSPECIFIED_GRADE  # the stated grade where none is supported with enough confidence
GRADE_CLASSES: Final[tuple[str, ...]] = tuple(DISC_LABELS)  # v1..v5, the grade grader's output order
ABNORMAL_GRADES: Final[tuple[str, ...]] = ("v2", "v3", "v4")  # what an abnormal disc's grade is chosen among
SCHMORL: Final[str] = "v5"
KINDS: Final[tuple[StructureType, ...]] = (StructureType.VERTEBRA, StructureType.DISC)


@dataclass(frozen=True)
class OperatingPoint:
    """The threshold on the calibrated P(abnormal) of one structure kind, chosen out of fold for `aim`, with the
    sensitivity and specificity it had there (point estimate and 95% bootstrap interval over studies)."""

    threshold: float = 0.5
    aim: str = "none: the 0.5 default"
    sensitivity: tuple[float, float, float] | None = None  # estimate, low, high
    specificity: tuple[float, float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "aim": self.aim,
            "sensitivity": list(self.sensitivity) if self.sensitivity else None,
            "specificity": list(self.specificity) if self.specificity else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OperatingPoint:
        sens, spec = data.get("sensitivity"), data.get("specificity")
        return cls(
            threshold=float(data.get("threshold", 0.5)),
            aim=str(data.get("aim", "")),
            sensitivity=(float(sens[0]), float(sens[1]), float(sens[2])) if sens else None,
            specificity=(float(spec[0]), float(spec[1]), float(spec[2])) if spec else None,
        )


GRADE_FEATURES: Final[tuple[str, ...]] = ("log q_v2", "log q_v3", "log q_v4", "logit P(abnormal)")
_IDENTITY: Final[tuple[tuple[float, ...], ...]] = ((1.0, 0.0, 0.0, 0.0), (0.0, 1.0, 0.0, 0.0), (0.0, 0.0, 1.0, 0.0))


@dataclass(frozen=True)
class GradeRule:
    """How an abnormal disc's grade is read from the grade grader's softmax q over v1..v5 and its P(abnormal).

    The posterior over bulge, protrusion and extrusion is a small multinomial logistic regression on
    `GRADE_FEATURES` (`weights`, `biases`; the default is q renormalised), fitted out of fold on abnormal discs:
    the binary path's confidence is also a measure of severity (out of fold it tells protrusion from bulge about as
    well as the grade grader does). The stated grade is the most probable one where its posterior is at least
    `min_share`, else the disc is "abnormal" (unspecified). The challenge label is the grade of the largest
    posterior x exp(`label_priors`) (priors fitted for the F1 of the three grades). A Schmorl's node is flagged where
    q[v5] >= `schmorl_threshold` (None: the flag is not offered, cross-validation did not show it learnable).
    """

    weights: tuple[tuple[float, ...], ...] = _IDENTITY
    biases: tuple[float, float, float] = (0.0, 0.0, 0.0)
    label_priors: tuple[float, float, float] = (0.0, 0.0, 0.0)
    min_share: float = 0.0
    schmorl_threshold: float | None = None

    def __post_init__(self) -> None:
        if len(self.weights) != len(ABNORMAL_GRADES) or any(len(w) != len(GRADE_FEATURES) for w in self.weights):
            raise ValueError(f"grade weights must be {len(ABNORMAL_GRADES)} x {len(GRADE_FEATURES)}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "features": list(GRADE_FEATURES),
            "weights": {g: [float(v) for v in w] for g, w in zip(ABNORMAL_GRADES, self.weights, strict=True)},
            "biases": {g: float(v) for g, v in zip(ABNORMAL_GRADES, self.biases, strict=True)},
            "label_priors": {g: float(v) for g, v in zip(ABNORMAL_GRADES, self.label_priors, strict=True)},
            "min_share": float(self.min_share),
            "schmorl_threshold": None if self.schmorl_threshold is None else float(self.schmorl_threshold),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GradeRule:
        weights = data.get("weights", {})
        threshold = data.get("schmorl_threshold")
        return cls(
            weights=tuple(
                tuple(float(v) for v in weights.get(g, default))
                for g, default in zip(ABNORMAL_GRADES, _IDENTITY, strict=True)
            ),
            biases=_three(data.get("biases", {})),
            label_priors=_three(data.get("label_priors", {})),
            min_share=float(data.get("min_share", 0.0)),
            schmorl_threshold=None if threshold is None else float(threshold),
        )

    def posterior(self, grades: np.ndarray, probability: np.ndarray | float) -> np.ndarray:
        """(..., 3) P(bulge), P(protrusion), P(extrusion) of an abnormal disc (see the class)."""
        scores = grade_features(grades, probability) @ np.asarray(self.weights).T + np.asarray(self.biases)
        scores = scores - scores.max(axis=-1, keepdims=True)
        shares: np.ndarray = np.exp(scores) / np.exp(scores).sum(axis=-1, keepdims=True)
        return shares

    def label_index(self, posterior: np.ndarray) -> np.ndarray:
        """The challenge label's grade (index into ABNORMAL_GRADES) of each posterior row."""
        choice: np.ndarray = np.argmax(np.log(np.clip(posterior, 1e-12, None)) + np.asarray(self.label_priors), -1)
        return choice


def grade_features(grades: np.ndarray, probability: np.ndarray | float) -> np.ndarray:
    """(..., 4) the `GRADE_FEATURES` of discs: log q of the three abnormal grades and the logit of P(abnormal)."""
    q = np.clip(np.asarray(grades, dtype=np.float64)[..., 1:4], 1e-12, None)
    p = np.clip(np.asarray(probability, dtype=np.float64), 1e-6, 1 - 1e-6)
    severity = np.log(p / (1 - p))[..., None] * np.ones((*q.shape[:-1], 1))
    return np.concatenate([np.log(q), severity], axis=-1)


def _three(values: dict[str, Any]) -> tuple[float, float, float]:
    return (float(values.get("v2", 0.0)), float(values.get("v3", 0.0)), float(values.get("v4", 0.0)))


@dataclass(frozen=True)
class LevelCheck:
    """Flags a study whose level count is doubtful: `score` (a `level_doubt` feature of the prediction) at or above
    `threshold`. `flagged_shifted` / `flagged_other` are the out-of-fold rates it had (estimate, low, high)."""

    threshold: float = math.inf
    feature: str = ""
    flagged_shifted: tuple[float, float, float] | None = None
    flagged_other: tuple[float, float, float] | None = None
    definition: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold if math.isfinite(self.threshold) else None,
            "feature": self.feature,
            "flagged_shifted": list(self.flagged_shifted) if self.flagged_shifted else None,
            "flagged_other": list(self.flagged_other) if self.flagged_other else None,
            "definition": self.definition,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LevelCheck:
        shifted, other = data.get("flagged_shifted"), data.get("flagged_other")
        threshold = data.get("threshold")
        return cls(
            threshold=math.inf if threshold is None else float(threshold),
            feature=str(data.get("feature", "")),
            flagged_shifted=(float(shifted[0]), float(shifted[1]), float(shifted[2])) if shifted else None,
            flagged_other=(float(other[0]), float(other[1]), float(other[2])) if other else None,
            definition=str(data.get("definition", "")),
        )


LEVEL_WARNING: Final[str] = (
    "The level count may be off by one: check the labelling of L1-L5 against the sacrum and the thoracic "
    "vertebrae before reading the findings level by level."
)


@dataclass(frozen=True)
class Readout:
    """Everything fitted out of fold that turns raw outputs into what a person reads (the card's `readout`)."""

    calibration: dict[StructureType, Calibration] = field(default_factory=dict)
    operating_points: dict[StructureType, OperatingPoint] = field(default_factory=dict)
    grade_rule: GradeRule | None = None
    level_check: LevelCheck | None = None
    fitted_on: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.calibration or self.operating_points or self.grade_rule or self.level_check)

    def threshold(self, kind: StructureType) -> float:
        point = self.operating_points.get(kind)
        return point.threshold if point else 0.5

    def to_dict(self) -> dict[str, Any]:
        return {
            "calibration": {k.value: c.to_dict() for k, c in self.calibration.items()},
            "operating_points": {k.value: o.to_dict() for k, o in self.operating_points.items()},
            "grade_rule": self.grade_rule.to_dict() if self.grade_rule else None,
            "level_check": self.level_check.to_dict() if self.level_check else None,
            "fitted_on": self.fitted_on,
            "metrics": self.metrics,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Readout:
        if not data:
            return cls()
        rule, check = data.get("grade_rule"), data.get("level_check")
        return cls(
            calibration={StructureType(k): Calibration.from_dict(v) for k, v in data.get("calibration", {}).items()},
            operating_points={
                StructureType(k): OperatingPoint.from_dict(v) for k, v in data.get("operating_points", {}).items()
            },
            grade_rule=GradeRule.from_dict(rule) if rule else None,
            level_check=LevelCheck.from_dict(check) if check else None,
            fitted_on=str(data.get("fitted_on", "")),
            metrics=dict(data.get("metrics", {})),
        )


def calibrated(readout: Readout, probabilities: np.ndarray) -> np.ndarray:
    """(11,) P(abnormal) through each kind's calibration (unchanged for a kind without one)."""
    out = np.asarray(probabilities, dtype=np.float64).copy()
    for kind in KINDS:
        calibration = readout.calibration.get(kind)
        if calibration is None:
            continue
        columns = [k for k in range(NUM_STRUCTURES) if structure_type(k) is kind]
        out[columns] = calibration(out[columns])
    return out


def disc_reading(
    rule: GradeRule | None, probability: float, abnormal: bool, grades: np.ndarray | None
) -> tuple[str, str, float, bool]:
    """One disc: (challenge label v1..v5, stated grade v1..v4 or "abnormal", the most probable abnormal grade's
    posterior (NaN when the disc is not called abnormal), Schmorl's node flag).

    The challenge label is always one class (the metric needs one): v5 where the node is flagged, else the rule's
    label grade where the disc is called abnormal, else v1. The stated grade is the herniation grade alone (the node
    is its own flag): "abnormal" instead of a grade whose posterior is under the rule's `min_share`.
    """
    if rule is None or grades is None or not np.isfinite(grades).all():
        return ("v2", ABNORMAL_UNSPECIFIED, math.nan, False) if abnormal else ("v1", "v1", math.nan, False)
    schmorl = rule.schmorl_threshold is not None and float(grades[GRADE_CLASSES.index(SCHMORL)]) >= (
        rule.schmorl_threshold
    )
    if not abnormal:
        return (SCHMORL if schmorl else "v1"), "v1", math.nan, schmorl
    shares = rule.posterior(grades, probability)
    best = int(np.argmax(shares))
    stated = ABNORMAL_GRADES[best] if shares[best] >= rule.min_share else ABNORMAL_UNSPECIFIED
    label = ABNORMAL_GRADES[int(rule.label_index(shares))]
    return (SCHMORL if schmorl else label), stated, float(shares[best]), schmorl


def read(readout: Readout, prediction: Prediction) -> Prediction:
    """`prediction` (raw, as the network and graders give it) read through `readout`: calibrated probabilities,
    the challenge label, the stated grade and the Schmorl's node flag of each structure, and the level warning."""
    probabilities = calibrated(readout, prediction.probabilities)
    labels: list[str] = []
    stated: list[str] = []
    shares = np.full(NUM_STRUCTURES, np.nan)
    schmorl = np.zeros(NUM_STRUCTURES, dtype=bool)
    for k in range(NUM_STRUCTURES):
        kind = structure_type(k)
        label = predicted_label(k, float(probabilities[k]), readout.threshold(kind))
        if kind is StructureType.DISC:
            grades = None if prediction.grade_probabilities is None else prediction.grade_probabilities[k]
            label, word, shares[k], schmorl[k] = disc_reading(
                readout.grade_rule, float(probabilities[k]), label != "v1", grades
            )
            stated.append(word)
        else:
            stated.append(label)
        labels.append(label)
    warning = None
    check = readout.level_check
    if check is not None and math.isfinite(prediction.level_doubt) and prediction.level_doubt >= check.threshold:
        warning = LEVEL_WARNING
    return replace(
        prediction,
        probabilities=probabilities,
        raw_probabilities=prediction.probabilities,
        labels=tuple(labels),
        grades=tuple(stated),
        grade_shares=shares,
        schmorl=schmorl,
        level_warning=warning,
    )

