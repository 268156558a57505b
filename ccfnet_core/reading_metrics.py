"""What `ccfnet evaluate` reports of the readout (issue 26), each headline figure with its 95% bootstrap interval
over studies: the paper's Score and its terms, the challenge's macro-F1 and per-class F1, the expected calibration
error per structure kind, the operating point (sensitivity and specificity per kind at the labels given), the disc
grade among abnormal discs per class, and the level check's rates.

The points are tabulated once (`PointTable`) and every figure is a function of the studies drawn, so a thousand
bootstrap rounds cost seconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from ccfnet_core.calibration import expected_calibration_error
from ccfnet_core.intervals import ROUNDS, bootstrap_many
from ccfnet_core.levels import level_shifted
from ccfnet_core.metrics import (
    _class_key,
    _match_study,
    distances_mm,
    prediction_label,
    roc_auc,
)
from ccfnet_core.sample import Prediction, SliceSample
from ccfnet_core.structures import CHALLENGE_CLASSES, NUM_STRUCTURES, StructureType, structure_type

ABNORMAL_DISC_GRADES: Final[tuple[str, ...]] = ("v2", "v3", "v4")
KIND_NAMES: Final[dict[StructureType, str]] = {StructureType.DISC: "Disc", StructureType.VERTEBRA: "Vertebra"}


@dataclass(frozen=True)
class PointTable:
    """One row per (study, structure): what the figures need, and per study its challenge counts and level facts."""

    study: np.ndarray  # (P,) study index
    disc: np.ndarray  # (P,) bool
    present: np.ndarray
    localised: np.ndarray
    target: np.ndarray  # 1 abnormal, 0 normal, NaN none
    probability: np.ndarray  # as given (calibrated where the card has a readout)
    ranked: np.ndarray  # before calibration: what the AUC reads (`evaluate.ranked`)
    called: np.ndarray  # bool: called abnormal (vertebra v2; disc: a grade or "abnormal" stated)
    label: np.ndarray  # (P,) str: the challenge class predicted
    truth: np.ndarray  # (P,) str: the point's label where it has exactly one, else ""
    stated: np.ndarray  # (P,) str: the grade a person reads
    counts: np.ndarray  # (studies, 7 classes, tp/fp/fn)
    shifted: np.ndarray  # (studies,) bool: the level count is off (levels.level_shifted)
    flagged: np.ndarray  # (studies,) bool: the level check warned


def tabulate(
    samples: Sequence[SliceSample], predictions: Sequence[Prediction], radius_mm: float = 6.0
) -> PointTable:
    rows: dict[str, list[Any]] = {k: [] for k in (
        "study", "disc", "present", "localised", "target", "probability", "ranked", "called", "label", "truth",
        "stated")}
    counts = np.zeros((len(samples), len(CHALLENGE_CLASSES), 3), dtype=np.int64)
    keys = [_class_key(t, label) for t, label in CHALLENGE_CLASSES]
    for i, (sample, prediction) in enumerate(zip(samples, predictions, strict=True)):
        distances = distances_mm(sample, prediction)
        targets = sample.abnormal_targets()
        for k in range(NUM_STRUCTURES):
            label = prediction_label(prediction, k)
            stated = prediction.grades[k] if prediction.grades else ("abnormal" if label != "v1" else "v1")
            rows["study"].append(i)
            rows["disc"].append(structure_type(k) is StructureType.DISC)
            rows["present"].append(bool(sample.present[k]))
            rows["localised"].append(bool(sample.present[k] and distances[k] <= radius_mm))
            rows["target"].append(targets[k])
            rows["probability"].append(float(prediction.probabilities[k]))
            raw = prediction.raw_probabilities if prediction.raw_probabilities is not None else prediction.probabilities
            rows["ranked"].append(float(raw[k]))
            rows["called"].append(stated != "v1")
            rows["label"].append(label)
            rows["truth"].append(next(iter(sample.labels[k])) if len(sample.labels[k]) == 1 else "")
            rows["stated"].append(stated)
        study_counts = {key: {"tp": 0, "fp": 0, "fn": 0} for key in keys}
        _match_study(sample, prediction, radius_mm, 0.5, study_counts)
        counts[i] = [[study_counts[key][c] for c in ("tp", "fp", "fn")] for key in keys]
    return PointTable(
        **{k: np.array(v) for k, v in rows.items()},
        counts=counts,
        shifted=np.array([level_shifted(s, p, radius_mm) for s, p in zip(samples, predictions, strict=True)]),
        flagged=np.array([p.level_warning is not None for p in predictions]),
    )


def _rate(hits: np.ndarray, of: np.ndarray) -> float:
    n = int(of.sum())
    return float((hits & of).sum()) / n if n else math.nan


def figures(table: PointTable, draw: np.ndarray) -> dict[str, float]:
    """Every headline figure on the studies `draw` (indices, repeats allowed), percent except ECE (0..1)."""
    weights = np.bincount(draw, minlength=len(table.counts))
    take = np.repeat(np.arange(len(table.study)), weights[table.study])

    def col(name: str) -> np.ndarray:
        value: np.ndarray = getattr(table, name)[take]
        return value

    disc, present, localised, target = col("disc"), col("present"), col("localised"), col("target")
    probability, called, truth, stated = col("probability"), col("called"), col("truth"), col("stated")
    ranked, chosen = col("ranked"), col("label")
    out: dict[str, float] = {}
    for kind_is_disc, name in ((True, "Disc"), (False, "Vertebra")):
        kind = disc == kind_is_disc
        out[f"L-{name}"] = 100 * _rate(localised, kind & present)
        graded = kind & localised & np.isfinite(target)
        y, p = target[graded], probability[graded]
        out[f"C-{name}"] = 100 * roc_auc(y, ranked[graded]) if len(np.unique(y)) == 2 else math.nan
        out[f"ECE-{name}"] = expected_calibration_error(p, y) if y.size else math.nan
        out[f"sensitivity-{name}"] = 100 * _rate(called, graded & (target == 1))
        out[f"specificity-{name}"] = 100 * _rate(~called, graded & (target == 0))
    out["Score"] = (out["L-Disc"] + out["L-Vertebra"]) / 2 * (out["C-Disc"] + out["C-Vertebra"]) / 200
    totals = (table.counts * weights[:, None, None]).sum(axis=0)
    f1s = []
    for (kind, label), (tp, fp, fn) in zip(CHALLENGE_CLASSES, totals, strict=True):
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan
        out[f"F1-{_class_key(kind, label)}"] = 100 * f1
        if tp + fp + fn:
            f1s.append(f1)
    out["challenge_macro_f1"] = 100 * float(np.mean(f1s))
    # The grade among abnormal discs: localised discs of each abnormal grade that were called abnormal.
    among = disc & localised & called
    for grade in ABNORMAL_DISC_GRADES:
        mine = among & (truth == grade)
        specified = mine & (stated != "abnormal")
        out[f"grade_stated_share-{grade}"] = 100 * _rate(specified, mine)
        out[f"grade_accuracy-{grade}"] = 100 * _rate(stated == grade, specified)
        out[f"grade_label_accuracy-{grade}"] = 100 * _rate(chosen == grade, mine)
    specified = among & np.isin(truth, ABNORMAL_DISC_GRADES) & (stated != "abnormal")
    out["grade_accuracy-abnormal_discs"] = 100 * _rate(stated == truth, specified)
    out["grade_stated_share-abnormal_discs"] = 100 * _rate(specified, among & np.isin(truth, ABNORMAL_DISC_GRADES))
    shifted, flagged = table.shifted[draw], table.flagged[draw]
    out["level_check_flags_shifted"] = 100 * _rate(flagged, shifted)
    out["level_check_flags_other"] = 100 * _rate(flagged, ~shifted)
    return out


def reading_summary(
    samples: Sequence[SliceSample], predictions: Sequence[Prediction], rounds: int = ROUNDS
) -> dict[str, Any]:
    """The readout's figures with 95% bootstrap intervals over studies ({name: [estimate, low, high]})."""
    table = tabulate(samples, predictions)
    intervals = bootstrap_many(lambda draw: figures(table, draw), len(samples), rounds)
    return {
        "intervals": {name: list(values) for name, values in intervals.items()},
        "interval_method": f"95% percentile bootstrap over studies, {rounds} rounds",
        "level_shifted_studies": int(table.shifted.sum()),
        "level_flagged_studies": int(table.flagged.sum()),
        "ece_bins": 10,
        "grade_note": (
            "grade_accuracy-<grade>: of the localised discs of that grade called abnormal, the share whose stated "
            "grade is right among those given a grade; grade_stated_share: the share given a grade (the rest read "
            "'abnormal'); grade_label_accuracy: the share whose challenge label (the best guess, given even where "
            "the stated grade is 'abnormal') is that grade"
        ),
    }
