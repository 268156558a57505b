"""Grayscale Softcopy Presentation State: markers and short labels on the source slice.

For PACS viewers that draw presentation states but not SR: per structure a small circle around the point and a
text "L4-L5 protrusion 0.87" anchored to it, all on one graphic layer, carrying the same tracking UIDs as the
SR groups.
"""

from __future__ import annotations

from typing import Final

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from worker.results import _common, render
from worker.results.findings import AnalysisResult, StructureFinding

GRAPHIC_LAYER: Final = "CCFNET"
# Yellow (CIELab), visible on grayscale MR.
_LAYER_COLOR: Final = hd.color.CIELabColor(97.1, -21.6, 94.5)
# Marker radius and text height as shares of the longer image side, with floors in pixels.
_MARKER_SHARE: Final = 0.012
_TEXT_SHARE: Final = 0.035


def _marker(finding: StructureFinding, radius: float, columns: int, tracking_uid: str) -> hd.pr.GraphicObject:
    """A CIRCLE: its centre and one point on the circumference (PS3.3 C.10.5.1.2), kept inside the image."""
    column, row = finding.point_px
    edge = column + radius if column + radius <= columns else column - radius
    return hd.pr.GraphicObject(
        graphic_type=hd.pr.GraphicTypeValues.CIRCLE,
        graphic_data=np.array([[column, row], [edge, row]], dtype=np.float64),
        units=hd.pr.AnnotationUnitsValues.PIXEL,
        tracking_id=finding.name,
        tracking_uid=tracking_uid,
    )


def _label(
    finding: StructureFinding, radius: float, text_height: float, columns: int, rows: int, tracking_uid: str
) -> hd.pr.TextObject:
    """The text in a box beside the marker (right of it, left near the right edge), anchored to the point."""
    column, row = finding.point_px
    width = min(len(finding.short_text) * text_height * 0.6, float(columns))
    left = column + 2.0 * radius
    if left + width > columns:
        left = column - 2.0 * radius - width
    left = min(max(left, 0.0), columns - width)
    top = min(max(row - text_height / 2.0, 0.0), rows - text_height)
    return hd.pr.TextObject(
        text_value=finding.short_text,
        units=hd.pr.AnnotationUnitsValues.PIXEL,
        bounding_box=(left, max(top, 0.0), left + width, min(max(top, 0.0) + text_height, float(rows))),
        anchor_point=(column, row),
        anchor_point_visible=True,
        text_justification=hd.pr.TextJustificationValues.LEFT,
        tracking_id=finding.name,
        tracking_uid=tracking_uid,
    )


def _voi(source: Dataset) -> list[hd.pr.SoftcopyVOILUTTransformation] | None:
    """The source's own window, or (when it has none) one computed from its pixels."""
    if "WindowCenter" in source and "WindowWidth" in source:
        return None
    center, width = render.display_window(source)
    return [
        hd.pr.SoftcopyVOILUTTransformation(
            window_center=center, window_width=width, window_explanation="CCF-Net percentile window"
        )
    ]


def build_presentation_state(
    result: AnalysisResult,
    *,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> hd.pr.GrayscaleSoftcopyPresentationState:
    """A GSPS referencing the source slice with 11 markers and 11 text labels, marked as unverified AI output.

    The IOD has no verification flag; Content Label "CCFNET_AI" and Content Description "AI result,
    unverified (<model>)" carry the marking, and Contributing Equipment names the algorithm.
    """
    if not isinstance(result, AnalysisResult):
        raise TypeError('Argument "result" must have type AnalysisResult.')
    series_uid = _common.new_uid(series_instance_uid, "series_instance_uid")
    instance_uid = _common.new_uid(sop_instance_uid, "sop_instance_uid")
    source = _common.working_source(result)
    rows, columns = int(source.Rows), int(source.Columns)
    longer = float(max(rows, columns))
    radius = max(2.0, longer * _MARKER_SHARE)
    text_height = max(8.0, longer * _TEXT_SHARE)

    markers, labels = [], []
    for finding in result.findings:
        uid = _common.tracking_uid(result, finding)
        markers.append(_marker(finding, radius, columns, uid))
        labels.append(_label(finding, radius, text_height, columns, rows, uid))
    layer = hd.pr.GraphicLayer(
        layer_name=GRAPHIC_LAYER,
        order=1,
        description=_common.short_description(result.algorithm),
        display_color=_LAYER_COLOR,
    )
    annotation = hd.pr.GraphicAnnotation(
        referenced_images=[source],
        graphic_layer=layer,
        graphic_objects=markers,
        text_objects=labels,
    )
    algorithm = result.algorithm
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[source],
        series_instance_uid=series_uid,
        series_number=_common.GSPS_SERIES.number,
        sop_instance_uid=instance_uid,
        instance_number=1,
        manufacturer=algorithm.manufacturer,
        manufacturer_model_name=algorithm.model_name,
        software_versions=algorithm.software_version,
        device_serial_number=algorithm.device_uid,
        content_label=_common.CONTENT_LABEL,
        content_description=_common.short_description(algorithm),
        graphic_annotations=[annotation],
        graphic_layers=[layer],
        voi_lut_transformations=_voi(source),
        contributing_equipment=[_common.contributing_equipment(algorithm)],
        series_description=_common.GSPS_SERIES.description,
        specific_character_set=_common.character_set(result),
    )
    _common.copy_body_part(gsps, source)
    _common.mark_equipment(gsps, algorithm)
    return gsps
