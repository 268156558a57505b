"""Comprehensive 3D SR with a TID 1500 Measurement Report: one TID 1501 measurement group per structure.

Each group holds the tracking identifier and UID (TID 4108), the diagnosis as the coded "Finding" (DCM 121071),
the finding site (SNOMED CT, the level coded), TID 4019 algorithm identification, the probability of abnormality
and the localisation confidence as NUM measurements in percent (UCUM "%"), each INFERRED FROM the structure's
point (SCOORD POINT on the source image, TID 300 / TID 320), and a Comment (DCM 121106) with the label a person
reads ("L4-L5 disc: protrusion, 87 %").

Why this layout (OHIF 3.13, Cornerstone3D adapters 5.6; docs/conformance.md 5.1 has the source lines):

- The tracking identifier is `Cornerstone3DTools@^0.1.0:ArrowAnnotate:<level>`. The adapters choose the tool a
  group opens as from the identifier's prefix; for any other identifier they fall back to the graphic type, and a
  point then opens as a Probe, which draws the pixel index and value on the image, not the label. An
  ArrowAnnotate draws the label (taken from the Comment) beside an arrow to the point, and cornerstone moves
  labels apart when they would cover each other. The level after the prefix keeps the identifier unique per
  structure, as DCM 112039 asks; the level is also in the Comment and coded as the finding site.
- No top-level SCOORD (no TID 1410 region group): before the measurements are tracked, OHIF's SR view prints
  the finding site of a group with a top-level SCOORD as "363698007: <site>"; without one it prints the Comment
  and the numbers.
"""

from __future__ import annotations

from typing import Final

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from worker.results import _common, codes
from worker.results.findings import AnalysisResult, StructureFinding

PERCENT_DECIMALS: Final = 1
# The tracking identifier prefix that makes OHIF open a group as a labelled arrow (module docstring).
OHIF_ARROW_PREFIX: Final = "Cornerstone3DTools@^0.1.0:ArrowAnnotate"


def _algorithm_identification(result: AnalysisResult) -> hd.sr.AlgorithmIdentification:
    """TID 4019: model name and model version (with the weights' sha256 prefix), manufacturer, and the full
    weights digest as the algorithm parameter."""
    weights = _common.weights_text(result.algorithm)
    return hd.sr.AlgorithmIdentification(
        name=result.algorithm.model_name,
        version=result.algorithm.model_version,
        manufacturer=result.algorithm.manufacturer,
        parameters=[weights] if weights else None,
    )


def _percent(fraction: float) -> float:
    """A fraction in [0, 1] as a percentage to 0.1 %: what the numbers mean, printed readably by viewers."""
    return round(100.0 * fraction, PERCENT_DECIMALS)


def _point(finding: StructureFinding) -> np.ndarray:
    return np.array([finding.point_px], dtype=np.float64)


def tracking_identifier(finding: StructureFinding) -> str:
    """The structure's tracking identifier, e.g. 'Cornerstone3DTools@^0.1.0:ArrowAnnotate:L4-L5'."""
    return f"{OHIF_ARROW_PREFIX}:{finding.name}"


def _tracking(result: AnalysisResult, finding: StructureFinding) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(uid=_common.tracking_uid(result, finding), identifier=tracking_identifier(finding))


def _finding_sites(finding: StructureFinding) -> list[hd.sr.FindingSite]:
    return [hd.sr.FindingSite(anatomic_location=codes.STRUCTURE_SITES[finding.name])]


def _measurement_group(
    result: AnalysisResult, source: Dataset, finding: StructureFinding
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501: what the structure is, the numbers (each inferred from its point) and the label."""
    coordinates = [
        hd.sr.CoordinatesForMeasurement(
            graphic_type=hd.sr.GraphicTypeValues.POINT,
            graphic_data=_point(finding),
            source_image=hd.sr.SourceImageForRegion.from_source_image(source),
        )
    ]
    measurements = [
        hd.sr.Measurement(
            name=codes.PROBABILITY_OF_ABNORMALITY,
            value=_percent(finding.probability),
            unit=codes.UNIT_PERCENT,
            referenced_coordinates=coordinates,
        ),
        hd.sr.Measurement(
            name=codes.LOCALIZATION_CONFIDENCE,
            value=_percent(finding.confidence),
            unit=codes.UNIT_PERCENT,
            referenced_coordinates=coordinates,
        ),
    ]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(result, finding),
        finding_type=codes.DIAGNOSES[(finding.kind, finding.label)],
        finding_sites=_finding_sites(finding),
        algorithm_id=_algorithm_identification(result),
        measurements=measurements,
    )
    group[0].ContentSequence.append(
        hd.sr.TextContentItem(
            name=codes.COMMENT,
            value=finding.text,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    return group


def _level_check(warning: str) -> hd.sr.ContainerContentItem:
    """TID 1500's Qualitative Evaluations container with the level check's sentence, written only when the
    model doubts the level count: the one error that shifts every label of the study by a level."""
    container = hd.sr.ContainerContentItem(
        name=codes.QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=codes.LEVEL_COUNT_CHECK,
                value=warning,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        ]
    )
    return container


def build_sr(
    result: AnalysisResult,
    *,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The measurement report (TID 1500) of one analysis, as a new series in the source's study.

    Unverified AI output: VerificationFlag UNVERIFIED, PreliminaryFlag PRELIMINARY, the algorithm in the
    observation context, in each group (TID 4019) and in the Contributing Equipment Sequence.
    """
    if not isinstance(result, AnalysisResult):
        raise TypeError('Argument "result" must have type AnalysisResult.')
    series_uid = _common.new_uid(series_instance_uid, "series_instance_uid")
    instance_uid = _common.new_uid(sop_instance_uid, "sop_instance_uid")
    source = _common.working_source(result)

    groups = [_measurement_group(result, source, finding) for finding in result.findings]
    report = hd.sr.MeasurementReport(
        observation_context=_common.observation_context(result.algorithm),
        procedure_reported=codes.PROCEDURE_REPORTED,
        imaging_measurements=groups,
        referenced_images=[source],
    )
    if result.level_warning is not None:
        report[0].ContentSequence.append(_level_check(result.level_warning))
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source],
        content=report[0],
        series_instance_uid=series_uid,
        series_number=_common.SR_SERIES.number,
        sop_instance_uid=instance_uid,
        instance_number=1,
        manufacturer=result.algorithm.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        contributing_equipment=[_common.contributing_equipment(result.algorithm)],
        series_description=_common.SR_SERIES.description,
        coding_schemes=[codes.private_scheme()],
        specific_character_set=_common.character_set(result),
    )
    _common.mark_equipment(sr, result.algorithm)
    return sr
