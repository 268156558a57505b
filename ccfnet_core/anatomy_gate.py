"""The anatomy gate: does this look like a sagittal lumbar spine, or should the model's answer be withheld?

CCF-Net puts 11 points and 11 probabilities on any image it is given; on a shoulder it reports a shoulder's
"L4-L5 protrusion". The gate withholds such answers. It reads two kinds of evidence, cheapest first:

- headers of the chosen series: Modality, BodyPartExamined, the series / protocol / study descriptions and the
  plane from ImageOrientationPatient;
- the model's own answer on the chosen slice: the 11 points must run head to foot in the spine's order
  (T12-L1, L1, L1-L2, ... L5, L5-S1), neighbouring points must lie a plausible number of millimetres apart, and
  the heatmap peaks must be confident. Each rule reads a robust statistic (a rank correlation, medians), so a
  real spine with one misplaced level still passes.

Thresholds live in `GateThresholds`; their defaults were read off real and synthetic lumbar slices and the
negatives of ``bench/anatomy_gate.py`` (see `GateThresholds`). Pure functions over plain values: no I/O, no
model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

import numpy as np
from pydicom.dataset import Dataset

from ccfnet_core.series_selection import PLANE_PREFERENCE, Plane, plane_of
from ccfnet_core.structures import NUM_STRUCTURES, STRUCTURES


class GateRule(StrEnum):
    """Which rule declined: the job's recorded `rule` and the `reason` label of the Prometheus counter."""

    MODALITY = "modality"
    BODY_PART = "body_part"
    DESCRIPTION = "description"
    PLANE = "plane"
    ORDER = "order"
    SPACING = "spacing"
    CONFIDENCE = "confidence"


# The 11 structures in head-to-foot order along the spine, as channel indices of structures.STRUCTURES.
CHAIN_NAMES: Final[tuple[str, ...]] = (
    "T12-L1", "L1", "L1-L2", "L2", "L2-L3", "L3", "L3-L4", "L4", "L4-L5", "L5", "L5-S1"
)
CHAIN: Final[tuple[int, ...]] = tuple(STRUCTURES.index(name) for name in CHAIN_NAMES)

# BodyPartExamined values (PS3.16 Annex L and common vendor spellings), compared without spaces and dashes, that
# name another region: those decline. Lumbar (LSPINE, LSSPINE, TLSPINE, SPINE ...) and unknown values pass.
OTHER_BODY_PARTS: Final[frozenset[str]] = frozenset(
    {
        "HEAD", "BRAIN", "SKULL", "HEADNECK", "NECK", "FACE", "ORBIT", "EYE", "EAR", "IAC", "SELLA", "PITUITARY",
        "TMJ", "JAW", "SINUS", "CSPINE", "TSPINE", "CTSPINE", "CERVICALSPINE", "THORACICSPINE", "CHEST",
        "THORAX", "BREAST", "HEART", "CARDIAC", "ABDOMEN", "LIVER", "KIDNEY", "PANCREAS", "PROSTATE",
        "SHOULDER", "CLAVICLE", "ARM", "UPPERARM", "HUMERUS", "ELBOW", "FOREARM", "WRIST", "HAND", "FINGER",
        "HIP", "THIGH", "FEMUR", "KNEE", "LEG", "LOWERLEG", "ANKLE", "FOOT", "TOE", "EXTREMITY",
    }
)
# Words in a description that name a region other than the lumbar spine ...
OTHER_REGION_WORDS: Final[frozenset[str]] = frozenset(
    {
        "HEAD", "BRAIN", "SKULL", "CEREBRAL", "NEURO", "ORBIT", "ORBITS", "IAC", "SELLA", "PITUITARY", "TMJ",
        "NECK", "CSPINE", "CERVICAL", "TSPINE", "THORACIC", "CHEST", "BREAST", "HEART", "CARDIAC", "ABDOMEN",
        "LIVER", "KIDNEY", "PROSTATE", "SHOULDER", "ELBOW", "WRIST", "HAND", "FINGER", "HIP", "KNEE", "ANKLE",
        "FOOT", "EXTREMITY", "HWS", "BWS",
    }
)
# ... and words that name the lumbar spine, which keep a description naming both (a combined study) eligible.
LUMBAR_WORDS: Final[frozenset[str]] = frozenset(
    {"LSPINE", "LUMBAR", "LUMBOSACRAL", "LS", "SPINE", "WHOLESPINE", "TLSPINE", "LWS"}
)
_WORD = re.compile(r"[A-Z0-9]+")
_REGION_SPINE = re.compile(r"(?<![A-Z0-9])([CTL])[\s_\-]*SPINE(?![A-Z0-9])")  # "C-SPINE", "L SPINE" -> CSPINE, LSPINE


@dataclass(frozen=True)
class GateThresholds:
    """Limits of the image evidence, each halfway between lumbar spines and images that are not one.

    min_order_tau: the lowest Kendall tau of chain position against distance towards the feet. Lumbar: 0.89 and
    up (160 tianchi slices, shipped and out-of-fold models), 0.78 and up (phantom studies, default model); not a
    lumbar spine: 0.60 at most (default model, bench negatives).
    step_mm: (low, high) median distance between neighbouring points of the chain (half a level). Lumbar 15.7 to
    20.7 mm; the band leaves room for small and tall patients (about 14 to 23 mm in adults).
    min_confidence: the lowest median heatmap peak of the 11. Lumbar: 0.43 and up (tianchi), 0.28 and up
    (phantoms through the default model); not a lumbar spine: 0.10 at most (default model).
    """

    min_order_tau: float = 0.7
    step_mm: tuple[float, float] = (10.0, 30.0)
    min_confidence: float = 0.2

    def __post_init__(self) -> None:
        low, high = self.step_mm
        if not 0 < low < high:
            raise ValueError(f"step_mm must be (low, high) with 0 < low < high, got {self.step_mm}")
        if not -1 <= self.min_order_tau <= 1:
            raise ValueError(f"min_order_tau must be in [-1, 1], got {self.min_order_tau}")
        if not 0 <= self.min_confidence <= 1:
            raise ValueError(f"min_confidence must be in [0, 1], got {self.min_confidence}")


@dataclass(frozen=True)
class Verdict:
    """The gate's answer. `rule` is None when the study passed; `reason` is for a person either way."""

    rule: GateRule | None
    reason: str
    measurements: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.rule is None


@dataclass(frozen=True)
class HeaderEvidence:
    """What the chosen series' headers say about the anatomy (empty strings where an attribute is absent)."""

    modality: str
    body_part: str
    descriptions: tuple[str, ...]
    plane: Plane

    @classmethod
    def from_datasets(cls, datasets: Sequence[Dataset], plane: Plane | None = None) -> HeaderEvidence:
        """Evidence from one series' datasets (headers suffice). `plane` is the series' plane as series selection
        saw it; without it, the most common ImageOrientationPatient plane of the datasets."""
        if not datasets:
            raise ValueError("HeaderEvidence.from_datasets needs at least one dataset")
        first = datasets[0]
        texts = (str(first.get(k, "") or "").strip() for k in ("SeriesDescription", "ProtocolName", "StudyDescription"))
        return cls(
            modality=str(first.get("Modality", "") or "").strip().upper(),
            body_part=str(first.get("BodyPartExamined", "") or "").strip(),
            descriptions=tuple(dict.fromkeys(text for text in texts if text)),
            plane=plane if plane is not None else _series_plane(datasets),
        )


@dataclass(frozen=True)
class PointEvidence:
    """The model's answer on one slice, in that slice's pixels.

    points: (11, 2) pixel indices (column, row) in STRUCTURES order; confidences: (11,) heatmap peaks;
    spacing_mm: (row, column) PixelSpacing; foot: unit (column, row) direction, in millimetres of the image
    plane, that points towards the patient's feet (from ImageOrientationPatient, `foot_direction`).
    """

    points: np.ndarray
    confidences: np.ndarray
    spacing_mm: tuple[float, float]
    foot: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        if np.shape(self.points) != (NUM_STRUCTURES, 2):
            raise ValueError(f"points must be ({NUM_STRUCTURES}, 2), got {np.shape(self.points)}")
        if np.shape(self.confidences) != (NUM_STRUCTURES,):
            raise ValueError(f"confidences must be ({NUM_STRUCTURES},), got {np.shape(self.confidences)}")
        if not (min(self.spacing_mm) > 0 and np.isfinite(self.spacing_mm).all()):
            raise ValueError(f"spacing_mm must be positive, got {self.spacing_mm}")
        if not np.isclose(float(np.hypot(*self.foot)), 1.0, atol=1e-6):
            raise ValueError(f"foot must be a unit vector, got {self.foot}")


def foot_direction(iop: Sequence[float] | None) -> tuple[float, float] | None:
    """The in-plane (column, row) unit direction towards the feet (-z in LPS), or None when the image plane holds
    no head-foot axis (axial) or has no orientation; `(0, 1)`, down the rows, for the usual sagittal display."""
    if iop is None or len(iop) != 6:
        return None
    values = [float(v) for v in iop]
    along = np.array([-values[2], -values[5]])  # -z component of the row and the column direction
    length = float(np.linalg.norm(along))
    if length < 0.5:
        return None
    return float(along[0] / length), float(along[1] / length)


def check_headers(evidence: HeaderEvidence) -> Verdict:
    """Decline what the headers say is not an MR of the lumbar spine in sagittal section; pass when they are
    silent (the image evidence then decides)."""
    if evidence.modality and evidence.modality != "MR":
        return Verdict(GateRule.MODALITY, f"modality is {evidence.modality}, not MR")
    body = _squash(evidence.body_part)
    if body in OTHER_BODY_PARTS:
        return Verdict(GateRule.BODY_PART, f"body part examined is {evidence.body_part}, not the lumbar spine")
    for text in evidence.descriptions:
        words = set(_WORD.findall(_REGION_SPINE.sub(r"\1SPINE", text.upper())))
        other = sorted(words & OTHER_REGION_WORDS)
        if other and not words & LUMBAR_WORDS:
            return Verdict(
                GateRule.DESCRIPTION, f"description '{text[:64]}' names {other[0].lower()}, not the lumbar spine"
            )
    if evidence.plane != "sagittal":
        return Verdict(GateRule.PLANE, f"the series is {evidence.plane}, not sagittal")
    return Verdict(None, "headers: MR, sagittal, no other body region named")


def measure(evidence: PointEvidence) -> dict[str, float]:
    """The image-evidence measurements of the 11 points taken in head-to-foot chain order (`CHAIN`).

    order_tau: Kendall's tau between chain position and distance towards the feet (1: perfectly ordered;
    one misplaced level of a real spine still scores about 0.9, scattered points about 0); median_step_mm:
    median distance between chain neighbours (half a lumbar level); min_step_mm: the smallest advance towards the
    feet between neighbours; median_confidence / min_confidence: of the 11 heatmap peaks.
    """
    chain = np.asarray(evidence.points, dtype=np.float64)[list(CHAIN)]
    row_mm, column_mm = evidence.spacing_mm
    millimetres = chain * np.array([column_mm, row_mm])
    along = millimetres @ np.asarray(evidence.foot, dtype=np.float64)
    steps = np.diff(millimetres, axis=0)
    confidences = np.asarray(evidence.confidences, dtype=np.float64)
    return {
        "order_tau": kendall_tau(along),
        "median_step_mm": float(np.median(np.linalg.norm(steps, axis=1))),
        "min_step_mm": float(np.diff(along).min()),
        "median_confidence": float(np.median(confidences)),
        "min_confidence": float(confidences.min()),
    }


def kendall_tau(values: np.ndarray) -> float:
    """Kendall's tau-a of `values` against their index: (concordant - discordant pairs) / all pairs."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n < 2:
        raise ValueError("kendall_tau needs at least two values")
    upper = np.triu_indices(n, k=1)
    signs = np.sign(values[None, :] - values[:, None])[upper]
    return float(signs.sum() / len(signs))


def check_points(evidence: PointEvidence, thresholds: GateThresholds | None = None) -> Verdict:
    """Decline when the model's 11 points do not look like a lumbar spine (order, spacing, confidence)."""
    limits = thresholds or GateThresholds()
    m = measure(evidence)
    low, high = limits.step_mm
    if m["order_tau"] < limits.min_order_tau:
        return Verdict(
            GateRule.ORDER,
            f"the 11 points do not run head to foot in the spine's order (order score {m['order_tau']:.2f}, "
            f"needs at least {limits.min_order_tau:g})",
            m,
        )
    if not low <= m["median_step_mm"] <= high:
        return Verdict(
            GateRule.SPACING,
            f"neighbouring points lie {m['median_step_mm']:.1f} mm apart (median), outside the {low:g} to "
            f"{high:g} mm of half a lumbar level",
            m,
        )
    if m["median_confidence"] < limits.min_confidence:
        return Verdict(
            GateRule.CONFIDENCE,
            f"the model is not sure where the levels are (median heatmap peak {m['median_confidence']:.2f}, "
            f"needs at least {limits.min_confidence:g})",
            m,
        )
    return Verdict(None, "points: head-to-foot order, lumbar spacing, confident peaks", m)


def assess(
    headers: HeaderEvidence | None, points: PointEvidence | None, thresholds: GateThresholds | None = None
) -> Verdict:
    """The first declining verdict of the header rules, then the point rules; a pass names both checks."""
    passed: list[Verdict] = []
    if headers is not None:
        verdict = check_headers(headers)
        if not verdict.passed:
            return verdict
        passed.append(verdict)
    if points is not None:
        verdict = check_points(points, thresholds)
        if not verdict.passed:
            return verdict
        passed.append(verdict)
    measurements = {k: v for verdict in passed for k, v in verdict.measurements.items()}
    return Verdict(None, "; ".join(v.reason for v in passed) or "nothing checked", measurements)


def _squash(text: str) -> str:
    return re.sub(r"[^A-Z0-9]", "", text.upper())


def _series_plane(datasets: Sequence[Dataset]) -> Plane:
    """The most common known ImageOrientationPatient plane (ties: series selection's preference order)."""
    planes: list[Plane] = [_plane(ds) for ds in datasets]
    known: list[Plane] = [p for p in planes if p != "unknown"] or planes
    return max(PLANE_PREFERENCE, key=known.count)


def _plane(ds: Dataset) -> Plane:
    iop = ds.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return "unknown"
    try:
        return plane_of([float(v) for v in iop])
    except ValueError:
        return "unknown"
