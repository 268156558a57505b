"""The SEG: BINARY regions around the found points by default, FRACTIONAL heatmaps on request; both valid,
one segment per structure, labelled with the level and coded with the structure's anatomy."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from results_fixtures import DCIODVFY, PIXEL_SPACING, dciodvfy_errors, dciodvfy_report, make_result, write

from worker.results import STRUCTURES, AnalysisResult, build_segmentation, codes
from worker.results.segmentation import REGION_RADIUS_MM, region_masks, upsample_heatmaps


@pytest.fixture(scope="module")
def result() -> AnalysisResult:
    return make_result()


@pytest.fixture(scope="module", params=["binary", "fractional"])
def seg_file(request: pytest.FixtureRequest, result: AnalysisResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write(build_segmentation(result, kind=request.param), tmp_path_factory.mktemp("seg") / "seg.dcm")


@pytest.fixture(scope="module")
def seg(seg_file: Path) -> hd.seg.Segmentation:
    return hd.seg.segread(seg_file)


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy not installed (apt-get install -y dicom3tools)")
def test_dciodvfy_reports_no_error(seg_file: Path) -> None:
    assert dciodvfy_errors(seg_file) == [], dciodvfy_report(seg_file)


def test_eleven_segments_named_by_level_and_coded_by_anatomy(seg: hd.seg.Segmentation, result: AnalysisResult) -> None:
    assert seg.number_of_segments == 11
    assert seg.ContentLabel == "CCFNET_AI"
    assert "unverified" in seg.ContentDescription
    for number, (name, finding) in enumerate(zip(STRUCTURES, result.findings, strict=True), start=1):
        description = seg.get_segment_description(number)
        assert description.segment_label == f"{name} {finding.kind}"  # "L4-L5 disc", "L3 vertebra"
        assert description.tracking_id == name
        assert description.segmented_property_type.value == codes.STRUCTURE_SITES[name].value
        assert description.segmented_property_category.value == codes.ANATOMICAL_STRUCTURE.value
        assert description.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        identification = description.algorithm_identification
        assert identification is not None
        assert identification[0].AlgorithmName == result.algorithm.model_name
        assert identification[0].AlgorithmVersion == result.algorithm.model_version


def test_binary_is_the_default_and_each_region_surrounds_its_point_alone(result: AnalysisResult) -> None:
    seg = build_segmentation(result)
    assert seg.SegmentationType == "BINARY"
    assert "SegmentationFractionalType" not in seg
    masks = seg.get_pixels_by_source_instance(
        [result.source_dataset.SOPInstanceUID], combine_segments=False
    )[0].astype(bool)
    assert masks.shape == (256, 256, 11)
    assert masks.sum(axis=-1).max() == 1  # no pixel belongs to two levels
    for index, finding in enumerate(result.findings):
        rows, columns = np.nonzero(masks[:, :, index])
        assert rows.size > 0, finding.name
        column, row = finding.point_px
        assert masks[int(row), int(column), index], finding.name  # the pixel under the point
        radius_px = np.hypot(columns + 0.5 - column, rows + 0.5 - row).max()
        assert radius_px <= REGION_RADIUS_MM / PIXEL_SPACING + 1e-6, finding.name


def test_a_region_shrinks_between_close_points_and_keeps_the_pixel_under_its_point() -> None:
    result = make_result()
    masks = region_masks(result)
    full_radius_px = REGION_RADIUS_MM / PIXEL_SPACING
    areas = masks.sum(axis=(0, 1))
    assert areas.max() <= np.pi * (full_radius_px + 1) ** 2
    assert (areas > 0).all()


def test_fractional_probability_maps_peak_at_their_structures(result: AnalysisResult) -> None:
    seg = build_segmentation(result, kind="fractional")
    assert seg.SegmentationType == "FRACTIONAL"
    assert seg.SegmentationFractionalType == "PROBABILITY"
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


def test_fractional_without_heatmaps_is_refused_and_binary_needs_none() -> None:
    without = make_result(with_heatmaps=False)
    with pytest.raises(ValueError, match="heatmaps"):
        build_segmentation(without, kind="fractional")
    assert build_segmentation(without).number_of_segments == 11
    with pytest.raises(ValueError, match="kind"):
        build_segmentation(without, kind="label")  # type: ignore[arg-type]
