"""Checks of a received instance before it is stored, so a broken image fails at intake with a status that
names the problem instead of being acknowledged and failing later in inference.

- Every element is as long as it declares, sequences end with their delimiter (:func:`parse_fully`).
- The data set was encoded as its transfer syntax says (explicit or implicit VR; Pixel Data encapsulated
  exactly when the syntax is a compressed one).
- An image has Pixel Data and the Image Pixel attributes that describe it, each one value in range.
- Native Pixel Data is exactly Rows x Columns x Samples per Pixel x Bits Allocated / 8 x Number of Frames
  bytes (one pad byte allowed when that is odd): shorter or longer is refused.
- Compressed Pixel Data: the first frame decodes (pylibjpeg / GDCM / pydicom's RLE) to the declared size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID

from worker.listener.status import StoreStatus

# Image SOP classes whose Pixel Data is Type 1 (MR, Enhanced MR): one without it was cut off or is not an image.
PIXEL_DATA_REQUIRED = frozenset({"1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1"})
_BITS_ALLOCATED = frozenset({1, 8, 16, 32, 64})
_MAX_DIMENSION = 65_535


class TruncatedDatasetError(ValueError):
    """An element declares more bytes than the stream holds."""


_UNDEFINED_LENGTH = 0xFFFFFFFF


_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # (FFFE,E0DD), length 0, little endian


def parse_fully(dataset: Dataset, stream: bytes | None = None) -> None:
    """Decode every element, so a truncated or garbled dataset fails here rather than in a worker later.

    pydicom defers parsing and tolerates short reads (it returns fewer bytes, or warns when a delimiter is
    missing), so lengths are checked against the stream: ``stream`` is the encoded top-level dataset.
    """
    for tag in list(dataset.keys()):
        raw = dataset.get_item(tag)
        if isinstance(raw, RawDataElement):
            value_length = len(raw.value or b"")
            if raw.length != _UNDEFINED_LENGTH and value_length != raw.length:
                raise TruncatedDatasetError(f"element {tag} is shorter than its declared length")
            if raw.length == _UNDEFINED_LENGTH and stream is not None and raw.value_tell is not None:
                end = raw.value_tell + value_length
                if stream[end : end + len(_SEQUENCE_DELIMITER)] != _SEQUENCE_DELIMITER:
                    raise TruncatedDatasetError(f"element {tag} ends without its sequence delimiter")
        element = dataset[tag]
        if element.VR == "SQ":
            for item in element.value:
                parse_fully(item)


@dataclass(frozen=True)
class Problem:
    """Why an instance is refused: the status the sender gets, and what exactly was wrong (for the log)."""

    status: StoreStatus
    detail: str


def check_instance(dataset: Dataset, transfer_syntax_uid: str, sop_class_uid: str) -> Problem | None:
    """None when the instance may be stored, else the first problem found."""
    syntax = UID(transfer_syntax_uid)
    if not syntax.is_transfer_syntax:
        return Problem(StoreStatus.TRANSFER_SYNTAX_MISMATCH, f"{syntax} is not a transfer syntax we know")
    problem = _check_encoding(dataset, syntax)
    if problem is not None or "PixelData" not in dataset:
        if problem is None and sop_class_uid in PIXEL_DATA_REQUIRED:
            return Problem(StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS, "an image without Pixel Data (truncated?)")
        return problem
    image, problem = _image_attributes(dataset)
    if problem is not None:
        return problem
    assert image is not None
    if syntax.is_compressed:
        return _check_first_frame(dataset, syntax)
    return _check_native_length(dataset, image)


def note_read_encoding(dataset: Dataset) -> None:
    """Record how a data set was really encoded (implicit or explicit VR, as pydicom found when it read the
    first element), which :func:`check_instance` compares with the transfer syntax. Call it before the
    elements are decoded. Both pynetdicom (a C-STORE data set) and ``dcmread`` (a file) mark a data set as
    encoded in its transfer syntax whatever they found."""
    first = next(iter(dataset.keys()), None)  # the tags only: iterating a Dataset would decode its elements
    raw = dataset.get_item(first) if first is not None else None
    if isinstance(raw, RawDataElement):
        dataset.set_original_encoding(raw.is_implicit_VR, raw.is_little_endian)


def _check_encoding(dataset: Dataset, syntax: UID) -> Problem | None:
    original = getattr(dataset, "original_encoding", (None, None))
    if original[0] is not None and original[0] != syntax.is_implicit_VR:
        found = "implicit" if original[0] else "explicit"
        return Problem(StoreStatus.TRANSFER_SYNTAX_MISMATCH, f"{found} VR data in {syntax.name}")
    if "PixelData" not in dataset:
        return None
    encapsulated = bool(dataset["PixelData"].is_undefined_length)
    if encapsulated != syntax.is_compressed:
        what = "encapsulated" if encapsulated else "native"
        return Problem(StoreStatus.TRANSFER_SYNTAX_MISMATCH, f"{what} Pixel Data in {syntax.name}")
    return None


@dataclass(frozen=True)
class _Image:
    rows: int
    columns: int
    samples: int
    bits_allocated: int
    frames: int

    @property
    def native_bytes(self) -> int:
        return (self.rows * self.columns * self.samples * self.frames * self.bits_allocated + 7) // 8


def _single_int(dataset: Dataset, keyword: str, low: int, high: int, default: int | None = None) -> int | str:
    """The attribute as one integer in [low, high], or a sentence saying what is wrong with it."""
    if keyword not in dataset or dataset[keyword].value in (None, ""):
        return default if default is not None else f"{keyword} is missing"
    value: Any = dataset[keyword].value
    try:
        number = int(value)
    except (TypeError, ValueError):
        return f"{keyword} is not one integer ({value!r})"
    if not low <= number <= high:
        return f"{keyword} {number} is out of range"
    return number


def _image_attributes(dataset: Dataset) -> tuple[_Image | None, Problem | None]:
    values = {
        "Rows": _single_int(dataset, "Rows", 1, _MAX_DIMENSION),
        "Columns": _single_int(dataset, "Columns", 1, _MAX_DIMENSION),
        "SamplesPerPixel": _single_int(dataset, "SamplesPerPixel", 1, 4),
        "BitsAllocated": _single_int(dataset, "BitsAllocated", 1, 64),
        "BitsStored": _single_int(dataset, "BitsStored", 1, 64),
        "PixelRepresentation": _single_int(dataset, "PixelRepresentation", 0, 1),
        "NumberOfFrames": _single_int(dataset, "NumberOfFrames", 1, 2**31 - 1, default=1),
    }
    wrong = [v for v in values.values() if isinstance(v, str)]
    numbers = {k: v for k, v in values.items() if isinstance(v, int)}
    if not wrong and numbers["BitsAllocated"] not in _BITS_ALLOCATED:
        wrong.append(f"BitsAllocated {numbers['BitsAllocated']} is not 1, 8, 16, 32 or 64")
    if not wrong and numbers["BitsStored"] > numbers["BitsAllocated"]:
        wrong.append("BitsStored exceeds BitsAllocated")
    if wrong:
        return None, Problem(StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS, "; ".join(wrong))
    image = _Image(
        numbers["Rows"], numbers["Columns"], numbers["SamplesPerPixel"], numbers["BitsAllocated"],
        numbers["NumberOfFrames"],
    )
    return image, None


def _check_native_length(dataset: Dataset, image: _Image) -> Problem | None:
    actual = len(dataset["PixelData"].value or b"")
    expected = image.native_bytes
    if actual == expected or (expected % 2 == 1 and actual == expected + 1):
        return None
    return Problem(
        StoreStatus.PIXEL_DATA_LENGTH_MISMATCH,
        f"Pixel Data is {actual} bytes; Rows x Columns x Samples x Bits Allocated x Frames make {expected}",
    )


def _check_first_frame(dataset: Dataset, syntax: UID) -> Problem | None:
    from pydicom.pixels.decoders.base import get_decoder

    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        return Problem(StoreStatus.PIXEL_DATA_UNDECODABLE, f"no decoder for {syntax.name}")
    if not decoder.is_available:
        return Problem(StoreStatus.PIXEL_DATA_UNDECODABLE, f"no decoder plugin installed for {syntax.name}")
    try:
        decoder.as_array(dataset, index=0)
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError, OSError) as exc:
        # The plugins raise what they raise (RuntimeError naming each plugin's failure, ValueError on sizes).
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return Problem(StoreStatus.PIXEL_DATA_UNDECODABLE, f"first frame does not decode: {first_line}")
    return None


# Attributes that place the pixels in the patient: with the pixels, what an analysis reads from an image.
_GEOMETRY = ("Rows", "Columns", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness")


def differs_from_stored(stored: Path, dataset: Dataset, transfer_syntax_uid: str) -> str | None:
    """What differs between a re-sent instance and the file already stored under its SOP Instance UID: the
    pixels or their geometry (a re-send that changes only other attributes replaces the file). None if the
    same, or if the stored file cannot be read (then the new one replaces it)."""
    import numpy as np
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        old = pydicom.dcmread(stored)
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return None
    for keyword in _GEOMETRY:
        if old.get(keyword) != dataset.get(keyword):
            return f"{keyword} differs from the stored instance"
    old_syntax = str(old.file_meta.get("TransferSyntaxUID", ""))
    if old.get("PixelData") == dataset.get("PixelData") and old_syntax == transfer_syntax_uid:
        return None
    if old_syntax == transfer_syntax_uid or "PixelData" not in old or "PixelData" not in dataset:
        return "Pixel Data differs from the stored instance"
    try:  # another transfer syntax: compare what the pixels decode to
        same = np.array_equal(old.pixel_array, dataset.pixel_array)
    except (RuntimeError, ValueError, TypeError, AttributeError) as exc:
        return f"Pixel Data cannot be compared with the stored instance ({exc})"
    return None if same else "Pixel Data differs from the stored instance"
