"""The TID 1500 measurement report: valid for dciodvfy, PixelMed and DCMTK, readable by highdicom, laid out so
OHIF shows each level's label and re-opens it as a tracked, labelled measurement, and saying what the model
found."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from results_fixtures import (
    DCIODVFY,
    DSRDUMP,
    LEVEL_WARNING,
    dciodvfy_errors,
    dciodvfy_report,
    make_result,
    write,
)

from worker.results import STRUCTURES, AnalysisResult, build_sr, codes

DSR2HTML: Final = shutil.which("dsr2html")
JAVA: Final = shutil.which("java")
# PixelMed (apt package libpixelmed-java) and the jars its validator loads.
PIXELMED_JARS: Final = tuple(
    Path("/usr/share/java") / name
    for name in ("pixelmed.jar", "commons-codec.jar", "javax.json-api.jar", "javax.json.jar", "slf4j-api.jar",
                 "jaxb-api.jar", "vecmath.jar")
)
HAS_PIXELMED: Final = JAVA is not None and all(jar.is_file() for jar in PIXELMED_JARS)

needs_dciodvfy = pytest.mark.skipif(
    DCIODVFY is None, reason="dciodvfy not installed (apt-get install -y dicom3tools)"
)
needs_dsrdump = pytest.mark.skipif(DSRDUMP is None, reason="dsrdump not installed (apt-get install -y dcmtk)")
needs_dsr2html = pytest.mark.skipif(DSR2HTML is None, reason="dsr2html not installed (apt-get install -y dcmtk)")
needs_pixelmed = pytest.mark.skipif(
    not HAS_PIXELMED, reason="PixelMed not installed (apt-get install -y libpixelmed-java)"
)
# Codes and UCUM syntax that must never reach a reader's screen.
RAW_CODE: Final = re.compile(r"\{|\b\d{6,}\b|CCF\d{4}|UCUM")


@pytest.fixture(scope="module")
def result() -> AnalysisResult:
    """With a level warning, so every validator sees the report-level Qualitative Evaluations container too."""
    return make_result(level_warning=LEVEL_WARNING)


@pytest.fixture(scope="module")
def sr_file(result: AnalysisResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write(build_sr(result), tmp_path_factory.mktemp("sr") / "sr.dcm")


@pytest.fixture(scope="module")
def standard(sr_file: Path) -> hd.sr.Comprehensive3DSR:
    return _read(sr_file)


def _read(path: Path) -> hd.sr.Comprehensive3DSR:
    sr = hd.sr.srread(path)
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    return sr


def _report(sr: hd.sr.Comprehensive3DSR) -> hd.sr.MeasurementReport:
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    return report


def _finding_code(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> tuple[str, str, str]:
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


@needs_pixelmed
@pytest.mark.slow
def test_pixelmed_validates_the_templates_without_error(sr_file: Path) -> None:
    """PixelMed's DicomSRValidator checks the IOD and the TID 1500 template tree; warnings are allowed
    (its 2022 templates lack TID 4019's Algorithm Manufacturer and a Comment in a measurement group), errors are not."""
    limits = [f"-Djdk.xml.{name}=0" for name in ("xpathExprOpLimit", "xpathExprGrpLimit", "xpathTotalOpLimit")]
    classpath = ":".join(str(jar) for jar in PIXELMED_JARS)
    completed = subprocess.run(
        [JAVA or "java", *limits, "-cp", classpath, "com.pixelmed.validate.DicomSRValidator", str(sr_file)],
        capture_output=True, text=True, timeout=300,
    )
    report = completed.stdout + completed.stderr
    assert completed.returncode == 0, report
    assert "Found Root Template TID_1500 (MeasurementReport)" in report, report
    assert "Root Template Validation Complete" in report and "IOD validation complete" in report, report
    errors = [line for line in report.splitlines() if line.lower().startswith("error")]
    assert errors == [], report


def _html_lines(path: Path) -> list[str]:
    """The lines a person reads in DCMTK's HTML rendering of the document."""
    assert DSR2HTML is not None
    completed = subprocess.run([DSR2HTML, str(path)], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    text = re.sub(r"<br\s*/?>|</(p|li|tr|td|h\d|div)>", "\n", completed.stdout)
    text = html.unescape(re.sub(r"<[^>]+>", "", text))
    return [line.strip() for line in text.splitlines() if line.strip()]


@needs_dsr2html
def test_dsr2html_renders_each_finding_as_one_readable_line(sr_file: Path, result: AnalysisResult) -> None:
    lines = _html_lines(sr_file)
    for finding in result.findings:
        assert lines.count(finding.text) == 1, finding.text  # e.g. "L4-L5 disc: protrusion, 87 %"
    # Our numbers in plain percent (the Image Library's geometry keeps highdicom's UCUM, e.g. "{pixels}").
    assert not [line for line in lines if "{probability}" in line or re.fullmatch(r"[\d.]+ 1", line)]
    assert "87.0 %" in lines  # the probability of abnormality of L4-L5, in percent


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


def test_each_level_has_one_measurement_group_tracked_by_an_identifier_ohif_opens_as_an_arrow(
    standard: hd.sr.Comprehensive3DSR, result: AnalysisResult
) -> None:
    report = _report(standard)
    assert report.get_planar_roi_measurement_groups() == []
    groups = report.get_image_measurement_groups()
    assert [group.tracking_identifier for group in groups] == [
        f"Cornerstone3DTools@^0.1.0:ArrowAnnotate:{name}" for name in STRUCTURES
    ]
    assert len({str(group.tracking_uid) for group in groups}) == 11


def test_groups_carry_site_diagnosis_label_probability_and_algorithm(
    standard: hd.sr.Comprehensive3DSR, result: AnalysisResult
) -> None:
    source_uid = result.source_dataset.SOPInstanceUID
    for group, finding in zip(_report(standard).get_image_measurement_groups(), result.findings, strict=True):
        expected = codes.DIAGNOSES[(finding.kind, finding.label)]
        assert [site.value.value for site in group.finding_sites] == [codes.STRUCTURE_SITES[finding.name].value]
        assert group.finding_sites[0].value.scheme_designator == "SCT"
        assert _finding_code(group) == (expected.value, expected.scheme_designator, expected.meaning)
        names = [item.TextValue for item in _named(group[0], "111001")]  # Algorithm Name
        versions = [item.TextValue for item in _named(group[0], "111003")]  # Algorithm Version
        assert names == [result.algorithm.model_name]
        assert versions == [result.algorithm.model_version]
        comments = [item for item in group[0].ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "121106"]
        assert [item.TextValue for item in comments] == [finding.text]
        (probability,) = group.get_measurements(name=codes.PROBABILITY_OF_ABNORMALITY)
        assert probability.value == pytest.approx(100 * finding.probability, abs=0.05)
        assert probability.unit.value == "%" and probability.unit.scheme_designator == "UCUM"
        (confidence,) = group.get_measurements(name=codes.LOCALIZATION_CONFIDENCE)
        assert confidence.value == pytest.approx(100 * finding.confidence, abs=0.05)
        assert confidence.unit.value == "%"
        for measurement in (probability, confidence):
            (scoord,) = [item for item in measurement[0].ContentSequence if item.ValueType == "SCOORD"]
            assert scoord.RelationshipType == "INFERRED FROM" and scoord.GraphicType == "POINT"
            np.testing.assert_allclose(scoord.GraphicData, finding.point_px, atol=1e-4)
            assert scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source_uid


def _ohif_tracked_reading(group: Dataset) -> tuple[str, list[float], str] | None:
    """What OHIF 3.13 (Cornerstone3D adapters 5.6) tracks from a measurement group: the tool from the tracking
    identifier's prefix (ArrowAnnotate here), else from a top-level SCOORD POINT (a Probe); the point from the
    first NUM's SCOORD if the group has a NUM, else from the top-level SCOORD; the label from the Comment."""
    content = list(group.ContentSequence)
    (identifier,) = [item.TextValue for item in content if item.ConceptNameCodeSequence[0].CodeValue == "112039"]
    graphics = [item for item in content if item.ValueType in ("SCOORD", "SCOORD3D")]
    if identifier.startswith("Cornerstone3DTools@^0.1.0:ArrowAnnotate"):
        tool = "ArrowAnnotate"
    elif graphics and graphics[0].GraphicType == "POINT" and len(graphics[0].GraphicData) == 2:
        tool = "Probe"
    else:
        return None  # no adapter accepts it; OHIF skips the group
    nums = [item for item in content if item.ValueType == "NUM"]
    if nums:
        graphics = [item for item in nums[0].get("ContentSequence", []) if item.ValueType == "SCOORD"]
    if not graphics:
        raise AssertionError("OHIF: 'No spatial coordinates group found.'")
    comments = [item.TextValue for item in content if item.ConceptNameCodeSequence[0].CodeValue == "121106"]
    return tool, [float(value) for value in graphics[0].GraphicData], (comments[0] if comments else "")


def test_ohif_tracks_one_labelled_arrow_per_level_where_the_sr_puts_it(
    standard: hd.sr.Comprehensive3DSR, result: AnalysisResult
) -> None:
    (imaging,) = _named(standard, "126010")  # Imaging Measurements
    readings = [reading for group in imaging.ContentSequence if (reading := _ohif_tracked_reading(group)) is not None]
    assert len(readings) == 11
    for (tool, point, label), finding in zip(readings, result.findings, strict=True):
        assert tool == "ArrowAnnotate"  # draws its label; a Probe draws the pixel value instead
        np.testing.assert_allclose(point, finding.point_px, atol=1e-4)
        assert label == finding.text and finding.name in label and finding.diagnosis in label
        assert RAW_CODE.search(label) is None


def _ohif_sr_view_lines(group: Dataset) -> list[str]:
    """The text OHIF 3.13's SR view (DICOMSRDisplayTool, before tracking) prints beside a group's point: with a
    top-level SCOORD, each NUM and "363698007: <finding site>"; without one, each Comment followed by ": ", then
    each NUM, "<name>: <value to 2 decimals> <unit code>"; 5 lines at most."""
    content = list(group.ContentSequence)
    lines = []
    top_level_scoord = any(item.ValueType in ("SCOORD", "SCOORD3D") for item in content)
    if not top_level_scoord:
        lines += [f"{item.TextValue}: " for item in content if item.ConceptNameCodeSequence[0].CodeValue == "121106"]
    for item in content:
        if item.ValueType == "NUM":
            value = item.MeasuredValueSequence[0]
            unit = value.MeasurementUnitsCodeSequence[0].CodeValue
            lines.append(f"{item.ConceptNameCodeSequence[0].CodeMeaning}: {float(value.NumericValue):.2f} {unit}")
    if top_level_scoord:
        lines += [f"363698007: {item.ConceptCodeSequence[0].CodeMeaning}" for item in content
                  if item.ConceptNameCodeSequence[0].CodeValue == "363698007"]
    return lines[:5]


def test_ohifs_sr_view_prints_the_label_and_the_numbers_without_codes(
    standard: hd.sr.Comprehensive3DSR, result: AnalysisResult
) -> None:
    (imaging,) = _named(standard, "126010")  # Imaging Measurements
    for group, finding in zip(imaging.ContentSequence, result.findings, strict=True):
        assert _ohif_sr_view_lines(group) == [
            f"{finding.text}: ",
            f"Probability of abnormality: {100 * finding.probability:.2f} %",
            f"Localization confidence: {100 * finding.confidence:.2f} %",
        ]


def test_diagnoses_use_snomed_for_normal_and_the_private_scheme_otherwise(
    standard: hd.sr.Comprehensive3DSR,
) -> None:
    report = _report(standard)
    groups = {group.tracking_identifier.rsplit(":", 1)[-1]: group for group in report.get_image_measurement_groups()}
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


def test_a_bad_argument_is_refused(result: AnalysisResult) -> None:
    with pytest.raises(TypeError, match="result"):
        build_sr(result.source_dataset)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="series_instance_uid"):
        build_sr(result, series_instance_uid="not-a-uid")


def test_caller_chosen_uids_are_used(result: AnalysisResult, tmp_path: Path) -> None:
    sr = build_sr(result, series_instance_uid="1.2.3.4", sop_instance_uid="1.2.3.4.5")
    read = dcmread(write(sr, tmp_path / "sr.dcm"))
    assert (read.SeriesInstanceUID, read.SOPInstanceUID) == ("1.2.3.4", "1.2.3.4.5")


def test_a_doubted_level_count_is_said_in_words_in_the_report(standard: hd.sr.Comprehensive3DSR) -> None:
    (container,) = _named(standard, codes.QUALITATIVE_EVALUATIONS.value)
    assert container.ValueType == "CONTAINER" and container.RelationshipType == "CONTAINS"
    (check,) = container.ContentSequence
    assert check.ConceptNameCodeSequence[0].CodeValue == codes.LEVEL_COUNT_CHECK.value
    assert check.TextValue == LEVEL_WARNING


def test_without_a_doubt_there_is_no_level_check_item(tmp_path: Path) -> None:
    plain = dcmread(write(build_sr(make_result()), tmp_path / "sr.dcm"))
    assert _named(plain, codes.QUALITATIVE_EVALUATIONS.value) == []
    assert _named(plain, codes.LEVEL_COUNT_CHECK.value) == []


def test_a_disc_without_a_supported_grade_is_coded_abnormal(standard: hd.sr.Comprehensive3DSR) -> None:
    labels = [item.TextValue for item in _named(standard, codes.COMMENT.value)]
    assert "L3-L4 disc: abnormal, 66 %" in labels
    findings = [item.ConceptCodeSequence[0] for item in _named(standard, "121071")]
    assert ("263654008", "SCT") in {(code.CodeValue, code.CodingSchemeDesignator) for code in findings}
