"""All result objects together: same patient and study, new distinct series, shared tracking, safe text."""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    Comprehensive3DSRStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)
from results_fixtures import DCIODVFY, dciodvfy_errors, dciodvfy_report, make_result, make_source, write

from worker.results import AnalysisResult, build_results

EXPECTED = (
    (Comprehensive3DSRStorage, "SR", 9001, "CCF-Net SR"),
    (GrayscaleSoftcopyPresentationStateStorage, "PR", 9002, "CCF-Net GSPS"),
    # The key image takes the source's modality (MR): viewers play an OT series as cine (OHIF does).
    (SecondaryCaptureImageStorage, "MR", 9003, "CCF-Net Key Image"),
    (SegmentationStorage, "SEG", 9004, "CCF-Net SEG"),
)


@pytest.fixture(scope="module")
def result() -> AnalysisResult:
    return make_result()


@pytest.fixture(scope="module")
def written(result: AnalysisResult, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    objects = build_results(result, include_segmentation=True)
    folder = tmp_path_factory.mktemp("results")
    return [write(ds, folder / f"{index}.dcm") for index, ds in enumerate(objects)]


def test_every_object_writes_and_reads_back_as_its_sop_class(written: list[Path]) -> None:
    read = [dcmread(path) for path in written]
    assert [(ds.SOPClassUID, ds.Modality, ds.SeriesNumber, ds.SeriesDescription) for ds in read] == list(
        EXPECTED
    )


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy not installed (apt-get install -y dicom3tools)")
def test_dciodvfy_reports_no_error_for_any_object(written: list[Path]) -> None:
    for path in written:
        assert dciodvfy_errors(path) == [], dciodvfy_report(path)


def test_patient_and_study_are_the_sources_and_series_are_new(
    written: list[Path], result: AnalysisResult
) -> None:
    source = result.source_dataset
    read = [dcmread(path) for path in written]
    for ds in read:
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.PatientID == source.PatientID
        assert ds.PatientName == source.PatientName
        assert ds.PatientBirthDate == source.PatientBirthDate
        assert ds.AccessionNumber == source.AccessionNumber
        assert ds.StudyDate == source.StudyDate
        assert ds.StudyDescription == source.StudyDescription
    series = [ds.SeriesInstanceUID for ds in read]
    instances = [ds.SOPInstanceUID for ds in read]
    assert len(set(series)) == len(read)
    assert source.SeriesInstanceUID not in series
    assert len(set(instances)) == len(read)
    assert source.SOPInstanceUID not in instances


def test_every_object_names_the_algorithm_in_contributing_equipment(
    written: list[Path], result: AnalysisResult
) -> None:
    algorithm = result.algorithm
    for path in written:
        ds = dcmread(path)
        ours = [
            item for item in ds.ContributingEquipmentSequence if item.get("DeviceUID") == algorithm.device_uid
        ]
        assert len(ours) == 1, path.name
        assert ours[0].ManufacturerModelName == algorithm.model_name
        assert ds.Manufacturer == algorithm.manufacturer
        assert ds.ManufacturerModelName == algorithm.model_name


def test_the_same_structure_has_the_same_tracking_uid_in_sr_gsps_and_seg(written: list[Path]) -> None:
    sr, gsps, _, seg = (dcmread(path) for path in written)
    groups = sr.ContentSequence[-1].ContentSequence
    sr_uids = [item.UID for group in groups for item in group.ContentSequence if item.ValueType == "UIDREF"]
    gsps_uids = [text.TrackingUID for text in gsps.GraphicAnnotationSequence[0].TextObjectSequence]
    seg_uids = [segment.TrackingUID for segment in seg.SegmentSequence]
    assert sr_uids == gsps_uids == seg_uids
    assert len(set(sr_uids)) == 11


def test_series_identity_is_deterministic_and_instances_are_new(result: AnalysisResult) -> None:
    first, second = build_results(result), build_results(result)
    assert [(ds.SeriesNumber, ds.SeriesDescription) for ds in first] == [
        (ds.SeriesNumber, ds.SeriesDescription) for ds in second
    ]
    assert {ds.SOPInstanceUID for ds in first}.isdisjoint(ds.SOPInstanceUID for ds in second)


def test_the_source_dataset_is_not_modified() -> None:
    source = make_source(with_window=False)
    del source.PatientSex
    before = copy.deepcopy(source)
    build_results(make_result(source=source), include_segmentation=True)
    assert source == before
    assert "PatientSex" not in source


def test_bad_arguments_are_refused(result: AnalysisResult) -> None:
    with pytest.raises(TypeError, match="result"):
        build_results(result.source_dataset)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="segmentation_kind"):
        build_results(result, include_segmentation=True, segmentation_kind="label")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="heatmaps"):
        build_results(make_result(with_heatmaps=False), include_segmentation=True, segmentation_kind="fractional")
    with pytest.raises(TypeError, match="result"):
        build_results(result.source_dataset)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("declared", "expected"),
    [(None, "ISO_IR 192"), ("ISO_IR 100", "ISO_IR 100"), ("ISO_IR 192", "ISO_IR 192")],
)
def test_non_ascii_patient_text_survives_in_a_declared_character_set(
    declared: str | None, expected: str, tmp_path: Path
) -> None:
    source = make_source(patient_name="Müller^Jürgen", character_set=declared)
    objects = build_results(make_result(source=source), include_segmentation=True)
    for index, ds in enumerate(objects):
        read = dcmread(write(ds, tmp_path / f"{index}.dcm"))
        assert read.SpecificCharacterSet == expected
        assert str(read.PatientName) == "Müller^Jürgen"


def test_ascii_sources_get_no_character_set(result: AnalysisResult) -> None:
    assert all("SpecificCharacterSet" not in ds for ds in build_results(result))


def test_nothing_about_the_patient_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    source = make_source(patient_name="Secret^Patient")
    source.PatientID = "MRN-998877"
    with caplog.at_level(logging.DEBUG):
        result = make_result(source=source)
        build_results(result, include_segmentation=True)
        logging.getLogger("test").info("%r", result)
    text = caplog.text + repr(result)
    assert "Secret" not in text
    assert "MRN-998877" not in text


def test_source_without_optional_patient_attributes_still_builds(tmp_path: Path) -> None:
    source: Dataset = make_source()
    for keyword in ("PatientBirthDate", "PatientSex", "AccessionNumber", "ReferringPhysicianName", "StudyID"):
        delattr(source, keyword)
    objects = build_results(make_result(source=source))
    for index, ds in enumerate(objects):
        read = dcmread(write(ds, tmp_path / f"{index}.dcm"))
        assert read.PatientBirthDate == ""


def test_non_ascii_text_of_our_own_switches_to_utf8(tmp_path: Path) -> None:
    source = make_source(patient_name="Müller^Jürgen", character_set="ISO_IR 100")
    result = make_result(source=source)
    algorithm = dataclasses.replace(result.algorithm, model_name="CCF-Net Ω")
    result = AnalysisResult(source, result.findings, algorithm, result.heatmaps)
    for index, ds in enumerate(build_results(result, include_segmentation=True)):
        read = dcmread(write(ds, tmp_path / f"{index}.dcm"))
        assert read.SpecificCharacterSet == "ISO_IR 192"
        assert str(read.PatientName) == "Müller^Jürgen"
        assert read.ManufacturerModelName == "CCF-Net Ω"


def test_non_ascii_study_text_in_an_undeclared_source_is_written_as_utf8(tmp_path: Path) -> None:
    source = make_source()
    source.StudyDescription = "MRT Lendenwirbelsäule"
    for index, ds in enumerate(build_results(make_result(source=source))):
        read = dcmread(write(ds, tmp_path / f"{index}.dcm"))
        assert read.SpecificCharacterSet == "ISO_IR 192"
        assert read.StudyDescription == "MRT Lendenwirbelsäule"
