"""The key image: a valid RGB Secondary Capture whose pixels carry the markers and labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage
from results_fixtures import (
    ARTIFACTS,
    DCIODVFY,
    PIXEL_SPACING,
    dciodvfy_errors,
    dciodvfy_report,
    make_result,
    write,
)

from worker.results import AnalysisResult, build_key_image
from worker.results.key_image import key_image_scale
from worker.results.render import render_rgb


@pytest.fixture(scope="module")
def result() -> AnalysisResult:
    return make_result()


@pytest.fixture(scope="module")
def key_image_file(result: AnalysisResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write(build_key_image(result), tmp_path_factory.mktemp("sc") / "key_image.dcm")


@pytest.fixture(scope="module")
def key_image(key_image_file: Path) -> Dataset:
    return dcmread(key_image_file)


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy not installed (apt-get install -y dicom3tools)")
def test_dciodvfy_reports_no_error(key_image_file: Path) -> None:
    assert dciodvfy_errors(key_image_file) == [], dciodvfy_report(key_image_file)


def test_it_is_an_rgb_secondary_capture_with_burned_in_annotation(key_image: Dataset) -> None:
    assert key_image.SOPClassUID == SecondaryCaptureImageStorage
    assert key_image.PhotometricInterpretation == "RGB"
    assert key_image.BurnedInAnnotation == "YES"
    assert key_image.SeriesDescription == "CCF-Net Key Image"
    assert "unverified" in key_image.ImageComments
    assert list(key_image.ImageType)[:2] == ["DERIVED", "SECONDARY"]


def test_geometry_follows_the_enlarged_source(key_image: Dataset, result: AnalysisResult) -> None:
    scale = key_image_scale(result.source_dataset)
    assert scale == 2
    assert (key_image.Rows, key_image.Columns) == (256 * scale, 256 * scale)
    assert [float(v) for v in key_image.PixelSpacing] == [PIXEL_SPACING / scale] * 2
    assert list(key_image.PatientOrientation) == ["P", "F"]
    assert key_image.SourceImageSequence[0].ReferencedSOPInstanceUID == result.source_dataset.SOPInstanceUID


def test_markers_are_burned_in_where_the_points_are(key_image: Dataset, result: AnalysisResult) -> None:
    scale = key_image_scale(result.source_dataset)
    plain = render_rgb(result.source_dataset, scale).astype(np.int32)
    burned = key_image.pixel_array.astype(np.int32)
    assert burned.shape == plain.shape
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    Image.fromarray(key_image.pixel_array).save(ARTIFACTS / "key_image.png")
    changed = np.abs(burned - plain).sum(axis=2) > 0
    for finding in result.findings:
        column, row = (round(v * scale) for v in finding.point_px)
        window = changed[row - 10 : row + 11, column - 10 : column + 11]
        assert window.sum() > 10, f"no marker burned in at {finding.name}"
    # Far from every point and label (bottom-left corner) the rendering is untouched.
    assert not changed[-60:, :60].any()


def test_the_banner_warns_when_the_model_is_phantom_only(result: AnalysisResult) -> None:
    ordinary = build_key_image(result).pixel_array
    phantom = build_key_image(make_result(phantom_only=True))
    assert phantom.ContentQualification == "RESEARCH"
    assert "not for clinical use" in phantom.ImageComments
    banner = slice(20, 45)
    assert not np.array_equal(ordinary[banner, :300], phantom.pixel_array[banner, :300])
