"""The level check: how doubtful a study's level count is, from the heatmaps the network decoded its points from.

Why (issue 26): half of the localisation misses out of fold are whole-level shifts, every label of the study one
level off, and no local stage can see them (the refiner moves a point within its patch; the grader grades what
it is given). A radiologist most needs to be told when the count may be off. The network's heatmaps say how sure
it was of each point: out of fold, studies whose count is off have lower peaks (the two localisers, averaged,
disagree, or neither is sure), so a low mean peak is the warning.
"""

from __future__ import annotations

from typing import Final

import numpy as np

from ccfnet_core.metrics import study_misses
from ccfnet_core.sample import Prediction, SliceSample

LEVEL_SHIFT_MIN_POINTS: Final[int] = 2  # a study is level-shifted when at least this many points are level shifts


def level_shifted(sample: SliceSample, prediction: Prediction, radius_mm: float = 6.0) -> bool:
    """True when at least `LEVEL_SHIFT_MIN_POINTS` of the study's points sit on a neighbouring structure of their
    type whose own channel missed too (`metrics.miss_breakdown`'s level shifts): the count is off."""
    kinds = study_misses(sample, prediction, radius_mm).values()
    return sum(kind == "level_shift" for kind in kinds) >= LEVEL_SHIFT_MIN_POINTS


def level_doubt(confidences: np.ndarray) -> float:
    """The level check's score of one study: one minus the mean of its 11 heatmap peaks (`Prediction.confidences`).

    Out of fold it told the 7 level-shifted studies of 155 from the rest with AUC 0.86, better than the heatmaps'
    second peaks about a level away (0.65) and about as well as the two localisers' disagreement (0.82), which
    the averaged maps do not keep (docs/model.md, "Level check")."""
    peaks = np.asarray(confidences, dtype=np.float64)
    return float(1.0 - peaks.mean()) if peaks.size and np.isfinite(peaks).all() else float("nan")
