"""PNG figures people would rather look at than numbers: overlays, per-level errors, ROC curves, curves.

matplotlib is imported inside each function (Agg backend) so that importing the library stays light.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ccfnet_core.sample import Prediction, SliceSample
from ccfnet_core.structures import DISC_INDICES, STRUCTURES, VERTEBRA_INDICES, predicted_label


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def overlay(
    path: Path,
    samples: Sequence[SliceSample],
    predictions: Sequence[Prediction],
    columns: int = 4,
    title: str = "",
) -> Path:
    """Slices with true points (green circles) and predictions (red crosses, label and probability)."""
    plt = _pyplot()
    n = len(samples)
    rows = max(1, int(np.ceil(n / columns)))
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 4.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, sample, pred in zip(axes.flat, samples, predictions, strict=False):
        ax.imshow(sample.image[1], cmap="gray")
        truth = sample.points
        ax.scatter(truth[:, 0], truth[:, 1], s=40, facecolors="none", edgecolors="lime", linewidths=1.2)
        ax.scatter(pred.points[:, 0], pred.points[:, 1], s=30, c="red", marker="x", linewidths=1.2)
        for k, (x, y) in enumerate(pred.points):
            label = pred.labels[k] if pred.labels else predicted_label(k, float(pred.probabilities[k]))
            ax.text(x + 6, y, f"{STRUCTURES[k]} {label} {pred.probabilities[k]:.2f}", color="yellow", fontsize=6)
        ax.set_title(sample.study_id, fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def per_level_error(path: Path, errors_mm: np.ndarray, radius_mm: float = 6.0) -> Path:
    """Box plot of localisation error (mm) per structure; errors_mm is (studies, 11) with NaN for missing."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    data = [col[np.isfinite(col)] for col in errors_mm.T]
    ax.boxplot(data, showfliers=True)
    ax.set_xticks(range(1, len(STRUCTURES) + 1), STRUCTURES, rotation=45)
    ax.axhline(radius_mm, color="red", linestyle="--", label=f"{radius_mm:g} mm")
    ax.set_ylabel("error (mm)")
    ax.set_yscale("symlog", linthresh=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def roc_curves(path: Path, targets: np.ndarray, probabilities: np.ndarray, localised: np.ndarray) -> Path:
    """ROC of normal vs abnormal per type over localised points; inputs are (studies, 11)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, indices in (("Vertebra", VERTEBRA_INDICES), ("Disc", DISC_INDICES)):
        t = targets[:, list(indices)].ravel()
        p = probabilities[:, list(indices)].ravel()
        keep = np.isfinite(t) & localised[:, list(indices)].ravel()
        t, p = t[keep], p[keep]
        if t.size == 0 or t.min() == t.max():
            continue
        order = np.argsort(-p, kind="stable")
        t_sorted = t[order]
        tpr = np.concatenate([[0], np.cumsum(t_sorted) / t_sorted.sum()])
        fpr = np.concatenate([[0], np.cumsum(1 - t_sorted) / (1 - t_sorted).sum()])
        ax.plot(fpr, tpr, label=f"{name} (n={t.size})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def learning_curves(path: Path, history_csvs: Sequence[Path]) -> Path:
    """Training loss and held-out metrics per epoch, one line per run (fold)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for csv_path in history_csvs:
        with csv_path.open() as handle:
            rows = list(csv.DictReader(handle))
        if not rows:
            continue
        epochs = [int(r["epoch"]) for r in rows]
        left.plot(epochs, [float(r["loss_total"]) for r in rows], label=csv_path.stem.replace("-history", ""))
        val = [(int(r["epoch"]), float(r["val_Score"])) for r in rows if r.get("val_Score") not in (None, "")]
        if val:
            right.plot(*zip(*val, strict=True), marker="o", label=csv_path.stem.replace("-history", ""))
    left.set_xlabel("epoch")
    left.set_ylabel("training loss")
    left.set_yscale("log")
    right.set_xlabel("epoch")
    right.set_ylabel("held-out Score")
    for ax in (left, right):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def reliability_diagram(path: Path, kind: str, probabilities: np.ndarray, targets: np.ndarray) -> Path:
    """Reliability diagram of one structure kind: per bin of the stated P(abnormal), the share truly abnormal (the
    diagonal is perfect calibration), with the bin counts and the ECE in the title."""
    from ccfnet_core.calibration import ECE_BINS, expected_calibration_error, reliability

    plt = _pyplot()
    rows = [r for r in reliability(probabilities, targets, ECE_BINS) if r["n"]]
    fig, (ax, counts) = plt.subplots(2, 1, figsize=(4.5, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.plot([r["mean_probability"] for r in rows], [r["share_abnormal"] for r in rows], marker="o")
    ax.set_ylabel("share abnormal")
    ax.set_title(f"{kind}: ECE {expected_calibration_error(probabilities, targets):.3f} (n={len(targets)})")
    counts.bar([(r["low"] + r["high"]) / 2 for r in rows], [r["n"] for r in rows], width=1 / ECE_BINS * 0.9)
    counts.set_xlabel("P(abnormal) stated")
    counts.set_ylabel("points")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
