"""Synthetic lumbar spine MR studies as real DICOM files, with challenge-layout truth (`ccfnet phantom`).

Why: demos, tests and a phantom-only checkpoint need whole studies (several series, real headers, a known
answer) that can be shared freely and made in seconds on a CPU. The anatomy is drawn analytically, so the
truth is exact.

Conventions (DICOM patient coordinates are LPS: +x patient left, +y posterior, +z head):
- Sagittal series: ImageOrientationPatient [0, 1, 0, 0, 0, -1]. Along a row (increasing column) is +y, towards
  the patient's back; down a column (increasing row) is -z, towards the feet. So anterior is on the image left
  and the head at the top, the usual display. Slices are stacked along +x (SpacingBetweenSlices apart); the
  series' middle slice by ImagePositionPatient x lies exactly on the spine's midline and is the annotated one.
- Axial series: [1, 0, 0, 0, 1, 0]: columns towards the patient's left, rows towards posterior.
- Pixel (col, row) has its centre at ImagePositionPatient + col * PixelSpacing[1] * row_dir
  + row * PixelSpacing[0] * col_dir; annotation coords [x, y] are (col, row) in that same convention.
- Inside this module the sagittal plane is drawn in millimetres: u (anterior -> posterior, = column * spacing)
  and v (head -> feet, = row * spacing). A spine element at angle phi has up-axis t = (sin phi, -cos phi) and
  posterior normal n = (cos phi, sin phi); phi > 0 leans the top of the element backwards.
"""

from __future__ import annotations

import io
import json
import struct
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
from pydicom import dcmread
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.tag import BaseTag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, MRImageStorage

from ccfnet_core import __version__
from ccfnet_core.structures import DISCS, NUM_STRUCTURES, STRUCTURES, VERTEBRAE, parse_labels

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

SAGITTAL_T2_DESCRIPTION: Final[str] = "T2_TSE_SAG"
SAGITTAL_T1_DESCRIPTION: Final[str] = "T1_TSE_SAG"
AXIAL_T2_DESCRIPTION: Final[str] = "T2_TSE_TRA"
STUDY_DESCRIPTION: Final[str] = "LUMBAR SPINE MR (phantom)"
MANUFACTURER: Final[str] = "ccfnet-worker phantom"
SAGITTAL_ORIENTATION: Final[tuple[float, ...]] = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
AXIAL_ORIENTATION: Final[tuple[float, ...]] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
BITS_STORED: Final[int] = 12
ANNOTATIONS_FILE: Final[str] = "annotations.json"
_IMPLEMENTATION_VERSION: Final[str] = "CCFNET_PHANTOM"

# Name-based UUIDs (RFC 4122 v5) under this namespace become 2.25 UIDs: deterministic, valid, collision-free.
_UID_NAMESPACE: Final[uuid.UUID] = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/ccfnet-worker/phantom")

# Label frequencies, roughly the challenge's (CCFNET.md): P(vertebra v2) ~ 0.4; discs v1 .47 / v2 .35 /
# v3 .15 / v4 .03, and v5 (Schmorl's node) 5 % on top, alone or with the other label. Lower levels and older
# patients carry more disease; the per-level weights below average to 1.
_P_VERTEBRA_V2: Final[float] = 0.40
_P_DISC_ABNORMAL: Final[float] = 0.53
_P_DISC_V5: Final[float] = 0.05
_DISC_ABNORMAL_SPLIT: Final[tuple[float, float]] = (0.35 / 0.53, 0.50 / 0.53)  # cumulative v2 | v3 | v4
_VERTEBRA_LEVEL_WEIGHT: Final[tuple[float, ...]] = (0.7, 0.85, 1.0, 1.15, 1.3)
_DISC_LEVEL_WEIGHT: Final[tuple[float, ...]] = (0.45, 0.6, 0.85, 1.1, 1.5, 1.5)

# Relative signal (T2, T1) of each tissue; CSF on T2 = 1. Jittered per study.
_TISSUES: Final[dict[str, tuple[float, float]]] = {
    "fat": (0.80, 0.95),
    "muscle": (0.24, 0.36),
    "bowel": (0.36, 0.40),
    "fluid": (0.95, 0.12),
    "marrow": (0.46, 0.64),
    "cortex": (0.08, 0.09),
    "annulus": (0.20, 0.30),
    "nucleus": (0.88, 0.34),
    "nucleus_degenerated": (0.24, 0.29),
    "csf": (1.00, 0.12),
    "cord": (0.45, 0.46),
    "root": (0.30, 0.35),
    "ligament": (0.10, 0.14),
    "flow_void": (0.05, 0.06),
    "ivc": (0.40, 0.30),
    "herniation": (0.26, 0.33),
    "epidural_fat": (0.72, 0.90),
    "schmorl": (0.62, 0.30),
    "skin": (0.45, 0.55),
}


@dataclass(frozen=True)
class PhantomTruth:
    """Ground truth of one phantom study, as the challenge annotates it: 11 points on one sagittal T2 slice.

    points: (11, 2) float array of (x = column, y = row) pixels of that slice, in STRUCTURES order, pixel
    centres at integers; labels: one frozenset per structure ("v1".."v5"); pixel_spacing_mm: (row, column)
    spacing of that slice, as its PixelSpacing. Equal truths have equal UIDs, labels, spacing and points.
    """

    study_uid: str
    series_uid: str
    instance_uid: str
    points: np.ndarray
    labels: tuple[frozenset[str], ...]
    pixel_spacing_mm: tuple[float, float]

    def __post_init__(self) -> None:
        points = np.array(self.points, dtype=np.float64)
        if points.shape != (NUM_STRUCTURES, 2) or not np.isfinite(points).all():
            raise ValueError(f"points must be a finite ({NUM_STRUCTURES}, 2) array, got shape {points.shape}")
        if len(self.labels) != NUM_STRUCTURES:
            raise ValueError(f"labels must hold {NUM_STRUCTURES} sets, got {len(self.labels)}")
        labels = tuple(frozenset(lab) for lab in self.labels)
        for index, lab in enumerate(labels):
            parse_labels(index, ",".join(sorted(lab)))
        if len(self.pixel_spacing_mm) != 2 or min(self.pixel_spacing_mm) <= 0:
            raise ValueError(f"pixel_spacing_mm must be two positive numbers, got {self.pixel_spacing_mm}")
        points.setflags(write=False)
        object.__setattr__(self, "points", points)
        object.__setattr__(self, "labels", labels)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PhantomTruth):
            return NotImplemented
        return self._key() == other._key() and bool(np.array_equal(self.points, other.points))

    def _key(self) -> tuple[object, ...]:
        return (self.study_uid, self.series_uid, self.instance_uid, self.labels, self.pixel_spacing_mm)

    def __hash__(self) -> int:
        return hash((self.study_uid, self.series_uid, self.instance_uid))


# ----------------------------------------------------------------------------------------------------
# The plan: every random choice of one study, drawn up front so that rendering consumes the generator
# identically whatever the labels are (a study re-drawn with forced labels differs only in its disease).


@dataclass
class _Element:
    """A rigid part of the spine chain, in the sagittal plane: a vertebral body, sacral segment or disc."""

    name: str
    centre: F64
    phi: float
    half_height: float
    half_depth: float
    front_height: float = 0.0
    back_height: float = 0.0

    @property
    def up(self) -> F64:
        return np.array([np.sin(self.phi), -np.cos(self.phi)])

    @property
    def back(self) -> F64:
        return np.array([np.cos(self.phi), np.sin(self.phi)])


@dataclass
class _DiscDisease:
    """How one annotated disc looks: hydration, herniation shape and an optional Schmorl's node."""

    labels: frozenset[str]
    degenerated: bool
    nucleus_t2: float
    lateral_mm: float
    bulge_depth: float
    protrusion: tuple[float, float]
    extrusion: tuple[float, float, float]
    schmorl_side: int
    schmorl: tuple[float, float, float]


@dataclass
class _BodyDisease:
    """How one lumbar vertebra looks: Modic-like endplate bands and marrow signal change when degenerated."""

    labels: frozenset[str]
    marrow_gain: tuple[float, float]
    band_gain: tuple[float, float]
    band_mm: float
    band_sides: tuple[bool, bool]
    osteophyte_mm: float


@dataclass
class _Plan:
    """Everything random about one study; rendering reads it and draws only noise and texture offsets."""

    rows: int
    cols: int
    spacing: float
    bodies: list[_Element]
    discs: list[_Element]
    disc_disease: list[_DiscDisease]
    body_disease: list[_BodyDisease]
    tissues: dict[str, F32]
    textures: _Textures
    centre_s: F64
    near: tuple[F64, F64, F64]
    far: tuple[F64, F64, F64]
    profile: dict[str, F64]
    arc: dict[str, float]
    lateral_half_width: float
    canal_half_width: float
    aorta: tuple[float, float]
    ivc: tuple[float, float]
    aorta_end_s: float
    conus_s: float
    thecal_end_s: float
    bladder: tuple[float, float, float] | None
    obliquity: tuple[float, float]
    noise: float
    root_offsets: F64
    trunk_half_width: float
    sagittal_slices: int
    slice_thickness: float
    slice_gap: float
    axial_slices: int
    axial_disc: int
    axial_fov: float
    sagittal_descending: bool
    midline_x: float
    origin_y: float
    origin_z: float
    token: str
    patient: dict[str, str]
    field_strength: float
    study_date: date
    study_seconds: int
    gains: tuple[float, float, float]
    bias: list[F64] = field(default_factory=list)

    def tissue(self, name: str) -> F32:
        return self.tissues[name]

    def at(self, name: str, s: float) -> float:
        """A centreline profile (e.g. 'hw', 'ca') at arc length s."""
        return float(np.interp(s, self.centre_s, self.profile[name]))


def _deg(value: float) -> float:
    return float(np.deg2rad(value))


def _draw_labels(rng: np.random.Generator, age: float) -> tuple[list[frozenset[str]], list[frozenset[str]]]:
    """Vertebra and disc labels with level- and age-dependent frequencies near the challenge's."""
    factor = 0.5 + (age - 25.0) / 55.0
    u_vert = rng.random(len(VERTEBRAE))
    u_disc = rng.random(len(DISCS))
    u_kind = rng.random(len(DISCS))
    u_v5 = rng.random(len(DISCS))
    vertebrae = [
        frozenset({"v2" if u < min(0.95, _P_VERTEBRA_V2 * w * factor) else "v1"})
        for u, w in zip(u_vert, _VERTEBRA_LEVEL_WEIGHT, strict=True)
    ]
    discs: list[frozenset[str]] = []
    for u, kind, v5, w in zip(u_disc, u_kind, u_v5, _DISC_LEVEL_WEIGHT, strict=True):
        if u < min(0.95, _P_DISC_ABNORMAL * w * factor):
            main = (
                "v2" if kind < _DISC_ABNORMAL_SPLIT[0] else "v3" if kind < _DISC_ABNORMAL_SPLIT[1] else "v4"
            )
        else:
            main = "v1"
        if v5 < _P_DISC_V5:
            discs.append(frozenset({"v5"}) if main == "v1" else frozenset({main, "v5"}))
        else:
            discs.append(frozenset({main}))
    return vertebrae, discs


def _check_labels(labels: Sequence[frozenset[str]]) -> list[frozenset[str]]:
    if len(labels) != NUM_STRUCTURES:
        raise ValueError(f"labels must hold {NUM_STRUCTURES} sets (STRUCTURES order), got {len(labels)}")
    return [parse_labels(i, ",".join(sorted(lab))) for i, lab in enumerate(labels)]


def _build_chain(
    rng: np.random.Generator, scale: float, disc_factor: F64
) -> tuple[list[_Element], list[_Element]]:
    """Vertebrae T8..S5 and the discs between them, built upwards from the S1 endplate along a lordotic curve.

    Each body has its own tilt; a disc joins two endplates along their mean axis, so lordosis makes the discs
    wedge-shaped (L5-S1 most). Returns bodies and discs ordered head to feet.
    """
    tilt = rng.uniform(-6.0, 6.0)
    phi_l5 = _deg(rng.uniform(-12.0, 0.0) + tilt)
    lordosis = _deg(rng.uniform(3.5, 6.5))
    thoracic = _deg(rng.uniform(-2.5, 0.5))
    phi_s1 = phi_l5 - _deg(rng.uniform(20.0, 32.0))
    sacral_curve = _deg(rng.uniform(5.0, 10.0))
    jitter = rng.normal(0.0, _deg(1.5), 14)
    size = scale * rng.uniform(0.96, 1.04, 14)

    # Upward from L5: (name, height, AP depth, angle).
    upper = [
        ("L5", 26.0, 34.5, phi_l5),
        ("L4", 27.0, 34.0, phi_l5 + lordosis),
        ("L3", 26.5, 33.0, phi_l5 + 2 * lordosis),
        ("L2", 25.5, 31.5, phi_l5 + 3 * lordosis),
        ("L1", 24.5, 30.0, phi_l5 + 4 * lordosis),
    ]
    phi = phi_l5 + 4 * lordosis
    for k, name in enumerate(("T12", "T11", "T10", "T9", "T8")):
        phi += thoracic
        upper.append((name, 23.5 - 1.0 * k, 28.5 - 1.2 * k, phi))
    # Disc centre heights from L5-S1 upwards; lumbar discs scaled by degeneration.
    disc_heights = [10.0, 10.5, 10.0, 9.0, 8.0, 6.5, 5.5, 5.2, 5.0, 4.8]
    disc_names = [
        "L5-S1",
        "L4-L5",
        "L3-L4",
        "L2-L3",
        "L1-L2",
        "T12-L1",
        "T11-T12",
        "T10-T11",
        "T9-T10",
        "T8-T9",
    ]

    s1 = _Element("S1", np.zeros(2), phi_s1, 11.5 * size[0], 0.5 * 33.0 * size[0])
    s1.centre = -s1.up * s1.half_height
    bodies = [s1]
    discs: list[_Element] = []
    lower = s1
    for k, (name, height, depth, angle) in enumerate(upper):
        body = _Element(name, np.zeros(2), angle + jitter[k], 0.5 * height * size[k], 0.5 * depth * size[k])
        mean_phi = 0.5 * (body.phi + lower.phi)
        disc = _Element(disc_names[k], np.zeros(2), mean_phi, 0.0, 0.5 * (body.half_depth + lower.half_depth))
        height_mm = disc_heights[k] * scale * (disc_factor[k] if k < len(disc_factor) else 1.0)
        wedge = (body.phi - lower.phi) * disc.half_depth
        height_mm = max(height_mm, wedge + 3.0)
        low_plate = lower.centre + lower.up * lower.half_height
        up_plate = low_plate + disc.up * height_mm
        body.centre = up_plate + body.up * body.half_height
        disc.centre = 0.5 * (low_plate + up_plate)
        disc.half_height = 0.5 * height_mm
        # Anterior / posterior heights from the actual endplate corners, projected on the disc axis.
        disc.back_height = float(
            (
                body.centre
                - body.up * body.half_height
                + body.back * body.half_depth
                - low_plate
                - lower.back * lower.half_depth
            )
            @ disc.up
        )
        disc.front_height = float(
            (
                body.centre
                - body.up * body.half_height
                - body.back * body.half_depth
                - low_plate
                + lower.back * lower.half_depth
            )
            @ disc.up
        )
        bodies.append(body)
        discs.append(disc)
        lower = body

    # Sacrum downwards: fused segments, shrinking and curving forwards, joined by thin rudimentary discs.
    upper_seg = s1
    for k, (height, depth) in enumerate(((19.0, 27.0), (16.0, 21.0), (13.0, 16.0), (10.0, 12.0))):
        seg = _Element(
            f"S{k + 2}", np.zeros(2), upper_seg.phi + sacral_curve, 0.5 * height * scale, 0.5 * depth * scale
        )
        gap = _Element(
            f"S{k + 1}-S{k + 2}",
            np.zeros(2),
            0.5 * (seg.phi + upper_seg.phi),
            1.1,
            0.5 * (seg.half_depth + upper_seg.half_depth),
            2.2,
            2.2,
        )
        plate = upper_seg.centre - upper_seg.up * upper_seg.half_height
        gap.centre = plate - gap.up * gap.half_height
        seg.centre = plate - gap.up * 2 * gap.half_height - seg.up * seg.half_height
        bodies.insert(0, seg)
        discs.insert(0, gap)
        upper_seg = seg
    bodies.reverse()
    discs.reverse()
    return bodies, discs


def _plan_study(
    rng: np.random.Generator,
    study_index: int,
    sagittal_slices: int | None,
    rows: int,
    cols: int,
    labels: Sequence[frozenset[str]] | None,
) -> _Plan:
    token = rng.bytes(16).hex()
    age = float(rng.uniform(25.0, 80.0))
    vert_labels, disc_labels = _draw_labels(rng, age)
    if labels is not None:
        checked = _check_labels(labels)
        vert_labels, disc_labels = checked[: len(VERTEBRAE)], checked[len(VERTEBRAE) :]

    fov = float(rng.uniform(250.0, 330.0))
    spacing = fov / rows
    scale = float(rng.uniform(0.9, 1.1))
    habitus = float(rng.uniform(0.85, 1.3))

    # Disc disease parameters are drawn for every disc, then applied by label.
    u_deg = rng.random(len(DISCS))
    deg_height = rng.uniform(0.55, 0.8, len(DISCS))
    nucleus_dim = rng.uniform(0.22, 0.40, len(DISCS))
    nucleus_ok = rng.uniform(0.75, 1.0, len(DISCS))
    lateral = rng.uniform(-4.0, 4.0, len(DISCS))
    bulge = rng.uniform(2.2, 3.5, len(DISCS))
    protrusion = np.stack([rng.uniform(5.0, 7.0, len(DISCS)), rng.uniform(0.8, 1.1, len(DISCS))], axis=1)
    extrusion = np.stack(
        [
            rng.uniform(7.5, 10.0, len(DISCS)),
            rng.uniform(6.0, 9.0, len(DISCS)),
            rng.choice([-1.0, 1.0], len(DISCS)) * rng.uniform(4.0, 9.0, len(DISCS)),
        ],
        axis=1,
    )
    schmorl_side = rng.choice([-1, 1], len(DISCS))
    schmorl = np.stack(
        [
            rng.uniform(-0.45, 0.3, len(DISCS)),
            rng.uniform(3.0, 4.5, len(DISCS)),
            rng.uniform(3.5, 6.0, len(DISCS)),
        ],
        axis=1,
    )
    disc_disease: list[_DiscDisease] = []
    disc_factor = np.ones(len(DISCS))
    for k, labs in enumerate(disc_labels):
        chain_k = len(DISCS) - 1 - k  # the chain counts discs from L5-S1 upwards
        abnormal = bool(labs & {"v2", "v3", "v4"})
        degenerated = bool(u_deg[k] < (0.85 if abnormal else 0.12))
        if degenerated:
            disc_factor[chain_k] = deg_height[k]
        disc_disease.append(
            _DiscDisease(
                labels=labs,
                degenerated=degenerated,
                nucleus_t2=float(nucleus_dim[k] if degenerated else nucleus_ok[k]),
                lateral_mm=float(lateral[k]),
                bulge_depth=float(bulge[k]),
                protrusion=(float(protrusion[k, 0]), float(protrusion[k, 1])),
                extrusion=(float(extrusion[k, 0]), float(extrusion[k, 1]), float(extrusion[k, 2])),
                schmorl_side=int(schmorl_side[k]),
                schmorl=(float(schmorl[k, 0]), float(schmorl[k, 1]), float(schmorl[k, 2])),
            )
        )

    marrow_kind = rng.random(len(VERTEBRAE))
    marrow_amount = rng.uniform(1.15, 1.28, len(VERTEBRAE))
    band_mm = rng.uniform(3.5, 7.0, len(VERTEBRAE))
    band_side = rng.random(len(VERTEBRAE))
    osteo = rng.uniform(2.0, 4.0, len(VERTEBRAE))
    normal_marrow = rng.uniform(0.95, 1.05, len(VERTEBRAE))
    body_disease: list[_BodyDisease] = []
    for k, labs in enumerate(vert_labels):
        if "v2" in labs:
            if marrow_kind[k] < 0.65:  # fatty (Modic 2 like): bright on T1 and T2
                gain = (float(marrow_amount[k]), float(marrow_amount[k]) * 1.05)
                band = (1.35, 1.3)
            else:  # oedema (Modic 1 like) with sclerosis: T1 dark, T2 bright bands, greyer marrow
                gain = (2.0 - float(marrow_amount[k]), 2.0 - float(marrow_amount[k]))
                band = (1.6, 0.6)
            sides = (band_side[k] < 0.75, band_side[k] > 0.35)
            body_disease.append(_BodyDisease(labs, gain, band, float(band_mm[k]), sides, float(osteo[k])))
        else:
            g = float(normal_marrow[k])
            body_disease.append(_BodyDisease(labs, (g, g), (1.0, 1.0), 0.0, (False, False), 0.0))

    bodies, discs = _build_chain(rng, scale, disc_factor)

    # Place the chain in the image: the T12-L1 .. L5-S1 span centred near the middle, a little posterior.
    by_name = {e.name: e for e in bodies + discs}
    top, bottom = by_name["T12-L1"].centre, by_name["L5-S1"].centre
    target = np.array([cols * spacing * rng.uniform(0.46, 0.60), rows * spacing * rng.uniform(0.47, 0.55)])
    shift = target - 0.5 * (top + bottom)
    named = [by_name[n].centre + shift for n in STRUCTURES]
    pts = np.array(named)
    margin = 0.08 * np.array([cols, rows]) * spacing
    low = margin - pts.min(axis=0)
    high = np.array([cols, rows]) * spacing - margin - pts.max(axis=0)
    shift = shift + np.clip(np.zeros(2), low, np.maximum(low, high))
    for e in bodies + discs:
        e.centre = e.centre + shift

    # A centreline through all elements (head to feet), extended beyond both ends, with smooth offset
    # profiles: half-depth of the spine, canal depth, soft tissue behind the canal and in front of the spine.
    chain = [e for pair in zip(bodies, [*discs, None], strict=True) for e in pair if e is not None]
    canal = float(rng.uniform(13.0, 17.0)) * scale
    back = float(rng.uniform(55.0, 70.0)) * habitus
    front = float(rng.uniform(150.0, 200.0)) * habitus
    wobble_knots = rng.normal(0.0, 1.0, 24)
    first, last = bodies[0], bodies[-1]
    ends = [
        (first, first.centre + first.up * 120.0),
        *((e, e.centre) for e in chain),
        (last, last.centre - last.up * 80.0),
    ]
    knot_u = np.array([float(c[0]) for _, c in ends])
    knot_v = np.array([float(c[1]) for _, c in ends])
    knot_s = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(knot_u), np.diff(knot_v)))])
    sacral = np.array([e.name.startswith("S") and e.name not in ("S1", "S1-S2") for e, _ in ends])
    lumbosacral = np.array([e.name in ("S1", "S1-S2", "L5-S1") for e, _ in ends])
    thoracic = np.array([e.name.startswith("T") and "L" not in e.name for e, _ in ends])
    ca_knot = np.where(sacral, 0.35, np.where(lumbosacral, 0.8, 1.0)) * canal
    back_knot = np.where(sacral | lumbosacral, 0.7, np.where(thoracic, 0.85, 1.0)) * back
    front_knot = np.where(sacral, 0.7, 1.0) * front
    centre_s = np.arange(0.0, knot_s[-1], 1.0)

    def along(values: F64, sigma: float) -> F64:
        return _smooth(np.interp(centre_s, knot_s, values), sigma)

    phi_knot = np.array([e.phi for e, _ in ends])
    near = (along(knot_u, 3.0), along(knot_v, 3.0), along(phi_knot, 5.0))
    far = (along(knot_u, 25.0), along(knot_v, 25.0), along(phi_knot, 25.0))
    wobble = 6.0 * np.interp(centre_s, np.linspace(0.0, centre_s[-1], wobble_knots.size), wobble_knots)
    profile = {
        "hw": along(np.array([e.half_depth for e, _ in ends]), 3.0),
        "ca": along(ca_knot, 8.0),
        "back": along(back_knot, 20.0),
        "front": along(front_knot, 25.0),
        "gut": _smooth(wobble, 12.0),
    }
    s_of = {e.name: float(knot_s[i + 1]) for i, e in enumerate(chain)}

    drawn_slices = int(rng.integers(9, 16))  # drawn either way, so a forced count keeps the anatomy
    sag = drawn_slices if sagittal_slices is None else int(sagittal_slices)
    ivc_x = float(rng.uniform(-26.0, -16.0))
    aorta_x = float(rng.uniform(6.0, 18.0))
    has_bladder = rng.random() < 0.5
    bladder_size = float(rng.uniform(25.0, 45.0))
    tissues = {
        name: (np.array(values) * rng.uniform(0.93, 1.07, 2)).astype(np.float32)
        for name, values in _TISSUES.items()
    }
    sacrum3 = by_name["S3"]
    bladder = None
    if has_bladder:
        c = sacrum3.centre - sacrum3.back * (sacrum3.half_depth + bladder_size + 25.0)
        bladder = (float(c[0]), float(c[1]), bladder_size)
    sex = "F" if rng.random() < 0.5 else "M"
    study_date = date(2018, 1, 1) + timedelta(days=int(rng.integers(0, 6 * 365)))
    birth = study_date - timedelta(days=int(age * 365.25))
    patient = {
        "name": f"PHANTOM^{study_index:04d}",
        "id": f"PH{study_index:04d}-{token[:6].upper()}",
        "birth": birth.strftime("%Y%m%d"),
        "sex": sex,
        "age": f"{int(age):03d}Y",
        "accession": f"A{int(token[:12], 16) % 10**12:012d}",
        "study_id": f"{study_index + 1}",
    }
    plan = _Plan(
        rows=rows,
        cols=cols,
        spacing=spacing,
        bodies=bodies,
        discs=discs,
        disc_disease=disc_disease,
        body_disease=body_disease,
        tissues=tissues,
        textures=_study_textures(rng, rows, cols, spacing),
        centre_s=centre_s,
        near=near,
        far=far,
        profile=profile,
        arc=s_of,
        lateral_half_width=float(rng.uniform(21.0, 25.0)) * scale,
        canal_half_width=float(rng.uniform(8.0, 10.5)),
        aorta=(aorta_x, float(rng.uniform(8.5, 11.5))),
        ivc=(ivc_x, float(rng.uniform(9.0, 12.0))),
        aorta_end_s=s_of["L4"],
        conus_s=s_of["L1"] + float(rng.uniform(-5.0, 20.0)),
        thecal_end_s=s_of["S2"],
        bladder=bladder,
        obliquity=(float(rng.uniform(-0.06, 0.06)), float(rng.uniform(-0.06, 0.06))),
        noise=float(rng.uniform(0.015, 0.035)),
        root_offsets=rng.uniform(0.45, 0.9, 4),
        trunk_half_width=float(rng.uniform(140.0, 180.0)) * habitus,
        sagittal_slices=sag,
        slice_thickness=float(np.round(rng.uniform(3.5, 4.5), 1)),
        slice_gap=float(np.round(rng.uniform(0.3, 1.0), 1)),
        axial_slices=int(rng.integers(3, 6)),
        axial_disc=int(rng.integers(3, 6)),
        axial_fov=float(rng.uniform(180.0, 220.0)),
        sagittal_descending=bool(rng.random() < 0.5),
        midline_x=float(np.round(rng.uniform(-10.0, 10.0), 2)),
        origin_y=float(np.round(-0.5 * cols * spacing + rng.uniform(-20.0, 20.0), 2)),
        origin_z=float(np.round(0.5 * rows * spacing + rng.uniform(-30.0, 30.0), 2)),
        token=token,
        patient=patient,
        field_strength=1.5 if rng.random() < 0.6 else 3.0,
        study_date=study_date,
        study_seconds=int(rng.integers(7 * 3600, 19 * 3600)),
        gains=(
            float(rng.uniform(1300, 1900)),
            float(rng.uniform(1100, 1700)),
            float(rng.uniform(1300, 1900)),
        ),
    )
    plan.bias = [rng.normal(0.0, 1.0, 6) for _ in range(3)]
    return plan


# ----------------------------------------------------------------------------------------------------
# Drawing: a canvas in millimetres holding both contrasts (T2, T1), painted back to front with soft edges.

_TEXTURE_PAD: Final[int] = 32


@dataclass
class _Textures:
    """Multiplicative tissue textures (about 1) and bowel signal per contrast; one padded set per study,
    cropped at a different offset for every slice, so slices differ without drawing new noise each time."""

    marrow: F32
    muscle: F32
    fat: F32
    bowel_t2: F32
    bowel_t1: F32

    def crop(self, dy: int, dx: int, rows: int, cols: int) -> _Textures:
        win = (slice(dy, dy + rows), slice(dx, dx + cols))
        return _Textures(
            self.marrow[win], self.muscle[win], self.fat[win], self.bowel_t2[win], self.bowel_t1[win]
        )


def _smooth(values: F64, sigma: float) -> F64:
    """Gaussian smoothing of a 1-D profile sampled every millimetre (edges held)."""
    if sigma <= 0:
        return values
    radius = int(3 * sigma)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    out: F64 = np.convolve(np.pad(values, radius, mode="edge"), kernel, mode="valid")
    return out


def _upsample2(field: F32) -> F32:
    """Double a field's size by linear interpolation (separable, vectorised)."""
    rows = np.repeat(field, 2, axis=0)
    rows[1:-1:2] = 0.5 * (field[:-1] + field[1:])
    out = np.repeat(rows, 2, axis=1)
    out[:, 1:-1:2] = 0.5 * (rows[:, :-1] + rows[:, 1:])
    return out


def _noise_field(rng: np.random.Generator, shape: tuple[int, int], sigma_px: tuple[float, float]) -> F32:
    """Gaussian-filtered white noise of unit standard deviation; smooth fields are made at half size."""
    half = min(sigma_px) >= 2.0
    size = ((shape[0] + 1) // 2, (shape[1] + 1) // 2) if half else shape
    sig = (sigma_px[0] / 2, sigma_px[1] / 2) if half else sigma_px
    white = rng.standard_normal(size, dtype=np.float32)
    fy = np.fft.fftfreq(size[0]).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(size[1]).astype(np.float32)[None, :]
    gain = np.exp(
        np.float32(-2.0 * np.pi**2) * ((np.float32(sig[0]) * fy) ** 2 + (np.float32(sig[1]) * fx) ** 2)
    )
    field = np.fft.irfft2(np.fft.rfft2(white) * gain, s=size).astype(np.float32)
    if half:
        field = _upsample2(field)[: shape[0], : shape[1]]
    field /= np.float32(max(float(field.std()), 1e-6))
    return field


def _study_textures(rng: np.random.Generator, rows: int, cols: int, spacing: float) -> _Textures:
    shape = (rows + _TEXTURE_PAD, cols + _TEXTURE_PAD)
    px = 1.0 / spacing
    fine = _noise_field(rng, shape, (1.0 * px, 1.0 * px))
    blob = _noise_field(rng, shape, (4.0 * px, 4.0 * px))
    fibre = _noise_field(rng, shape, (8.0 * px, 1.0 * px))
    gut = _noise_field(rng, shape, (4.0 * px, 4.0 * px))
    mix = np.clip(0.5 + 0.3 * gut + 0.12 * fine, 0.0, 1.0)
    fluid = np.clip(gut - 1.6, 0.0, 0.6) / 0.6
    gas = np.clip(1.0 + (gut + 2.1) * 2.0, 0.2, 1.0)
    return _Textures(
        marrow=1.0 + 0.07 * fine + 0.05 * blob,
        muscle=1.0 + 0.08 * fibre + 0.3 * np.clip(fibre - 1.7, 0.0, 1.0),
        fat=1.0 + 0.05 * fine,
        bowel_t2=(0.26 + 0.2 * mix**2 + 0.35 * fluid) * gas,
        bowel_t1=(0.36 + 0.08 * mix - 0.15 * fluid) * gas,
    )


Values = Sequence[float] | F32 | Sequence[F32]


class _Canvas:
    """Both contrasts of one slice, painted with anti-aliased (partial-volume) shapes in millimetres."""

    def __init__(self, rows: int, cols: int, spacing: float, a0: float = 0.0, b0: float = 0.0) -> None:
        self.spacing = spacing
        self.a = (a0 + np.arange(cols) * spacing).astype(np.float32)
        self.b = (b0 + np.arange(rows) * spacing).astype(np.float32)
        self.img = np.zeros((2, rows, cols), dtype=np.float32)
        self.edge = np.float32(max(spacing, 0.8))

    def window(self, centre: F64 | tuple[float, float], radius: float) -> tuple[slice, slice] | None:
        """Rows and columns within `radius` mm of `centre`; None if that box is off the canvas."""
        sp = self.spacing
        c0 = max(0, int(np.floor((centre[0] - radius - self.a[0]) / sp)))
        c1 = min(self.a.size, int(np.ceil((centre[0] + radius - self.a[0]) / sp)) + 1)
        r0 = max(0, int(np.floor((centre[1] - radius - self.b[0]) / sp)))
        r1 = min(self.b.size, int(np.ceil((centre[1] + radius - self.b[0]) / sp)) + 1)
        if c0 >= c1 or r0 >= r1:
            return None
        return slice(r0, r1), slice(c0, c1)

    def local(
        self, win: tuple[slice, slice], centre: F64 | tuple[float, float], phi: float
    ) -> tuple[F32, F32]:
        """Coordinates in an element's frame: x towards its back (posterior), y towards its top."""
        da = self.a[win[1]][None, :] - np.float32(centre[0])
        db = self.b[win[0]][:, None] - np.float32(centre[1])
        c, s = np.float32(np.cos(phi)), np.float32(np.sin(phi))
        return da * c + db * s, da * s - db * c

    def alpha(self, sdf: F32) -> F32:
        out: F32 = np.clip(0.5 - sdf / self.edge, 0.0, 1.0)
        return out

    def paint(self, win: tuple[slice, slice], alpha: F32, values: Values, texture: F32 | None = None) -> None:
        """Blend `values` (per contrast: a number or a full-canvas array, times `texture`) into the window."""
        sub = self.img[:, win[0], win[1]]
        first, second = values[0], values[1]
        target: F32
        if isinstance(first, np.ndarray) and first.ndim == 2:
            target = np.stack([first[win[0], win[1]], np.asarray(second)[win[0], win[1]]])
        else:
            target = np.array([first, second], dtype=np.float32)[:, None, None]
        if texture is not None:
            target = target * texture[win[0], win[1]]
        sub += alpha * (target - sub)


def _sd_rect(x: F32, y: F32, hx: float, hy: float, r: float) -> F32:
    """Signed distance to a rounded rectangle of half-sizes hx, hy and corner radius r."""
    r = min(r, hx, hy)
    qx = np.abs(x) - np.float32(hx - r)
    qy = np.abs(y) - np.float32(hy - r)
    outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
    out: F32 = outside + np.minimum(np.maximum(qx, qy), 0.0) - np.float32(r)
    return out


def _sd_ellipse(x: F32, y: F32, ax: float, ay: float) -> F32:
    """Approximate signed distance to an ellipse (exact on its axes, good enough for soft edges)."""
    k = np.hypot(x / np.float32(ax), y / np.float32(ay))
    out: F32 = (k - 1.0) * np.float32(min(ax, ay))
    return out


def _noise_pool(rng: np.random.Generator, rows: int, cols: int, sigma: float) -> F32:
    """Complex Gaussian noise for a series, larger than a slice; each slice reads it at its own offset."""
    out: F32 = rng.standard_normal((2, rows + _TEXTURE_PAD, cols + _TEXTURE_PAD), dtype=np.float32)
    out *= np.float32(sigma)
    return out


def _finish(img: F32, pool: F32, rng: np.random.Generator, bias: F32) -> F32:
    """Apply the coil's smooth sensitivity and Rician noise (magnitude of complex Gaussian noise)."""
    dy, dx = (int(k) for k in rng.integers(0, _TEXTURE_PAD + 1, 2))
    rows, cols = img.shape
    n = pool[:, dy : dy + rows, dx : dx + cols]
    out: F32 = np.hypot(img * bias + n[0], n[1])
    return out


def _bias_field(coeffs: F64, rows: int, cols: int, posterior_gain: float) -> F32:
    """A smooth quadratic field (about +-20 %), brighter towards the posterior spine coil when asked."""
    y = np.linspace(-1.0, 1.0, rows, dtype=np.float32)[:, None]
    x = np.linspace(-1.0, 1.0, cols, dtype=np.float32)[None, :]
    c = coeffs.astype(np.float32) * np.float32(0.06)
    field = 1.0 + c[0] * x + c[1] * y + c[2] * x * y + c[3] * x * x + c[4] * y * y
    field = field * np.exp(np.float32(posterior_gain) * x)
    out: F32 = np.clip(field, 0.3, 1.8).astype(np.float32)
    return out


# ----------------------------------------------------------------------------------------------------
# Sagittal slices


def _band_edge(line: tuple[F64, F64, F64], offset: F64, rows_v: F32) -> F32:
    """Image-row positions (u, mm) of the curve that runs `offset` mm behind a centreline."""
    cu, cv, phi = line
    pu = cu + np.cos(phi) * offset
    pv = np.maximum.accumulate(cv + np.sin(phi) * offset)
    out: F32 = np.interp(rows_v, pv, pu).astype(np.float32)
    return out


def _paint_band(
    canvas: _Canvas,
    plan: _Plan,
    lo: F64,
    hi: F64,
    values: Values,
    *,
    texture: F32 | None = None,
    s_range: tuple[float, float] | None = None,
    strength: float = 1.0,
    far: bool = False,
) -> None:
    """Paint the strip between two offset curves of the centreline (soft edges), optionally for s in range.

    `far` follows the heavily smoothed centreline, for skin and fat layers far from the spine."""
    if strength <= 0.0:
        return
    line = plan.far if far else plan.near
    rows_v = canvas.b
    u_lo = _band_edge(line, lo, rows_v)
    u_hi = _band_edge(line, hi, rows_v)
    weight = np.full(rows_v.shape, np.float32(strength), dtype=np.float32)
    if s_range is not None:
        s_row = np.interp(rows_v, plan.near[1], plan.centre_s)
        weight *= np.clip((s_row - s_range[0]) / 4.0 + 0.5, 0, 1) * np.clip(
            (s_range[1] - s_row) / 4.0 + 0.5, 0, 1
        )
    live = np.nonzero(weight > 0)[0]
    if live.size == 0:
        return
    c0 = max(
        0, int(np.floor((float(min(u_lo[live].min(), u_hi[live].min())) - canvas.a[0]) / canvas.spacing)) - 2
    )
    c1 = min(canvas.a.size, int(np.ceil((float(u_hi[live].max()) - canvas.a[0]) / canvas.spacing)) + 3)
    if c0 >= c1:
        return
    win = (slice(int(live[0]), int(live[-1]) + 1), slice(c0, c1))
    a = canvas.a[win[1]][None, :]
    e = canvas.edge
    alpha = (
        np.clip((a - u_lo[win[0], None]) / e + 0.5, 0, 1)
        * np.clip((u_hi[win[0], None] - a) / e + 0.5, 0, 1)
        * weight[win[0], None]
    )
    canvas.paint(win, alpha, values, texture)


def _paint_bone(
    canvas: _Canvas,
    tex: _Textures,
    centre: F64,
    phi: float,
    half: tuple[float, float],
    marrow: Sequence[float],
    cortex: F32,
    strength: float = 1.0,
) -> None:
    """A bone block: dark cortical rim about 1.2 mm thick, textured marrow inside."""
    hx, hy = half
    win = canvas.window(centre, float(np.hypot(hx, hy)) + 2.0)
    if win is None or strength <= 0:
        return
    x, y = canvas.local(win, centre, phi)
    d = _sd_rect(x, y, hx, hy, 3.0)
    canvas.paint(win, canvas.alpha(d) * np.float32(strength), cortex)
    canvas.paint(win, canvas.alpha(d + 1.2) * np.float32(strength), marrow, tex.marrow)


def _render_sagittal(plan: _Plan, lateral: float, rng: np.random.Generator) -> F32:
    """Both contrasts (T2, T1) of the sagittal slice `lateral` mm from the midline (+ = patient left)."""
    dy, dx = (int(v) for v in rng.integers(0, _TEXTURE_PAD + 1, 2))
    tex = plan.textures.crop(dy, dx, plan.rows, plan.cols)
    # Slight patient obliquity: lateral slices see the anatomy shifted in-plane.
    canvas = _Canvas(
        plan.rows, plan.cols, plan.spacing, -lateral * plan.obliquity[0], -lateral * plan.obliquity[1]
    )
    t = plan.tissue
    prof = plan.profile
    hw, ca = prof["hw"], prof["ca"]
    canal_front = hw + 1.5
    canal_back = canal_front + ca
    skin_back = canal_back + prof["back"]
    skin_front = -(hw + prof["front"])
    fat_back = 0.2 * prof["back"]
    fat_front = 0.15 * prof["front"]
    body = plan.lateral_half_width
    # Psoas and prevertebral vessels push the bowel forwards, more so off the midline.
    psoas = 25.0 * float(np.clip((abs(lateral) - 8.0) / 20.0, 0.0, 1.0))
    gut = -(hw + 3.0 + 2 * plan.aorta[1] + 4.0 + psoas + np.abs(prof["gut"]))

    _paint_band(canvas, plan, skin_front, skin_back, t("muscle"), texture=tex.muscle, far=True)
    _paint_band(canvas, plan, skin_front + fat_front + 10.0, gut, (tex.bowel_t2, tex.bowel_t1))
    _paint_band(canvas, plan, skin_front, skin_front + fat_front, t("fat"), texture=tex.fat, far=True)
    _paint_band(canvas, plan, skin_back - fat_back, skin_back, t("fat"), texture=tex.fat, far=True)
    _paint_band(canvas, plan, skin_back - 1.5, skin_back, t("skin"), far=True)
    _paint_band(canvas, plan, skin_front, skin_front + 1.5, t("skin"), far=True)
    if abs(lateral) < body:
        _paint_band(canvas, plan, -(hw + 3.0), -(hw + 0.3), t("fat"), strength=0.6)
    if plan.bladder is not None:
        bu, bv, br = plan.bladder
        vis = max(0.0, 1.0 - (lateral / (br * 1.1)) ** 2) ** 0.5
        win = canvas.window((bu, bv), br + 2)
        if win is not None and vis > 0.1:
            x, y = canvas.local(win, (bu, bv), 0.0)
            canvas.paint(win, canvas.alpha(_sd_ellipse(x, y, br * vis, 0.8 * br * vis)), t("fluid"))
    vessels = ((plan.aorta, "flow_void", plan.aorta_end_s), (plan.ivc, "ivc", plan.arc["L5"]))
    for (vx, vr), tissue, end in vessels:
        chord = max(0.0, 1.0 - ((lateral - vx) / vr) ** 2) ** 0.5
        if chord > 0.05:
            lo = -(hw + 3.0 + vr * (1 + chord))
            _paint_band(canvas, plan, lo, lo + 2 * vr * chord, t(tissue), s_range=(-1e9, end))

    # Spinal canal: ligaments, epidural fat, thecal sac with cord or cauda equina.
    c_half = plan.canal_half_width
    g = max(0.0, 1.0 - (lateral / c_half) ** 2) ** 0.5
    g_fat = max(0.0, 1.0 - (lateral / (c_half + 4.0)) ** 2) ** 0.5
    if g_fat > 0:
        _paint_band(canvas, plan, canal_front - 1.3, canal_back + 2.5, t("ligament"))
        _paint_band(canvas, plan, canal_front, canal_back, t("epidural_fat"), strength=g_fat)
    if g > 0.05:
        shrink = (1.0 - g) * ca / 2.0
        sac_lo, sac_hi = canal_front + 0.6 + shrink, canal_back - 0.8 - shrink
        _paint_band(canvas, plan, sac_lo, sac_hi, t("csf"), s_range=(-1e9, plan.thecal_end_s))
        mid = 0.5 * (sac_lo + sac_hi)
        cord_hw = 0.22 * ca * g
        _paint_band(canvas, plan, mid - cord_hw, mid + cord_hw, t("cord"), s_range=(-1e9, plan.conus_s))
        for frac in plan.root_offsets:
            off = sac_lo + (sac_hi - sac_lo) * float(frac)
            _paint_band(
                canvas,
                plan,
                off - 0.45,
                off + 0.45,
                t("root"),
                s_range=(plan.conus_s, plan.thecal_end_s),
                strength=0.45,
            )

    _paint_posterior_elements(canvas, plan, lateral, tex)
    _paint_discs(canvas, plan, lateral)
    _paint_bodies(canvas, plan, lateral, tex)
    _paint_disc_disease(canvas, plan, lateral)
    return canvas.img


def _lateral_depth(plan: _Plan, lateral: float) -> float:
    """The share of a body's AP depth cut by a slice `lateral` mm off the midline (bodies are ~elliptic)."""
    return max(0.0, 1.0 - (lateral / plan.lateral_half_width) ** 2) ** 0.5


def _marrow(plan: _Plan, gain: tuple[float, float] = (1.0, 1.0)) -> tuple[float, float]:
    m = plan.tissue("marrow")
    return float(m[0]) * gain[0], float(m[1]) * gain[1]


def _paint_posterior_elements(canvas: _Canvas, plan: _Plan, lateral: float, tex: _Textures) -> None:
    """Spinous processes near the midline; laminae, pedicles, facets and neural foramina further out."""
    ax = abs(lateral)
    cortex = plan.tissue("cortex")
    bone = _marrow(plan, (0.95, 0.95))
    spinous = float(np.clip(1.0 - (ax - 3.0) / 4.0, 0.0, 1.0))
    lamina = float(np.clip(1.0 - abs(ax - 9.0) / 6.0, 0.0, 1.0))
    pillar = float(np.clip(1.0 - abs(ax - 18.0) / 7.0, 0.0, 1.0))
    for body in plan.bodies:
        sacral = body.name.startswith("S")
        if sacral and body.name not in ("S1", "S2", "S3"):
            continue
        hb, hw = body.half_height, body.half_depth
        canal = plan.at("ca", plan.arc[body.name])
        start = hw + 1.5 + canal
        if spinous > 0:
            lumbar = body.name.startswith("L")
            length = 10.0 if sacral else 26.0 if lumbar else 30.0
            droop = _deg(5.0 if sacral else 14.0 if lumbar else 35.0)
            phi = body.phi + droop
            direction = np.array([np.cos(phi), np.sin(phi)])
            c = body.centre + body.back * start - body.up * (0.25 * hb) + direction * (0.5 * length)
            height = 0.7 * hb if sacral else 0.55 * hb
            _paint_bone(canvas, tex, c, phi, (0.5 * length, height), bone, cortex, spinous)
        if lamina > 0 and not sacral:
            c = body.centre + body.back * (start + 5.0) - body.up * (0.15 * hb)
            _paint_bone(canvas, tex, c, body.phi, (5.0, 0.7 * hb), bone, cortex, lamina)
        if pillar > 0 and not sacral:
            # Foramen (fat with the exiting root) below the pedicle, behind the disc.
            fc = body.centre + body.back * (hw + 0.5 * canal + 1.0) - body.up * (hb + 2.0)
            win = canvas.window(fc, hb + 6.0)
            if win is not None:
                x, y = canvas.local(win, fc, body.phi)
                canvas.paint(
                    win,
                    canvas.alpha(_sd_ellipse(x, y, 0.5 * canal + 2.0, 0.65 * hb + 3.0)) * pillar,
                    plan.tissue("epidural_fat"),
                )
                x, y = canvas.local(win, fc + body.up * (0.3 * hb), body.phi)
                canvas.paint(win, canvas.alpha(_sd_ellipse(x, y, 2.5, 2.5)) * pillar, plan.tissue("root"))
            pc = body.centre + body.back * (hw + 0.5 * canal) + body.up * (0.35 * hb)
            _paint_bone(canvas, tex, pc, body.phi, (0.5 * canal + 4.0, 0.4 * hb), bone, cortex, pillar)
            fc2 = body.centre + body.back * (start + 6.0) - body.up * (0.1 * hb)
            _paint_bone(canvas, tex, fc2, body.phi, (6.5, 0.85 * hb), bone, cortex, pillar)


def _disc_half(disc: _Element, x: F32 | float) -> F32 | float:
    """Half-height of a wedge-shaped disc at depth x (anterior and posterior heights differ)."""
    hd = disc.half_depth
    return 0.25 * (disc.front_height + disc.back_height) + 0.25 * (disc.back_height - disc.front_height) * (
        x / hd
    )


def _paint_discs(canvas: _Canvas, plan: _Plan, lateral: float) -> None:
    """Discs: dark annulus, bright (healthy) or dark (degenerated) nucleus with a faint intranuclear cleft."""
    f = _lateral_depth(plan, lateral)
    if f < 0.2:
        return
    annulus = plan.tissue("annulus")
    nucleus = plan.tissue("nucleus")
    dark = plan.tissue("nucleus_degenerated")
    for k, disc in enumerate(plan.discs):
        hd = disc.half_depth * f
        centre = disc.centre + disc.back * (disc.half_depth - hd)
        win = canvas.window(centre, hd + disc.half_height + 6.0)
        if win is None:
            continue
        x, y = canvas.local(win, centre, disc.phi)
        # The wedge in the full disc's depth coordinate, so a lateral cut keeps the posterior heights.
        half = np.maximum(_disc_half(disc, x + np.float32(disc.half_depth - hd)), 0.8) + np.float32(1.2)
        sd = np.maximum(np.abs(y) - half, np.abs(x) - np.float32(hd))
        if disc.name.startswith("S"):
            canvas.paint(win, canvas.alpha(sd), (float(annulus[0]) * 0.9, float(annulus[1])))
            continue
        canvas.paint(win, canvas.alpha(sd), annulus)
        if disc.name in DISCS:
            level = plan.disc_disease[DISCS.index(disc.name)].nucleus_t2
        else:
            level = 0.9 if k % 2 else 0.8
        value = (float(dark[0] + (nucleus[0] - dark[0]) * level), float(nucleus[1]))
        centre_half = float(_disc_half(disc, 0.1 * disc.half_depth))
        nuc = _sd_ellipse(x - np.float32(0.1 * hd), y, 0.62 * hd, max(0.8, 0.6 * centre_half))
        canvas.paint(win, canvas.alpha(nuc), value)
        if level > 0.5:
            cleft = np.maximum(np.abs(y) - 0.35, np.abs(x) - np.float32(0.45 * hd))
            canvas.paint(win, canvas.alpha(cleft) * np.float32(0.35), annulus)


def _paint_bodies(canvas: _Canvas, plan: _Plan, lateral: float, tex: _Textures) -> None:
    """Vertebral bodies: cortex and marrow; degenerated lumbar bodies get marrow and endplate-band changes."""
    f = _lateral_depth(plan, lateral)
    if f < 0.15:
        return
    cortex = plan.tissue("cortex")
    for body in plan.bodies:
        hw = body.half_depth * f
        centre = body.centre + body.back * (body.half_depth - hw)
        disease = plan.body_disease[VERTEBRAE.index(body.name)] if body.name in VERTEBRAE else None
        bone = _marrow(plan, disease.marrow_gain if disease is not None else (1.0, 1.0))
        win = canvas.window(centre, body.half_height + hw + 6.0)
        if win is None:
            continue
        x, y = canvas.local(win, centre, body.phi)
        if disease is not None and disease.osteophyte_mm > 0:
            for side in (-1.0, 1.0):
                yc = np.float32(side * (body.half_height - 0.5))
                spur = _sd_ellipse(
                    x + np.float32(hw - 0.5), y - yc, disease.osteophyte_mm, 1.2 + 0.5 * disease.osteophyte_mm
                )
                canvas.paint(win, canvas.alpha(spur), cortex)
        d = _sd_rect(x, y, hw, body.half_height, 3.0)
        canvas.paint(win, canvas.alpha(d), cortex)
        inside = canvas.alpha(d + 1.3)
        canvas.paint(win, inside, bone, tex.marrow)
        if disease is not None and disease.band_mm > 0:
            band_values = (bone[0] * disease.band_gain[0], bone[1] * disease.band_gain[1])
            for side, on in zip((1.0, -1.0), disease.band_sides, strict=True):
                if on:
                    band = np.float32(body.half_height - 1.3 - disease.band_mm) - np.float32(side) * y
                    canvas.paint(win, inside * canvas.alpha(band), band_values, tex.marrow)


def _paint_disc_disease(canvas: _Canvas, plan: _Plan, lateral: float) -> None:
    """Posterior disc contour (bulge, protrusion, extrusion) into the canal; Schmorl's nodes as notches."""
    f = _lateral_depth(plan, lateral)
    herniation = plan.tissue("herniation")
    annulus = plan.tissue("annulus")
    for disc in plan.discs:
        if disc.name not in DISCS:
            continue
        disease = plan.disc_disease[DISCS.index(disc.name)]
        labels = disease.labels
        hd = disc.half_depth
        win = canvas.window(disc.centre, hd + 25.0)
        if win is None:
            continue
        x, y = canvas.local(win, disc.centre, disc.phi)
        hp = 0.5 * disc.back_height
        focal = np.float32(np.exp(-(((lateral - disease.lateral_mm) / 9.0) ** 2)))
        if "v2" in labels and f > 0.2:
            d = _sd_ellipse(x - np.float32(hd - 0.5), y, disease.bulge_depth + 0.5, max(3.5, hp + 1.8))
            canvas.paint(win, canvas.alpha(d) * np.float32(min(1.0, 1.4 * f)), annulus)
        if "v3" in labels:
            depth, tall = disease.protrusion
            d = _sd_ellipse(
                x - np.float32(hd + 0.5 * depth - 1.5), y, 0.5 * depth + 1.5, max(4.0, tall * hp + 2.0)
            )
            canvas.paint(win, canvas.alpha(d) * focal, herniation)
        if "v4" in labels:
            depth, tall, migrate = disease.extrusion
            reach = 0.5 * (depth - 0.5)
            neck = _sd_ellipse(x - np.float32(hd + 1.0), y, 3.5, max(2.5, hp + 0.5))
            frag = _sd_ellipse(x - np.float32(hd + 0.5 + reach), y - np.float32(migrate), reach, tall)
            canvas.paint(win, canvas.alpha(np.minimum(neck, frag)) * focal, herniation)
        if "v5" in labels and f > 0.3:
            pos, rx, ry = disease.schmorl
            side = np.float32(disease.schmorl_side)
            xs = np.float32(pos * hd)
            yc = side * np.float32(max(float(_disc_half(disc, pos * hd)), 0.8))
            into_body = canvas.alpha(np.float32(0.5) - side * (y - yc))
            rim = _sd_ellipse(x - xs, y - yc, rx + 1.4, ry + 1.4)
            canvas.paint(win, canvas.alpha(rim) * into_body, plan.tissue("cortex"))
            core = _sd_ellipse(x - xs, y - yc, rx, ry)
            canvas.paint(
                win,
                canvas.alpha(core) * canvas.alpha(np.float32(-1.0) - side * (y - yc)),
                plan.tissue("schmorl"),
            )


# ----------------------------------------------------------------------------------------------------
# Axial slices


def _render_axial(
    plan: _Plan, vs: Sequence[float], fov: float, rng: np.random.Generator
) -> tuple[list[F32], float, float]:
    """Both contrasts of parallel axial slices at sagittal depths `vs` (mm), sharing one in-plane origin,
    returned as (x, u) in millimetres. The trunk is drawn once, at the middle slice's level."""
    rows, cols = plan.rows, plan.cols
    sp = fov / cols
    s_ref = float(np.interp(vs[len(vs) // 2], plan.near[1], plan.centre_s))
    u_ref = float(np.interp(s_ref, plan.centre_s, plan.near[0]))
    a0 = -0.5 * cols * sp
    b0 = u_ref + 30.0 - 0.5 * rows * sp
    canvas = _Canvas(rows, cols, sp, a0, b0)
    tex = plan.textures.crop(0, 0, rows, cols)
    t = plan.tissue

    def ellipse(
        cx: float, cy: float, rx: float, ry: float, values: Values, texture: F32 | None = None
    ) -> None:
        win = canvas.window((cx, cy), max(rx, ry) + 3.0)
        if win is not None:
            x, y = canvas.local(win, (cx, cy), 0.0)
            canvas.paint(win, canvas.alpha(_sd_ellipse(x, y, rx, ry)), values, texture)

    def rect(
        cx: float,
        cy: float,
        hx: float,
        hy: float,
        phi: float,
        values: Values,
        texture: F32 | None = None,
        grow: float = 0.0,
    ) -> None:
        win = canvas.window((cx, cy), float(np.hypot(hx, hy)) + 3.0)
        if win is not None:
            x, y = canvas.local(win, (cx, cy), phi)
            canvas.paint(win, canvas.alpha(_sd_rect(x, y, hx + grow, hy + grow, 2.0)), values, texture)

    def bone(cx: float, cy: float, hx: float, hy: float, phi: float = 0.0) -> None:
        rect(cx, cy, hx, hy, phi, t("cortex"), grow=1.0)
        rect(cx, cy, hx, hy, phi, _marrow(plan), tex.marrow)

    hw, ca = plan.at("hw", s_ref), plan.at("ca", s_ref)
    back, front = plan.at("back", s_ref), plan.at("front", s_ref)
    skin_back = u_ref + hw + 1.5 + ca + back
    skin_front = u_ref - hw - front
    trunk_c, trunk_ry = 0.5 * (skin_back + skin_front), 0.5 * (skin_back - skin_front)
    tw = plan.trunk_half_width
    fat_t = 0.2 * back
    ellipse(0.0, trunk_c, tw, trunk_ry, t("skin"))
    ellipse(0.0, trunk_c, tw - 1.5, trunk_ry - 1.5, t("fat"), tex.fat)
    ellipse(0.0, trunk_c, tw - fat_t, trunk_ry - fat_t, t("muscle"), tex.muscle)
    ellipse(0.0, trunk_c, tw - fat_t - 12.0, trunk_ry - fat_t - 12.0, (tex.bowel_t2, tex.bowel_t1))
    background = canvas.img.copy()
    images: list[F32] = []
    for v in vs:
        dy, dx = (int(k) for k in rng.integers(0, _TEXTURE_PAD + 1, 2))
        tex = plan.textures.crop(dy, dx, rows, cols)
        canvas.img = background.copy()
        s = float(np.interp(v, plan.near[1], plan.centre_s))
        u_c = float(np.interp(s, plan.centre_s, plan.near[0]))
        images.append(_axial_spine(plan, canvas, tex, v, s, u_c, ellipse, rect, bone))
    return images, a0, b0


def _axial_spine(
    plan: _Plan,
    canvas: _Canvas,
    tex: _Textures,
    v: float,
    s: float,
    u_c: float,
    ellipse: Callable[..., None],
    rect: Callable[..., None],
    bone: Callable[..., None],
) -> F32:
    """The retroperitoneum, vessels, spine and canal of one axial slice, painted over its trunk."""
    t = plan.tissue
    lat = plan.lateral_half_width
    c_half = plan.canal_half_width
    hw, ca, back = plan.at("hw", s), plan.at("ca", s), plan.at("back", s)
    canal_c = u_c + hw + 1.5 + 0.5 * ca
    # Retroperitoneum: fat around the spine and psoas; paraspinal muscles behind, vessels in front.
    ellipse(0.0, u_c + 5.0, lat + 45.0, hw + 22.0, t("fat") * np.float32(0.85), tex.fat)
    level = float(np.clip((s - plan.aorta_end_s + 150.0) / 150.0, 0.35, 1.0))
    for side in (-1.0, 1.0):
        ellipse(
            side * (lat + 15.0 * level), u_c - 0.1 * hw, 16.0 * level, 19.0 * level, t("muscle"), tex.muscle
        )
        ellipse(side * (lat + 38.0), u_c + hw + 12.0, 16.0, 11.0, t("muscle"), tex.muscle)
        ellipse(
            side * 25.0, canal_c + 0.5 * ca + 22.0, 22.0, min(26.0, 0.5 * back - 2.0), t("muscle"), tex.muscle
        )
    if s < plan.aorta_end_s:
        ellipse(plan.aorta[0], u_c - hw - 3.0 - plan.aorta[1], plan.aorta[1], plan.aorta[1], t("flow_void"))
        ellipse(plan.ivc[0], u_c - hw - 3.0 - plan.ivc[1], plan.ivc[1] * 1.3, plan.ivc[1] * 0.8, t("ivc"))
    else:
        for side in (-1.0, 1.0):
            ellipse(side * 20.0, u_c - hw - 9.0, 6.0, 6.0, t("flow_void"))

    # The vertebra or disc the plane cuts, the canal and the posterior arch.
    disc = next((d for d in plan.discs if abs((np.array([u_c, v]) - d.centre) @ d.up) < d.half_height), None)
    ellipse(0.0, canal_c, c_half + 3.0, 0.5 * ca + 1.5, t("epidural_fat"))
    for side in (-1.0, 1.0):  # facet joints, with a thin joint line
        bone(side * (c_half + 6.0), canal_c + 0.5 * ca + 1.0, 5.0, 4.5, side * 0.6)
        rect(side * (c_half + 6.0), canal_c + 0.5 * ca + 1.0, 0.4, 4.5, side * 0.6, t("ligament"))
    if disc is None:
        for side in (-1.0, 1.0):  # pedicles, transverse processes, laminae
            bone(side * (c_half + 3.0), canal_c - 0.1 * ca, 3.5, 0.5 * ca + 1.0)
            bone(side * (c_half + 22.0), canal_c - 0.2 * ca, 14.0, 3.0, side * 0.15)
            bone(side * 0.5 * c_half, canal_c + 0.5 * ca + 6.0, 0.6 * c_half, 2.8, -side * 0.5)
        bone(0.0, canal_c + 0.5 * ca + 18.0, 3.0, 13.0)
    else:
        for side in (-1.0, 1.0):  # ligamenta flava
            rect(side * 0.5 * c_half, canal_c + 0.5 * ca + 2.0, 0.6 * c_half, 1.5, -side * 0.5, t("ligament"))
    ellipse(0.0, canal_c, c_half, 0.5 * ca, t("csf"))
    if s < plan.conus_s:
        ellipse(0.0, canal_c, 5.0, 4.0, t("cord"))
    else:
        for k, frac in enumerate(plan.root_offsets):
            ellipse((k - 1.5) * 0.45 * c_half, canal_c - 0.5 * ca + ca * float(frac), 1.1, 1.1, t("root"))
    if disc is not None and disc.name in DISCS:
        disease = plan.disc_disease[DISCS.index(disc.name)]
        ellipse(0.0, u_c, lat, hw, t("annulus"))
        nucleus, dark = t("nucleus"), t("nucleus_degenerated")
        ellipse(
            0.0,
            u_c,
            0.55 * lat,
            0.5 * hw,
            (float(dark[0] + (nucleus[0] - dark[0]) * disease.nucleus_t2), float(nucleus[1])),
        )
        if "v2" in disease.labels:
            ellipse(0.0, u_c + hw - 4.0, 0.8 * lat, 4.0 + disease.bulge_depth, t("annulus"))
        if "v3" in disease.labels:
            ellipse(
                1.5 * disease.lateral_mm, u_c + hw, 7.0, 0.5 * disease.protrusion[0] + 1.5, t("herniation")
            )
        if "v4" in disease.labels:
            ellipse(
                1.5 * disease.lateral_mm,
                u_c + hw + 2.0,
                9.0,
                0.5 * disease.extrusion[0] + 1.5,
                t("herniation"),
            )
    elif disc is not None:
        ellipse(0.0, u_c, lat, hw, t("annulus"))
    else:
        ellipse(0.0, u_c, lat + 1.2, hw + 1.2, t("cortex"))
        ellipse(0.0, u_c, lat, hw, _marrow(plan), tex.marrow)
    return canvas.img


# ----------------------------------------------------------------------------------------------------
# DICOM


def _uid(token: str, *parts: object) -> str:
    """A 2.25 UID from a name-based UUID: the same study token and role always give the same UID."""
    name = "/".join([token, *(str(p) for p in parts)])
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def _ds(value: float) -> str:
    """A decimal string of at most 16 characters."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text if len(text) <= 16 else f"{value:.8g}"


def _tm(seconds: int) -> str:
    seconds %= 24 * 3600
    return f"{seconds // 3600:02d}{(seconds // 60) % 60:02d}{seconds % 60:02d}"


@dataclass(frozen=True)
class _Series:
    role: str
    description: str
    number: int
    weighting: str
    orientation: tuple[float, ...]
    spacing: tuple[float, float]
    thickness: float
    between: float
    offset_seconds: int


def _to_pixels(img: F32, gain: float) -> npt.NDArray[np.uint16]:
    top = (1 << BITS_STORED) - 1
    out: npt.NDArray[np.uint16] = np.clip(np.rint(img * np.float32(gain)), 0, top).astype(np.uint16)
    return out


def _series_template(plan: _Plan, series: _Series, window: tuple[float, float]) -> _EncodedSeries:
    """The attributes every instance of a series shares: Patient, General Study, General Series, Frame of
    Reference, General Equipment, Image Pixel description, MR Image and VOI LUT."""
    token = plan.token
    study_date = plan.study_date.strftime("%Y%m%d")
    acquired = plan.study_seconds + series.offset_seconds
    t2 = series.weighting == "T2"
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.SOPClassUID = MRImageStorage
    ds.StudyDate = study_date
    ds.SeriesDate = study_date
    ds.AcquisitionDate = study_date
    ds.ContentDate = study_date
    ds.StudyTime = _tm(plan.study_seconds)
    ds.SeriesTime = _tm(acquired)
    ds.AcquisitionTime = _tm(acquired)
    ds.ContentTime = _tm(acquired + 60)
    ds.AccessionNumber = plan.patient["accession"]
    ds.Modality = "MR"
    ds.Manufacturer = MANUFACTURER
    ds.InstitutionName = "Phantom Hospital"
    ds.ReferringPhysicianName = ""
    ds.StationName = "PHANTOM01"
    ds.StudyDescription = STUDY_DESCRIPTION
    ds.SeriesDescription = series.description
    ds.ManufacturerModelName = "synthetic"
    ds.PatientName = plan.patient["name"]
    ds.PatientID = plan.patient["id"]
    ds.PatientBirthDate = plan.patient["birth"]
    ds.PatientSex = plan.patient["sex"]
    ds.PatientAge = plan.patient["age"]
    ds.BodyPartExamined = "LSPINE"
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = ["SK", "SP"]
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.SequenceName = "*tse2d1_17" if t2 else "*tse2d1_3"
    ds.AngioFlag = "N"
    ds.SliceThickness = _ds(series.thickness)
    ds.RepetitionTime = "3500" if t2 else "550"
    ds.EchoTime = "96" if t2 else "11"
    ds.NumberOfAverages = "2"
    ds.ImagingFrequency = _ds(42.577478 * plan.field_strength)
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = "1"
    ds.MagneticFieldStrength = _ds(plan.field_strength)
    ds.SpacingBetweenSlices = _ds(series.between)
    ds.NumberOfPhaseEncodingSteps = str(plan.cols)
    ds.EchoTrainLength = "17" if t2 else "3"
    ds.PercentSampling = "100"
    ds.PercentPhaseFieldOfView = "100"
    ds.PixelBandwidth = "200"
    ds.SoftwareVersions = __version__
    ds.ProtocolName = series.description
    ds.ReceiveCoilName = "SPINE"
    ds.TransmitCoilName = "BODY"
    ds.AcquisitionMatrix = [0, plan.cols, plan.rows, 0]
    ds.InPlanePhaseEncodingDirection = "ROW"
    ds.FlipAngle = "150"
    ds.VariableFlipAngleFlag = "N"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = _uid(token, "study")
    ds.SeriesInstanceUID = _uid(token, series.role, "series")
    ds.StudyID = plan.patient["study_id"]
    ds.SeriesNumber = str(series.number)
    ds.AcquisitionNumber = "1"
    ds.ImageOrientationPatient = [_ds(o) for o in series.orientation]
    ds.FrameOfReferenceUID = _uid(token, "frame-of-reference")
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = plan.rows
    ds.Columns = plan.cols
    ds.PixelSpacing = [_ds(series.spacing[0]), _ds(series.spacing[1])]
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.WindowCenter = _ds(window[0])
    ds.WindowWidth = _ds(window[1])
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, implicit_vr=False, little_endian=True)
    return _EncodedSeries(buffer.getvalue())


_LONG_VRS: Final[frozenset[bytes]] = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)


def _encode(tag: int, vr: str, value: bytes) -> bytes:
    """One Explicit VR Little Endian element (value padded to even length as its VR requires)."""
    if len(value) % 2:
        value += b"\x00" if vr in ("UI", "OB") else b" "
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode("ascii")
    if vr.encode("ascii") in _LONG_VRS:
        return head + b"\x00\x00" + struct.pack("<L", len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def _split_elements(data: bytes) -> list[tuple[int, bytes]]:
    """(tag, encoded element) pairs of an Explicit VR Little Endian data set that holds no sequences."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(data):
        group, element = struct.unpack_from("<HH", data, pos)
        if data[pos + 4 : pos + 6] in _LONG_VRS:
            end = pos + 12 + struct.unpack_from("<L", data, pos + 8)[0]
        else:
            end = pos + 8 + struct.unpack_from("<H", data, pos + 6)[0]
        out.append(((group << 16) | element, data[pos:end]))
        pos = end
    return out


class _EncodedSeries:
    """A series' shared attributes, encoded once by pydicom.

    In-memory instances get their own dict of pydicom's immutable raw elements (decoded into that instance's
    own DataElement only when read), so instances share nothing mutable; files are the same encoded elements
    merged in tag order with the few per-instance ones, which is what makes writing fast.
    """

    def __init__(self, encoded: bytes) -> None:
        self.chunks = _split_elements(encoded)
        raw = dcmread(io.BytesIO(encoded), force=True)
        self.raw: dict[BaseTag, DataElement | RawDataElement] = {
            tag: raw.get_item(tag) for tag in sorted(raw.keys())
        }


@dataclass(frozen=True)
class _Instance:
    """One MR Image Storage instance: its series template plus SOP Common, General Image, Image Plane and
    the pixels."""

    series: _EncodedSeries
    sop_uid: str
    number: int
    position: tuple[float, float, float]
    location: float
    pixels: npt.NDArray[np.uint16]

    def _own(self) -> list[tuple[int, str, bytes]]:
        return [
            (0x00080018, "UI", self.sop_uid.encode("ascii")),
            (0x00200013, "IS", str(self.number).encode("ascii")),
            (0x00200032, "DS", "\\".join(_ds(p) for p in self.position).encode("ascii")),
            (0x00201041, "DS", _ds(self.location).encode("ascii")),
            (0x7FE00010, "OW", self.pixels.astype("<u2").tobytes()),
        ]

    def _meta(self) -> list[tuple[int, str, bytes]]:
        return [
            (0x00020001, "OB", b"\x00\x01"),
            (0x00020002, "UI", MRImageStorage.encode("ascii")),
            (0x00020003, "UI", self.sop_uid.encode("ascii")),
            (0x00020010, "UI", ExplicitVRLittleEndian.encode("ascii")),
            (0x00020012, "UI", PYDICOM_IMPLEMENTATION_UID.encode("ascii")),
            (0x00020013, "SH", _IMPLEMENTATION_VERSION.encode("ascii")),
        ]

    def dataset(self) -> Dataset:
        ds = Dataset(dict(self.series.raw))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = UID(self.sop_uid)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = _IMPLEMENTATION_VERSION
        ds.file_meta = meta
        ds.preamble = b"\x00" * 128
        ds.SOPInstanceUID = self.sop_uid
        ds.InstanceNumber = str(self.number)
        ds.ImagePositionPatient = [_ds(p) for p in self.position]
        ds.SliceLocation = _ds(self.location)
        ds.PixelData = self.pixels.astype("<u2").tobytes()
        ds["PixelData"].VR = "OW"
        return ds

    def file_bytes(self) -> bytes:
        """The DICOM Part 10 file: preamble, DICM, File Meta Information, then the data set in tag order."""
        meta = b"".join(_encode(tag, vr, value) for tag, vr, value in self._meta())
        own = [(tag, _encode(tag, vr, value)) for tag, vr, value in self._own()]
        body = b"".join(chunk for _, chunk in sorted(self.series.chunks + own, key=lambda item: item[0]))
        group_length = _encode(0x00020000, "UL", struct.pack("<L", len(meta)))
        return b"\x00" * 128 + b"DICM" + group_length + meta + body


def _window(pixels: npt.NDArray[np.uint16]) -> tuple[float, float]:
    lo, hi = np.percentile(pixels, [1.0, 99.5])
    return float(np.round(0.5 * (lo + hi))), float(max(1.0, np.round(hi - lo)))


# ----------------------------------------------------------------------------------------------------
# Public API


def render_study(
    rng: np.random.Generator,
    study_index: int,
    *,
    sagittal_slices: int | None = None,
    rows: int = 256,
    cols: int = 256,
    labels: Sequence[frozenset[str]] | None = None,
) -> tuple[list[Dataset], PhantomTruth]:
    """Every instance of one synthetic lumbar MR study (sagittal T2, sagittal T1, axial T2) and its truth.

    `sagittal_slices` None draws 9..15. `labels` (11 sets in STRUCTURES order) overrides the drawn diagnoses;
    the generator is consumed identically either way, so the same seed with other labels gives the same
    study except for the disease drawn.
    """
    instances, truth = _render(rng, study_index, sagittal_slices, rows, cols, labels)
    return [instance.dataset() for instance in instances], truth


def _render(
    rng: np.random.Generator,
    study_index: int,
    sagittal_slices: int | None,
    rows: int,
    cols: int,
    labels: Sequence[frozenset[str]] | None,
) -> tuple[list[_Instance], PhantomTruth]:
    if rows < 32 or cols < 32:
        raise ValueError(f"rows and cols must be >= 32, got {rows}x{cols}")
    if study_index < 0:
        raise ValueError(f"study_index must be >= 0, got {study_index}")
    if sagittal_slices is not None and sagittal_slices < 1:
        raise ValueError(f"sagittal_slices must be >= 1, got {sagittal_slices}")
    plan = _plan_study(rng, study_index, sagittal_slices, rows, cols, labels)
    sp = plan.spacing
    between = plan.slice_thickness + plan.slice_gap
    n = plan.sagittal_slices
    mid = n // 2
    laterals = [(k - mid) * between for k in range(n)]
    t2_sag = _Series(
        "sag-t2",
        SAGITTAL_T2_DESCRIPTION,
        3,
        "T2",
        SAGITTAL_ORIENTATION,
        (sp, sp),
        plan.slice_thickness,
        between,
        300,
    )
    t1_sag = _Series(
        "sag-t1",
        SAGITTAL_T1_DESCRIPTION,
        2,
        "T1",
        SAGITTAL_ORIENTATION,
        (sp, sp),
        plan.slice_thickness,
        between,
        0,
    )
    ax_sp = plan.axial_fov / cols
    ax_between = 4.0 + plan.slice_gap
    t2_ax = _Series(
        "ax-t2", AXIAL_T2_DESCRIPTION, 4, "T2", AXIAL_ORIENTATION, (ax_sp, ax_sp), 4.0, ax_between, 600
    )

    t2_bias = _bias_field(plan.bias[0], rows, cols, 0.45)
    t1_bias = _bias_field(plan.bias[1], rows, cols, 0.45)
    t2_pool = _noise_pool(rng, rows, cols, plan.noise)
    t1_pool = _noise_pool(rng, rows, cols, plan.noise)
    t2_images: list[F32] = []
    t1_images: list[F32] = []
    for lateral in laterals:
        img = _render_sagittal(plan, lateral, rng)
        t2_images.append(_finish(img[0], t2_pool, rng, t2_bias))
        t1_images.append(_finish(img[1], t1_pool, rng, t1_bias))

    order = list(range(n))[::-1] if plan.sagittal_descending else list(range(n))
    instances: list[_Instance] = []
    annotated_uid = ""
    for series, images, gain in ((t1_sag, t1_images, plan.gains[1]), (t2_sag, t2_images, plan.gains[0])):
        series_pixels = [_to_pixels(im, gain) for im in images]
        template = _series_template(plan, series, _window(series_pixels[mid]))
        for number, k in enumerate(order, start=1):
            x = plan.midline_x + laterals[k]
            position = (x, plan.origin_y, plan.origin_z)
            uid = _uid(plan.token, series.role, "instance", number)
            instances.append(_Instance(template, uid, number, position, x, series_pixels[k]))
            if series is t2_sag and k == mid:
                annotated_uid = uid

    # Axial block through one of the three lowest discs.
    disc = next(d for d in plan.discs if d.name == DISCS[plan.axial_disc])
    ax_bias = _bias_field(plan.bias[2], rows, cols, 0.0)
    ax_vs = [
        float(disc.centre[1]) + (k - plan.axial_slices // 2) * ax_between for k in range(plan.axial_slices)
    ]
    ax_renders, a0, b0 = _render_axial(plan, ax_vs, plan.axial_fov, rng)
    ax_pool = _noise_pool(rng, rows, cols, plan.noise)
    ax_images = [_finish(img[0], ax_pool, rng, ax_bias) for img in ax_renders]
    ax_pixels = [_to_pixels(im, plan.gains[2]) for im in ax_images]
    template = _series_template(plan, t2_ax, _window(ax_pixels[len(ax_pixels) // 2]))
    for number, (pixels, v) in enumerate(zip(ax_pixels, ax_vs, strict=True), start=1):
        z = plan.origin_z - v
        position = (plan.midline_x + a0, plan.origin_y + b0, z)
        uid = _uid(plan.token, t2_ax.role, "instance", number)
        instances.append(_Instance(template, uid, number, position, z, pixels))

    by_name = {e.name: e for e in plan.bodies + plan.discs}
    points = np.array([np.round(by_name[name].centre / sp, 2) for name in STRUCTURES])
    labels_out = tuple(d.labels for d in plan.body_disease) + tuple(d.labels for d in plan.disc_disease)
    truth = PhantomTruth(
        study_uid=_uid(plan.token, "study"),
        series_uid=_uid(plan.token, t2_sag.role, "series"),
        instance_uid=annotated_uid,
        points=points,
        labels=labels_out,
        pixel_spacing_mm=(float(_ds(sp)), float(_ds(sp))),
    )
    return instances, truth


def study_generator(seed: int, index: int) -> np.random.Generator:
    """The generator behind study `index` of `write_phantom_studies(..., seed)`: pass it to `render_study` to
    get that study in memory. Independent of how many studies are written."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))


def _annotation_entry(truth: PhantomTruth, z_index: int) -> dict[str, object]:
    """One study in the challenge's annotation layout; disc tags with two labels read "v2,v5"."""
    points = []
    for index, name in enumerate(STRUCTURES):
        key = "vertebra" if name in VERTEBRAE else "disc"
        tag_value = ",".join(sorted(truth.labels[index]))
        x, y = (float(c) for c in truth.points[index])
        points.append({"coord": [x, y], "tag": {"identification": name, key: tag_value}, "zIndex": z_index})
    return {
        "studyUid": truth.study_uid,
        "data": [
            {
                "seriesUid": truth.series_uid,
                "instanceUid": truth.instance_uid,
                "annotation": [{"data": {"point": points}}],
            }
        ],
    }


def write_phantom_studies(
    out_dir: Path,
    n_studies: int,
    seed: int,
    *,
    rows: int = 256,
    cols: int = 256,
    progress: Callable[[int], None] | None = None,
) -> list[PhantomTruth]:
    """Write `n_studies` phantom studies in the challenge layout, and annotations.json; return the truths.

    Layout: `out_dir/studyNNNN/imageK.dcm` (every series of a study in one folder, files in shuffled order, as
    in the challenge data) and `out_dir/annotations.json`. Study i is `render_study(study_generator(seed, i),
    i, rows=rows, cols=cols)`, so a larger run starts with the same studies and the same seed gives
    byte-identical files (on one platform: the textures go through numpy's FFT). A study folder's old
    image*.dcm files are replaced; nothing else in `out_dir` is touched. `progress` gets the count of
    studies written so far.
    """
    if n_studies < 0:
        raise ValueError(f"n_studies must be >= 0, got {n_studies}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    truths: list[PhantomTruth] = []
    entries: list[dict[str, object]] = []
    for index in range(n_studies):
        rng = study_generator(seed, index)
        instances, truth = _render(rng, index, None, rows, cols, None)
        folder = out_dir / f"study{index:04d}"
        folder.mkdir(exist_ok=True)
        for old in folder.glob("image*.dcm"):
            old.unlink()
        for file_number, pos in enumerate(rng.permutation(len(instances)), start=1):
            (folder / f"image{file_number}.dcm").write_bytes(instances[int(pos)].file_bytes())
        truths.append(truth)
        # zIndex as in the challenge: the annotated slice's InstanceNumber - 1.
        z_index = next(i.number - 1 for i in instances if i.sop_uid == truth.instance_uid)
        entries.append(_annotation_entry(truth, z_index))
        if progress is not None:
            progress(index + 1)
    text = json.dumps(entries, indent=1)
    (out_dir / ANNOTATIONS_FILE).write_text(text + "\n", encoding="utf-8")
    return truths
