"""One annotated (or unannotated) slice as the library passes it around."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ccfnet_core.structures import NUM_STRUCTURES, abnormal_target


@dataclass(frozen=True)
class SliceSample:
    """Three channels (slices i-1, i, i+1) of one sagittal slice, with its 11 points where known.

    image: float32 (3, H, W) in [0, 1], already min-max rescaled per channel (CCFNET.md, input).
    points: float64 (11, 2) as (x, y) = (column, row) pixels of `image`; NaN where a point is missing.
    labels: per structure the set of challenge labels ("v1".."v5"); empty where unknown.
    spacing_mm: (row, column) mm per pixel, used for the 6 mm criterion and patient coordinates.
    """

    study_id: str
    image: np.ndarray
    points: np.ndarray
    labels: tuple[frozenset[str], ...]
    spacing_mm: tuple[float, float]
    flag: str | None = None
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.image.ndim != 3 or self.image.shape[0] != 3:
            raise ValueError(f"image must be (3, H, W), got {self.image.shape}")
        if self.points.shape != (NUM_STRUCTURES, 2):
            raise ValueError(f"points must be ({NUM_STRUCTURES}, 2), got {self.points.shape}")
        if len(self.labels) != NUM_STRUCTURES:
            raise ValueError(f"labels must have {NUM_STRUCTURES} entries, got {len(self.labels)}")
        if min(self.spacing_mm) <= 0:
            raise ValueError(f"spacing_mm must be positive, got {self.spacing_mm}")

    @property
    def height(self) -> int:
        return int(self.image.shape[1])

    @property
    def width(self) -> int:
        return int(self.image.shape[2])

    @property
    def present(self) -> np.ndarray:
        """Boolean (11,): which points are annotated."""
        return np.isfinite(self.points).all(axis=1)

    def abnormal_targets(self) -> np.ndarray:
        """Float (11,): 1 abnormal, 0 normal, NaN no target (missing point, or a disc with only v5)."""
        out = np.full(NUM_STRUCTURES, np.nan)
        for k, labels in enumerate(self.labels):
            target = abnormal_target(k, labels)
            if target is not None and self.present[k]:
                out[k] = target
        return out


def rescale_to_unit(slice_2d: np.ndarray, invert: bool = False) -> np.ndarray:
    """Min-max rescale one slice to [0, 1] float32 (0..255 then /255 in the paper; the same up to rounding)."""
    data = slice_2d.astype(np.float32)
    lo, hi = float(data.min()), float(data.max())
    out = (data - lo) / (hi - lo) if hi > lo else np.zeros_like(data)
    return 1.0 - out if invert else out


@dataclass(frozen=True)
class Prediction:
    """The network's answer for one slice, in pixels of the slice it was given.

    points: float64 (11, 2) as (x, y) = (column, row).
    probabilities: float64 (11,) P(abnormal) per structure (vertebra v2; disc v2/v3/v4); calibrated where the
        model card has a readout (`ccfnet_core.readout`), the model's raw output otherwise.
    confidences: float64 (11,) heatmap peak value per structure (about 1 where the model is sure).
    grade_probabilities: float64 (11, 5) softmax over the disc classes v1..v5 (NaN rows for vertebrae), from a
        model with a disc grade grader; None otherwise.
    level_doubt: how doubtful the level count is (`ccfnet_core.levels`); NaN where not measured.
    What the card's readout adds (empty/None without one): raw_probabilities, P(abnormal) before calibration (the
    ranking the paper's AUC reads); labels, the challenge class per structure (v1..v5);
    grades, the stated grade (the label, or "abnormal" for a disc whose grade is not supported); grade_shares,
    the stated grade's share among the abnormal grades; schmorl, the Schmorl's node flag; level_warning, a
    sentence for the reader when the level count is doubtful.
    """

    points: np.ndarray
    probabilities: np.ndarray
    confidences: np.ndarray
    grade_probabilities: np.ndarray | None = None
    level_doubt: float = float("nan")
    raw_probabilities: np.ndarray | None = None
    labels: tuple[str, ...] = ()
    grades: tuple[str, ...] = ()
    grade_shares: np.ndarray | None = None
    schmorl: np.ndarray | None = None
    level_warning: str | None = None

    def __post_init__(self) -> None:
        if self.points.shape != (NUM_STRUCTURES, 2):
            raise ValueError(f"points must be ({NUM_STRUCTURES}, 2), got {self.points.shape}")
        if self.probabilities.shape != (NUM_STRUCTURES,) or self.confidences.shape != (NUM_STRUCTURES,):
            raise ValueError("probabilities and confidences must have shape (11,)")
        if self.grade_probabilities is not None and self.grade_probabilities.shape[0] != NUM_STRUCTURES:
            raise ValueError(f"grade_probabilities must have {NUM_STRUCTURES} rows")
        for name in ("labels", "grades"):
            if getattr(self, name) and len(getattr(self, name)) != NUM_STRUCTURES:
                raise ValueError(f"{name} must have {NUM_STRUCTURES} entries or none")
