"""What a sender is given (one object of one export) and what it says about it (no database, no network)."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

ERROR_TEXT_LIMIT = 2000


class Outcome(enum.StrEnum):
    """An attempt's outcome as recorded in ``export_attempts.outcome``."""

    DELIVERED = "delivered"
    WARNING = "warning"  # stored by the peer with a remark (C-STORE 0xB000/0xB006/0xB007, STOW-RS 202): delivered
    FAILED = "failed"


@dataclass(frozen=True)
class Item:
    """One result object file to send, under its export's id."""

    export_id: int
    path: Path
    sop_instance_uid: str


@dataclass(frozen=True)
class Delivery:
    """How sending one object went. `status_code` is the DICOM status when the peer gave one (C-STORE Status,
    STOW-RS FailureReason/WarningReason), else the HTTP status of a STOW-RS request."""

    outcome: Outcome
    status_code: int | None = None
    error: str | None = None

    @property
    def delivered(self) -> bool:
        return self.outcome is not Outcome.FAILED


def failed(error: str, status_code: int | None = None) -> Delivery:
    return Delivery(Outcome.FAILED, status_code, error[:ERROR_TEXT_LIMIT])


def read_items(items: Sequence[Item]) -> tuple[list[tuple[Item, Dataset]], dict[int, Delivery]]:
    """The readable items with their datasets, and a failed delivery for each unreadable one."""
    readable: list[tuple[Item, Dataset]] = []
    results: dict[int, Delivery] = {}
    for item in items:
        try:
            readable.append((item, pydicom.dcmread(item.path)))
        except (InvalidDicomError, OSError) as exc:
            results[item.export_id] = failed(f"cannot read result object {item.path.name}: {exc}")
    return readable, results
