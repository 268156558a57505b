"""Result writers (DESIGN.md step 6): standard DICOM objects from one analysed slice, each in a new series.

Pure functions: an `AnalysisResult` in, pydicom datasets out; no database, no network, no model library.
Every object copies the source's patient and study, names the algorithm (Contributing Equipment with device
UID, General Equipment) and is marked as unverified AI output.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

from worker.results.findings import (
    DISCS,
    STRUCTURES,
    VERTEBRAE,
    AlgorithmIdentity,
    AnalysisResult,
    StructureFinding,
)
from worker.results.key_image import build_key_image
from worker.results.presentation_state import build_presentation_state
from worker.results.segmentation import SEGMENTATION_KINDS, SegmentationKind, build_segmentation
from worker.results.sr import build_sr

__all__ = [
    "DISCS",
    "SEGMENTATION_KINDS",
    "STRUCTURES",
    "VERTEBRAE",
    "AlgorithmIdentity",
    "AnalysisResult",
    "SegmentationKind",
    "StructureFinding",
    "build_key_image",
    "build_presentation_state",
    "build_results",
    "build_segmentation",
    "build_sr",
]


def build_results(
    result: AnalysisResult,
    *,
    include_segmentation: bool = False,
    segmentation_kind: SegmentationKind = "binary",
) -> list[Dataset]:
    """SR, GSPS and key image (and the SEG when asked: BINARY regions, or FRACTIONAL heatmaps), in that order."""
    if not isinstance(result, AnalysisResult):
        raise TypeError('Argument "result" must have type AnalysisResult.')
    if not isinstance(include_segmentation, bool):
        raise TypeError('Argument "include_segmentation" must be a bool.')
    if segmentation_kind not in SEGMENTATION_KINDS:
        raise ValueError(
            f'Argument "segmentation_kind" must be one of {", ".join(SEGMENTATION_KINDS)}, got {segmentation_kind!r}.'
        )
    if include_segmentation and segmentation_kind == "fractional" and result.heatmaps is None:
        raise ValueError('A fractional segmentation is asked for but the result has no heatmaps.')
    objects: list[Dataset] = [
        build_sr(result),
        build_presentation_state(result),
        build_key_image(result),
    ]
    if include_segmentation:
        objects.append(build_segmentation(result, kind=segmentation_kind))
    return objects
