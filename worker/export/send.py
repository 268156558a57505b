"""Send a batch of one destination's objects by that destination's protocol."""

from __future__ import annotations

from collections.abc import Sequence

from worker.export.delivery import Delivery, Item
from worker.export.dimse import send_dimse
from worker.export.stow import send_stow
from worker.settings import DicomDestination, DicomWebDestination


def deliver(
    destination: DicomDestination | DicomWebDestination, items: Sequence[Item], *, calling_ae: str, timeout: float
) -> dict[int, Delivery]:
    """One association (C-STORE) or one request (STOW-RS) for all `items`; a result for every item."""
    if isinstance(destination, DicomDestination):
        return send_dimse(destination, items, calling_ae=calling_ae, timeout=timeout)
    return send_stow(destination, items, timeout=timeout)
