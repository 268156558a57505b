"""Comprehensive 3D SR with a TID 1500 Measurement Report: one measurement group per structure.

Two layouts, chosen by `tracking`:

- "standard": each group is TID 1410 (Planar ROI Measurements and Qualitative Evaluations) with the level as
  its tracking identifier ("L4-L5"), a tracking UID, the point as an Image Region SCOORD POINT on the source
  image, the finding site (SNOMED CT), the diagnosis as the coded "Finding" (DCM 121071), the probability of
  abnormality and the localisation confidence as NUM measurements, and TID 4019 algorithm identification.
- "ohif": what OHIF / Cornerstone3D re-open as editable Probe annotations. OHIF chooses the tool from the
  tracking identifier text, which must be "Cornerstone3DTools@^0.1.0:Probe"; its reader takes the point from a
  NUM item's INFERRED FROM SCOORD (TID 1501 with TID 300 coordinates; cornerstone's own Probe writes exactly
  this) and the annotation label from a Comment (DCM 121106) TEXT item (Cornerstone3D 3.x) or else a
  CORNERSTONEJS "CORNERSTONEFREETEXT" finding site (older OHIF). Since the tracking identifier is taken,
  the level goes into those label items ("L4-L5 protrusion 0.87") and stays in the coded finding site.
"""

from __future__ import annotations

from typing import Final, Literal

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from worker.results import _common, codes
from worker.results.findings import AnalysisResult, StructureFinding

SrTracking = Literal["standard", "ohif"]
SR_TRACKING_MODES: Final[tuple[str, ...]] = ("standard", "ohif")
OHIF_PROBE_TRACKING_IDENTIFIER: Final = "Cornerstone3DTools@^0.1.0:Probe"


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


def _measurements(
    finding: StructureFinding, coordinates: hd.sr.CoordinatesForMeasurement | None
) -> list[hd.sr.Measurement]:
    """Probability of abnormality and localisation confidence (TID 300), maybe inferred from the point."""
    references = [coordinates] if coordinates is not None else None
    return [
        hd.sr.Measurement(
            name=codes.PROBABILITY_OF_ABNORMALITY,
            value=finding.probability,
            unit=codes.UNIT_PROBABILITY,
            referenced_coordinates=references,
        ),
        hd.sr.Measurement(
            name=codes.LOCALIZATION_CONFIDENCE,
            value=finding.confidence,
            unit=codes.UNIT_NONE,
            referenced_coordinates=references,
        ),
    ]


def _point(finding: StructureFinding) -> np.ndarray:
    return np.array([finding.point_px], dtype=np.float64)


def _standard_group(
    result: AnalysisResult, source: Dataset, finding: StructureFinding
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POINT,
        graphic_data=_point(finding),
        source_image=hd.sr.SourceImageForRegion.from_source_image(source),
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=_common.tracking_uid(result, finding), identifier=finding.name
        ),
        referenced_region=region,
        finding_type=codes.DIAGNOSES[(finding.kind, finding.label)],
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.STRUCTURE_SITES[finding.name])],
        algorithm_id=_algorithm_identification(result),
        measurements=_measurements(finding, None),
    )


def _ohif_group(
    result: AnalysisResult, source: Dataset, finding: StructureFinding
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    coordinates = hd.sr.CoordinatesForMeasurement(
        graphic_type=hd.sr.GraphicTypeValues.POINT,
        graphic_data=_point(finding),
        source_image=hd.sr.SourceImageForRegion.from_source_image(source),
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=_common.tracking_uid(result, finding), identifier=OHIF_PROBE_TRACKING_IDENTIFIER
        ),
        finding_type=codes.DIAGNOSES[(finding.kind, finding.label)],
        finding_sites=[
            hd.sr.FindingSite(anatomic_location=codes.STRUCTURE_SITES[finding.name]),
            hd.sr.FindingSite(anatomic_location=codes.ohif_free_text(finding.text)),
        ],
        algorithm_id=_algorithm_identification(result),
        measurements=_measurements(finding, coordinates),
    )
    group[0].ContentSequence.append(
        hd.sr.TextContentItem(
            name=codes.COMMENT,
            value=finding.text,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    return group


def build_sr(
    result: AnalysisResult,
    *,
    tracking: SrTracking = "standard",
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The measurement report (TID 1500) of one analysis, as a new series in the source's study.

    Unverified AI output: VerificationFlag UNVERIFIED, PreliminaryFlag PRELIMINARY, the algorithm in the
    observation context, in each group (TID 4019) and in the Contributing Equipment Sequence.
    """
    if not isinstance(result, AnalysisResult):
        raise TypeError('Argument "result" must have type AnalysisResult.')
    if tracking not in SR_TRACKING_MODES:
        raise ValueError(
            f'Argument "tracking" must be one of {", ".join(SR_TRACKING_MODES)}, got {tracking!r}.'
        )
    series_uid = _common.new_uid(series_instance_uid, "series_instance_uid")
    instance_uid = _common.new_uid(sop_instance_uid, "sop_instance_uid")
    source = _common.working_source(result)

    make_group = _standard_group if tracking == "standard" else _ohif_group
    groups = [make_group(result, source, finding) for finding in result.findings]
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(result),
        procedure_reported=codes.PROCEDURE_REPORTED,
        imaging_measurements=groups,
        referenced_images=[source],
    )
    coding_schemes = [codes.private_scheme()]
    if tracking == "ohif":
        coding_schemes.append(codes.ohif_scheme())
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
        coding_schemes=coding_schemes,
        specific_character_set=_common.character_set(result),
    )
    _common.mark_equipment(sr, result.algorithm)
    return sr
