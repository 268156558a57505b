"""The GSPS: a marker and a label per structure on the source slice, valid, marked as unverified AI output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from results_fixtures import DCIODVFY, dciodvfy_errors, dciodvfy_report, make_result, make_source, write

from worker.results import AnalysisResult, build_presentation_state
from worker.results.render import display_window


@pytest.fixture(scope="module")
def result() -> AnalysisResult:
    return make_result()


@pytest.fixture(scope="module")
def gsps_file(result: AnalysisResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write(build_presentation_state(result), tmp_path_factory.mktemp("pr") / "gsps.dcm")


@pytest.fixture(scope="module")
def gsps(gsps_file: Path) -> Dataset:
    return dcmread(gsps_file)


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy not installed (apt-get install -y dicom3tools)")
def test_dciodvfy_reports_no_error(gsps_file: Path) -> None:
    assert dciodvfy_errors(gsps_file) == [], dciodvfy_report(gsps_file)


def test_it_references_the_source_slice(gsps: Dataset, result: AnalysisResult) -> None:
    source = result.source_dataset
    (series,) = gsps.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert series.ReferencedImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    (annotation,) = gsps.GraphicAnnotationSequence
    assert annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_eleven_labels_and_markers_at_the_points(gsps: Dataset, result: AnalysisResult) -> None:
    (annotation,) = gsps.GraphicAnnotationSequence
    texts = annotation.TextObjectSequence
    markers = annotation.GraphicObjectSequence
    assert [text.UnformattedTextValue for text in texts] == [finding.short_text for finding in result.findings]
    assert len(markers) == 11
    for text, marker, finding in zip(texts, markers, result.findings, strict=True):
        np.testing.assert_allclose(text.AnchorPoint, finding.point_px, atol=1e-3)
        assert marker.GraphicType == "CIRCLE"
        assert marker.GraphicAnnotationUnits == "PIXEL"
        np.testing.assert_allclose(marker.GraphicData[:2], finding.point_px, atol=1e-3)
        assert text.TrackingID == marker.TrackingID == finding.name
        left, top = text.BoundingBoxTopLeftHandCorner
        right, bottom = text.BoundingBoxBottomRightHandCorner
        assert 0 <= left < right <= result.source_dataset.Columns
        assert 0 <= top < bottom <= result.source_dataset.Rows
    assert annotation.GraphicLayer == gsps.GraphicLayerSequence[0].GraphicLayer


def test_it_is_marked_as_unverified_ai_output_of_the_algorithm(gsps: Dataset, result: AnalysisResult) -> None:
    assert gsps.ContentLabel == "CCFNET_AI"
    assert "unverified" in gsps.ContentDescription
    assert gsps.SeriesDescription == "CCF-Net GSPS"
    assert gsps.SeriesNumber == 9002
    (equipment,) = [
        item
        for item in gsps.ContributingEquipmentSequence
        if item.Manufacturer == result.algorithm.manufacturer
    ]
    assert equipment.DeviceUID == result.algorithm.device_uid
    assert gsps.Manufacturer == result.algorithm.manufacturer


def test_the_window_is_the_sources_or_computed_when_it_has_none(gsps: Dataset, tmp_path: Path) -> None:
    assert float(gsps.SoftcopyVOILUTSequence[0].WindowCenter) == 700.0
    source = make_source(with_window=False)
    windowless = build_presentation_state(make_result(source=source))
    read = dcmread(write(windowless, tmp_path / "gsps.dcm"))
    center, width = display_window(source)
    voi = read.SoftcopyVOILUTSequence[0]
    assert float(voi.WindowCenter) == pytest.approx(center, rel=1e-4)
    assert float(voi.WindowWidth) == pytest.approx(width, rel=1e-4)
    assert width > 100.0


def test_a_wrong_argument_is_refused(result: AnalysisResult) -> None:
    with pytest.raises(TypeError, match="result"):
        build_presentation_state(result.findings)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sop_instance_uid"):
        build_presentation_state(result, sop_instance_uid="1.02")
