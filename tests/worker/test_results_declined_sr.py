"""The "not analysed" SR of a declined study: valid (dciodvfy), in its own series of the source's study, saying
'not analysed: <reason>', naming the algorithm and marked unverified AI output."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from results_fixtures import DCIODVFY, dciodvfy_errors, dciodvfy_report, make_algorithm, make_source, write

from worker.provenance import RESULT_KINDS, own_output
from worker.results.declined_sr import DECLINED_SR_SERIES, DeclinedStudy, build_declined_sr

REASON = "the 11 points do not run head to foot in the spine's order (order score 0.27, needs at least 0.7)"


def _header() -> pydicom.Dataset:
    """The looked-at slice as the gate has it when headers decline a study: no pixels."""
    source = make_source()
    del source.PixelData
    return source


def _texts(items: pydicom.Sequence) -> dict[str, str]:
    found: dict[str, str] = {}
    for item in items:
        if item.ValueType == "TEXT":
            found[item.ConceptNameCodeSequence[0].CodeMeaning] = str(item.TextValue)
        found.update(_texts(item.get("ContentSequence", [])))
    return found


@pytest.fixture
def written(tmp_path: Path) -> tuple[pydicom.Dataset, Path]:
    source = _header()
    return source, write(build_declined_sr(DeclinedStudy(source, make_algorithm(), REASON)), tmp_path / "sr.dcm")


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy not installed (apt-get install -y dicom3tools)")
def test_dciodvfy_reports_no_error(written: tuple[pydicom.Dataset, Path]) -> None:
    _, path = written
    assert dciodvfy_errors(path) == [], dciodvfy_report(path)


def test_it_says_not_analysed_with_the_reason_in_its_own_series(written: tuple[pydicom.Dataset, Path]) -> None:
    source, path = written
    sr = pydicom.dcmread(path)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR
    assert _texts(sr.ContentSequence)["Impression"] == f"not analysed: {REASON}"
    assert sr.ConceptNameCodeSequence[0].CodeValue == "18748-4"
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "2000"
    assert (sr.StudyInstanceUID, sr.PatientID, sr.PatientName) == (
        source.StudyInstanceUID, source.PatientID, source.PatientName
    )
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert (sr.SeriesNumber, sr.SeriesDescription) == (DECLINED_SR_SERIES.number, DECLINED_SR_SERIES.description)
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_it_names_the_algorithm_and_is_unverified(written: tuple[pydicom.Dataset, Path]) -> None:
    _, path = written
    sr = pydicom.dcmread(path)
    algorithm = make_algorithm()
    assert (sr.VerificationFlag, sr.PreliminaryFlag, sr.CompletionFlag) == ("UNVERIFIED", "PRELIMINARY", "COMPLETE")
    (equipment,) = [item for item in sr.ContributingEquipmentSequence if "DeviceUID" in item]
    assert (equipment.DeviceUID, equipment.ManufacturerModelName) == (algorithm.device_uid, algorithm.model_name)
    assert list(sr.SoftwareVersions) == [algorithm.software_version, algorithm.model_version]
    assert "AI result, unverified" in _texts(sr.ContentSequence)["Comment"]
    assert "ContentQualification" not in sr


def test_it_carries_our_signature_so_it_never_becomes_a_job_when_sent_back(
    written: tuple[pydicom.Dataset, Path],
) -> None:
    _, path = written
    sr = pydicom.dcmread(path)
    found = own_output(sr)
    assert found is not None and found.device_uid == make_algorithm().device_uid
    assert RESULT_KINDS[str(sr.SOPClassUID)] == "declined"


def test_a_phantom_model_marks_it_research_content() -> None:
    sr = build_declined_sr(DeclinedStudy(_header(), make_algorithm(phantom_only=True), REASON))
    assert sr.ContentQualification == "RESEARCH"
    assert "not for clinical use" in _texts(sr.ContentSequence)["Comment"]


def test_bad_input_is_refused_naming_what_is_wrong() -> None:
    source = _header()
    del source.StudyInstanceUID
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        DeclinedStudy(source, make_algorithm(), REASON)
    with pytest.raises(ValueError, match="reason"):
        DeclinedStudy(_header(), make_algorithm(), "  ")
    with pytest.raises(TypeError, match="algorithm"):
        DeclinedStudy(_header(), "CCF-Net", REASON)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="declined"):
        build_declined_sr(REASON)  # type: ignore[arg-type]
    assert "Doe" not in repr(DeclinedStudy(_header(), make_algorithm(), REASON))
