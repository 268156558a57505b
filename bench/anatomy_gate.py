"""The anatomy gate on real lumbar slices, phantom studies and images that are not a lumbar spine.

Phantom studies and the negatives go through the worker's own path (`core_bridge.analyse_files`: series choice,
anatomy gate, model) from DICOM files in a temporary folder, as the service reads them from its spool. The real
slices have no DICOM header: they are predicted in batches and judged by the same gate functions with the headers
of a sagittal lumbar T2 MR (faster on a shared CPU; the point rules are all that can refuse them).

- lumbar, must pass: every slice of ../shared/data/tianchi-slices (pixel spacing: the README's estimate) with the
  shipped default model (and, with --out-of-fold, each slice with the fold model that never saw it); phantom
  studies (`ccfnet phantom`) with the phantom and with the default model.
- not a lumbar spine, must be refused: built at run time from pydicom's test files (pydicom-data) and noise;
  "as sent" keeps the file's own headers, "relabelled" rewrites them into a sagittal lumbar T2 MR
  (BodyPartExamined LSPINE, "T2 TSE SAG", a 300 mm field of view), so only the image evidence can refuse it.

    python bench/anatomy_gate.py [--model PATH] [--phantoms 30] [--out-of-fold] [--no-tianchi]
Prints a table (refused / studies, and which stage refused) and each measurement's range; no pass/fail.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

ROOT = Path(__file__).resolve().parent.parent
TIANCHI = ROOT.parent / "shared" / "data" / "tianchi-slices"
SAGITTAL = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
CORONAL = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
LUMBAR_FOV_MM = 300.0
# Seeds of the phantom studies the tests, the demo and the other benches send (seed, index 0).
TEST_SEEDS = (7, 11, 21, 22, 23, 24, 25, 41, 42, 61, 71, 100)


@dataclass(frozen=True)
class Case:
    """One study to send through the worker's path."""

    group: str
    name: str
    datasets: list[Dataset]
    model: Path


def _uid() -> str:
    return str(generate_uid())


def mr_slice(
    pixels: np.ndarray,
    *,
    study: str,
    series: str,
    number: int,
    orientation: Sequence[float] | None,
    spacing: float | None,
    position_x: float = 0.0,
    body_part: str = "LSPINE",
    description: str = "T2 TSE SAG",
    modality: str = "MR",
) -> Dataset:
    """A single-frame MR Image Storage dataset (16-bit unsigned) from a 2-D array."""
    values = np.asarray(pixels, dtype=np.float64)
    lo, hi = float(values.min()), float(values.max())
    scaled = np.round((values - lo) / (hi - lo) * 4095) if hi > lo else np.zeros_like(values)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = _uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality = modality
    ds.PatientName, ds.PatientID = "Gate^Bench", "GATE"
    ds.SeriesDescription = description
    if body_part:
        ds.BodyPartExamined = body_part
    ds.InstanceNumber = number
    if orientation is not None:
        ds.ImageOrientationPatient = [f"{v:g}" for v in orientation]
        ds.ImagePositionPatient = [f"{position_x:g}", "-150", "150"]
    if spacing is not None:
        ds.PixelSpacing = [f"{spacing:.6g}", f"{spacing:.6g}"]
    ds.Rows, ds.Columns = scaled.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = scaled.astype(np.uint16).tobytes()
    return ds


def relabelled(
    images: Sequence[np.ndarray], *, orientation: Sequence[float] = SAGITTAL, **headers: str
) -> list[Dataset]:
    """The images as one sagittal lumbar T2 series (300 mm field of view), slices 4 mm apart."""
    study, series = _uid(), _uid()
    return [
        mr_slice(image, study=study, series=series, number=i + 1, orientation=orientation,
                 spacing=LUMBAR_FOV_MM / max(image.shape), position_x=4.0 * i, **headers)
        for i, image in enumerate(images)
    ]


def _testdata(name: str) -> Dataset:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        raise FileNotFoundError(f"pydicom test file {name} not found: install pydicom-data (the [test] extra)")
    return pydicom.dcmread(path)


def _pixels(ds: Dataset) -> list[np.ndarray]:
    frames = np.asarray(ds.pixel_array, dtype=np.float64)
    return list(frames) if frames.ndim == 3 else [frames]


def _with_new_uids(datasets: Sequence[Dataset]) -> list[Dataset]:
    """Copies in a study of their own (pydicom's files share UIDs between variants)."""
    study, series = _uid(), _uid()
    out = []
    for ds in datasets:
        copy_ = copy.deepcopy(ds)
        copy_.StudyInstanceUID, copy_.SeriesInstanceUID = study, series
        out.append(copy_)
    return out


def negatives() -> Iterator[tuple[str, list[Dataset]]]:
    """(name, datasets) of studies that are not a sagittal lumbar spine MR, built from packages at run time."""
    rng = np.random.default_rng(0)
    brain = _testdata("emri_small.dcm")  # real brain MR, 10 frames of 64 x 64, BodyPartExamined HEAD
    yield "brain MR, as sent (enhanced, no orientation)", _with_new_uids([brain])
    yield "brain MR, sagittal orientation added, own body part", relabelled(_pixels(brain), body_part="HEAD",
                                                                               description="")
    yield "brain MR, relabelled", relabelled(_pixels(brain))
    mr2 = [_testdata(f"MR2_{name}.dcm") for name in ("UNCI", "UNCR", "J2KR")]  # shoulder, 1024 x 1024
    yield "shoulder MR (MR2_*), as sent", _with_new_uids(mr2)
    yield "shoulder MR (MR2_*), relabelled", relabelled(_pixels(mr2[0]))
    coronal = _with_new_uids(mr2[:1])
    coronal[0].ImageOrientationPatient = [f"{v:g}" for v in CORONAL]
    yield "coronal series (MR2 shoulder, coronal)", coronal
    small = _testdata("MR_small.dcm")
    yield "MR_small, as sent (axial)", _with_new_uids([small])
    yield "MR_small, relabelled", relabelled(_pixels(small))
    abdomen = _testdata("MR-SIEMENS-DICOM-WithOverlays.dcm")
    yield "abdomen MR, as sent (axial)", _with_new_uids([abdomen])
    yield "abdomen MR, relabelled", relabelled(_pixels(abdomen))
    ct = _testdata("CT_small.dcm")
    ct_as_mr = _with_new_uids([ct])
    ct_as_mr[0].Modality, ct_as_mr[0].SOPClassUID = "MR", MRImageStorage
    yield "CT relabelled MR (CT_small, axial)", ct_as_mr
    yield "CT relabelled MR, relabelled sagittal lumbar", relabelled(_pixels(ct))
    axial = [ds for ds in _phantom(5, 0) if "TRA" in str(ds.SeriesDescription)]
    yield "phantom axial series only, as sent", _with_new_uids(axial)
    yield "phantom axial series, relabelled", relabelled([_pixels(ds)[0] for ds in axial])
    yield "uniform noise, relabelled", relabelled([rng.random((384, 384)) for _ in range(3)])
    smooth = [_blur(rng.random((384, 384)), 6) for _ in range(3)]
    yield "smooth noise, relabelled", relabelled(smooth)
    yield "blank image, relabelled", relabelled([np.zeros((384, 384))])


def _blur(image: np.ndarray, passes: int) -> np.ndarray:
    for _ in range(passes):
        image = (image + np.roll(image, 1, 0) + np.roll(image, -1, 0) + np.roll(image, 1, 1)
                 + np.roll(image, -1, 1)) / 5
    return image


def _phantom(seed: int, index: int) -> list[Dataset]:
    from ccfnet_core.phantom import render_study, study_generator

    datasets, _ = render_study(study_generator(seed, index), index)
    return datasets


def tianchi_verdicts(
    root: Path, models: dict[str, Path], batch: int = 8
) -> Iterator[tuple[str, str, dict[str, float]]]:
    """(study, outcome, measurements) of every tianchi slice: `models` maps study id to the checkpoint to use."""
    from ccfnet_core.anatomy_gate import HeaderEvidence, PointEvidence, assess
    from ccfnet_core.datasets import read_tianchi_slices
    from ccfnet_core.inference import Predictor

    headers = HeaderEvidence(modality="MR", body_part="LSPINE", descriptions=("T2 TSE SAG",), plane="sagittal")
    samples = read_tianchi_slices(root)
    for checkpoint in sorted(set(models.values())):
        predictor = Predictor.from_checkpoint(checkpoint, "cpu")
        chosen = [sample for sample in samples if models[sample.study_id] == checkpoint]
        for start in range(0, len(chosen), batch):
            part = chosen[start : start + batch]
            for sample, prediction in zip(part, predictor.predict([s.image for s in part]), strict=True):
                points = PointEvidence(prediction.points, prediction.confidences, sample.spacing_mm)
                verdict = assess(headers, points)
                outcome = "accepted" if verdict.rule is None else f"gate: {verdict.rule.value}"
                yield sample.study_id, outcome, verdict.measurements


def run_case(datasets: Sequence[Dataset], model: Path, folder: Path) -> tuple[str, str, dict[str, float]]:
    """(outcome, detail, measurements): outcome 'accepted', 'selection', 'gate: <rule>' or 'unreadable'."""
    from worker import core_bridge

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    paths = []
    for i, ds in enumerate(datasets):
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    try:
        analysis = core_bridge.analyse_files(paths, model, "cpu")
    except core_bridge.NoEligibleInput as exc:
        return "selection", exc.reason, {}
    except core_bridge.NotLumbarSpine as exc:
        return f"gate: {exc.rule}", exc.reason, exc.measurements
    except core_bridge.UnreadableInput as exc:
        return "unreadable", str(exc), {}
    return "accepted", "", analysis.gate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="default: the shipped default model")
    parser.add_argument("--phantoms", type=int, default=20, help="phantom studies beyond the tests' seeds")
    parser.add_argument("--out-of-fold", action="store_true", help="tianchi slices with their fold models too")
    parser.add_argument("--no-tianchi", action="store_true")
    args = parser.parse_args()

    import torch

    from ccfnet_core.checkpoint import MODELS_DIR, PHANTOM_MODEL_NAME, default_model_path
    from ccfnet_core.folds import load_folds

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    default = args.model or default_model_path()
    phantom_model = MODELS_DIR / PHANTOM_MODEL_NAME
    results: dict[str, list[tuple[str, str, str, dict[str, float]]]] = {}
    if not args.no_tianchi and TIANCHI.is_dir():
        study_ids = [str(e["studyUid"]) for e in json.loads((TIANCHI / "annotations.json").read_text())]
        runs = {"tianchi lumbar slices, default model": dict.fromkeys(study_ids, default)}
        if args.out_of_fold:
            folds = load_folds(ROOT / "experiments" / "tianchi-folds.json")
            fold_dir = default.with_suffix(".folds")
            runs["tianchi lumbar slices, out-of-fold model"] = {
                study: fold_dir / f"fold{folds[study]}.pt" for study in study_ids
            }
        for group, models in runs.items():
            for n, (study, outcome, measurements) in enumerate(tianchi_verdicts(TIANCHI, models)):
                results.setdefault(group, []).append((study, outcome, "", measurements))
                print(f"\r{group}: {n + 1}/{len(models)}", end="", file=sys.stderr, flush=True)
            print(file=sys.stderr)
    elif not args.no_tianchi:
        print(f"tianchi-slices not found at {TIANCHI}: lumbar slices skipped", file=sys.stderr)
    cases: list[Case] = []
    seeds = [(seed, 0) for seed in TEST_SEEDS] + [(0, i) for i in range(args.phantoms)]
    phantoms = {(seed, index): _phantom(seed, index) for seed, index in seeds}
    for model, label in ((phantom_model, "phantom model"), (default, "default model")):
        for (seed, index), datasets in phantoms.items():
            cases.append(Case(f"phantom studies, {label}", f"seed {seed} #{index}", datasets, model))
    for name, datasets in negatives():
        cases.append(Case("not a lumbar spine, default model", name, datasets, default))
        cases.append(Case("not a lumbar spine, phantom model", name, datasets, phantom_model))

    work = Path(tempfile.mkdtemp(prefix="ccfnet-gate-"))
    try:
        for n, case in enumerate(cases):
            outcome, detail, measurements = run_case(case.datasets, case.model, work / "study")
            results.setdefault(case.group, []).append((case.name, outcome, detail, measurements))
            print(f"\r{n + 1}/{len(cases)} studies", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _print(results)


def _print(results: dict[str, list[tuple[str, str, str, dict[str, float]]]]) -> None:
    print(f"{'group':<44}{'studies':>8}{'refused':>9}  refused by")
    for group, rows in results.items():
        refused = Counter(outcome for _, outcome, _, _ in rows if outcome != "accepted")
        by = ", ".join(f"{k} {v}" for k, v in sorted(refused.items())) or "-"
        print(f"{group:<44}{len(rows):>8}{sum(refused.values()):>9}  {by}")
    keys = ("order_tau", "median_step_mm", "median_confidence", "min_step_mm", "min_confidence")
    print(f"\n{'measurements (min .. max over studies)':<44}" + "".join(f"{k:>22}" for k in keys))
    for group, rows in results.items():
        measured = [m for _, _, _, m in rows if m]
        cells = []
        for key in keys:
            values = [m[key] for m in measured if key in m]
            cells.append(f"{min(values):>9.2f} .. {max(values):<8.2f}" if values else f"{'-':>22}")
        print(f"{group:<44}" + "".join(f"{c:>22}" for c in cells))
    print("\nstudies that are not a lumbar spine, one by one:")
    for group, rows in results.items():
        if not group.startswith("not a lumbar"):
            continue
        for name, outcome, detail, found in rows:
            text = (f"tau {found['order_tau']:5.2f} step {found['median_step_mm']:6.1f} mm "
                    f"conf {found['median_confidence']:.2f}" if found else detail[:70])
            print(f"  {group[-13:]:<14}{name:<52}{outcome:<18}{text}")
    for group, rows in results.items():
        if group.startswith("not a lumbar"):
            continue
        for name, outcome, detail, _ in rows:
            if outcome != "accepted":
                print(f"  FALSELY REFUSED {group}: {name}: {outcome}: {detail[:120]}")


if __name__ == "__main__":
    main()
