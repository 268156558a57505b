"""Comprehensive 3D SR with a TID 1500 Measurement Report: per structure, two measurement groups that share the
structure's tracking identifier ("L4-L5") and tracking UID, the pattern PS3.16 gives for measurements of one
finding made with different templates (PS3.17 RRR.5):

- TID 1410 (Planar ROI Measurements and Qualitative Evaluations): the point as the Image Region (SCOORD POINT on
  the source image), the diagnosis as the coded "Finding" (DCM 121071), the finding site (SNOMED CT), TID 4019
  algorithm identification, and a Comment (DCM 121106) with the label a person reads
  ("L4-L5 disc: protrusion, 87 %").
- TID 1501 (Measurement and Qualitative Evaluation Group): the same finding and site, the probability of
  abnormality and the localisation confidence as NUM measurements in percent (UCUM "%"), each INFERRED FROM
  the same point (TID 300 / TID 320).

Why two groups: OHIF 3.x (Cornerstone3D adapters) re-opens a group as a tracked Probe annotation when the
tracking identifier is one of its own ("Cornerstone3DTools@^0.1.0:Probe") or, for any other identifier, when
the group holds a single-point SCOORD POINT at its top level, which only TID 1410 allows; it then reads the
point from the group's first NUM's INFERRED FROM SCOORD if the group has a NUM, which TID 1410 forbids (TID
1419 has no INFERRED FROM row). A TID 1410 group without NUMs is read from its Image Region, with the Comment
as the annotation's label; OHIF skips the TID 1501 group when hydrating (no top-level SCOORD) and shows its
numbers beside the point in its SR view, where groups are merged by tracking UID.
"""

from __future__ import annotations

from typing import Final

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from worker.results import _common, codes
from worker.results.findings import AnalysisResult, StructureFinding

PERCENT_DECIMALS: Final = 1
_Group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations


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


def _observation_context(result: AnalysisResult) -> hd.sr.ObservationContext:
    """TID 1001 with a device observer: the model, identified by the model card's device UID."""
    algorithm = result.algorithm
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=hd.sr.CodedConcept.from_code(codes.DEVICE_OBSERVER),
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=algorithm.device_uid,
                name=algorithm.model_name,
                manufacturer_name=algorithm.manufacturer,
                model_name=algorithm.model_name,
            ),
        )
    )


def _percent(fraction: float) -> float:
    """A fraction in [0, 1] as a percentage to 0.1 %: what the numbers mean, printed readably by viewers."""
    return round(100.0 * fraction, PERCENT_DECIMALS)


def _point(finding: StructureFinding) -> np.ndarray:
    return np.array([finding.point_px], dtype=np.float64)


def _tracking(result: AnalysisResult, finding: StructureFinding) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(uid=_common.tracking_uid(result, finding), identifier=finding.name)


def _finding_sites(finding: StructureFinding) -> list[hd.sr.FindingSite]:
    return [hd.sr.FindingSite(anatomic_location=codes.STRUCTURE_SITES[finding.name])]


def _region_group(
    result: AnalysisResult, source: Dataset, finding: StructureFinding
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410: where the structure is, what it is, and the label; no NUM (see the module docstring)."""
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POINT,
        graphic_data=_point(finding),
        source_image=hd.sr.SourceImageForRegion.from_source_image(source),
    )
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(result, finding),
        referenced_region=region,
        finding_type=codes.DIAGNOSES[(finding.kind, finding.label)],
        finding_sites=_finding_sites(finding),
        algorithm_id=_algorithm_identification(result),
    )
    group[0].ContentSequence.append(
        hd.sr.TextContentItem(
            name=codes.COMMENT,
            value=finding.text,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    return group


def _measurement_group(
    result: AnalysisResult, source: Dataset, finding: StructureFinding
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501: the numbers, each inferred from the structure's point."""
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
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(result, finding),
        finding_type=codes.DIAGNOSES[(finding.kind, finding.label)],
        finding_sites=_finding_sites(finding),
        algorithm_id=_algorithm_identification(result),
        measurements=measurements,
    )


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

    groups: list[_Group] = []
    for finding in result.findings:
        groups += [_region_group(result, source, finding), _measurement_group(result, source, finding)]
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(result),
        procedure_reported=codes.PROCEDURE_REPORTED,
        imaging_measurements=groups,
        referenced_images=[source],
    )
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
