"""Fractional (probability) Segmentation of the 11 localisation heatmaps, one segment per structure.

The heatmaps come at network resolution and cover the whole slice (the network input is the slice resized,
aspect not kept), so each is resampled to the slice's matrix with bilinear interpolation on pixel centres
(PIL, the same half-pixel alignment the heatmap targets use) and stored as FRACTIONAL / PROBABILITY.
"""

from __future__ import annotations

from typing import Final

import highdicom as hd
import numpy as np
from PIL import Image

from worker.results import _common, codes
from worker.results.findings import AnalysisResult

# 8-bit fractional values: 255 steps of probability are finer than the heatmaps' own precision.
MAX_FRACTIONAL_VALUE: Final = 255


def upsample_heatmaps(heatmaps: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """(11, h, w) in [0, 1] -> (rows, columns, 11) float32 in [0, 1], bilinear."""
    if heatmaps.ndim != 3:
        raise ValueError(f'Argument "heatmaps" must have shape (n, h, w), got {heatmaps.shape}.')
    planes = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32), mode="F").resize(
                (columns, rows), Image.Resampling.BILINEAR
            ),
            dtype=np.float32,
        )
        for plane in heatmaps
    ]
    return np.clip(np.stack(planes, axis=-1), 0.0, 1.0)


def build_segmentation(
    result: AnalysisResult,
    *,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> hd.seg.Segmentation:
    """The heatmaps as a FRACTIONAL PROBABILITY SEG on the source slice; requires `result.heatmaps`.

    Each segment: the level as label and tracking ID (with the SR's tracking UID), category "Anatomical
    Structure", type the structure's SNOMED CT code, AUTOMATIC with the algorithm identified (family
    "Artificial Intelligence"). Content Label "CCFNET_AI" and Content Description mark it unverified AI
    output.
    """
    if not isinstance(result, AnalysisResult):
        raise TypeError('Argument "result" must have type AnalysisResult.')
    if result.heatmaps is None:
        raise ValueError('Argument "result" has no heatmaps; a segmentation needs them.')
    series_uid = _common.new_uid(series_instance_uid, "series_instance_uid")
    instance_uid = _common.new_uid(sop_instance_uid, "sop_instance_uid")
    source = _common.working_source(result)
    algorithm = result.algorithm
    probabilities = upsample_heatmaps(result.heatmaps, int(source.Rows), int(source.Columns))

    identification = hd.AlgorithmIdentificationSequence(
        name=algorithm.model_name,
        family=codes.ARTIFICIAL_INTELLIGENCE,
        version=algorithm.model_version,
        source=algorithm.manufacturer,
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=finding.name,
            segmented_property_category=codes.ANATOMICAL_STRUCTURE,
            segmented_property_type=codes.STRUCTURE_SITES[finding.name],
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identification,
            tracking_id=finding.name,
            tracking_uid=_common.tracking_uid(result, finding),
        )
        for number, finding in enumerate(result.findings, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=[source],
        pixel_array=probabilities[None, ...],
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        segment_descriptions=descriptions,
        series_instance_uid=series_uid,
        series_number=_common.SEG_SERIES.number,
        sop_instance_uid=instance_uid,
        instance_number=1,
        manufacturer=algorithm.manufacturer,
        manufacturer_model_name=algorithm.model_name,
        software_versions=algorithm.software_version,
        device_serial_number=algorithm.device_uid,
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=MAX_FRACTIONAL_VALUE,
        content_label=_common.CONTENT_LABEL,
        content_description=_common.short_description(algorithm),
        omit_empty_frames=False,
        contributing_equipment=[_common.contributing_equipment(algorithm)],
        series_description=_common.SEG_SERIES.description,
        specific_character_set=_common.character_set(result),
    )
    _common.mark_equipment(seg, algorithm)
    return seg
