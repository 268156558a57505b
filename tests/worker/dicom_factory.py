"""Small valid MR Image Storage and Enhanced MR datasets for the intake tests (synthetic patients only)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    generate_uid,
)

MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4")
ENHANCED_MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4.1")
UID_ROOT = "1.2.826.0.1.3680043.10.1234."


@dataclass(frozen=True)
class StudyUIDs:
    study: str
    series: tuple[str, ...]


def new_study(series_count: int = 1) -> StudyUIDs:
    return StudyUIDs(generate_uid(UID_ROOT), tuple(generate_uid(UID_ROOT) for _ in range(series_count)))


def _file_meta(
    sop_class: str, sop_instance: str, transfer_syntax: str = ExplicitVRLittleEndian
) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def mr_image(
    study_uid: str,
    series_uid: str,
    index: int = 0,
    *,
    rows: int = 64,
    columns: int = 64,
    bits: int = 16,
    sop_instance_uid: str | None = None,
    series_description: str = "SAG T2",
) -> Dataset:
    """A valid MR Image Storage instance: sagittal slice `index` with a synthetic pattern."""
    ds = Dataset()
    sop_uid = sop_instance_uid or generate_uid(UID_ROOT)
    ds.file_meta = _file_meta(MR_IMAGE_STORAGE, sop_uid)
    ds.SOPClassUID = MR_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    today = dt.date.today().strftime("%Y%m%d")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = today
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = "ACC0001"
    ds.Modality = "MR"
    ds.Manufacturer = "CCFNET TEST"
    ds.ReferringPhysicianName = ""
    ds.PatientName = "Phantom^Test"
    ds.PatientID = "PHANTOM-1"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    ds.SeriesDescription = series_description
    ds.FrameOfReferenceUID = study_uid + ".1" if len(study_uid) < 62 else study_uid
    ds.PositionReferenceIndicator = ""
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "NONE"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.EchoTime = 100
    ds.RepetitionTime = 3000
    ds.EchoTrainLength = 16
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.ImagePositionPatient = [float(index * 4 - 20), -100.0, 100.0]
    ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
    ds.PixelSpacing = [0.6, 0.6]
    ds.SliceThickness = 4.0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = bits
    ds.BitsStored = 12 if bits == 16 else 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    yy, xx = np.mgrid[0:rows, 0:columns]
    image = ((xx + yy * 2 + index * 7) % (1 << ds.BitsStored)).astype(np.uint16 if bits == 16 else np.uint8)
    ds.PixelData = image.tobytes()
    return ds


def enhanced_mr_image(
    study_uid: str, series_uid: str, *, frames: int = 2, rows: int = 32, columns: int = 32
) -> Dataset:
    """A minimal multi-frame Enhanced MR Image Storage instance."""
    ds = mr_image(study_uid, series_uid, rows=rows, columns=columns)
    ds.SOPClassUID = ENHANCED_MR_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPClassUID = ENHANCED_MR_IMAGE_STORAGE
    for keyword in (
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "SliceThickness",
        "ScanningSequence",
        "SequenceVariant",
        "ScanOptions",
        "EchoTime",
        "RepetitionTime",
        "EchoTrainLength",
    ):
        delattr(ds, keyword)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.NumberOfFrames = frames
    ds.AcquisitionDateTime = ds.StudyDate + "120000"
    frame_items = []
    for f in range(frames):
        item = Dataset()
        position = Dataset()
        position.ImagePositionPatient = [float(f * 4), -100.0, 100.0]
        item.PlanePositionSequence = Sequence([position])
        frame_items.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frame_items)
    shared = Dataset()
    orientation = Dataset()
    orientation.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
    shared.PlaneOrientationSequence = Sequence([orientation])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PixelData = np.zeros((frames, rows, columns), np.uint16).tobytes()
    return ds


def study_images(uids: StudyUIDs, per_series: int, **kwargs: object) -> Iterator[Dataset]:
    for series_uid in uids.series:
        for i in range(per_series):
            yield mr_image(uids.study, series_uid, i, **kwargs)  # type: ignore[arg-type]


def write(ds: Dataset, folder: Path, name: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (name or f"{ds.SOPInstanceUID}.dcm")
    ds.save_as(path, enforce_file_format=True)
    return path
