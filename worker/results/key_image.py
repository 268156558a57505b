"""Secondary Capture key image: the slice with markers and labels burned in, for viewers showing nothing else.

The slice is rendered with its own display window (or a percentile window), enlarged by an integer factor
when small so the text stays legible, and drawn on in RGB: normal structures in cyan, abnormal in orange,
each with "L4-L5 protrusion 0.87", and a banner that says it is an unverified AI result.
"""

from __future__ import annotations

import math
from typing import Final

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from worker.results import _common, render
from worker.results.findings import AnalysisResult, StructureFinding

# Smallest long side (pixels) of the key image; smaller slices are enlarged by an integer factor up to 4.
MIN_LONG_SIDE: Final = 512
MAX_SCALE: Final = 4
NORMAL_COLOR: Final = (0, 200, 255)
ABNORMAL_COLOR: Final = (255, 140, 0)
BANNER_COLOR: Final = (255, 255, 0)
_OUTLINE: Final = (0, 0, 0)
# Burned in when the model doubts the level count (the SR carries the full sentence).
LEVEL_WARNING_BANNER: Final = "LEVEL COUNT MAY BE OFF BY ONE: CHECK THE LABELS"


def key_image_scale(source: Dataset) -> int:
    """Integer enlargement so the long side reaches MIN_LONG_SIDE (1 for large matrices, at most 4)."""
    longer = max(int(source.Rows), int(source.Columns))
    return int(min(MAX_SCALE, max(1, math.ceil(MIN_LONG_SIDE / longer))))


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled default font: no font files needed on the worker image."""
    return ImageFont.load_default(size=size)


def _banner_lines(result: AnalysisResult) -> list[str]:
    lines = [f"{result.algorithm.model_name} - {_common.UNVERIFIED_TEXT}"]
    if result.algorithm.phantom_only:
        lines.append(_common.PHANTOM_TEXT.upper())
    if result.level_warning is not None:
        lines.append(LEVEL_WARNING_BANNER)
    return lines


def burn_in(result: AnalysisResult, canvas: np.ndarray, scale: int) -> np.ndarray:
    """Draw markers, labels and the banner on an RGB rendering of the source enlarged by `scale`."""
    image = Image.fromarray(canvas, mode="RGB")
    draw = ImageDraw.Draw(image)
    height, width = canvas.shape[:2]
    longer = max(height, width)
    font_size = max(11, round(longer * 0.026))
    font = _font(font_size)
    radius = max(3.0, longer * 0.012)
    stroke = max(1, font_size // 8)

    for finding in result.findings:
        _draw_finding(draw, finding, scale, radius, font, stroke, width)

    y = 2.0
    for line in _banner_lines(result):
        draw.text((4.0, y), line, fill=BANNER_COLOR, font=font, stroke_width=stroke, stroke_fill=_OUTLINE)
        y += font_size + 4
    return np.asarray(image, dtype=np.uint8)


def _draw_finding(
    draw: ImageDraw.ImageDraw,
    finding: StructureFinding,
    scale: int,
    radius: float,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    stroke: int,
    width: int,
) -> None:
    color = NORMAL_COLOR if finding.label == "v1" else ABNORMAL_COLOR
    # DICOM image coordinates (pixel corners) to Pillow pixel indices (pixel centres).
    x = finding.point_px[0] * scale - 0.5
    y = finding.point_px[1] * scale - 0.5
    box = (x - radius, y - radius, x + radius, y + radius)
    draw.ellipse(box, outline=_OUTLINE, width=3)
    draw.ellipse(box, outline=color, width=2)
    draw.point((x, y), fill=color)
    left, top, right, bottom = draw.textbbox((0, 0), finding.short_text, font=font, stroke_width=stroke)
    text_x = x + 2.0 * radius
    if text_x + (right - left) > width:
        text_x = x - 2.0 * radius - (right - left)
    text_y = y - (bottom - top) / 2.0 - top
    draw.text(
        (max(text_x, 0.0), text_y),
        finding.short_text,
        fill=color,
        font=font,
        stroke_width=stroke,
        stroke_fill=_OUTLINE,
    )


def render_key_image(result: AnalysisResult) -> np.ndarray:
    """The key image's RGB pixels: (rows*scale, columns*scale, 3) uint8, scale from `key_image_scale`."""
    scale = key_image_scale(result.source_dataset)
    return burn_in(result, render.render_rgb(result.source_dataset, scale), scale)


def _source_image_reference(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return item


def build_key_image(
    result: AnalysisResult,
    *,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> hd.sc.SCImage:
    """The key image as a Secondary Capture in the source's study: RGB, BurnedInAnnotation YES.

    The SC IOD has no verification flag or content label; Image Comments and Derivation Description say
    "<model> <version>: AI result, unverified", and so does the burned-in banner.
    """
    if not isinstance(result, AnalysisResult):
        raise TypeError('Argument "result" must have type AnalysisResult.')
    series_uid = _common.new_uid(series_instance_uid, "series_instance_uid")
    instance_uid = _common.new_uid(sop_instance_uid, "sop_instance_uid")
    source = _common.working_source(result)
    scale = key_image_scale(source)
    pixels = render_key_image(result)
    orientation = render.patient_orientation(source)
    spacing = source.get("PixelSpacing")
    algorithm = result.algorithm

    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_uid,
        series_number=_common.KEY_IMAGE_SERIES.number,
        sop_instance_uid=instance_uid,
        instance_number=1,
        manufacturer=algorithm.manufacturer,
        # highdicom takes one letter per axis; the full (oblique) letters are set below.
        patient_orientation=(orientation[0][0], orientation[1][0]),
        # highdicom annotates pixel_spacing as ints; the attribute is DS (decimal) and takes floats.
        pixel_spacing=(float(spacing[0]) / scale, float(spacing[1]) / scale) if spacing else None,  # type: ignore[arg-type]
        transfer_syntax_uid=hd.UID("1.2.840.10008.1.2.1"),
        contributing_equipment=[_common.contributing_equipment(algorithm)],
        series_description=_common.KEY_IMAGE_SERIES.description,
        manufacturer_model_name=algorithm.model_name,
        software_versions=algorithm.software_version,
        specific_character_set=_common.character_set(result),
    )
    sc.copy_patient_and_study_information(source)
    sc.PatientOrientation = list(orientation)
    # highdicom writes Modality OT; OHIF plays OT (and US) series as cine, whose bar covers the image. The
    # source's modality makes viewers show the key image as the still it is.
    sc.Modality = source.get("Modality") or "OT"
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = _common.identity_text(algorithm)
    sc.DerivationDescription = _common.description(algorithm)
    sc.SourceImageSequence = DicomSequence([_source_image_reference(source)])
    _common.copy_body_part(sc, source)
    _common.mark_equipment(sc, algorithm)
    return sc
