"""A realistic analysed slice for the result-writer tests: a sagittal T2 lumbar MR image and 11 findings.

The image is synthetic (bright discs between darker vertebral bodies along a lordotic curve, CSF behind them)
with the attributes a real MR Image Storage instance carries, so the writers see what a PACS sends.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Final

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from worker.results import AlgorithmIdentity, AnalysisResult, StructureFinding

WEIGHTS_SHA256: Final = "5f1e2d3c4b5a" + "0123456789abcdef" * 3 + "abcd"
ROWS: Final = 256
COLUMNS: Final = 256
PIXEL_SPACING: Final = 1.25
ARTIFACTS: Final = Path(__file__).resolve().parents[2] / "test-artifacts"
DCIODVFY: Final = shutil.which("dciodvfy")
DSRDUMP: Final = shutil.which("dsrdump")

# (name, kind, label, P(abnormal)): a spread of every label so each code path is written.
FINDING_SPECS: Final[tuple[tuple[str, str, str, float], ...]] = (
    ("L1", "vertebra", "v1", 0.08),
    ("L2", "vertebra", "v1", 0.21),
    ("L3", "vertebra", "v2", 0.64),
    ("L4", "vertebra", "v2", 0.71),
    ("L5", "vertebra", "v1", 0.33),
    ("T12-L1", "disc", "v1", 0.05),
    ("L1-L2", "disc", "v5", 0.12),
    ("L2-L3", "disc", "v2", 0.58),
    ("L3-L4", "disc", "abnormal", 0.66),  # abnormal, grade not supported by the model
    ("L4-L5", "disc", "v3", 0.87),
    ("L5-S1", "disc", "v4", 0.93),
)
# Row of each structure's centre from T12-L1 (top) to L5-S1, alternating disc / vertebra, 18 px apart.
_LEVEL_ROWS: Final[dict[str, float]] = {
    "T12-L1": 52.0,
    "L1": 70.0,
    "L1-L2": 88.0,
    "L2": 106.0,
    "L2-L3": 124.0,
    "L3": 142.0,
    "L3-L4": 160.0,
    "L4": 178.0,
    "L4-L5": 196.0,
    "L5": 214.0,
    "L5-S1": 232.0,
}


def spine_column(row: float) -> float:
    """Column of the spine's axis at a row: a gentle lordosis."""
    return 118.0 + 10.0 * np.sin((row - 40.0) / 200.0 * np.pi)


def spine_pixels(rng: np.random.Generator) -> np.ndarray:
    """12-bit sagittal T2-like image: tissue, vertebral bodies, bright discs, CSF; uint16 (ROWS, COLUMNS)."""
    yy, xx = np.mgrid[0:ROWS, 0:COLUMNS].astype(np.float64)
    image = rng.normal(60.0, 12.0, size=(ROWS, COLUMNS))
    body = ((xx - 128.0) / 110.0) ** 2 + ((yy - 128.0) / 140.0) ** 2 < 1.0
    image[body] += 380.0
    axis = spine_column(yy)
    for name, row in _LEVEL_ROWS.items():
        is_disc = "-" in name
        half_height = 4.0 if is_disc else 7.5
        inside = (np.abs(yy - row) <= half_height) & (np.abs(xx - axis) <= 17.0)
        image[inside] = (1100.0 if is_disc else 620.0) + rng.normal(0.0, 25.0, size=int(inside.sum()))
    csf = (xx - axis > 21.0) & (xx - axis < 30.0) & (yy > 30.0) & (yy < 250.0)
    image[csf] = 1500.0 + rng.normal(0.0, 30.0, size=int(csf.sum()))
    return np.clip(image, 0, 4095).astype(np.uint16)


def make_source(
    *,
    seed: int = 7,
    patient_name: str = "Doe^Jane",
    with_window: bool = True,
    character_set: str | None = None,
) -> Dataset:
    """A sagittal MR Image Storage instance (256x256, 16-bit, 12 stored) with patient, study and geometry."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if character_set is not None:
        ds.SpecificCharacterSet = character_set
    ds.PatientName = patient_name
    ds.PatientID = "PAT-0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.PatientAge = "054Y"
    ds.StudyInstanceUID = generate_uid()
    ds.StudyDate = "20240612"
    ds.StudyTime = "101500"
    ds.StudyID = "S1"
    ds.AccessionNumber = "ACC123"
    ds.ReferringPhysicianName = "Smith^John"
    ds.StudyDescription = "MR LUMBAR SPINE"
    ds.Modality = "MR"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 3
    ds.SeriesDescription = "T2 TSE SAG"
    ds.BodyPartExamined = "LSPINE"
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "ACME Medical"
    ds.ManufacturerModelName = "Magnetom Example"
    ds.InstanceNumber = 8
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.AcquisitionNumber = 1
    ds.ContentDate = "20240612"
    ds.ContentTime = "101700"
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "SK"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.RepetitionTime = 3000.0
    ds.EchoTime = 100.0
    ds.EchoTrainLength = 16
    ds.MagneticFieldStrength = 1.5
    ds.SliceThickness = 4.0
    ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
    ds.ImagePositionPatient = [2.5, -160.0, 160.0]
    ds.SliceLocation = 2.5
    ds.PixelSpacing = [PIXEL_SPACING, PIXEL_SPACING]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ROWS
    ds.Columns = COLUMNS
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    if with_window:
        ds.WindowCenter = 700
        ds.WindowWidth = 1400
    ds.PixelData = spine_pixels(np.random.default_rng(seed)).tobytes()
    return ds


def make_findings() -> list[StructureFinding]:
    """11 findings on the synthetic spine, in challenge order."""
    findings = []
    for name, kind, label, probability in FINDING_SPECS:
        row = _LEVEL_ROWS[name]
        findings.append(
            StructureFinding(
                name=name,
                kind=kind,  # type: ignore[arg-type]
                point_px=(round(float(spine_column(row)), 3), row + 0.5),
                label=label,
                probability=probability,
                confidence=0.9,
            )
        )
    return findings


def make_algorithm(*, phantom_only: bool = False) -> AlgorithmIdentity:
    return AlgorithmIdentity(
        manufacturer="ccfnet-worker",
        model_name="CCF-Net R18-MSC",
        software_version="0.1.0",
        model_version="0.1.0@5f1e2d3c4b5a",
        device_uid="2.25.176123029384756019283746501928374650",
        phantom_only=phantom_only,
        weights_sha256=WEIGHTS_SHA256,
    )


def make_heatmaps(findings: list[StructureFinding], size: int = 32) -> np.ndarray:
    """(11, size, size) Gaussian heatmaps peaking at each finding, as the network would give them."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    maps = []
    for finding in findings:
        cx = finding.point_px[0] / COLUMNS * size
        cy = finding.point_px[1] / ROWS * size
        maps.append(np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 1.0**2)))
    return np.stack(maps).astype(np.float32)


LEVEL_WARNING: Final = "The level count may be off by one: check the labelling of L1-L5 before reading on."


def make_result(
    *,
    with_heatmaps: bool = True,
    phantom_only: bool = False,
    source: Dataset | None = None,
    level_warning: str | None = None,
) -> AnalysisResult:
    findings = make_findings()
    return AnalysisResult(
        source_dataset=make_source() if source is None else source,
        findings=findings,
        algorithm=make_algorithm(phantom_only=phantom_only),
        heatmaps=make_heatmaps(findings) if with_heatmaps else None,
        level_warning=level_warning,
    )


def write(ds: Dataset, path: Path) -> Path:
    """Write as a conformant Part 10 file (the writers must produce one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    dcmwrite(path, ds, enforce_file_format=True)
    return path


def dciodvfy_errors(path: Path) -> list[str]:
    """The lines of dciodvfy's report that start with 'Error'."""
    assert DCIODVFY is not None
    completed = subprocess.run(
        [DCIODVFY, str(path)], capture_output=True, text=True, check=False, timeout=120
    )
    lines = (completed.stdout + completed.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


def dciodvfy_report(path: Path) -> str:
    assert DCIODVFY is not None
    completed = subprocess.run(
        [DCIODVFY, str(path)], capture_output=True, text=True, check=False, timeout=120
    )
    return completed.stdout + completed.stderr
