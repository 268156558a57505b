"""The input contract of the result writers: what one analysed slice produced.

The bridge to ccfnet_core fills these; the writers never import the model library (STYLE.md, layering), so the
11 structure names and the label vocabulary are restated here and checked on construction.

Coordinates: `point_px` is (column, row) in the continuous image coordinates DICOM uses for SR SCOORD and
presentation-state PIXEL units, with (0, 0) the top-left corner of the top-left pixel (its centre is
(0.5, 0.5)). ccfnet_core's decoded points ("edge coordinates") use the same convention: they pass unchanged.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

import numpy as np
from pydicom.dataset import Dataset

VERTEBRAE: Final[tuple[str, ...]] = ("L1", "L2", "L3", "L4", "L5")
DISCS: Final[tuple[str, ...]] = ("T12-L1", "L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1")
STRUCTURES: Final[tuple[str, ...]] = VERTEBRAE + DISCS

StructureKind = Literal["vertebra", "disc"]

LABEL_NAMES: Final[dict[str, dict[str, str]]] = {
    "vertebra": {"v1": "normal", "v2": "degeneration"},
    # "abnormal": the model's calibrated P(abnormal) passed its operating point but cross-validation does not
    # support naming the grade (docs/model.md), so none is guessed.
    "disc": {
        "v1": "normal",
        "v2": "bulge",
        "v3": "protrusion",
        "v4": "extrusion",
        "v5": "Schmorl's node",
        "abnormal": "abnormal",
    },
}

_UID_RE: Final = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_SHA256_RE: Final = re.compile(r"^[0-9a-f]{64}$")
_MONOCHROME: Final = frozenset({"MONOCHROME1", "MONOCHROME2"})


def structure_kind(name: str) -> StructureKind:
    """'vertebra' for L1..L5, 'disc' for the six discs."""
    if name in VERTEBRAE:
        return "vertebra"
    if name in DISCS:
        return "disc"
    raise ValueError(f"unknown structure name {name!r}; expected one of {', '.join(STRUCTURES)}")


def is_valid_uid(value: str) -> bool:
    """A DICOM UID: dotted decimal without leading zeros, at most 64 characters."""
    return 0 < len(value) <= 64 and _UID_RE.match(value) is not None


def _finite_unit_interval(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a finite number in [0, 1], got {value!r}")


@dataclass(frozen=True)
class StructureFinding:
    """One of the 11 structures: where it is on the source slice and what the model says about it.

    `probability` is the calibrated P(abnormal); `label` the grade the caller states: a challenge class
    ("v1".."v5") or, for a disc whose grade the model cannot support, "abnormal"; `confidence` the localisation
    confidence (heatmap peak), both in [0, 1].
    """

    name: str
    kind: StructureKind
    point_px: tuple[float, float]
    label: str
    probability: float
    confidence: float

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"name must be a str, got {type(self.name).__name__}")
        expected_kind = structure_kind(self.name)
        if self.kind != expected_kind:
            raise ValueError(f"kind of {self.name} must be {expected_kind!r}, got {self.kind!r}")
        if not isinstance(self.point_px, tuple | list) or len(self.point_px) != 2:
            raise ValueError(f"point_px must be a (column, row) pair, got {self.point_px!r}")
        for coordinate in self.point_px:
            if isinstance(coordinate, bool) or not isinstance(coordinate, int | float | np.floating):
                raise TypeError(f"point_px must hold numbers, got {self.point_px!r}")
            if not math.isfinite(coordinate):
                raise ValueError(f"point_px must be finite, got {self.point_px!r}")
        object.__setattr__(self, "point_px", (float(self.point_px[0]), float(self.point_px[1])))
        if self.label not in LABEL_NAMES[self.kind]:
            allowed = ", ".join(LABEL_NAMES[self.kind])
            raise ValueError(f"label of {self.name} must be one of {allowed}, got {self.label!r}")
        _finite_unit_interval("probability", self.probability)
        _finite_unit_interval("confidence", self.confidence)

    @property
    def diagnosis(self) -> str:
        """Human-readable diagnosis, e.g. 'protrusion'."""
        return LABEL_NAMES[self.kind][self.label]

    @property
    def percent(self) -> int:
        """The probability of the stated finding in whole percent: P(abnormal) for an abnormal grade, else
        P(normal) = 1 - P(abnormal), so the number always backs the word beside it."""
        stated = self.probability if self.label != "v1" else 1.0 - self.probability
        return round(100.0 * stated)

    @property
    def text(self) -> str:
        """The label a person reads in a viewer, e.g. 'L4-L5 disc: protrusion, 87 %'."""
        return f"{self.name} {self.kind}: {self.diagnosis}, {self.percent} %"

    @property
    def short_text(self) -> str:
        """The label drawn on the image (presentation state, key image), e.g. 'L4-L5 protrusion 87 %'."""
        return f"{self.name} {self.diagnosis} {self.percent} %"


@dataclass(frozen=True)
class AlgorithmIdentity:
    """The algorithm as IHE AI Results names it: equipment attributes plus the model card's device UID.

    All of it comes from the checkpoint that ran: `model_name` and `device_uid` from its card, `model_version`
    the card's version with the start of the weights' sha256 (``0.1.0@c4788c709397``), `weights_sha256` the
    whole digest (empty only for a card written without one). `phantom_only` marks a model trained on synthetic
    studies only: its results say so and are flagged as research content.
    """

    manufacturer: str
    model_name: str
    software_version: str
    model_version: str
    device_uid: str
    phantom_only: bool = False
    weights_sha256: str = ""

    def __post_init__(self) -> None:
        for name in ("manufacturer", "model_name", "software_version", "model_version"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a str, got {type(value).__name__}")
            # LO: 64 characters, no backslash (it would split the value) and no control characters.
            if not value.strip() or len(value) > 64 or "\\" in value or any(ord(c) < 32 for c in value):
                raise ValueError(
                    f"{name} must be 1..64 printable characters without backslash, got {value!r}"
                )
        if not isinstance(self.device_uid, str) or not is_valid_uid(self.device_uid):
            raise ValueError(f"device_uid must be a valid DICOM UID, got {self.device_uid!r}")
        if not isinstance(self.weights_sha256, str) or not (
            self.weights_sha256 == "" or _SHA256_RE.match(self.weights_sha256)
        ):
            raise ValueError(f"weights_sha256 must be 64 lowercase hex digits, got {self.weights_sha256!r}")
        if not isinstance(self.phantom_only, bool):
            raise TypeError(f"phantom_only must be a bool, got {type(self.phantom_only).__name__}")


_REQUIRED_SOURCE_ATTRIBUTES: Final = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "PixelData",
)


def _check_source(ds: Dataset) -> None:
    if not isinstance(ds, Dataset):
        raise TypeError(f"source_dataset must be a pydicom Dataset, got {type(ds).__name__}")
    missing = [keyword for keyword in _REQUIRED_SOURCE_ATTRIBUTES if keyword not in ds]
    if missing:
        raise ValueError(f"source_dataset lacks {', '.join(missing)}")
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not is_valid_uid(str(ds[keyword].value)):
            raise ValueError(f"source_dataset has an invalid {keyword}")
    if int(ds.SamplesPerPixel) != 1 or ds.PhotometricInterpretation not in _MONOCHROME:
        raise ValueError("source_dataset must be a grayscale (MONOCHROME1/2, one sample) image")
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise ValueError("source_dataset must be a single-frame image (one analysed slice)")
    if int(ds.Rows) < 1 or int(ds.Columns) < 1:
        raise ValueError("source_dataset has an empty pixel matrix")


@dataclass(frozen=True, eq=False, repr=False)
class AnalysisResult:
    """Everything the writers need: the analysed centre slice, 11 findings, the algorithm, optional heatmaps.

    `findings` is stored in the canonical structure order (L1..L5, T12-L1..L5-S1) whatever order it came in.
    `heatmaps` (11, h, w) in [0, 1] are at network resolution and cover the whole slice (the network input is
    the slice resized, aspect not kept), in the same structure order.
    """

    source_dataset: Dataset
    findings: Sequence[StructureFinding]
    algorithm: AlgorithmIdentity
    heatmaps: np.ndarray | None = field(default=None)
    # A sentence for the reader when the model doubts the level count (off by one), else None.
    level_warning: str | None = field(default=None)

    def __post_init__(self) -> None:
        _check_source(self.source_dataset)
        if self.level_warning is not None and (
            not isinstance(self.level_warning, str)
            or not self.level_warning.strip()
            or len(self.level_warning) > 1024
            or any(ord(c) < 32 for c in self.level_warning)
        ):
            raise ValueError("level_warning must be None or one line of 1..1024 printable characters")
        if not isinstance(self.algorithm, AlgorithmIdentity):
            raise TypeError(f"algorithm must be an AlgorithmIdentity, got {type(self.algorithm).__name__}")
        self._check_findings()
        self._check_heatmaps()

    def _check_findings(self) -> None:
        if isinstance(self.findings, str | bytes) or not isinstance(self.findings, Sequence):
            raise TypeError("findings must be a sequence of StructureFinding")
        by_name: dict[str, StructureFinding] = {}
        for finding in self.findings:
            if not isinstance(finding, StructureFinding):
                raise TypeError(f"findings must hold StructureFinding, got {type(finding).__name__}")
            if finding.name in by_name:
                raise ValueError(f"findings has {finding.name} twice")
            by_name[finding.name] = finding
        missing = [name for name in STRUCTURES if name not in by_name]
        if missing:
            raise ValueError(f"findings lacks {', '.join(missing)} (all 11 structures are required)")
        rows, columns = int(self.source_dataset.Rows), int(self.source_dataset.Columns)
        for finding in by_name.values():
            column, row = finding.point_px
            if not (0.0 <= column <= columns and 0.0 <= row <= rows):
                raise ValueError(
                    f"findings: point_px of {finding.name} {finding.point_px} is outside the "
                    f"{columns}x{rows} source image"
                )
        object.__setattr__(self, "findings", tuple(by_name[name] for name in STRUCTURES))

    def _check_heatmaps(self) -> None:
        if self.heatmaps is None:
            return
        if not isinstance(self.heatmaps, np.ndarray):
            raise TypeError(f"heatmaps must be a numpy array, got {type(self.heatmaps).__name__}")
        if self.heatmaps.ndim != 3 or self.heatmaps.shape[0] != len(STRUCTURES) or 0 in self.heatmaps.shape:
            raise ValueError(f"heatmaps must have shape (11, h, w), got {self.heatmaps.shape}")
        if not np.issubdtype(self.heatmaps.dtype, np.floating):
            raise TypeError(f"heatmaps must be floating point, got {self.heatmaps.dtype}")
        if not np.all(np.isfinite(self.heatmaps)):
            raise ValueError("heatmaps must be finite")
        if self.heatmaps.min() < 0.0 or self.heatmaps.max() > 1.0:
            raise ValueError("heatmaps must lie in [0, 1] (clip before building the result)")

    def __repr__(self) -> str:
        """UIDs only: the source dataset holds patient data, which must not reach logs or test reports."""
        heatmaps = "none" if self.heatmaps is None else "x".join(str(n) for n in self.heatmaps.shape)
        return (
            f"AnalysisResult(source_sop_instance_uid={self.source_dataset.SOPInstanceUID!s}, "
            f"algorithm={self.algorithm.model_name!r} {self.algorithm.model_version!r}, heatmaps={heatmaps})"
        )
