"""Phantom studies: real DICOM files, challenge-layout annotations, plausible anatomy with visible disease."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, MRImageStorage

from ccfnet_core.phantom import (
    ANNOTATIONS_FILE,
    AXIAL_ORIENTATION,
    AXIAL_T2_DESCRIPTION,
    SAGITTAL_ORIENTATION,
    SAGITTAL_T1_DESCRIPTION,
    SAGITTAL_T2_DESCRIPTION,
    PhantomTruth,
    _annotation_entry,
    _draw_labels,
    render_study,
    study_generator,
    write_phantom_studies,
)
from ccfnet_core.series_selection import choose_slice
from ccfnet_core.structures import DISCS, NUM_STRUCTURES, STRUCTURES, VERTEBRAE

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
SMALL = 128


def _labels(vertebra: str, disc: str) -> list[frozenset[str]]:
    return [frozenset({vertebra})] * len(VERTEBRAE) + [frozenset(disc.split(","))] * len(DISCS)


def _by_series(datasets: Sequence[Dataset]) -> dict[str, list[Dataset]]:
    series: dict[str, list[Dataset]] = defaultdict(list)
    for ds in datasets:
        series[str(ds.SeriesInstanceUID)].append(ds)
    return dict(series)


def _annotated_image(datasets: Sequence[Dataset], truth: PhantomTruth) -> np.ndarray:
    ds = next(d for d in datasets if d.SOPInstanceUID == truth.instance_uid)
    return np.asarray(ds.pixel_array, dtype=np.float64)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[PhantomTruth]]:
    out = tmp_path_factory.mktemp("phantom")
    calls: list[int] = []
    truths = write_phantom_studies(out, 2, seed=11, rows=SMALL, cols=SMALL, progress=calls.append)
    assert calls == [1, 2]
    return out, truths


def test_same_seed_gives_identical_files_and_another_seed_other_uids(tmp_path: Path) -> None:
    first = write_phantom_studies(tmp_path / "a", 2, seed=5, rows=96, cols=96)
    second = write_phantom_studies(tmp_path / "b", 2, seed=5, rows=96, cols=96)
    other = write_phantom_studies(tmp_path / "c", 1, seed=6, rows=96, cols=96)
    assert first == second
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b
    assert len(files_a) > 2 * 9
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert other[0].study_uid != first[0].study_uid
    assert other[0].instance_uid != first[0].instance_uid


def test_files_are_mr_images_with_consistent_geometry(written: tuple[Path, list[PhantomTruth]]) -> None:
    out, truths = written
    for index, truth in enumerate(truths):
        datasets = [pydicom.dcmread(path) for path in sorted((out / f"study{index:04d}").glob("image*.dcm"))]
        sop_uids = [str(ds.SOPInstanceUID) for ds in datasets]
        assert len(set(sop_uids)) == len(sop_uids)
        for ds in datasets:
            assert ds.preamble == b"\x00" * 128
            assert ds.file_meta.MediaStorageSOPClassUID == MRImageStorage
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert ds.SOPClassUID == MRImageStorage
            assert ds.Modality == "MR"
            assert ds.Manufacturer == "ccfnet-worker phantom"
            assert ds.StudyDescription == "LUMBAR SPINE MR (phantom)"
            assert str(ds.PatientName) == f"PHANTOM^{index:04d}"
            assert ds.PatientID and ds.PatientBirthDate and ds.PatientSex in ("F", "M")
            assert ds.StudyDate and ds.StudyTime and ds.AccessionNumber and ds.StudyID
            assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
            assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.SamplesPerPixel == 1
            assert ds.pixel_array.shape == (SMALL, SMALL) and int(ds.pixel_array.max()) < 4096
            for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID):
                assert UID(uid).is_valid and str(uid).startswith("2.25.")
        assert {str(ds.StudyInstanceUID) for ds in datasets} == {truth.study_uid}
        assert len({str(ds.FrameOfReferenceUID) for ds in datasets}) == 1

        series = _by_series(datasets)
        descriptions = {uid: str(group[0].SeriesDescription) for uid, group in series.items()}
        assert sorted(descriptions.values()) == sorted(
            [SAGITTAL_T2_DESCRIPTION, SAGITTAL_T1_DESCRIPTION, AXIAL_T2_DESCRIPTION]
        )
        assert descriptions[truth.series_uid] == SAGITTAL_T2_DESCRIPTION
        for uid, group in series.items():
            orientations = {tuple(float(v) for v in ds.ImageOrientationPatient) for ds in group}
            expected = (
                AXIAL_ORIENTATION if descriptions[uid] == AXIAL_T2_DESCRIPTION else SAGITTAL_ORIENTATION
            )
            assert orientations == {expected}
            axis = 2 if expected == AXIAL_ORIENTATION else 0
            ordered = sorted(group, key=lambda ds: float(ds.ImagePositionPatient[axis]))
            steps = np.diff([float(ds.ImagePositionPatient[axis]) for ds in ordered])
            assert np.allclose(steps, float(group[0].SpacingBetweenSlices), atol=1e-3)
            assert float(group[0].SpacingBetweenSlices) >= float(group[0].SliceThickness)
            assert sorted(int(ds.InstanceNumber) for ds in group) == list(range(1, len(group) + 1))
            others = [i for i in range(3) if i != axis]
            assert len({tuple(float(ds.ImagePositionPatient[i]) for i in others) for ds in group}) == 1
        sagittal_t2 = series[truth.series_uid]
        assert 9 <= len(sagittal_t2) <= 15
        assert len(series[truth.series_uid]) == len(
            next(g for u, g in series.items() if descriptions[u] == SAGITTAL_T1_DESCRIPTION)
        )
        spacing = tuple(float(v) for v in sagittal_t2[0].PixelSpacing)
        assert spacing == truth.pixel_spacing_mm
        # The annotated slice is the middle one by x, and the selection rule of CCFNET.md picks it.
        by_x = sorted(sagittal_t2, key=lambda ds: float(ds.ImagePositionPatient[0]))
        assert by_x[len(by_x) // 2].SOPInstanceUID == truth.instance_uid
        choice = choose_slice(series)
        assert choice.series_uid == truth.series_uid
        assert choice.centre_sop_instance_uid == truth.instance_uid


def test_written_files_match_the_in_memory_study(written: tuple[Path, list[PhantomTruth]]) -> None:
    out, truths = written
    datasets, truth = render_study(study_generator(11, 1), 1, rows=SMALL, cols=SMALL)
    assert truth == truths[1]
    on_disk = {
        str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p) for p in (out / "study0001").glob("*.dcm"))
    }
    assert sorted(on_disk) == sorted(str(ds.SOPInstanceUID) for ds in datasets)
    for ds in datasets:
        disk = on_disk[str(ds.SOPInstanceUID)]
        assert sorted(disk.keys()) == sorted(ds.keys())
        for tag in ds:
            assert disk[tag.tag].value == tag.value, tag.keyword
    # Instances share no mutable element: editing one leaves the others alone.
    datasets[0].PatientName = "CHANGED^NAME"
    datasets[0].PixelSpacing[0] = 9.0
    assert str(datasets[1].PatientName) == f"PHANTOM^{1:04d}"
    assert float(datasets[1].PixelSpacing[0]) != 9.0


def test_annotations_follow_the_challenge_layout(written: tuple[Path, list[PhantomTruth]]) -> None:
    out, truths = written
    entries = json.loads((out / ANNOTATIONS_FILE).read_text())
    assert isinstance(entries, list) and len(entries) == len(truths)
    for index, (entry, truth) in enumerate(zip(entries, truths, strict=True)):
        assert entry["studyUid"] == truth.study_uid
        assert len(entry["data"]) == 1
        data = entry["data"][0]
        assert (data["seriesUid"], data["instanceUid"]) == (truth.series_uid, truth.instance_uid)
        points = data["annotation"][0]["data"]["point"]
        assert len(points) == NUM_STRUCTURES
        assert [p["tag"]["identification"] for p in points] == list(STRUCTURES)
        annotated = next(
            ds
            for ds in (
                pydicom.dcmread(p, stop_before_pixels=True) for p in (out / f"study{index:04d}").glob("*")
            )
            if ds.SOPInstanceUID == truth.instance_uid
        )
        for k, point in enumerate(points):
            key = "vertebra" if STRUCTURES[k] in VERTEBRAE else "disc"
            assert set(point["tag"]) == {"identification", key}
            assert frozenset(point["tag"][key].split(",")) == truth.labels[k]
            assert point["coord"] == [float(v) for v in truth.points[k]]
            assert point["zIndex"] == int(annotated.InstanceNumber) - 1


def test_a_disc_with_two_labels_is_written_comma_separated() -> None:
    points = np.tile([[64.0, 64.0]], (NUM_STRUCTURES, 1))
    labels = (*_labels("v1", "v1")[:-1], frozenset({"v5", "v2"}))
    truth = PhantomTruth("2.25.1", "2.25.2", "2.25.3", points, labels, (1.0, 1.0))
    entry = json.loads(json.dumps(_annotation_entry(truth, 4)))
    point = entry["data"][0]["annotation"][0]["data"]["point"][-1]
    assert point["tag"] == {"identification": "L5-S1", "disc": "v2,v5"}
    assert point["zIndex"] == 4


def test_points_lie_on_the_image_in_anatomical_order() -> None:
    for index in range(6):
        datasets, truth = render_study(np.random.default_rng(100 + index), index, rows=SMALL, cols=SMALL)
        image = _annotated_image(datasets, truth)
        points = truth.points
        assert points.shape == (NUM_STRUCTURES, 2)
        assert (
            (points >= 0).all()
            and (points[:, 0] < image.shape[1]).all()
            and (points[:, 1] < image.shape[0]).all()
        )
        vertebrae, discs = points[: len(VERTEBRAE), 1], points[len(VERTEBRAE) :, 1]
        # Head to feet: T12-L1, L1, L1-L2, L2, ..., L5, L5-S1.
        interleaved = np.empty(len(VERTEBRAE) + len(DISCS))
        interleaved[0::2], interleaved[1::2] = discs, vertebrae
        assert (np.diff(interleaved) > 0).all(), interleaved
        span_mm = float(np.linalg.norm(points[0] - points[4])) * truth.pixel_spacing_mm[0]
        assert 120.0 < span_mm < 170.0  # about 36 mm per lumbar level
        allowed_sets = [{"v1", "v2"}] * 5 + [{"v1", "v2", "v3", "v4", "v5"}] * 6
        for labels, allowed in zip(truth.labels, allowed_sets, strict=True):
            assert labels and labels <= allowed


def test_sagittal_slice_count_is_drawn_or_chosen() -> None:
    counts = set()
    for index in range(8):
        datasets, truth = render_study(np.random.default_rng(index), index, rows=64, cols=64)
        counts.add(len(_by_series(datasets)[truth.series_uid]))
    assert counts <= set(range(9, 16)) and len(counts) > 1
    datasets, truth = render_study(np.random.default_rng(0), 0, sagittal_slices=4, rows=64, cols=64)
    assert len(_by_series(datasets)[truth.series_uid]) == 4


def test_neighbouring_slices_differ_and_the_canal_fades_laterally() -> None:
    datasets, truth = render_study(np.random.default_rng(3), 0, sagittal_slices=11)
    by_x = sorted(_by_series(datasets)[truth.series_uid], key=lambda ds: float(ds.ImagePositionPatient[0]))
    images = [np.asarray(ds.pixel_array, dtype=np.float64) for ds in by_x]
    middle = len(images) // 2
    assert not np.array_equal(images[middle - 1], images[middle])
    assert not np.array_equal(images[middle + 1], images[middle])
    threshold = 0.6 * np.percentile(images[middle], 99.5)
    x0, x1 = int(truth.points[:, 0].min()), int(truth.points[:, 0].max() + 45 / truth.pixel_spacing_mm[0])
    y0, y1 = int(truth.points[:, 1].min()), int(truth.points[:, 1].max())
    bright = [int((im[y0:y1, x0:x1] > threshold).sum()) for im in images]
    assert bright[middle] > 3 * max(bright[0], bright[-1])


def _csf_fraction(image: np.ndarray, truth: PhantomTruth, k: int) -> float:
    """Share of bright (CSF) pixels in a box behind structure k: what a herniation displaces."""
    ps = truth.pixel_spacing_mm[0]
    x, y = truth.points[k]
    rows = slice(round(y - 12 / ps), round(y + 12 / ps) + 1)
    cols = slice(round(x + 8 / ps), round(x + 45 / ps) + 1)
    return float((image[rows, cols] > 0.6 * np.percentile(image, 99.5)).mean())


def _box_mean(image: np.ndarray, truth: PhantomTruth, k: int, half_mm: float) -> float:
    r = round(half_mm / truth.pixel_spacing_mm[0])
    x, y = (round(v) for v in truth.points[k])
    return float(image[y - r : y + r + 1, x - r : x + r + 1].mean())


def test_disease_is_drawn_where_the_labels_say() -> None:
    seed = 21
    studies = {
        name: render_study(np.random.default_rng(seed), 0, labels=_labels(vertebra, disc))
        for name, vertebra, disc in (
            ("normal", "v1", "v1"),
            ("bulge", "v1", "v2"),
            ("protrusion", "v1", "v3"),
            ("extrusion", "v1", "v4"),
            ("schmorl", "v1", "v5"),
            ("degenerated", "v2", "v1"),
        )
    }
    images = {name: _annotated_image(*study) for name, study in studies.items()}
    truths = {name: study[1] for name, study in studies.items()}
    disc_ks = range(len(VERTEBRAE), NUM_STRUCTURES)

    def csf(name: str) -> np.ndarray:
        return np.array([_csf_fraction(images[name], truths[name], k) for k in disc_ks])

    normal = csf("normal")
    assert (normal > 0.1).all()  # the canal is there to be narrowed
    assert (csf("extrusion") / normal < 0.95).all() and (csf("extrusion") / normal).mean() < 0.85
    assert (csf("protrusion") / normal < 1.0).all() and (csf("protrusion") / normal).mean() < 0.93
    assert (csf("bulge") / normal).mean() < 0.99

    # Degenerated vertebrae: marrow signal change at the vertebra point.
    for k in range(len(VERTEBRAE)):
        ratio = _box_mean(images["degenerated"], truths["degenerated"], k, 5) / _box_mean(
            images["normal"], truths["normal"], k, 5
        )
        assert abs(ratio - 1.0) > 0.08, (STRUCTURES[k], ratio)

    # Schmorl's nodes change the image only at the endplates next to each disc (same anatomy, same noise).
    diff = np.abs(images["schmorl"] - images["normal"]) > 0
    assert truths["schmorl"] == PhantomTruth(
        truths["normal"].study_uid,
        truths["normal"].series_uid,
        truths["normal"].instance_uid,
        truths["normal"].points,
        tuple(_labels("v1", "v5")),
        truths["normal"].pixel_spacing_mm,
    )
    ps = truths["normal"].pixel_spacing_mm[0]
    rows, cols = np.nonzero(diff)
    assert rows.size > 0
    near = np.zeros(rows.size, dtype=bool)
    for k in disc_ks:
        x, y = truths["normal"].points[k]
        near |= (np.abs(cols - x) < 25 / ps) & (np.abs(rows - y) < 14 / ps)
        touched = (np.abs(cols - x) < 20 / ps) & (np.abs(rows - y) < 12 / ps)
        assert touched.sum() * ps * ps > 8.0, STRUCTURES[k]  # a notch of several mm²
    assert near.all()


def test_label_frequencies_are_near_the_challenge_data() -> None:
    rng = np.random.default_rng(0)
    vertebra: Counter[str] = Counter()
    disc: Counter[str] = Counter()
    n = 3000
    for _ in range(n):
        vert_labels, disc_labels = _draw_labels(rng, float(rng.uniform(25.0, 80.0)))
        vertebra.update(label for labels in vert_labels for label in labels)
        disc.update(label for labels in disc_labels for label in labels)
    assert abs(vertebra["v2"] / (5 * n) - 0.40) < 0.05
    for label, expected in (("v1", 0.45), ("v2", 0.35), ("v3", 0.15), ("v4", 0.03), ("v5", 0.05)):
        assert abs(disc[label] / (6 * n) - expected) < max(0.05, 0.4 * expected), label


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="labels"):
        render_study(rng, 0, labels=_labels("v1", "v1")[:-1])
    with pytest.raises(ValueError, match="L1"):
        render_study(rng, 0, labels=[frozenset({"v3"}), *_labels("v1", "v1")[1:]])
    with pytest.raises(ValueError, match="rows"):
        render_study(rng, 0, rows=8)
    with pytest.raises(ValueError, match="sagittal_slices"):
        render_study(rng, 0, sagittal_slices=0)
    with pytest.raises(ValueError, match="n_studies"):
        write_phantom_studies(tmp_path, -1, seed=0)
    with pytest.raises(ValueError, match="points"):
        PhantomTruth("2.25.1", "2.25.2", "2.25.3", np.zeros((10, 2)), tuple(_labels("v1", "v1")), (1.0, 1.0))


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) is not installed")
def test_dciodvfy_finds_no_errors(written: tuple[Path, list[PhantomTruth]]) -> None:
    out, _ = written
    checked = set()
    for path in sorted((out / "study0000").glob("image*.dcm")):
        description = str(pydicom.dcmread(path, stop_before_pixels=True).SeriesDescription)
        if description in checked:
            continue
        checked.add(description)
        result = subprocess.run(
            ["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False
        )
        report = result.stdout + result.stderr
        assert "MRImage" in report, report
        errors = [line for line in report.splitlines() if "Error" in line]
        assert not errors, f"{description}: {errors}"
    assert SAGITTAL_T2_DESCRIPTION in checked and len(checked) == 3


def test_montage_of_mid_sagittal_slices() -> None:
    """Saves test-artifacts/phantom_montage.png for a person to judge the anatomy (asserts only the file)."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    n = 6
    fig, axes = plt.subplots(2, n, figsize=(3.2 * n, 7))
    for index in range(n):
        datasets, truth = render_study(np.random.default_rng(1000 + index), index)
        image = _annotated_image(datasets, truth)
        by_x = sorted(
            _by_series(datasets)[truth.series_uid], key=lambda ds: float(ds.ImagePositionPatient[0])
        )
        axes[0, index].imshow(image, cmap="gray")
        for k, (x, y) in enumerate(truth.points):
            axes[0, index].plot(x, y, "r+" if k < len(VERTEBRAE) else "c+", ms=5)
            label = ",".join(sorted(truth.labels[k]))
            if label != "v1":
                axes[0, index].annotate(
                    label, (x, y), xytext=(4, -2), textcoords="offset points", color="yellow", fontsize=6
                )
        axes[0, index].set_title(f"phantom {index}: T2 mid, {len(by_x)} slices", fontsize=8)
        axes[1, index].imshow(np.asarray(by_x[len(by_x) // 2 - 2].pixel_array), cmap="gray")
        axes[1, index].set_title("T2 two slices off the midline", fontsize=8)
        for ax in axes[:, index]:
            ax.axis("off")
    fig.tight_layout()
    path = ARTIFACTS / "phantom_montage.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    assert path.stat().st_size > 10_000
