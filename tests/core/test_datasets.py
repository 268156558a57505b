"""Readers: the challenge DICOM layout, unannotated studies, the tianchi-slices layout, and the dispatcher."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from ccfnet_core.datasets import (
    read_challenge_folder,
    read_dataset,
    read_dicom_study,
    read_tianchi_slices,
)
from ccfnet_core.sample import SliceSample
from ccfnet_core.series_selection import NoEligibleSeries
from ccfnet_core.structures import NUM_STRUCTURES, STRUCTURES

TIANCHI = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tianchi-slices"
SAGITTAL = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
ROWS, COLS = 12, 10


def write_mr(
    path: Path, study_uid: str, series_uid: str, description: str, iop: list[float], x: float, level: int
) -> str:
    """One MR file whose pixels identify it: a 0 corner, the rest `level` plus a small ramp."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SOPClassUID = MRImageStorage
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.Modality, ds.SeriesDescription = "MR", description
    ds.InstanceNumber = int(100 - x)
    ds.ImageOrientationPatient = iop
    ds.ImagePositionPatient = [x, 0.0, 0.0]
    ds.PixelSpacing = [0.75, 0.5]
    ds.Rows, ds.Columns = ROWS, COLS
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    pixels = np.full((ROWS, COLS), level, dtype=np.uint16)
    pixels[0, 0] = 0
    pixels[-1, -1] = level + 1000
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


def write_study(folder: Path, study_uid: str, seed: int = 0) -> dict[str, Any]:
    """A study folder: sagittal T2 (x = -20..20, level 1000 + 10 * i), a darker fat-sat T2, an axial series.

    Files are named imageN.dcm in a shuffled order. Returns the UIDs keyed by x for the bright T2.
    """
    folder.mkdir(parents=True)
    specs: list[tuple[str, str, list[float], float, int, float | None]] = []
    t2, fs, ax = generate_uid(), generate_uid(), generate_uid()
    for i, x in enumerate((-20.0, -10.0, 0.0, 10.0, 20.0)):
        specs.append((t2, "T2_TSE_SAG", SAGITTAL, x, 1000 + 10 * i, x))
        specs.append((fs, "T2_TSE_SAG_FS", SAGITTAL, x, 200, None))
    for z in range(3):
        specs.append((ax, "T2_TSE_TRA", AXIAL, float(z), 3000, None))
    random.Random(seed).shuffle(specs)
    by_x: dict[float, str] = {}
    for n, (series, description, iop, x, level, key) in enumerate(specs):
        uid = write_mr(folder / f"image{n}.dcm", study_uid, series, description, iop, x, level)
        if key is not None:
            by_x[key] = uid
    return {"series": t2, "by_x": by_x}


def point(name: str, x: float, y: float, value: str) -> dict[str, Any]:
    kind = "vertebra" if name.startswith("L") and "-" not in name else "disc"
    return {"coord": [x, y], "tag": {"identification": name, kind: value}, "zIndex": 2}


def annotation(
    study_uid: str, series_uid: str | None, instance_uid: str, points: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "studyUid": study_uid,
        "data": [
            {
                "seriesUid": series_uid,
                "instanceUid": instance_uid,
                "annotation": [{"data": {"point": points}}],
            }
        ],
    }


@pytest.fixture()
def challenge(tmp_path: Path) -> dict[str, Any]:
    """lumbar_tiny/: two studies (one folder named by its UID, one not) and the sibling annotation JSON."""
    root = tmp_path / "lumbar_tiny"
    uid_a, uid_b = "1.2.826.0.1.3680043.2.1125.10", "1.2.826.0.1.3680043.2.1125.11"
    a = write_study(root / "study0", uid_a, seed=1)
    b = write_study(root / uid_b, uid_b, seed=2)
    points_a = [point("L1", 3, 4, "v2"), point("L1-L2", 5, 6, "v2,v5"), point("T12-L1", 1.5, 2.5, "v1")]
    points_b = [point(name, 1 + k, 2 + k, "v1") for k, name in enumerate(STRUCTURES)]
    entries = [
        annotation(uid_a, a["series"], a["by_x"][0.0], points_a),
        annotation(uid_b, b["series"], b["by_x"][-20.0], points_b),
    ]
    json_path = tmp_path / "lumbar_tiny_annotation.json"
    json_path.write_text(json.dumps(entries))
    return {"root": root, "json": json_path, "a": a, "b": b, "uids": (uid_a, uid_b), "entries": entries}


def test_challenge_folder_reads_annotated_slice_and_neighbours(challenge: dict[str, Any]) -> None:
    samples = read_challenge_folder(challenge["root"])
    assert [s.study_id for s in samples] == list(challenge["uids"])
    first, second = samples
    assert isinstance(first, SliceSample)
    assert first.image.shape == (3, ROWS, COLS) and first.image.dtype == np.float32
    assert first.spacing_mm == (0.75, 0.5)
    # Channels i-1, i, i+1 are the slices at x = -10, 0, 10: levels 1010, 1020, 1030, each over 0..level+1000.
    expected = [level / (level + 1000) for level in (1010, 1020, 1030)]
    np.testing.assert_allclose(first.image[:, 5, 5], expected, rtol=1e-6)
    assert first.meta["sop_instance_uid"] == challenge["a"]["by_x"][0.0]
    assert first.meta["series_uid"] == challenge["a"]["series"]
    assert first.meta["folder"] == "study0"
    # The edge slice repeats itself: x = -20, -20, -10.
    expected_edge = [level / (level + 1000) for level in (1000, 1000, 1010)]
    np.testing.assert_allclose(second.image[:, 5, 5], expected_edge, rtol=1e-6)


def test_challenge_points_labels_and_missing(challenge: dict[str, Any]) -> None:
    first, second = read_challenge_folder(challenge["root"], challenge["json"])
    l1, l1l2, t12 = STRUCTURES.index("L1"), STRUCTURES.index("L1-L2"), STRUCTURES.index("T12-L1")
    np.testing.assert_array_equal(first.points[l1], [3.0, 4.0])
    np.testing.assert_array_equal(first.points[t12], [1.5, 2.5])
    assert first.labels[l1] == frozenset({"v2"})
    assert first.labels[l1l2] == frozenset({"v2", "v5"})
    assert int(first.present.sum()) == 3
    assert np.isnan(first.points[STRUCTURES.index("L5")]).all()
    assert first.labels[STRUCTURES.index("L5")] == frozenset()
    assert second.present.all()


def test_annotations_json_inside_root_is_found_first(challenge: dict[str, Any]) -> None:
    only_b = [challenge["entries"][1]]
    (challenge["root"] / "annotations.json").write_text(json.dumps(only_b))
    samples = read_challenge_folder(challenge["root"])
    assert [s.study_id for s in samples] == [challenge["uids"][1]]


def test_missing_annotation_file_names_what_was_tried(challenge: dict[str, Any]) -> None:
    challenge["json"].unlink()
    with pytest.raises(FileNotFoundError, match=r"lumbar_tiny_annotation\.json"):
        read_challenge_folder(challenge["root"])


@pytest.mark.parametrize(
    ("bad_point", "message"),
    [
        (point("S1", 1, 1, "v1"), "unknown structure 'S1'"),
        (point("L3", 1, 1, "v7"), "L3: unknown label"),
        (point("L4-L5", 1, 1, "v1,v9"), "L4-L5: unknown label"),
        ({"coord": [1], "tag": {"identification": "L2", "vertebra": "v1"}}, "L2 has no usable coord"),
    ],
)
def test_bad_tags_raise_naming_study_and_structure(
    challenge: dict[str, Any], bad_point: dict[str, Any], message: str
) -> None:
    entries = challenge["entries"]
    entries[0]["data"][0]["annotation"][0]["data"]["point"].append(bad_point)
    challenge["json"].write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=message) as caught:
        read_challenge_folder(challenge["root"])
    assert challenge["uids"][0] in str(caught.value)


def test_missing_instance_and_broken_file_are_named(challenge: dict[str, Any]) -> None:
    entries = challenge["entries"]
    entries[1]["data"][0]["instanceUid"] = "1.2.3.4.5"
    challenge["json"].write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=r"annotated instance 1\.2\.3\.4\.5 is not in"):
        read_challenge_folder(challenge["root"])
    broken = challenge["root"] / "study0" / "image999.dcm"
    broken.write_bytes(b"not dicom at all")
    with pytest.raises(ValueError, match=r"image999\.dcm"):
        read_challenge_folder(challenge["root"])


def test_unknown_study_folder_is_named(challenge: dict[str, Any]) -> None:
    entries = challenge["entries"]
    entries[0]["studyUid"] = "9.9.9"
    challenge["json"].write_text(json.dumps(entries))
    with pytest.raises(FileNotFoundError, match=r"study 9\.9\.9"):
        read_challenge_folder(challenge["root"])


def test_read_dicom_study_chooses_the_bright_sagittal_t2(challenge: dict[str, Any]) -> None:
    sample = read_dicom_study(challenge["root"] / "study0")
    assert sample.study_id == challenge["uids"][0]
    assert sample.meta["series_uid"] == challenge["a"]["series"]
    assert sample.meta["sop_instance_uid"] == challenge["a"]["by_x"][0.0]
    assert "sagittal T2" in sample.meta["reason"]
    assert np.isnan(sample.points).all() and not any(sample.labels)
    assert sample.labels == (frozenset(),) * NUM_STRUCTURES
    expected = [level / (level + 1000) for level in (1010, 1020, 1030)]
    np.testing.assert_allclose(sample.image[:, 5, 5], expected, rtol=1e-6)


def test_read_dicom_study_without_sagittal_raises(tmp_path: Path) -> None:
    folder = tmp_path / "axial_only"
    folder.mkdir()
    series = generate_uid()
    for z in range(2):
        write_mr(folder / f"image{z}.dcm", "1.2.3", series, "T2_TRA", AXIAL, float(z), 500)
    with pytest.raises(NoEligibleSeries, match="axial T2 x 2"):
        read_dicom_study(folder)
    with pytest.raises(FileNotFoundError, match=r"no \.dcm files"):
        read_dicom_study(tmp_path)


def write_tianchi(root: Path, n: int = 3) -> list[dict[str, Any]]:
    """A tiny tianchi-slices copy with synthetic images (never the real ones)."""
    (root / "images").mkdir(parents=True)
    entries = []
    for i in range(n):
        image = np.zeros((20, 16), dtype=np.uint8)
        image[5, 7] = 255
        image[6, 7] = 51
        name = f"images/{i:03d}-000.npy"
        np.save(root / name, image)
        points = [
            point(s, 2 + k, 1 + k, "v1") for k, s in enumerate(STRUCTURES) if not (i == 0 and s == "T12-L1")
        ]
        entry = annotation(f"study{i}", None, f"{i:03d}-000", points)
        entry.update(
            image=name,
            width=16,
            height=20,
            pixel_spacing=None,
            pixel_spacing_estimate=0.5 + i,
            flag="T12-L1 missing" if i == 0 else None,
        )
        entries.append(entry)
    (root / "annotations.json").write_text(json.dumps(entries))
    return entries


def test_tianchi_layout_reads_repeated_channels_and_spacing(tmp_path: Path) -> None:
    write_tianchi(tmp_path / "slices")
    samples = read_tianchi_slices(tmp_path / "slices")
    assert [s.study_id for s in samples] == ["study0", "study1", "study2"]
    first = samples[0]
    assert first.image.shape == (3, 20, 16) and first.image.dtype == np.float32
    np.testing.assert_array_equal(first.image[0], first.image[2])
    assert first.image[1, 5, 7] == 1.0 and first.image[1, 6, 7] == pytest.approx(0.2)
    assert [s.spacing_mm for s in samples] == [(0.5, 0.5), (1.5, 1.5), (2.5, 2.5)]
    assert first.flag == "T12-L1 missing" and samples[1].flag is None
    assert np.isnan(first.points[STRUCTURES.index("T12-L1")]).all()
    np.testing.assert_array_equal(samples[1].points[0], [2.0, 1.0])
    assert [s.study_id for s in read_tianchi_slices(tmp_path / "slices", include_flagged=False)] == [
        "study1",
        "study2",
    ]


def test_tianchi_layout_errors_name_the_file(tmp_path: Path) -> None:
    root = tmp_path / "slices"
    entries = write_tianchi(root)
    (root / "images" / "001-000.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"001-000\.npy"):
        read_tianchi_slices(root)
    entries[1]["image"] = "images/000-000.npy"
    entries[1]["height"] = 99
    (root / "annotations.json").write_text(json.dumps(entries))
    with pytest.raises(ValueError, match="study1"):
        read_tianchi_slices(root)
    with pytest.raises(FileNotFoundError, match=r"annotations\.json"):
        read_tianchi_slices(tmp_path / "nowhere")


def test_read_dataset_dispatches_on_layout(tmp_path: Path, challenge: dict[str, Any]) -> None:
    write_tianchi(tmp_path / "slices")
    assert [s.study_id for s in read_dataset(tmp_path / "slices")] == ["study0", "study1", "study2"]
    assert [s.study_id for s in read_dataset(challenge["root"])] == list(challenge["uids"])
    with pytest.raises(FileNotFoundError, match="missing"):
        read_dataset(tmp_path / "missing")


@pytest.fixture(scope="module")
def tianchi() -> list[SliceSample]:
    if not (TIANCHI / "annotations.json").is_file():
        pytest.skip(f"real tianchi-slices data not present at {TIANCHI}")
    return read_tianchi_slices(TIANCHI)


def test_real_tianchi_slices(tianchi: list[SliceSample]) -> None:
    assert len(tianchi) == 160
    assert len({s.study_id for s in tianchi}) == 160
    assert sum(1 for s in tianchi if s.flag) == 5
    assert len(read_tianchi_slices(TIANCHI, include_flagged=False)) == 155
    for sample in tianchi:
        assert sample.spacing_mm[0] == sample.spacing_mm[1] > 0
        assert sample.image.dtype == np.float32 and sample.image.min() >= 0.0 and sample.image.max() <= 1.0
        np.testing.assert_array_equal(sample.image[0], sample.image[1])
        points = sample.points[sample.present]
        assert ((points >= 0) & (points < [sample.width, sample.height])).all(), sample.study_id
    assert sum(int(s.present.sum()) for s in tianchi) == 160 * 11 - 1  # study82 lacks T12-L1
    assert read_dataset(TIANCHI)[0].study_id == tianchi[0].study_id
