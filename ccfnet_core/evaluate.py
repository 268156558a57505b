"""Evaluation: the paper's L/C/Score, the challenge's macro-F1, confusion matrices, and figures.

With a folds file and per-fold checkpoints beside the main one, every study is predicted by the model that
did not see it (out-of-fold), which is how the cross-validation numbers in docs/model.md are made.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ccfnet_core.checkpoint import read_card, write_card
from ccfnet_core.inference import Predictor
from ccfnet_core.metrics import challenge_metrics, confusion_matrices, miss_breakdown, paper_metrics
from ccfnet_core.reading_metrics import reading_summary
from ccfnet_core.sample import Prediction, SliceSample
from ccfnet_core.structures import DISC_INDICES, VERTEBRA_INDICES

PAPER_KEYS = ("L-Disc", "L-Vertebra", "C-Disc", "C-Vertebra", "Score")


def errors_mm(samples: Sequence[SliceSample], predictions: Sequence[Prediction]) -> np.ndarray:
    """(studies, 11) distance in mm between each true point and its same-named prediction; NaN if missing."""
    rows = []
    for sample, pred in zip(samples, predictions, strict=True):
        row_mm, col_mm = sample.spacing_mm
        delta = (pred.points - sample.points) * np.array([col_mm, row_mm])
        rows.append(np.sqrt((delta**2).sum(axis=1)))
    return np.array(rows)


def ranked(predictions: Sequence[Prediction]) -> list[Prediction]:
    """The predictions with P(abnormal) before calibration, which the paper's C (an AUC) is read from.

    Why: each fold model's readout calibrates with its own monotone map, so pooling four folds' calibrated
    probabilities on one ROC would move the pooled AUC (by about half a Score point on the shipped model) although
    no model's ranking changed; for one model the two AUCs are the same (isotonic ties aside).
    """
    return [p if p.raw_probabilities is None else replace(p, probabilities=p.raw_probabilities) for p in predictions]


def summarise(
    samples: Sequence[SliceSample], predictions: Sequence[Prediction], intervals: bool = True
) -> dict[str, Any]:
    """All metrics: paper keys at top level (percent), challenge macro-F1, and the detail beside them; with
    `intervals`, the readout's figures (per-class F1, ECE, operating point, disc grade, level check) with 95%
    bootstrap intervals over studies (`reading_metrics`)."""
    paper = paper_metrics(samples, ranked(predictions))
    challenge = challenge_metrics(samples, predictions)
    errors = errors_mm(samples, predictions)
    finite = errors[np.isfinite(errors)]
    result: dict[str, Any] = {key: paper[key] for key in PAPER_KEYS}
    result["challenge_macro_f1"] = challenge["macro_f1"]
    result["studies"] = len(samples)
    result["mean_error_mm"] = float(finite.mean()) if finite.size else float("nan")
    result["median_error_mm"] = float(np.median(finite)) if finite.size else float("nan")
    result["paper_detail"] = {k: v for k, v in paper.items() if k not in PAPER_KEYS}
    result["challenge"] = challenge
    result["confusion"] = confusion_matrices(samples, predictions)
    result["misses"] = miss_breakdown(samples, predictions)
    result["per_class_f1"] = {key: value["f1"] for key, value in challenge["per_class"].items()}
    if any(p.raw_probabilities is not None for p in predictions):
        calibrated = paper_metrics(samples, predictions)
        result["calibrated_probabilities_paper"] = {key: calibrated[key] for key in PAPER_KEYS}
    if intervals:
        reading = reading_summary(samples, predictions)
        figures = reading["intervals"]
        result["reading"] = reading
        result["ece"] = {kind: figures[f"ECE-{name}"][0] for kind, name in (("vertebra", "Vertebra"), ("disc", "Disc"))}
        result["operating_point"] = {
            kind: {"sensitivity": figures[f"sensitivity-{name}"], "specificity": figures[f"specificity-{name}"]}
            for kind, name in (("vertebra", "Vertebra"), ("disc", "Disc"))
        }
        result["disc_grade"] = {key: value for key, value in figures.items() if key.startswith("grade_")}
        result["level_check"] = {
            "flags_shifted_percent": figures["level_check_flags_shifted"],
            "flags_other_percent": figures["level_check_flags_other"],
            "shifted_studies": reading["level_shifted_studies"],
            "flagged_studies": reading["level_flagged_studies"],
        }
    return result


def score_for_training(samples: Sequence[SliceSample], predictions: list[Prediction]) -> dict[str, Any]:
    """The compact set logged per epoch while training."""
    paper = paper_metrics(samples, predictions)
    out: dict[str, Any] = {key: paper[key] for key in PAPER_KEYS}
    out["macro_f1"] = challenge_metrics(samples, predictions)["macro_f1"]
    return out


def fold_checkpoint(checkpoint: Path, fold: int) -> Path:
    """Where the model of fold k lives beside a shipped checkpoint: <stem>.folds/fold<k>.pt."""
    return checkpoint.with_suffix("").with_name(checkpoint.stem + ".folds") / f"fold{fold}.pt"


def predict_out_of_fold(
    samples: Sequence[SliceSample],
    checkpoint: Path,
    folds: dict[str, int],
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    readout: bool = True,
) -> list[Prediction]:
    """Predict each study with the fold model that did not train on it (read through that fold model's readout,
    or, without `readout`, the raw outputs a readout is fitted on)."""
    missing = sorted({s.study_id for s in samples} - folds.keys())
    if missing:
        raise ValueError(f"{len(missing)} studies are not in the folds file (e.g. {missing[0]})")
    predictions: dict[int, Prediction] = {}
    fold_ids = sorted({folds[s.study_id] for s in samples})
    for done, fold in enumerate(fold_ids):
        path = fold_checkpoint(checkpoint, fold)
        if not path.is_file():
            raise FileNotFoundError(f"out-of-fold evaluation needs {path} (the fold-{fold} model)")
        predictor = Predictor.from_checkpoint(path, device, readout)
        members = [i for i, s in enumerate(samples) if folds[s.study_id] == fold]
        for i, pred in zip(members, predictor.predict([samples[i].image for i in members]), strict=True):
            predictions[i] = pred
        if progress:
            progress(done + 1, len(fold_ids))
    return [predictions[i] for i in range(len(samples))]


def per_fold_metrics(
    samples: Sequence[SliceSample], predictions: Sequence[Prediction], folds: dict[str, int]
) -> dict[int, dict[str, Any]]:
    """The paper's keys and the macro-F1 of each fold's studies alone (the spread the cards and docs report)."""
    out = {}
    for fold in sorted({folds[s.study_id] for s in samples}):
        idx = [i for i, s in enumerate(samples) if folds[s.study_id] == fold]
        part = summarise([samples[i] for i in idx], [predictions[i] for i in idx], intervals=False)
        out[fold] = {key: part[key] for key in (*PAPER_KEYS, "challenge_macro_f1")}
    return out


def record_in_card(checkpoint: Path, summary: dict[str, Any], per_fold: dict[int, dict[str, Any]], k: int) -> None:
    """Write out-of-fold metrics into the checkpoint's card (weights, and so their digest, untouched)."""
    card = read_card(checkpoint)
    metrics: dict[str, Any] = {key: summary[key] for key in (*PAPER_KEYS, "challenge_macro_f1")}
    metrics["per_fold"] = per_fold
    for key in ("per_class_f1", "ece", "operating_point", "disc_grade", "level_check", "confusion"):
        if key in summary:
            metrics[key] = summary[key]
    if "reading" in summary:
        metrics["intervals"] = summary["reading"]["intervals"]
        metrics["interval_method"] = summary["reading"]["interval_method"]
    metrics["evaluation"] = f"{k}-fold out-of-fold over {summary['studies']} unflagged studies, 6 mm" + (
        "; each fold model read through the readout fitted on the other folds (nested)" if card.readout else ""
    )
    write_card(checkpoint, replace(card, metrics=metrics))


def write_figures(
    out_dir: Path, samples: Sequence[SliceSample], predictions: Sequence[Prediction], max_overlays: int = 8
) -> dict[str, str]:
    """Overlay of a few studies, per-level error box plot, ROC curves, a reliability diagram per structure kind
    (localised points with a target, as the C metric and the ECE); returns the paths written."""
    from ccfnet_core import plots

    out_dir.mkdir(parents=True, exist_ok=True)
    errors = errors_mm(samples, predictions)
    targets = np.stack([s.abnormal_targets() for s in samples])
    probabilities = np.stack([p.probabilities for p in predictions])
    localised = np.nan_to_num(errors, nan=np.inf) <= 6.0
    pick = np.linspace(0, len(samples) - 1, num=min(max_overlays, len(samples))).astype(int)
    figures = {
        "overlay": str(plots.overlay(out_dir / "overlay.png", [samples[i] for i in pick],
                                     [predictions[i] for i in pick])),
        "per_level_error": str(plots.per_level_error(out_dir / "per_level_error.png", errors)),
        "roc": str(plots.roc_curves(out_dir / "roc.png", targets, probabilities, localised)),
    }
    for name, indices in (("vertebra", VERTEBRA_INDICES), ("disc", DISC_INDICES)):
        columns = list(indices)
        keep = np.isfinite(targets[:, columns]) & localised[:, columns]
        if keep.any():
            path = out_dir / f"reliability_{name}.png"
            t, p = targets[:, columns][keep], probabilities[:, columns][keep]
            figures[f"reliability_{name}"] = str(plots.reliability_diagram(path, name, p, t))
    return figures
