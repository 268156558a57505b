"""The TID 1500 measurement report: valid, readable by DCMTK and highdicom, saying what the model found."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from results_fixtures import DCIODVFY, DSRDUMP, dciodvfy_errors, dciodvfy_report, make_result, write

from worker.results import OHIF_PROBE_TRACKING_IDENTIFIER, STRUCTURES, AnalysisResult, build_sr, codes

needs_dciodvfy = pytest.mark.skipif(
    DCIODVFY is None, reason="dciodvfy not installed (apt-get install -y dicom3tools)"
)
needs_dsrdump = pytest.mark.skipif(DSRDUMP is None, reason="dsrdump not installed (apt-get install -y dcmtk)")


@pytest.fixture(scope="module")
def result() -> AnalysisResult:
    return make_result()


@pytest.fixture(scope="module", params=["standard", "ohif"])
def sr_file(
    request: pytest.FixtureRequest, result: AnalysisResult, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    sr = build_sr(result, tracking=request.param)
    return write(sr, tmp_path_factory.mktemp("sr") / f"sr_{request.param}.dcm")


@pytest.fixture(scope="module")
def standard(result: AnalysisResult, tmp_path_factory: pytest.TempPathFactory) -> hd.sr.Comprehensive3DSR:
    return _read(write(build_sr(result), tmp_path_factory.mktemp("sr") / "sr.dcm"))


@pytest.fixture(scope="module")
def ohif(result: AnalysisResult, tmp_path_factory: pytest.TempPathFactory) -> hd.sr.Comprehensive3DSR:
    return _read(write(build_sr(result, tracking="ohif"), tmp_path_factory.mktemp("sr") / "sr_ohif.dcm"))


def _read(path: Path) -> hd.sr.Comprehensive3DSR:
    sr = hd.sr.srread(path)
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    return sr


def _report(sr: hd.sr.Comprehensive3DSR) -> hd.sr.MeasurementReport:
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    return report


def _finding_code(group: hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations) -> tuple[str, str, str]:
    """The group's "Finding" (DCM 121071) code: the diagnosis."""
    finding = group.finding_type
    assert finding is not None
    return (finding.value, finding.scheme_designator, finding.meaning)


def _items(dataset: Dataset) -> Iterator[Dataset]:
    """Every content item below `dataset`, depth first."""
    for item in dataset.get("ContentSequence", []):
        yield item
        yield from _items(item)


def _named(dataset: Dataset, code_value: str) -> list[Dataset]:
    return [
        item
        for item in _items(dataset)
        if "ConceptNameCodeSequence" in item and item.ConceptNameCodeSequence[0].CodeValue == code_value
    ]


@needs_dciodvfy
def test_dciodvfy_reports_no_error(sr_file: Path) -> None:
    assert dciodvfy_errors(sr_file) == [], dciodvfy_report(sr_file)


@needs_dsrdump
def test_dsrdump_reads_the_document(sr_file: Path) -> None:
    completed = subprocess.run(
        [DSRDUMP or "dsrdump", str(sr_file)], capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 0, completed.stderr
    assert "Imaging Measurement Report" in completed.stdout
    assert "L4-L5" in completed.stdout


def test_the_document_is_unverified_preliminary_ai_output(
    standard: hd.sr.Comprehensive3DSR, result: AnalysisResult
) -> None:
    assert standard.VerificationFlag == "UNVERIFIED"
    assert standard.PreliminaryFlag == "PRELIMINARY"
    assert standard.CompletionFlag == "COMPLETE"
    assert standard.SeriesDescription == "CCF-Net SR"
    algorithm = result.algorithm
    (equipment,) = [
        item for item in standard.ContributingEquipmentSequence if item.Manufacturer == algorithm.manufacturer
    ]
    assert equipment.Manufacturer == algorithm.manufacturer
    assert equipment.ManufacturerModelName == algorithm.model_name
    assert list(equipment.SoftwareVersions) == [algorithm.software_version, algorithm.model_version]
    assert equipment.DeviceUID == algorithm.device_uid
    assert equipment.PurposeOfReferenceCodeSequence[0].CodeValue == codes.PROCESSING_EQUIPMENT.value
    observer_uids = [item.UID for item in _named(standard, "121012")]  # Device Observer UID
    assert observer_uids == [algorithm.device_uid]
    schemes = [item.CodingSchemeDesignator for item in standard.CodingSchemeIdentificationSequence]
    assert codes.PRIVATE_SCHEME_DESIGNATOR in schemes


def test_eleven_planar_groups_track_each_level_with_its_point(
    standard: hd.sr.Comprehensive3DSR, result: AnalysisResult
) -> None:
    groups = _report(standard).get_planar_roi_measurement_groups()
    assert [group.tracking_identifier for group in groups] == list(STRUCTURES)
    uids = [str(group.tracking_uid) for group in groups]
    assert len(set(uids)) == 11
    source_uid = result.source_dataset.SOPInstanceUID
    for group, finding in zip(groups, result.findings, strict=True):
        roi = group.roi
        assert isinstance(roi, hd.sr.ImageRegion)
        assert roi.graphic_type == hd.sr.GraphicTypeValues.POINT
        np.testing.assert_allclose(roi.value, [finding.point_px], atol=1e-4)
        assert roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source_uid


def test_groups_carry_site_diagnosis_probability_and_algorithm(
    standard: hd.sr.Comprehensive3DSR, result: AnalysisResult
) -> None:
    groups = _report(standard).get_planar_roi_measurement_groups()
    for group, finding in zip(groups, result.findings, strict=True):
        assert [site.value.value for site in group.finding_sites] == [
            codes.STRUCTURE_SITES[finding.name].value
        ]
        assert group.finding_sites[0].value.scheme_designator == "SCT"
        expected = codes.DIAGNOSES[(finding.kind, finding.label)]
        assert _finding_code(group) == (expected.value, expected.scheme_designator, expected.meaning)
        (probability,) = group.get_measurements(name=codes.PROBABILITY_OF_ABNORMALITY)
        assert probability.value == pytest.approx(finding.probability)
        assert probability.unit.value == codes.UNIT_PROBABILITY.value
        (confidence,) = group.get_measurements(name=codes.LOCALIZATION_CONFIDENCE)
        assert confidence.value == pytest.approx(finding.confidence)
        names = [item.TextValue for item in _named(group[0], "111001")]  # Algorithm Name
        versions = [item.TextValue for item in _named(group[0], "111003")]  # Algorithm Version
        assert names == [result.algorithm.model_name]
        assert versions == [result.algorithm.model_version]


def test_diagnoses_use_snomed_for_normal_and_the_private_scheme_otherwise(
    standard: hd.sr.Comprehensive3DSR,
) -> None:
    groups = {
        group.tracking_identifier: group for group in _report(standard).get_planar_roi_measurement_groups()
    }
    assert _finding_code(groups["L1"]) == ("17621005", "SCT", "Normal")
    assert _finding_code(groups["L4-L5"]) == ("CCF1003", "99CCFNET", "Intervertebral disc protrusion")
    assert _finding_code(groups["L1-L2"]) == ("CCF1005", "99CCFNET", "Schmorl's node")
    assert groups["L1"].finding_sites[0].value.value == "66794005"
    assert groups["L4-L5"].finding_sites[0].value.value == "84020006"


def test_image_library_and_evidence_reference_the_source(
    standard: hd.sr.Comprehensive3DSR, result: AnalysisResult
) -> None:
    source = result.source_dataset
    (library,) = _named(standard, "111028")  # Image Library
    referenced = {
        ref.ReferencedSOPInstanceUID
        for item in _items(library)
        for ref in item.get("ReferencedSOPSequence", [])
    }
    assert referenced == {source.SOPInstanceUID}
    (evidence,) = standard.CurrentRequestedProcedureEvidenceSequence
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    (series,) = evidence.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_ohif_mode_uses_the_probe_tracking_identifier_and_puts_the_level_in_the_label(
    ohif: hd.sr.Comprehensive3DSR, result: AnalysisResult
) -> None:
    groups = _report(ohif).get_image_measurement_groups()
    assert len(groups) == 11
    assert {group.tracking_identifier for group in groups} == {OHIF_PROBE_TRACKING_IDENTIFIER}
    assert len({str(group.tracking_uid) for group in groups}) == 11
    for group, finding in zip(groups, result.findings, strict=True):
        comments = [item.TextValue for item in _named(group[0], codes.COMMENT.value)]
        assert comments == [finding.text]
        assert finding.name in finding.text
        free_text = [
            site
            for site in group.finding_sites
            if site.value.scheme_designator == codes.OHIF_SCHEME_DESIGNATOR
        ]
        assert [site.value.meaning for site in free_text] == [finding.text]
        coded_sites = [
            site.value.value for site in group.finding_sites if site.value.scheme_designator == "SCT"
        ]
        assert coded_sites == [codes.STRUCTURE_SITES[finding.name].value]


def test_ohif_mode_puts_the_point_where_cornerstone_reads_it(
    ohif: hd.sr.Comprehensive3DSR, result: AnalysisResult
) -> None:
    """Cornerstone's reader: the first NUM of the group, its SCOORD child, that SCOORD's image reference."""
    imaging = _named(ohif, "126010")[0]  # Imaging Measurements
    groups = list(imaging.ContentSequence)
    for group, finding in zip(groups, result.findings, strict=True):
        first_num = next(item for item in group.ContentSequence if item.ValueType == "NUM")
        scoord = next(item for item in first_num.ContentSequence if item.ValueType == "SCOORD")
        assert scoord.GraphicType == "POINT"
        np.testing.assert_allclose(scoord.GraphicData, finding.point_px, atol=1e-4)
        image = scoord.ContentSequence[0]
        assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == result.source_dataset.SOPInstanceUID
        finding_item = next(
            item for item in group.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "121071"
        )
        assert (
            finding_item.ConceptCodeSequence[0].CodeValue
            == codes.DIAGNOSES[(finding.kind, finding.label)].value
        )


def test_an_unknown_tracking_mode_or_argument_is_refused(result: AnalysisResult) -> None:
    with pytest.raises(ValueError, match="tracking"):
        build_sr(result, tracking="cornerstone")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="result"):
        build_sr(result.source_dataset)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="series_instance_uid"):
        build_sr(result, series_instance_uid="not-a-uid")


def test_caller_chosen_uids_are_used(result: AnalysisResult, tmp_path: Path) -> None:
    sr = build_sr(result, series_instance_uid="1.2.3.4", sop_instance_uid="1.2.3.4.5")
    read = dcmread(write(sr, tmp_path / "sr.dcm"))
    assert (read.SeriesInstanceUID, read.SOPInstanceUID) == ("1.2.3.4", "1.2.3.4.5")
