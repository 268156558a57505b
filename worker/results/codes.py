"""Every coded concept the result writers put into DICOM objects, in one place (STYLE.md).

Schemes:
- SCT: SNOMED CT. Vertebra and disc codes are the body-structure concepts DICOM PS3.16 lists (pydicom's
  concept dictionary carries them); "Normal" is SCT 17621005 (CID 222/7151).
- DCM: DICOM's own codes (PS3.16 Annex D).
- UCUM: units.
- LN: LOINC (procedure reported, CID 100).
- 99CCFNET: our private scheme (see below).

Disc codes follow SNOMED CT's anatomical convention of naming an intervertebral disc after the vertebra
above it: "intervertebral disc structure of fourth lumbar vertebra" is the L4-L5 disc, "... of twelfth
thoracic vertebra" is T12-L1 and "... of fifth lumbar vertebra" is L5-S1.

Standard codes are used wherever the concept exists and its code could be checked: anatomy and "Normal" /
"Abnormal" and the procedure (LN 25056-3, CID 100) against DICOM PS3.16 (pydicom's concept dictionary);
"Herniation of intervertebral disc" (SCT 73589001) and "Degeneration of intervertebral disc" (SCT 77547008)
against two independent published SNOMED CT value sets each (this machine has no SNOMED CT browser).

The private scheme 99CCFNET (coding scheme designator "99CCFNET", a "99"-prefixed local designator as PS3.3
8.2 allows) holds the concepts that are more specific than any standard code that could be verified: disc
bulge (under disc degeneration), protrusion and extrusion (each a kind of herniation), Schmorl's node,
vertebral degeneration; the localisation confidence and "probability of abnormality" (DCM 122157
"Probability" exists but does not say *of what*). `STANDARD_PARENTS` names the standard concept each private
finding belongs under (docs/conformance.md shows the table). Every object that uses the scheme carries a Coding
Scheme Identification Sequence item (`PRIVATE_SCHEME`). Code values are stable: never reuse one for another
meaning; add new ones at the end.
"""

from __future__ import annotations

from typing import Final

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.coding import Code

PRIVATE_SCHEME_DESIGNATOR: Final = "99CCFNET"


def private_scheme() -> CodingSchemeIdentificationItem:
    """The Coding Scheme Identification item that documents 99CCFNET inside each object."""
    return CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME_DESIGNATOR,
        name="ccfnet-worker private codes",
        version="1",
        responsible_organization="ccfnet-worker",
    )


# Anatomy: finding sites (SR) and segmented property types (SEG).
L1_VERTEBRA: Final = Code("66794005", "SCT", "L1 vertebra")
L2_VERTEBRA: Final = Code("14293000", "SCT", "L2 vertebra")
L3_VERTEBRA: Final = Code("36470004", "SCT", "L3 vertebra")
L4_VERTEBRA: Final = Code("11994002", "SCT", "L4 vertebra")
L5_VERTEBRA: Final = Code("49668003", "SCT", "L5 vertebra")
T12_L1_DISC: Final = Code("76206002", "SCT", "Intervertebral disc structure of twelfth thoracic vertebra")
L1_L2_DISC: Final = Code("80064006", "SCT", "Intervertebral disc structure of first lumbar vertebra")
L2_L3_DISC: Final = Code("67459009", "SCT", "Intervertebral disc structure of second lumbar vertebra")
L3_L4_DISC: Final = Code("62551000", "SCT", "Intervertebral disc structure of third lumbar vertebra")
L4_L5_DISC: Final = Code("84020006", "SCT", "Intervertebral disc structure of fourth lumbar vertebra")
L5_S1_DISC: Final = Code("75782005", "SCT", "Intervertebral disc structure of fifth lumbar vertebra")

STRUCTURE_SITES: Final[dict[str, Code]] = {
    "L1": L1_VERTEBRA,
    "L2": L2_VERTEBRA,
    "L3": L3_VERTEBRA,
    "L4": L4_VERTEBRA,
    "L5": L5_VERTEBRA,
    "T12-L1": T12_L1_DISC,
    "L1-L2": L1_L2_DISC,
    "L2-L3": L2_L3_DISC,
    "L3-L4": L3_L4_DISC,
    "L4-L5": L4_L5_DISC,
    "L5-S1": L5_S1_DISC,
}

# Diagnoses (the challenge labels, and the grades the model reports).
NORMAL: Final = Code("17621005", "SCT", "Normal")
ABNORMAL: Final = Code("263654008", "SCT", "Abnormal")
DISC_DEGENERATION: Final = Code("77547008", "SCT", "Degeneration of intervertebral disc")
DISC_HERNIATION: Final = Code("73589001", "SCT", "Herniation of intervertebral disc")
VERTEBRAL_DEGENERATION: Final = Code("CCF1001", PRIVATE_SCHEME_DESIGNATOR, "Vertebral degeneration")
DISC_BULGE: Final = Code("CCF1002", PRIVATE_SCHEME_DESIGNATOR, "Intervertebral disc bulge")
DISC_PROTRUSION: Final = Code("CCF1003", PRIVATE_SCHEME_DESIGNATOR, "Intervertebral disc protrusion")
DISC_EXTRUSION: Final = Code("CCF1004", PRIVATE_SCHEME_DESIGNATOR, "Intervertebral disc extrusion")
SCHMORL_NODE: Final = Code("CCF1005", PRIVATE_SCHEME_DESIGNATOR, "Schmorl's node")

DIAGNOSES: Final[dict[tuple[str, str], Code]] = {
    ("vertebra", "v1"): NORMAL,
    ("vertebra", "v2"): VERTEBRAL_DEGENERATION,
    ("disc", "v1"): NORMAL,
    ("disc", "v2"): DISC_BULGE,
    ("disc", "v3"): DISC_PROTRUSION,
    ("disc", "v4"): DISC_EXTRUSION,
    ("disc", "v5"): SCHMORL_NODE,
    ("disc", "abnormal"): ABNORMAL,
}

# The standard concept each private finding is a kind of (None: no standard parent could be verified).
STANDARD_PARENTS: Final[dict[Code, Code | None]] = {
    VERTEBRAL_DEGENERATION: None,
    DISC_BULGE: DISC_DEGENERATION,
    DISC_PROTRUSION: DISC_HERNIATION,
    DISC_EXTRUSION: DISC_HERNIATION,
    SCHMORL_NODE: None,
}

# Report-level qualitative evaluations (TID 1500 "Qualitative Evaluations").
QUALITATIVE_EVALUATIONS: Final = Code("C0034375", "UMLS", "Qualitative Evaluations")
LEVEL_COUNT_CHECK: Final = Code("CCF3001", PRIVATE_SCHEME_DESIGNATOR, "Level count check")

# Measurements and their units.
PROBABILITY_OF_ABNORMALITY: Final = Code("CCF2001", PRIVATE_SCHEME_DESIGNATOR, "Probability of abnormality")
LOCALIZATION_CONFIDENCE: Final = Code("CCF2002", PRIVATE_SCHEME_DESIGNATOR, "Localization confidence")
UNIT_PERCENT: Final = Code("%", "UCUM", "percent")

# Report structure.
# TID 1500's Procedure Reported takes CID 100, which has no lumbar spine MR procedure, and PixelMed's validator
# refuses codes outside it (SCT 433141005 "Magnetic resonance imaging of lumbar and sacral spine" was tried):
# the procedure is CID 100's MR entry, and the lumbar spine is coded at every finding site.
PROCEDURE_REPORTED: Final = Code("25056-3", "LN", "MRI unspecified body region")
COMMENT: Final = Code("121106", "DCM", "Comment")
DEVICE_OBSERVER: Final = Code("121007", "DCM", "Device")

# Equipment and algorithm identification.
PROCESSING_EQUIPMENT: Final = Code("109102", "DCM", "Processing Equipment")
ARTIFICIAL_INTELLIGENCE: Final = Code("123110", "DCM", "Artificial Intelligence")

# Segmentation.
ANATOMICAL_STRUCTURE: Final = Code("91723000", "SCT", "Anatomical Structure")

# The "not analysed" report (declined_sr, TID 2000 / 2002): title, section heading, element, image purpose.
DIAGNOSTIC_IMAGING_REPORT: Final = Code("18748-4", "LN", "Diagnostic Imaging Report")
IMPRESSIONS: Final = Code("121072", "DCM", "Impressions")
IMPRESSION: Final = Code("121073", "DCM", "Impression")
BEST_ILLUSTRATION: Final = Code("121080", "DCM", "Best illustration of finding")
