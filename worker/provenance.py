"""What marks a DICOM object as this service's own output, so one sent back to us never becomes a job.

A PACS routing rule (or a study pulled for reprocessing) can hand our SR, presentation state, key image or
segmentation back to the listener. Each of them names us twice, as IHE AI Results asks: General Equipment
Manufacturer is ours, and a Contributing Equipment item says ours, with purpose "Processing Equipment" and
the model's Device UID. Both are required: another vendor's object has its own Manufacturer, and one derived
from ours (a radiologist's edit, another AI reading our key image) may keep our item in its Contributing
Equipment but names its own maker at the top.

The UID root is no sign: our UIDs come from highdicom's root, which every highdicom user shares. The device UID
alone is none either: each checkpoint has its own, so the manufacturer is what stays the same.

Pure functions of a pydicom dataset (no database, no model library): the listener imports this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from pydicom.dataset import Dataset

# General Equipment and Contributing Equipment Manufacturer of every object we write.
MANUFACTURER: Final = "ccfnet-worker"
# SOP Class UID -> kind, of every object we write (result_objects.kind).
RESULT_KINDS: Final[dict[str, str]] = {
    "1.2.840.10008.5.1.4.1.1.88.34": "sr",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.11.1": "gsps",
    "1.2.840.10008.5.1.4.1.1.7": "sc",
    "1.2.840.10008.5.1.4.1.1.66.4": "seg",
    "1.2.840.10008.5.1.4.1.1.88.22": "declined",  # Enhanced SR: the "not analysed" report (results/declined_sr)
}
# DCM 109102 "Processing Equipment": the purpose of reference of our Contributing Equipment item.
_PROCESSING_EQUIPMENT: Final = ("109102", "DCM")
_UID_RE: Final = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


@dataclass(frozen=True)
class OwnOutput:
    """An object recognised as ours, and the Device UID of the model that made it."""

    device_uid: str


def _text(value: object) -> str:
    return str(value or "").strip()


def _is_processing_equipment(item: Dataset) -> bool:
    for code in item.get("PurposeOfReferenceCodeSequence") or []:
        if (_text(code.get("CodeValue")), _text(code.get("CodingSchemeDesignator"))) == _PROCESSING_EQUIPMENT:
            return True
    return False


def own_output(dataset: Dataset) -> OwnOutput | None:
    """Our equipment signature in `dataset`, or None when it is someone else's object (or not decodable as one)."""
    if _text(dataset.get("Manufacturer")) != MANUFACTURER:
        return None
    for item in dataset.get("ContributingEquipmentSequence") or []:
        if _text(item.get("Manufacturer")) != MANUFACTURER or not _is_processing_equipment(item):
            continue
        device_uid = _text(item.get("DeviceUID"))
        if 0 < len(device_uid) <= 64 and _UID_RE.match(device_uid):
            return OwnOutput(device_uid=device_uid)
    return None
