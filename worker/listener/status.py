"""DIMSE statuses the listener answers with, in DICOM's words (PS3.4 B.2.3)."""

from __future__ import annotations

import enum

from pydicom.dataset import Dataset


class StoreStatus(enum.IntEnum):
    """C-STORE response statuses; Cxxx is "Error: Cannot understand", the low byte says which check failed.

    Every failure goes out with an Error Comment (0000,0902) that names the problem: :attr:`comment`.
    """

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    DATASET_DECODE_FAILED = 0xC210
    PROCESSING_FAILURE = 0xC211
    INVALID_UID = 0xC220
    PIXEL_DATA_LENGTH_MISMATCH = 0xC230
    PIXEL_DATA_UNDECODABLE = 0xC231
    TRANSFER_SYNTAX_MISMATCH = 0xC232
    CONFLICTING_DUPLICATE = 0xC240

    @property
    def comment(self) -> str:
        """The Error Comment sent with this status (LO: at most 64 characters)."""
        return _COMMENTS.get(self, "")


_COMMENTS = {
    StoreStatus.OUT_OF_RESOURCES: "Out of resources: spool disk full or database unavailable",
    StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS: "Data set does not match SOP class (see the listener log)",
    StoreStatus.CANNOT_UNDERSTAND: "Cannot understand",
    StoreStatus.DATASET_DECODE_FAILED: "Data set cannot be decoded: truncated or malformed",
    StoreStatus.PROCESSING_FAILURE: "Processing failure",
    StoreStatus.INVALID_UID: "Invalid or missing Study, Series or SOP Instance UID",
    StoreStatus.PIXEL_DATA_LENGTH_MISMATCH: "Pixel Data length does not match the image attributes",
    StoreStatus.PIXEL_DATA_UNDECODABLE: "Compressed Pixel Data: first frame cannot be decoded",
    StoreStatus.TRANSFER_SYNTAX_MISMATCH: "Transfer syntax does not match the encoded data",
    StoreStatus.CONFLICTING_DUPLICATE: "SOP Instance UID already stored with different content",
}


def store_response(status: StoreStatus) -> Dataset:
    """A C-STORE response status with its Error Comment (0000,0902), so the sender's log names the problem."""
    response = Dataset()
    response.Status = int(status)
    if status.comment:
        response.ErrorComment = status.comment[:64]
    return response


class EchoStatus(enum.IntEnum):
    SUCCESS = 0x0000


class RejectReason(enum.Enum):
    """Why an association request was refused: (result, source, diagnostic) of A-ASSOCIATE-RJ."""

    CALLED_AE_NOT_RECOGNISED = (0x01, 0x01, 0x07)
    CALLING_AE_NOT_RECOGNISED = (0x01, 0x01, 0x03)
    PEER_ADDRESS_NOT_ALLOWED = (0x01, 0x01, 0x01)  # "no reason given": the standard has no code for it
    LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)  # rejected-transient, service provider (presentation)
