"""The paper's L/C/Score metric and the challenge's per-class F1 (CCFNET.md, "Metrics").

Samples and predictions are paired by position (one Prediction per SliceSample, in the same order).
Distances are in mm: the x difference times the column spacing, the y difference times the row spacing;
"within 6 mm" means distance <= radius_mm. A prediction with a NaN point is no prediction. Nothing is filtered
here: drop flagged samples before calling (a note says when some are included). Every result is made of dicts,
lists, str, int and float only, so json.dumps takes it (undefined values are NaN; json.dumps writes NaN).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Final

import numpy as np

from ccfnet_core.sample import Prediction, SliceSample
from ccfnet_core.structures import (
    CHALLENGE_CLASSES,
    DISC_INDICES,
    NUM_STRUCTURES,
    STRUCTURES,
    VERTEBRA_INDICES,
    StructureType,
    predicted_label,
    structure_type,
)

_TYPES: Final[tuple[tuple[str, StructureType, tuple[int, ...]], ...]] = (
    ("Disc", StructureType.DISC, DISC_INDICES),
    ("Vertebra", StructureType.VERTEBRA, VERTEBRA_INDICES),
)


def roc_auc(targets: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC (0..1) by the Mann-Whitney U statistic with average ranks for ties; NaN with one class only.

    Equal to sklearn.metrics.roc_auc_score, without importing sklearn into the library.
    """
    y = np.asarray(targets, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"targets and scores differ in length: {y.size} vs {s.size}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("targets must be 0 or 1")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _average_ranks(s)
    u = float(ranks[y == 1].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def distances_mm(sample: SliceSample, prediction: Prediction) -> np.ndarray:
    """(11,) mm from each ground-truth point to the same-named prediction; NaN where either is missing."""
    delta = np.asarray(prediction.points, dtype=np.float64) - sample.points
    row_mm, col_mm = sample.spacing_mm
    return np.hypot(delta[:, 0] * col_mm, delta[:, 1] * row_mm)


def paper_metrics(
    samples: Sequence[SliceSample], predictions: Sequence[Prediction], radius_mm: float = 6.0
) -> dict[str, Any]:
    """L-Disc, L-Vertebra, C-Disc, C-Vertebra and Score in percent, as the paper's table prints them.

    L: share of ground-truth points whose same-named prediction is within radius_mm. C: ROC-AUC of
    P(abnormal) against sample.abnormal_targets() over the localised points that have a target. Score:
    mean(L) x mean(C) / 100 (so 94.73 x 85.02 prints 80.54). Undefined values are NaN with a line in "notes".
    Also: per-type counts and per-structure localisation rate, mean/median error (over every point that has
    both a ground truth and a prediction) and AUC.
    """
    _check_inputs(samples, predictions, radius_mm)
    notes = _flag_notes(samples)
    n = len(samples)
    distances = np.array([distances_mm(s, p) for s, p in zip(samples, predictions, strict=True)]).reshape(
        n, NUM_STRUCTURES
    )
    present = np.array([s.present for s in samples], dtype=bool).reshape(n, NUM_STRUCTURES)
    localised = present & (np.nan_to_num(distances, nan=np.inf) <= radius_mm)
    targets = np.array([s.abnormal_targets() for s in samples]).reshape(n, NUM_STRUCTURES)
    scores = np.array([p.probabilities for p in predictions], dtype=np.float64).reshape(n, NUM_STRUCTURES)
    missing_predictions = int((present & ~np.isfinite(distances)).sum())
    if missing_predictions:
        notes.append(f"{missing_predictions} ground-truth points have no (finite) prediction; not localised")

    result: dict[str, Any] = {}
    per_type: dict[str, Any] = {}
    for name, _, indices in _TYPES:
        cols = list(indices)
        n_points = int(present[:, cols].sum())
        n_localised = int(localised[:, cols].sum())
        rate = 100.0 * n_localised / n_points if n_points else math.nan
        if not n_points:
            notes.append(f"L-{name} undefined: no ground-truth {name.lower()} points")
        auc, n_classified, n_abnormal = _auc(targets[:, cols], scores[:, cols], localised[:, cols])
        if math.isnan(auc):
            notes.append(
                f"C-{name} undefined: {n_classified} localised {name.lower()} points with a target, "
                f"{n_abnormal} abnormal; AUC needs both classes"
            )
        result[f"L-{name}"] = rate
        result[f"C-{name}"] = 100.0 * auc
        per_type[name.lower()] = {
            "n_points": n_points,
            "n_localised": n_localised,
            "n_classified": n_classified,
            "n_abnormal": n_abnormal,
            "localisation_rate": rate,
            "auc": 100.0 * auc,
        }
    mean_l = (result["L-Disc"] + result["L-Vertebra"]) / 2.0
    mean_c = (result["C-Disc"] + result["C-Vertebra"]) / 2.0
    result["Score"] = mean_l * mean_c / 100.0
    if math.isnan(result["Score"]):
        notes.append("Score undefined because an L or C term is undefined")

    per_structure = {}
    for k, name in enumerate(STRUCTURES):
        errors = distances[present[:, k] & np.isfinite(distances[:, k]), k]
        n_points = int(present[:, k].sum())
        auc, _, _ = _auc(targets[:, [k]], scores[:, [k]], localised[:, [k]])
        per_structure[name] = {
            "n_points": n_points,
            "n_localised": int(localised[:, k].sum()),
            "localisation_rate": 100.0 * float(localised[:, k].sum()) / n_points if n_points else math.nan,
            "mean_error_mm": float(errors.mean()) if errors.size else math.nan,
            "median_error_mm": float(np.median(errors)) if errors.size else math.nan,
            "auc": 100.0 * auc,
        }
    result.update(
        {
            "radius_mm": float(radius_mm),
            "n_samples": n,
            "per_type": per_type,
            "per_structure": per_structure,
            "notes": notes,
        }
    )
    return result


MISS_KINDS: Final[tuple[str, ...]] = ("duplicate", "level_shift", "other_type", "off_target", "no_prediction")


def miss_breakdown(
    samples: Sequence[SliceSample], predictions: Sequence[Prediction], radius_mm: float = 6.0
) -> dict[str, int]:
    """Why annotated points were not localised, counted per kind (MISS_KINDS).

    For a missed point, look at the annotated structure nearest to its prediction (in mm):
    - duplicate: a structure of the same type, within radius_mm, that its own channel also found (two
      channels on one level: a decoder that keeps channels apart could fix these);
    - level_shift: a structure of the same type, within radius_mm, that its own channel missed too (the
      levels are counted off: the whole chain moved);
    - other_type: a structure of the other type (a disc on a vertebra or the reverse), within radius_mm;
    - off_target: no annotated structure within radius_mm (its own point further than radius_mm included);
    - no_prediction: no finite prediction.
    """
    _check_inputs(samples, predictions, radius_mm)
    counts = dict.fromkeys(MISS_KINDS, 0)
    for sample, prediction in zip(samples, predictions, strict=True):
        for kind in study_misses(sample, prediction, radius_mm).values():
            counts[kind] += 1
    return counts


def study_misses(sample: SliceSample, prediction: Prediction, radius_mm: float = 6.0) -> dict[int, str]:
    """The annotated points of one study that were not localised, each with its kind (`miss_breakdown`)."""
    own = distances_mm(sample, prediction)
    found = sample.present & (np.nan_to_num(own, nan=np.inf) <= radius_mm)
    row_mm, col_mm = sample.spacing_mm
    kinds: dict[int, str] = {}
    for k in np.flatnonzero(sample.present & ~found):
        point = np.asarray(prediction.points[k], dtype=np.float64)
        if not np.all(np.isfinite(point)):
            kinds[int(k)] = "no_prediction"
            continue
        delta = sample.points - point
        to_each = np.hypot(delta[:, 0] * col_mm, delta[:, 1] * row_mm)
        to_each[~sample.present] = np.inf
        nearest = int(np.argmin(to_each))
        if nearest == k or to_each[nearest] > radius_mm:
            kinds[int(k)] = "off_target"
        elif structure_type(nearest) is not structure_type(int(k)):
            kinds[int(k)] = "other_type"
        else:
            kinds[int(k)] = "duplicate" if found[nearest] else "level_shift"
    return kinds


def challenge_metrics(
    samples: Sequence[SliceSample],
    predictions: Sequence[Prediction],
    radius_mm: float = 6.0,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """The challenge's TP/FP/FN per class (7 classes) and their macro-averaged F1, as fractions 0..1.

    Matching, study by study (one sample = one study, its 11 predictions against its own ground truth):
    - a prediction's class is (its structure's type, predicted_label(probability, threshold)), so a vertebra
      prediction can only match a vertebra point and a disc prediction a disc point;
    - a (prediction, ground truth) pair is a candidate when the distance is <= radius_mm and the predicted
      label is one of the point's labels (a disc labelled {v2, v5} is matched by v2 or by v5; the name of the
      structure need not agree);
    - candidates are taken greedily, same-named pairs first, then by increasing distance, each prediction
      and each ground-truth point used at most once; every taken pair is a TP of the predicted class;
    - every other prediction is an FP of its predicted class (wrong class within radius_mm, a point already
      taken, or far from every point);
    - every ground-truth point without a TP is an FN of each of its labels (once per label: a {v2, v5} disc
      missed counts for v2 and for v5; matched, it counts only the matched label).
    Ground-truth points without a label are left out. Per class: precision TP/(TP+FP), recall TP/(TP+FN)
    (NaN on 0/0), F1 = 2TP/(2TP+FP+FN); macro_f1 averages F1 over the classes with TP+FP+FN > 0.
    """
    _check_inputs(samples, predictions, radius_mm)
    counts = {_class_key(t, label): {"tp": 0, "fp": 0, "fn": 0} for t, label in CHALLENGE_CLASSES}
    for sample, prediction in zip(samples, predictions, strict=True):
        _match_study(sample, prediction, radius_mm, threshold, counts)

    notes = _flag_notes(samples)
    per_class: dict[str, Any] = {}
    f1s = []
    for key, c in counts.items():
        tp, fp, fn = c["tp"], c["fp"], c["fn"]
        defined = tp + fp + fn > 0
        f1 = 2.0 * tp / (2 * tp + fp + fn) if defined else math.nan
        per_class[key] = {
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "support": tp + fn,
            "precision": tp / (tp + fp) if tp + fp else math.nan,
            "recall": tp / (tp + fn) if tp + fn else math.nan,
            "f1": f1,
        }
        if defined:
            f1s.append(f1)
        else:
            notes.append(f"class {key}: no ground truth and no prediction; left out of macro_f1")
    totals = {k: sum(c[k] for c in counts.values()) for k in ("tp", "fp", "fn")}
    return {
        "macro_f1": float(np.mean(f1s)) if f1s else math.nan,
        "per_class": per_class,
        "classes": list(counts),
        "totals": totals,
        "radius_mm": float(radius_mm),
        "threshold": float(threshold),
        "n_samples": len(samples),
        "notes": notes,
    }


def confusion_matrices(
    samples: Sequence[SliceSample],
    predictions: Sequence[Prediction],
    radius_mm: float = 6.0,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Per type, true vs predicted label over the localised points (same-named prediction within radius).

    Vertebra: rows true v1, v2; columns predicted v1, v2. Disc: rows true v1..v5; columns the predicted challenge
    class v1..v5 (`prediction_label`: a model without a grade readout predicts v1 or v2 only), and in
    `disc_stated` the grade a person reads (v1..v4, or "abnormal" where the grade was not supported). A point with
    two labels ({v2, v5}) counts in both rows; a point without a label is left out.
    """
    _check_inputs(samples, predictions, radius_mm)
    disc_labels = ["v1", "v2", "v3", "v4", "v5"]
    stated_columns = ["v1", "v2", "v3", "v4", "abnormal"]
    rows = {StructureType.VERTEBRA: ["v1", "v2"], StructureType.DISC: disc_labels}
    columns = {StructureType.VERTEBRA: ["v1", "v2"], StructureType.DISC: disc_labels}
    matrices = {t: np.zeros((len(rows[t]), len(columns[t])), dtype=np.int64) for t in rows}
    stated = np.zeros((len(disc_labels), len(stated_columns)), dtype=np.int64)
    for sample, prediction in zip(samples, predictions, strict=True):
        distances = distances_mm(sample, prediction)
        for k in range(NUM_STRUCTURES):
            if not sample.present[k] or not distances[k] <= radius_mm:
                continue
            kind = structure_type(k)
            predicted = prediction_label(prediction, k, threshold)
            word = prediction.grades[k] if prediction.grades else ("abnormal" if predicted != "v1" else "v1")
            for label in sample.labels[k]:
                matrices[kind][rows[kind].index(label), columns[kind].index(predicted)] += 1
                if kind is StructureType.DISC and word in stated_columns:
                    stated[disc_labels.index(label), stated_columns.index(word)] += 1
    return {
        "vertebra": {
            "true": rows[StructureType.VERTEBRA],
            "predicted": columns[StructureType.VERTEBRA],
            "matrix": matrices[StructureType.VERTEBRA].tolist(),
        },
        "disc": {
            "true": rows[StructureType.DISC],
            "predicted": columns[StructureType.DISC],
            "matrix": matrices[StructureType.DISC].tolist(),
        },
        "disc_stated": {"true": disc_labels, "stated": stated_columns, "matrix": stated.tolist()},
        "radius_mm": float(radius_mm),
        "threshold": float(threshold),
    }


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    boundaries = np.flatnonzero(np.diff(sorted_values)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [values.size]))
    group_ranks = (starts + ends + 1) / 2.0
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(group_ranks, ends - starts)
    return ranks


def _auc(targets: np.ndarray, scores: np.ndarray, localised: np.ndarray) -> tuple[float, int, int]:
    """AUC over localised points with a target, and how many points / abnormal points it used."""
    use = localised & np.isfinite(targets)
    y, s = targets[use], scores[use]
    if not np.isfinite(s).all():
        raise ValueError("probabilities must be finite for every localised point with a target")
    return roc_auc(y, s), int(use.sum()), int(y.sum())


def _match_study(
    sample: SliceSample,
    prediction: Prediction,
    radius_mm: float,
    threshold: float,
    counts: dict[str, dict[str, int]],
) -> None:
    """Add one study's TP/FP/FN to `counts` (the matching is described in challenge_metrics)."""
    row_mm, col_mm = sample.spacing_mm
    predicted: dict[int, str] = {}
    for j in range(NUM_STRUCTURES):
        if np.isfinite(prediction.points[j]).all():
            predicted[j] = prediction_label(prediction, j, threshold)
    truths = [k for k in range(NUM_STRUCTURES) if sample.present[k] and sample.labels[k]]
    candidates = []
    for j, label in predicted.items():
        for k in truths:
            if structure_type(j) is not structure_type(k) or label not in sample.labels[k]:
                continue
            dx, dy = prediction.points[j] - sample.points[k]
            distance = math.hypot(dx * col_mm, dy * row_mm)
            if distance <= radius_mm:
                candidates.append((j != k, distance, j, k))
    used_predictions: set[int] = set()
    used_truths: set[int] = set()
    for _, _, j, k in sorted(candidates):
        if j in used_predictions or k in used_truths:
            continue
        used_predictions.add(j)
        used_truths.add(k)
        counts[_class_key(structure_type(j), predicted[j])]["tp"] += 1
    for j, label in predicted.items():
        if j not in used_predictions:
            counts[_class_key(structure_type(j), label)]["fp"] += 1
    for k in truths:
        if k not in used_truths:
            for label in sample.labels[k]:
                counts[_class_key(structure_type(k), label)]["fn"] += 1


def prediction_label(prediction: Prediction, index: int, threshold: float = 0.5) -> str:
    """The challenge class a prediction gives structure `index`: its own label where the model card's readout
    decided one (`Prediction.labels`: the card's thresholds and the disc grade), else the binary rule at
    `threshold`."""
    if prediction.labels:
        return prediction.labels[index]
    return predicted_label(index, float(prediction.probabilities[index]), threshold)


def _class_key(kind: StructureType, label: str) -> str:
    return f"{kind.value}_{label}"


def _check_inputs(
    samples: Sequence[SliceSample], predictions: Sequence[Prediction], radius_mm: float
) -> None:
    if len(samples) != len(predictions):
        raise ValueError(f"{len(samples)} samples but {len(predictions)} predictions; pair them one to one")
    if not radius_mm > 0:
        raise ValueError(f"radius_mm must be positive, got {radius_mm}")


def _flag_notes(samples: Sequence[SliceSample]) -> list[str]:
    flagged = [s.study_id for s in samples if s.flag]
    if not flagged:
        return []
    return [f"{len(flagged)} flagged samples included ({', '.join(flagged)}); drop them for reported figures"]
