"""The fractional probability SEG: valid, one segment per structure, heatmaps resampled onto the slice."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from results_fixtures import DCIODVFY, dciodvfy_errors, dciodvfy_report, make_result, write

from worker.results import STRUCTURES, AnalysisResult, build_segmentation, codes
from worker.results.segmentation import upsample_heatmaps


@pytest.fixture(scope="module")
def result() -> AnalysisResult:
    return make_result()


@pytest.fixture(scope="module")
def seg_file(result: AnalysisResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write(build_segmentation(result), tmp_path_factory.mktemp("seg") / "seg.dcm")


@pytest.fixture(scope="module")
def seg(seg_file: Path) -> hd.seg.Segmentation:
    return hd.seg.segread(seg_file)


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy not installed (apt-get install -y dicom3tools)")
def test_dciodvfy_reports_no_error(seg_file: Path) -> None:
    assert dciodvfy_errors(seg_file) == [], dciodvfy_report(seg_file)


def test_it_is_a_fractional_probability_segmentation_of_eleven_structures(
    seg: hd.seg.Segmentation, result: AnalysisResult
) -> None:
    assert seg.SegmentationType == "FRACTIONAL"
    assert seg.SegmentationFractionalType == "PROBABILITY"
    assert seg.number_of_segments == 11
    assert seg.ContentLabel == "CCFNET_AI"
    assert "unverified" in seg.ContentDescription
    for number, name in enumerate(STRUCTURES, start=1):
        description = seg.get_segment_description(number)
        assert description.segment_label == name
        assert description.segmented_property_type.value == codes.STRUCTURE_SITES[name].value
        assert description.segmented_property_category.value == codes.ANATOMICAL_STRUCTURE.value
        assert description.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        identification = description.algorithm_identification
        assert identification is not None
        assert identification[0].AlgorithmName == result.algorithm.model_name
        assert identification[0].AlgorithmVersion == result.algorithm.model_version


def test_each_probability_map_peaks_at_its_structure(
    seg: hd.seg.Segmentation, result: AnalysisResult
) -> None:
    source_uid = result.source_dataset.SOPInstanceUID
    maps = seg.get_pixels_by_source_instance([source_uid], combine_segments=False, rescale_fractional=True)
    assert maps.shape == (1, 256, 256, 11)
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    for index, finding in enumerate(result.findings):
        row, column = np.unravel_index(np.argmax(maps[0, :, :, index]), maps.shape[1:3])
        # Pixel (row, column) has its centre at (column + 0.5, row + 0.5) in DICOM image coordinates.
        assert abs(column + 0.5 - finding.point_px[0]) <= 4.0, finding.name
        assert abs(row + 0.5 - finding.point_px[1]) <= 4.0, finding.name


def test_upsampling_keeps_pixel_centres_aligned() -> None:
    heatmaps = np.zeros((1, 4, 4), dtype=np.float32)
    heatmaps[0, 1, 2] = 1.0  # the cell whose centre is (2.5, 1.5) in 4x4 -> (20, 12) in 32x32
    up = upsample_heatmaps(heatmaps, 32, 32)[:, :, 0]
    rows, columns = np.nonzero(up == up.max())
    assert (rows.mean() + 0.5, columns.mean() + 0.5) == pytest.approx((12.0, 20.0), abs=0.6)


def test_without_heatmaps_it_is_refused() -> None:
    with pytest.raises(ValueError, match="heatmaps"):
        build_segmentation(make_result(with_heatmaps=False))
