"""Fit the readout (`ccfnet_core.readout.Readout`) on out-of-fold outputs and write it into the model cards.

Every part is fitted on raw outputs of studies the fitted model did not train on: fold k's card gets the readout
fitted on the other folds' out-of-fold outputs, so `ccfnet evaluate --folds` scores calibration, thresholds, grade
rule and level check on studies none of them was fitted on (nested); the shipped card gets the one fitted on all
of them. The aims are stated in `ReadoutAims` and in the card.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from itertools import product
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
import torch.nn.functional as F

from ccfnet_core import calibration as cal
from ccfnet_core.checkpoint import read_card, write_card
from ccfnet_core.evaluate import fold_checkpoint, predict_out_of_fold
from ccfnet_core.intervals import bootstrap
from ccfnet_core.levels import level_shifted
from ccfnet_core.metrics import distances_mm
from ccfnet_core.readout import (
    ABNORMAL_GRADES,
    GRADE_CLASSES,
    KINDS,
    SCHMORL,
    Calibration,
    GradeRule,
    LevelCheck,
    OperatingPoint,
    Readout,
    grade_features,
)
from ccfnet_core.sample import Prediction, SliceSample
from ccfnet_core.structures import StructureType, structure_type

PRIOR_GRID: Final[tuple[float, ...]] = tuple(float(v) for v in np.round(np.arange(-2.0, 2.01, 0.25), 2))


@dataclass(frozen=True)
class ReadoutAims:
    """What the readout is fitted for (stated in the card).

    Operating points: the highest specificity with sensitivity at least `min_sensitivity` on the fitting data plus
    `margin` (so it stays at or above the aim on studies it was not fitted on). Calibration: the simplest of
    temperature, Platt and isotonic whose cross-fitted ECE is within `calibration_tolerance` of the best. Grade:
    priors that maximise the mean F1 of bulge, protrusion and extrusion; a grade is stated where its share is at
    least the smallest `min_share` whose stated grades are right at least `grade_accuracy` of the time, else
    "abnormal". Schmorl's node: flagged at the q[v5] of best F1, offered only where that F1 is at least
    `schmorl_min_f1`. Level check: flags studies whose doubt is above the `level_quantile` of the studies whose
    count was right.
    """

    min_sensitivity: tuple[tuple[str, float], ...] = (("vertebra", 0.80), ("disc", 0.80))
    margin: float = 0.02
    calibration_tolerance: float = 0.01
    grade_accuracy: float = 0.70
    schmorl_min_f1: float = 0.25
    level_quantile: float = 0.92

    def sensitivity_aim(self, kind: StructureType) -> float:
        return dict(self.min_sensitivity)[kind.value]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["min_sensitivity"] = dict(self.min_sensitivity)
        return data


@dataclass(frozen=True)
class Outputs:
    """The fitting data, one row per localised point with a target or a label (the C metric's points)."""

    study: np.ndarray
    kind: np.ndarray  # (P,) StructureType value
    target: np.ndarray  # 1 / 0 / NaN (a disc with only v5)
    truth: np.ndarray  # (P,) the label (v1..v5) where the point has exactly one, else ""
    probability: np.ndarray  # raw P(abnormal)
    grades: np.ndarray  # (P, 5) grade softmax (NaN rows for vertebrae or without a grade grader)
    doubt: np.ndarray  # (studies,) level doubt
    shifted: np.ndarray  # (studies,) level count off
    fold: np.ndarray  # (studies,) fold of each study


def tabulate(
    samples: Sequence[SliceSample], predictions: Sequence[Prediction], folds: Sequence[int], radius_mm: float = 6.0
) -> Outputs:
    rows: dict[str, list[Any]] = {k: [] for k in ("study", "kind", "target", "truth", "probability", "grades")}
    for i, (sample, prediction) in enumerate(zip(samples, predictions, strict=True)):
        localised = sample.present & (np.nan_to_num(distances_mm(sample, prediction), nan=np.inf) <= radius_mm)
        targets = sample.abnormal_targets()
        for k in np.flatnonzero(localised):
            labels = sample.labels[k]
            rows["study"].append(i)
            rows["kind"].append(structure_type(int(k)).value)
            rows["target"].append(targets[k])
            rows["truth"].append(next(iter(labels)) if len(labels) == 1 else "")
            rows["probability"].append(float(prediction.probabilities[k]))
            grades = prediction.grade_probabilities
            rows["grades"].append(grades[k] if grades is not None else np.full(len(GRADE_CLASSES), np.nan))
    return Outputs(
        **{k: np.array(v) for k, v in rows.items()},
        doubt=np.array([p.level_doubt for p in predictions]),
        shifted=np.array([level_shifted(s, p, radius_mm) for s, p in zip(samples, predictions, strict=True)]),
        fold=np.asarray(folds),
    )


def choose_calibration(
    p: np.ndarray, y: np.ndarray, fold: np.ndarray, tolerance: float
) -> tuple[cal.Method, dict[str, float]]:
    """The simplest method whose cross-fitted ECE (fitted on the other folds, pooled) is within `tolerance` of the
    best; returns it and every method's cross-fitted ECE."""
    eces: dict[str, float] = {}
    for method in cal.METHODS:
        out = np.empty_like(p)
        for f in np.unique(fold):
            mine = fold == f
            usable = ~mine if len(np.unique(y[~mine])) == 2 else np.ones_like(mine)  # one fold: in-sample
            out[mine] = cal.fit(method, p[usable], y[usable])(p[mine])
        eces[method] = cal.expected_calibration_error(out, y)
    best = min(eces.values())
    return next(m for m in cal.METHODS if eces[m] <= best + tolerance), eces


def threshold_for_sensitivity(p: np.ndarray, y: np.ndarray, sensitivity: float) -> float:
    """The highest threshold t with P(p >= t | abnormal) >= sensitivity (so the highest specificity there)."""
    positives = np.sort(p[y == 1])[::-1]
    if not positives.size:
        raise ValueError("an operating point needs abnormal examples")
    needed = min(max(math.ceil(sensitivity * positives.size), 1), positives.size)
    return float(positives[needed - 1])


def _sens_spec(p: np.ndarray, y: np.ndarray, study: np.ndarray, threshold: float, studies: int) -> tuple[Any, Any]:
    def rate(draw: np.ndarray, positive: bool) -> float:
        weights = np.bincount(draw, minlength=studies)[study]
        mine = (y == 1) if positive else (y == 0)
        hits = (p >= threshold) if positive else (p < threshold)
        total = float((weights * mine).sum())
        return float((weights * (mine & hits)).sum()) / total if total else math.nan

    return (bootstrap(lambda d: rate(d, True), studies), bootstrap(lambda d: rate(d, False), studies))


def _grade_f1(truth: np.ndarray, chosen: np.ndarray, called: np.ndarray) -> float:
    """Mean F1 over bulge, protrusion, extrusion of the discs' chosen grade (discs not called abnormal: no grade)."""
    f1s = []
    for g in ABNORMAL_GRADES:
        tp = int((called & (chosen == g) & (truth == g)).sum())
        fp = int((called & (chosen == g) & (truth != g)).sum())
        fn = int(((truth == g) & ~(called & (chosen == g))).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(f1s))


def fit_grade_posterior(features: np.ndarray, truth: np.ndarray, ridge: float = 1e-4) -> GradeRule:
    """The multinomial logistic regression of the abnormal grade (v2..v4 in `truth`) on `features` (P, 4): maximum
    likelihood with a small ridge towards the default rule (q renormalised), by L-BFGS."""
    target = torch.as_tensor(np.searchsorted(np.array(ABNORMAL_GRADES), truth), dtype=torch.long)
    x = torch.as_tensor(features, dtype=torch.float64)
    start = torch.tensor(GradeRule().weights, dtype=torch.float64)
    weights = start.clone().requires_grad_(True)
    biases = torch.zeros(len(ABNORMAL_GRADES), dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([weights, biases], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = F.cross_entropy(x @ weights.T + biases, target) + ridge * ((weights - start) ** 2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    fitted = biases.detach()
    return GradeRule(
        weights=tuple(tuple(float(v) for v in row) for row in weights.detach()),
        biases=(float(fitted[0]), float(fitted[1]), float(fitted[2])),
    )


def schmorl_threshold(scores: np.ndarray, is_node: np.ndarray) -> tuple[float, float | None]:
    """The q[v5] at which flagging a Schmorl's node has the best F1, and that F1 (None: no node to find)."""
    best_f1, best_threshold = 0.0, None
    for threshold in np.unique(np.round(scores, 3)):
        flagged = scores >= threshold
        tp, fp, fn = int((flagged & is_node).sum()), int((flagged & ~is_node).sum()), int((~flagged & is_node).sum())
        f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        if f1 > best_f1:
            best_f1, best_threshold = f1, float(threshold)
    return best_f1, best_threshold


def fit_grade_rule(
    grades: np.ndarray,
    probability: np.ndarray,
    truth: np.ndarray,
    called: np.ndarray,
    fold: np.ndarray,
    aims: ReadoutAims,
) -> tuple[GradeRule, dict[str, Any]]:
    """The grade posterior, the label priors, the posterior needed to state a grade and the Schmorl's node threshold,
    fitted on localised discs (`grades` (P, 5), calibrated `probability`, `truth` v1..v5, `called` abnormal, `fold`
    of each disc's study). The node is offered only when its flag, thresholded on the other folds, reaches
    `schmorl_min_f1` on each fold (cross-fitted): cross-validation must show it learnable."""
    abnormal = np.isin(truth, ABNORMAL_GRADES)
    features = grade_features(grades, probability)
    rule = fit_grade_posterior(features[abnormal], truth[abnormal])
    posterior = rule.posterior(grades, probability)
    best: tuple[float, tuple[float, float, float]] = (-1.0, (0.0, 0.0, 0.0))
    for priors in product([0.0], PRIOR_GRID, PRIOR_GRID):
        chosen = np.array(ABNORMAL_GRADES)[replace(rule, label_priors=priors).label_index(posterior)]
        score = _grade_f1(truth, chosen, called)
        if score > best[0] + 1e-9:
            best = (score, priors)
    rule = replace(rule, label_priors=best[1])
    top = posterior.max(axis=1)
    stated_grade = np.array(ABNORMAL_GRADES)[posterior.argmax(axis=1)]
    graded = called & abnormal
    min_share = 1.0
    for candidate in np.arange(0.34, 1.0, 0.02):
        stated = graded & (top >= candidate)
        if stated.sum() >= 10 and (stated_grade[stated] == truth[stated]).mean() >= aims.grade_accuracy:
            min_share = float(round(candidate, 2))
            break
    schmorl = grades[:, GRADE_CLASSES.index(SCHMORL)]
    is_node = truth == SCHMORL
    best_f1, best_threshold = schmorl_threshold(schmorl, is_node)
    crossed = np.zeros_like(is_node)  # each fold flagged at the threshold of best F1 on the other folds
    for f in np.unique(fold):
        mine = fold == f
        _, threshold = schmorl_threshold(schmorl[~mine], is_node[~mine])
        crossed[mine] = False if threshold is None else schmorl[mine] >= threshold
    tp = int((crossed & is_node).sum())
    cross_f1 = 2 * tp / (2 * tp + int((crossed & ~is_node).sum()) + int((~crossed & is_node).sum())) if tp else 0.0
    offered = best_threshold if cross_f1 >= aims.schmorl_min_f1 and len(np.unique(fold)) > 1 else None
    facts = {"grade_mean_f1_fitted": best[0], "schmorl_f1_fitted": best_f1, "schmorl_f1_cross_fitted": cross_f1,
             "schmorl_threshold_best": best_threshold}
    return replace(rule, min_share=min_share, schmorl_threshold=offered), facts


def fit(outputs: Outputs, aims: ReadoutAims, fitted_on: str) -> Readout:
    """A readout fitted on `outputs` for `aims`."""
    studies = len(outputs.doubt)
    calibrations: dict[StructureType, Calibration] = {}
    points: dict[StructureType, OperatingPoint] = {}
    metrics: dict[str, Any] = {"aims": aims.to_dict()}
    calibrated = outputs.probability.copy()
    point_fold = outputs.fold[outputs.study]
    for kind in KINDS:
        mine = (outputs.kind == kind.value) & np.isfinite(outputs.target)
        p, y = outputs.probability[mine], outputs.target[mine]
        if len(np.unique(y)) < 2:
            raise ValueError(
                f"the out-of-fold outputs have {int(mine.sum())} localised {kind.value} points with a target, "
                f"{int(y.sum())} abnormal: a readout needs normal and abnormal ones"
            )
        method, eces = choose_calibration(p, y, point_fold[mine], aims.calibration_tolerance)
        calibrations[kind] = cal.fit(method, p, y)
        calibrated[outputs.kind == kind.value] = calibrations[kind](outputs.probability[outputs.kind == kind.value])
        q = calibrated[mine]
        threshold = threshold_for_sensitivity(q, y, aims.sensitivity_aim(kind) + aims.margin)
        sensitivity, specificity = _sens_spec(q, y, outputs.study[mine], threshold, studies)
        aim = (f"the highest specificity with sensitivity >= {aims.sensitivity_aim(kind):.2f} "
               f"(fitted at {aims.sensitivity_aim(kind) + aims.margin:.2f} on the fitting studies)")
        points[kind] = OperatingPoint(threshold, aim, sensitivity, specificity)
        metrics[f"calibration_cross_fitted_ece_{kind.value}"] = eces
    discs = outputs.kind == StructureType.DISC.value
    rule = None
    if np.isfinite(outputs.grades[discs]).all() and discs.any():
        called = calibrated[discs] >= points[StructureType.DISC].threshold
        rule, facts = fit_grade_rule(
            outputs.grades[discs], calibrated[discs], outputs.truth[discs], called, point_fold[discs], aims
        )
        metrics.update(facts)
    right = ~outputs.shifted & np.isfinite(outputs.doubt)
    check = None
    if right.any() and outputs.shifted.any():
        threshold = float(np.quantile(outputs.doubt[right], aims.level_quantile))
        flagged = outputs.doubt > threshold

        def rate(draw: np.ndarray, of_shifted: bool) -> float:
            mine = outputs.shifted[draw] if of_shifted else ~outputs.shifted[draw]
            return float(flagged[draw][mine].mean()) if mine.any() else math.nan

        check = LevelCheck(
            threshold=float(np.nextafter(threshold, np.inf)),
            feature="1 - mean heatmap peak over the 11 channels",
            flagged_shifted=bootstrap(lambda d: rate(d, True), studies),
            flagged_other=bootstrap(lambda d: rate(d, False), studies),
            definition=f"level-shifted: at least 2 points of the study on a neighbouring structure of their type "
                       f"({int(outputs.shifted.sum())} of {studies} studies here)",
        )
    return Readout(calibrations, points, rule, check, fitted_on, metrics)


def fit_readout_into_cards(
    checkpoint: Path,
    samples: Sequence[SliceSample],
    folds: dict[str, int],
    aims: ReadoutAims,
    device: str = "auto",
    log: Callable[[str], None] = print,
) -> Readout:
    """Fit the readout of every fold model on the other folds' out-of-fold outputs and the shipped model's on all
    of them; write each into its card (weights untouched). Returns the shipped model's."""
    raw = predict_out_of_fold(samples, checkpoint, folds, device, readout=False)
    fold_of = [folds[s.study_id] for s in samples]
    outputs = tabulate(samples, raw, fold_of)
    log(f"out-of-fold raw outputs of {len(samples)} studies; {int(outputs.shifted.sum())} level-shifted")
    for k in sorted(set(fold_of)):
        keep = [i for i, f in enumerate(fold_of) if f != k]
        part = tabulate([samples[i] for i in keep], [raw[i] for i in keep], [fold_of[i] for i in keep])
        readout = fit(part, aims, f"out-of-fold outputs of the {len(keep)} studies outside fold {k}")
        path = fold_checkpoint(checkpoint, k)
        write_card(path, replace(read_card(path), readout=readout.to_dict()))
        log(f"fold {k}: readout written into {path}")
    readout = fit(outputs, aims, f"out-of-fold outputs of all {len(samples)} studies ({len(set(fold_of))} folds)")
    write_card(checkpoint, replace(read_card(checkpoint), readout=readout.to_dict()))
    log(f"readout written into {checkpoint}")
    return readout

