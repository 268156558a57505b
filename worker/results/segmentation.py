"""Segmentation of the 11 structures on the analysed slice, one segment per structure.

BINARY (the default, what OHIF and most PACS viewers load): each segment is the region around its found point,
a disc of `REGION_RADIUS_MM` (the paper's 6 mm hit radius) in patient millimetres, shrunk where two found points
lie closer than twice that so that neighbouring levels never share a pixel.

FRACTIONAL (research viewers): the localisation heatmaps, which come at network resolution and cover the whole
slice (the network input is the slice resized, aspect not kept), each resampled to the slice's matrix with
bilinear interpolation on pixel centres (PIL, the same half-pixel alignment the heatmap targets use) and
stored as PROBABILITY.
"""

from __future__ import annotations

import math
from typing import Final, Literal

import highdicom as hd
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset

from worker.results import _common, codes
from worker.results.findings import AnalysisResult

# 8-bit fractional values: 255 steps of probability are finer than the heatmaps' own precision.
MAX_FRACTIONAL_VALUE: Final = 255
# Radius of a structure's region in a BINARY segmentation: the paper's 6 mm localisation hit radius.
REGION_RADIUS_MM: Final = 6.0
# Share of the distance to the nearest other found point a region may reach (below 0.5: no overlap).
MAX_NEIGHBOUR_SHARE: Final = 0.45
# Without Pixel Spacing, the radius is this share of the slice's longer side.
FALLBACK_RADIUS_SHARE: Final = 0.02

SegmentationKind = Literal["binary", "fractional"]
SEGMENTATION_KINDS: Final[tuple[str, ...]] = ("binary", "fractional")


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


def _pixel_spacing_mm(source: Dataset) -> tuple[float, float] | None:
    """(row spacing, column spacing) in mm, or None when the slice does not state a usable one."""
    try:
        row_mm, column_mm = (float(value) for value in source.PixelSpacing)
    except (AttributeError, TypeError, ValueError):
        return None
    return (row_mm, column_mm) if row_mm > 0 and column_mm > 0 else None


def region_masks(result: AnalysisResult) -> np.ndarray:
    """(rows, columns, 11) bool: the region of each structure around its found point (see the module doc)."""
    source = result.source_dataset
    rows, columns = int(source.Rows), int(source.Columns)
    spacing = _pixel_spacing_mm(source)
    if spacing is None:  # work in pixels: one "mm" per pixel, the radius a share of the slice
        spacing, radius = (1.0, 1.0), FALLBACK_RADIUS_SHARE * max(rows, columns)
    else:
        radius = REGION_RADIUS_MM
    row_mm, column_mm = spacing
    points_mm = np.array([(f.point_px[0] * column_mm, f.point_px[1] * row_mm) for f in result.findings])
    centre_rows = (np.arange(rows, dtype=np.float64) + 0.5)[:, None] * row_mm
    centre_columns = (np.arange(columns, dtype=np.float64) + 0.5)[None, :] * column_mm
    masks = np.zeros((rows, columns, len(result.findings)), dtype=bool)
    for index, (x_mm, y_mm) in enumerate(points_mm):
        others = np.delete(points_mm, index, axis=0)
        nearest = float(np.min(np.hypot(others[:, 0] - x_mm, others[:, 1] - y_mm))) if len(others) else math.inf
        reach = min(radius, MAX_NEIGHBOUR_SHARE * nearest)
        # At least the pixel under the point, so that no segment is empty.
        reach = max(reach, 0.5 * max(row_mm, column_mm))
        masks[:, :, index] = (centre_columns - x_mm) ** 2 + (centre_rows - y_mm) ** 2 <= reach**2
    return masks


def build_segmentation(
    result: AnalysisResult,
    *,
    kind: SegmentationKind = "binary",
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> hd.seg.Segmentation:
    """A BINARY SEG of each structure's region, or the heatmaps as a FRACTIONAL PROBABILITY SEG (which
    requires `result.heatmaps`), on the source slice.

    Each segment: "<level> <kind>" as label ("L4-L5 disc"), the level as tracking ID (with the SR's tracking
    UID), category "Anatomical Structure", type the structure's SNOMED CT code, AUTOMATIC with the algorithm
    identified (family "Artificial Intelligence"). Content Label "CCFNET_AI" and Content Description mark it
    unverified AI output.
    """
    if not isinstance(result, AnalysisResult):
        raise TypeError('Argument "result" must have type AnalysisResult.')
    if kind not in SEGMENTATION_KINDS:
        raise ValueError(f'Argument "kind" must be one of {", ".join(SEGMENTATION_KINDS)}, got {kind!r}.')
    if kind == "fractional" and result.heatmaps is None:
        raise ValueError('Argument "result" has no heatmaps; a fractional segmentation needs them.')
    series_uid = _common.new_uid(series_instance_uid, "series_instance_uid")
    instance_uid = _common.new_uid(sop_instance_uid, "sop_instance_uid")
    source = _common.working_source(result)
    algorithm = result.algorithm
    if kind == "fractional":
        assert result.heatmaps is not None
        pixels: np.ndarray = upsample_heatmaps(result.heatmaps, int(source.Rows), int(source.Columns))
        segmentation_type = hd.seg.SegmentationTypeValues.FRACTIONAL
    else:
        pixels = region_masks(result).astype(np.uint8)
        segmentation_type = hd.seg.SegmentationTypeValues.BINARY

    identification = hd.AlgorithmIdentificationSequence(
        name=algorithm.model_name,
        family=codes.ARTIFICIAL_INTELLIGENCE,
        version=algorithm.model_version,
        source=algorithm.manufacturer,
        parameters={"weights sha256": algorithm.weights_sha256} if algorithm.weights_sha256 else None,
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=f"{finding.name} {finding.kind}",
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
        pixel_array=pixels[None, ...],
        segment_descriptions=descriptions,
        series_instance_uid=series_uid,
        series_number=_common.SEG_SERIES.number,
        sop_instance_uid=instance_uid,
        instance_number=1,
        manufacturer=algorithm.manufacturer,
        manufacturer_model_name=algorithm.model_name,
        software_versions=algorithm.software_version,
        device_serial_number=algorithm.device_uid,
        segmentation_type=segmentation_type,
        # Used by FRACTIONAL only (highdicom leaves them out of a BINARY segmentation).
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
