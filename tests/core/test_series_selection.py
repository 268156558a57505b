"""Choosing CCF-Net's input from a study: plane, sequence, brightness, slice order, and the slices' pixels."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from ccfnet_core.series_selection import (
    NoEligibleSeries,
    SeriesSummary,
    choose_slice,
    load_input_slices,
    neighbour_indices,
    ordered_slices,
    plane_of,
    sequence_of,
    summarise_series,
)

SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def mr_slice(
    series_uid: str,
    description: str,
    iop: Sequence[float] | None,
    x: float,
    pixels: np.ndarray | None,
    instance_number: int = 1,
    photometric: str = "MONOCHROME2",
    rows: int = 8,
    columns: int = 6,
) -> Dataset:
    """A minimal single-frame MR image; x is the ImagePositionPatient x (sagittal slice position)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.2.1125.1"
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "MR"
    ds.SeriesDescription = description
    ds.InstanceNumber = instance_number
    if iop is not None:
        ds.ImageOrientationPatient = list(iop)
    ds.ImagePositionPatient = [x, -100.0, 100.0]
    ds.PixelSpacing = [0.5, 0.625]
    ds.Rows, ds.Columns = pixels.shape if pixels is not None else (rows, columns)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if pixels is not None:
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    return ds


def sagittal_series(
    description: str, level: int, n: int = 5, with_pixels: bool = True, shuffle_seed: int | None = 0
) -> tuple[str, list[Dataset]]:
    """n sagittal slices 10 mm apart centred on x = 0; pixel value = level + index along x.

    InstanceNumbers run opposite to x and the list is shuffled, so only sorting by position gives the order.
    """
    uid = generate_uid()
    slices = []
    for i in range(n):
        x = 10.0 * (i - n // 2)
        pixels = np.full((8, 6), level + i, dtype=np.uint16)
        pixels[0, 0] = 0  # a dark corner so the min-max rescale is not degenerate
        slices.append(
            mr_slice(uid, description, SAGITTAL, x, pixels if with_pixels else None, instance_number=n - i)
        )
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(slices)
    return uid, slices


def x_of(ds: Dataset) -> float:
    return float(ds.ImagePositionPatient[0])


def test_plane_of_reads_the_normal() -> None:
    assert plane_of(SAGITTAL) == "sagittal"
    assert plane_of(CORONAL) == "coronal"
    assert plane_of(AXIAL) == "axial"
    c = float(np.cos(np.pi / 4))
    assert plane_of((0.0, c, c, 0.0, c, -c)) == "sagittal"  # in-plane rotation keeps the normal on x
    assert plane_of((c, c, 0.0, 0.0, 0.0, -1.0)) == "oblique"  # normal halfway between x and y
    with pytest.raises(ValueError, match="6 values"):
        plane_of((1.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="parallel"):
        plane_of((1.0, 0.0, 0.0, 1.0, 0.0, 0.0))


def test_sequence_of_is_case_insensitive_and_prefers_t1() -> None:
    assert sequence_of("t2_tse_sag_384") == "T2"
    assert sequence_of("T1 FLAIR SAG") == "T1"
    assert sequence_of("STIR sag") == "other"
    assert sequence_of("") == "other"


def test_brightest_sagittal_t2_wins_over_fat_sat_t1_and_axial() -> None:
    bright_uid, bright = sagittal_series("T2_TSE_SAG", level=1000)
    fs_uid, fat_sat = sagittal_series("T2_TSE_SAG_FS", level=300)
    t1_uid, t1 = sagittal_series("T1_TSE_SAG", level=3000)  # brighter still, but T1
    axial_uid = generate_uid()
    axial = [mr_slice(axial_uid, "T2_TSE_TRA", AXIAL, 0.0, np.full((8, 6), 4000)) for _ in range(3)]
    study: dict[str, list[Dataset]] = {fs_uid: fat_sat, t1_uid: t1, axial_uid: axial, bright_uid: bright}

    choice = choose_slice(study)

    assert choice.series_uid == bright_uid
    by_uid = {ds.SOPInstanceUID: ds for ds in bright}
    assert [x_of(by_uid[u]) for u in choice.sop_instance_uids] == [-10.0, 0.0, 10.0]
    assert x_of(by_uid[choice.centre_sop_instance_uid]) == 0.0
    assert choice.centre_index == 2 and choice.n_slices == 5
    assert choice.frame_numbers == (None, None, None)
    assert "sagittal T2" in choice.reason
    summaries = {s.series_uid: s for s in choice.summaries}
    assert set(summaries) == set(study)
    assert summaries[axial_uid].plane == "axial"
    assert summaries[t1_uid].sequence == "T1"
    assert summaries[fs_uid].mean_intensity is not None
    assert summaries[bright_uid].mean_intensity > summaries[fs_uid].mean_intensity  # type: ignore[operator]
    assert summaries[t1_uid].mean_intensity is None  # not a candidate: no pixels read for it


def test_centre_is_found_by_position_whatever_the_file_order() -> None:
    uid, slices = sagittal_series("T2", level=500, n=7, shuffle_seed=None)
    centres = set()
    for seed in range(5):
        shuffled = list(slices)
        random.Random(seed).shuffle(shuffled)
        choice = choose_slice({uid: shuffled})
        by_uid = {ds.SOPInstanceUID: ds for ds in shuffled}
        centres.add(choice.centre_sop_instance_uid)
        assert [x_of(by_uid[u]) for u in choice.sop_instance_uids] == [-10.0, 0.0, 10.0]
    assert len(centres) == 1


def test_ordered_slices_sorts_by_x_not_instance_number() -> None:
    _, slices = sagittal_series("T2", level=500, n=4)
    ordered = ordered_slices(slices)
    assert [x_of(ds) for ds, _ in ordered] == [-20.0, -10.0, 0.0, 10.0]
    assert [frame for _, frame in ordered] == [None] * 4


def test_falls_back_to_brightest_sagittal_without_t2() -> None:
    dim_uid, dim = sagittal_series("T1_SAG", level=200)
    bright_uid, bright = sagittal_series("PD_SAG", level=900)
    choice = choose_slice({dim_uid: dim, bright_uid: bright})
    assert choice.series_uid == bright_uid
    assert "no sagittal T2" in choice.reason


def test_brightness_comes_from_the_callback_for_headers() -> None:
    a_uid, a = sagittal_series("T2 A", level=0, with_pixels=False)
    b_uid, b = sagittal_series("T2 B", level=0, with_pixels=False)
    brightness = {a_uid: 10.0, b_uid: 20.0}
    calls: list[str] = []

    def mean(datasets: Sequence[Dataset]) -> float:
        calls.append(datasets[0].SeriesInstanceUID)
        return brightness[datasets[0].SeriesInstanceUID]

    assert choose_slice({a_uid: a, b_uid: b}, mean_intensity=mean).series_uid == b_uid
    assert sorted(calls) == sorted([a_uid, b_uid])
    brightness[a_uid] = 30.0
    assert choose_slice({a_uid: a, b_uid: b}, mean_intensity=mean).series_uid == a_uid


def test_no_sagittal_series_names_what_was_found() -> None:
    axial_uid, coronal_uid = generate_uid(), generate_uid()
    study: dict[str, list[Dataset]] = {
        axial_uid: [mr_slice(axial_uid, "T2_TRA", AXIAL, 0.0, None, i) for i in range(20)],
        coronal_uid: [mr_slice(coronal_uid, "T1_COR", CORONAL, 0.0, None, i) for i in range(15)],
    }
    with pytest.raises(NoEligibleSeries) as caught:
        choose_slice(study)
    reason = caught.value.reason
    assert "no sagittal series among 2 series" in reason
    assert "axial T2 x 20" in reason and "coronal T1 x 15" in reason
    assert str(caught.value) == reason


def test_only_non_image_instances_are_refused() -> None:
    sr = Dataset()
    sr.SOPInstanceUID, sr.SeriesInstanceUID, sr.Modality = generate_uid(), generate_uid(), "SR"
    with pytest.raises(NoEligibleSeries, match="non-image instances \\(SR x 1\\)"):
        choose_slice({sr.SeriesInstanceUID: [sr]})
    with pytest.raises(NoEligibleSeries, match="no series"):
        choose_slice({})


def test_missing_orientation_everywhere_is_refused() -> None:
    uid = generate_uid()
    slices = [mr_slice(uid, "T2_SAG", None, float(i), None, i) for i in range(3)]
    with pytest.raises(NoEligibleSeries, match="ImageOrientationPatient"):
        choose_slice({uid: slices})
    summary = summarise_series(slices)
    assert summary.plane == "unknown" and summary.n_slices == 3


def test_single_slice_series_repeats_its_edges() -> None:
    uid, slices = sagittal_series("T2_SAG", level=700, n=1)
    choice = choose_slice({uid: slices})
    assert choice.sop_instance_uids == (slices[0].SOPInstanceUID,) * 3
    assert choice.centre_index == 0 and choice.n_slices == 1
    image, _ = load_input_slices(slices * 3)
    assert image.shape == (3, 8, 6)
    np.testing.assert_array_equal(image[0], image[1])
    np.testing.assert_array_equal(image[2], image[1])


def test_neighbour_indices_clamp_at_the_edges() -> None:
    assert neighbour_indices(5, 0) == (0, 0, 1)
    assert neighbour_indices(5, 4) == (3, 4, 4)
    assert neighbour_indices(1, 0) == (0, 0, 0)
    with pytest.raises(ValueError):
        neighbour_indices(3, 3)


def test_summarise_series_applies_rescale_to_brightness() -> None:
    uid = generate_uid()
    ds = mr_slice(uid, "T2 SAG", SAGITTAL, 0.0, np.array([[0, 10], [20, 30]]))
    ds.RescaleSlope, ds.RescaleIntercept = 2.0, 5.0
    summary = summarise_series([ds])
    assert summary == SeriesSummary(uid, "T2 SAG", "sagittal", "T2", 1, 2.0 * 15.0 + 5.0)


def test_monochrome1_counts_as_bright_when_stored_values_are_low() -> None:
    mono2_uid, mono2 = sagittal_series("T2 A", level=1000)
    mono1_uid, mono1 = sagittal_series("T2 B", level=100)  # displayed as 4095 - 100: brighter
    for ds in mono1:
        ds.PhotometricInterpretation = "MONOCHROME1"
    assert choose_slice({mono2_uid: mono2, mono1_uid: mono1}).series_uid == mono1_uid


def test_load_input_slices_rescales_inverts_and_reports_spacing() -> None:
    uid = generate_uid()
    ramp = np.arange(48, dtype=np.uint16).reshape(8, 6) * 10
    plain = mr_slice(uid, "T2", SAGITTAL, -1.0, ramp)
    inverted = mr_slice(uid, "T2", SAGITTAL, 0.0, ramp, photometric="MONOCHROME1")
    negative = mr_slice(uid, "T2", SAGITTAL, 1.0, ramp)
    negative.RescaleSlope, negative.RescaleIntercept = -1.0, 100.0

    image, spacing = load_input_slices([plain, inverted, negative])

    assert image.dtype == np.float32 and image.shape == (3, 8, 6)
    assert spacing == (0.5, 0.625)
    expected = ramp / ramp.max()
    np.testing.assert_allclose(image[0], expected, atol=1e-6)
    np.testing.assert_allclose(image[1], 1.0 - expected, atol=1e-6)  # MONOCHROME1: high stored = dark
    np.testing.assert_allclose(image[2], 1.0 - expected, atol=1e-6)  # negative slope flips too
    assert image.min() == 0.0 and image.max() == 1.0


def test_load_input_slices_resizes_neighbours_to_the_centre() -> None:
    uid = generate_uid()
    centre = mr_slice(uid, "T2", SAGITTAL, 0.0, np.arange(48).reshape(8, 6))
    small = mr_slice(uid, "T2", SAGITTAL, -1.0, np.arange(12).reshape(4, 3))
    large = mr_slice(uid, "T2", SAGITTAL, 1.0, np.arange(160).reshape(16, 10))
    image, _ = load_input_slices([small, centre, large])
    assert image.shape == (3, 8, 6)
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert image[0, 0, 0] < image[0, -1, -1] and image[2, 0, 0] < image[2, -1, -1]


def test_load_input_slices_refuses_headers_and_wrong_counts() -> None:
    _, slices = sagittal_series("T2", level=10, n=3, with_pixels=False)
    with pytest.raises(ValueError, match="no pixel data"):
        load_input_slices(slices)
    with pytest.raises(ValueError, match="needs 3 datasets"):
        load_input_slices(slices[:2])
    no_spacing = sagittal_series("T2", level=10, n=3)[1]
    del no_spacing[1].PixelSpacing
    with pytest.raises(ValueError, match="PixelSpacing"):
        load_input_slices(no_spacing)


def enhanced_series(n: int = 5) -> Dataset:
    """One Enhanced MR instance: orientation shared, positions per frame in shuffled x order."""
    xs = [10.0 * (i - n // 2) for i in range(n)]
    random.Random(1).shuffle(xs)
    ds = Dataset()
    ds.SOPInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
    ds.Modality, ds.SeriesDescription = "MR", "t2_tse_sag"
    ds.Rows, ds.Columns, ds.NumberOfFrames = 4, 4, n
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    shared = Dataset()
    orientation, measures = Dataset(), Dataset()
    orientation.ImageOrientationPatient = list(SAGITTAL)
    measures.PixelSpacing = [0.7, 0.8]
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    shared.PixelMeasuresSequence = DicomSequence([measures])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    pixels = np.zeros((n, 4, 4), dtype=np.uint16)
    for index, x in enumerate(xs):
        position, group = Dataset(), Dataset()
        position.ImagePositionPatient = [x, 0.0, 0.0]
        group.PlanePositionSequence = DicomSequence([position])
        frames.append(group)
        pixels[index] = np.arange(16).reshape(4, 4) * (1 if x <= 0 else -1) + 100  # ramp flips at x > 0
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    ds.PixelData = pixels.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.frame_x = xs  # test-only bookkeeping
    return ds


def test_enhanced_multi_frame_is_read_frame_by_frame() -> None:
    ds = enhanced_series()
    choice = choose_slice({ds.SeriesInstanceUID: [ds]})
    xs = ds.frame_x
    assert choice.n_slices == 5
    assert choice.sop_instance_uids == (ds.SOPInstanceUID,) * 3
    assert [xs[f - 1] for f in choice.frame_numbers if f is not None] == [-10.0, 0.0, 10.0]
    image, spacing = load_input_slices([ds] * 3, choice.frame_numbers)
    assert spacing == (0.7, 0.8)
    assert image[0, 0, 0] == 0.0 and image[1, 0, 0] == 0.0  # x <= 0: ramp rising
    assert image[2, 0, 0] == 1.0  # x > 0: ramp falling
    with pytest.raises(ValueError, match="frame number"):
        load_input_slices([ds] * 3)
