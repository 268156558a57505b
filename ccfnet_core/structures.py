"""The 11 lumbar structures, their channel order and their diagnosis labels (CCFNET.md, "The task").

Channel order everywhere: L1, L2, L3, L4, L5, T12-L1, L1-L2, L2-L3, L3-L4, L4-L5, L5-S1.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

VERTEBRAE: Final[tuple[str, ...]] = ("L1", "L2", "L3", "L4", "L5")
DISCS: Final[tuple[str, ...]] = ("T12-L1", "L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1")
STRUCTURES: Final[tuple[str, ...]] = VERTEBRAE + DISCS
NUM_STRUCTURES: Final[int] = len(STRUCTURES)
VERTEBRA_INDICES: Final[tuple[int, ...]] = tuple(range(len(VERTEBRAE)))
DISC_INDICES: Final[tuple[int, ...]] = tuple(range(len(VERTEBRAE), NUM_STRUCTURES))


class StructureType(StrEnum):
    """The challenge's tag key for a point: `vertebra` or `disc`."""

    VERTEBRA = "vertebra"
    DISC = "disc"


def structure_type(index: int) -> StructureType:
    """Vertebra for channels 0-4, disc for 5-10."""
    if not 0 <= index < NUM_STRUCTURES:
        raise ValueError(f"structure index must be in 0..{NUM_STRUCTURES - 1}, got {index}")
    return StructureType.VERTEBRA if index < len(VERTEBRAE) else StructureType.DISC


VERTEBRA_LABELS: Final[dict[str, str]] = {"v1": "normal", "v2": "degeneration"}
DISC_LABELS: Final[dict[str, str]] = {
    "v1": "normal",
    "v2": "bulge",
    "v3": "protrusion",
    "v4": "extrusion",
    "v5": "Schmorl's node",
}
ABNORMAL_DISC_LABELS: Final[frozenset[str]] = frozenset({"v2", "v3", "v4"})

# The 7 classes of the challenge metric, as (type, label).
CHALLENGE_CLASSES: Final[tuple[tuple[StructureType, str], ...]] = (
    (StructureType.VERTEBRA, "v1"),
    (StructureType.VERTEBRA, "v2"),
    (StructureType.DISC, "v1"),
    (StructureType.DISC, "v2"),
    (StructureType.DISC, "v3"),
    (StructureType.DISC, "v4"),
    (StructureType.DISC, "v5"),
)


def parse_labels(index: int, tag_value: str) -> frozenset[str]:
    """Parse a challenge tag value ("v2" or "v2,v5") into a set of labels valid for the structure."""
    allowed = VERTEBRA_LABELS if structure_type(index) is StructureType.VERTEBRA else DISC_LABELS
    labels = frozenset(part.strip() for part in tag_value.split(",") if part.strip())
    unknown = labels - allowed.keys()
    if not labels or unknown:
        raise ValueError(f"{STRUCTURES[index]}: unknown label(s) {sorted(unknown) or tag_value!r}")
    return labels


def abnormal_target(index: int, labels: frozenset[str]) -> float | None:
    """Binary classification target: vertebra v2 vs v1; disc v2/v3/v4 vs v1; a disc with only v5 -> None.

    None means "no classification target" (masked out of the loss and the C metric).
    """
    if not labels:
        return None
    if structure_type(index) is StructureType.VERTEBRA:
        return 1.0 if "v2" in labels else 0.0
    if labels & ABNORMAL_DISC_LABELS:
        return 1.0
    if "v1" in labels:
        return 0.0
    return None


def predicted_label(index: int, probability: float, threshold: float = 0.5) -> str:
    """The binary class of a P(abnormal): v2 at or above `threshold`, else v1.

    The threshold is the model card's operating point for the structure's kind (`ccfnet_core.readout`, which the
    Predictor applies; 0.5 only for a model without one). For a disc, v2 here means "abnormal": the readout then
    chooses its grade (bulge, protrusion, extrusion) from the disc grade grader, or leaves it "abnormal".
    """
    return "v2" if probability >= threshold else "v1"


UNSPECIFIED_GRADE: Final[str] = "abnormal"


def grade_word(index: int, grade: str) -> str:
    """The word a person reads for a stated grade: the label's name, or "abnormal" for a disc whose grade the model
    does not support with enough confidence."""
    return UNSPECIFIED_GRADE if grade == UNSPECIFIED_GRADE else label_name(index, grade)


def label_name(index: int, label: str) -> str:
    """Human-readable diagnosis, e.g. 'protrusion'."""
    table = VERTEBRA_LABELS if structure_type(index) is StructureType.VERTEBRA else DISC_LABELS
    return table[label]
