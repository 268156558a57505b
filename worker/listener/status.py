"""DIMSE statuses the listener answers with, in DICOM's words (PS3.4 B.2.3)."""

from __future__ import annotations

import enum


class StoreStatus(enum.IntEnum):
    """C-STORE response statuses; Cxxx is "Error: Cannot understand", the low byte says which check failed."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    DATASET_DECODE_FAILED = 0xC210
    PROCESSING_FAILURE = 0xC211
    INVALID_UID = 0xC220


class EchoStatus(enum.IntEnum):
    SUCCESS = 0x0000


class RejectReason(enum.Enum):
    """Why an association request was refused: (result, source, diagnostic) of A-ASSOCIATE-RJ."""

    CALLED_AE_NOT_RECOGNISED = (0x01, 0x01, 0x07)
    CALLING_AE_NOT_RECOGNISED = (0x01, 0x01, 0x03)
    PEER_ADDRESS_NOT_ALLOWED = (0x01, 0x01, 0x01)  # "no reason given": the standard has no code for it
