"""Send one DICOM file to one destination and say how it went (no database here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from worker.settings import DicomDestination, DicomWebDestination

# C-STORE statuses that mean "stored, with a remark" (PS3.4 B.2.3): a warning is not a failure.
WARNING_STATUSES = frozenset({0xB000, 0xB006, 0xB007})


@dataclass(frozen=True)
class Delivery:
    delivered: bool
    status_code: int | None
    error: str | None
    outcome: str  # delivered | warning | failed


def _failed(error: str, status: int | None = None) -> Delivery:
    return Delivery(False, status, error[:2000], "failed")


def send_dimse(destination: DicomDestination, path: Path, calling_ae: str) -> Delivery:
    """C-STORE over its own association; the peer's status decides."""
    from pynetdicom import AE

    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError) as exc:
        return _failed(f"cannot read {path.name}: {exc}")
    ae = AE(ae_title=destination.calling_ae_title or calling_ae)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    tls_args = None
    if destination.tls:
        import ssl

        tls_args = (ssl.create_default_context(ssl.Purpose.SERVER_AUTH), destination.host)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        return _failed(f"association with {destination.ae_title}@{destination.host}:{destination.port} failed")
    try:
        rsp = assoc.send_c_store(ds)
    finally:
        assoc.release()
    if "Status" not in rsp:
        return _failed("no C-STORE response (connection lost or timed out)")
    status = int(rsp.Status)
    if status == 0:
        return Delivery(True, status, None, "delivered")
    if status in WARNING_STATUSES:
        return Delivery(True, status, f"stored with warning 0x{status:04X}", "warning")
    return _failed(f"C-STORE status 0x{status:04X}", status)


def send_stow(destination: DicomWebDestination, path: Path) -> Delivery:
    """STOW-RS of one instance with dicomweb-client; HTTP errors and FailedSOPSequence are failures."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError) as exc:
        return _failed(f"cannot read {path.name}: {exc}")
    session = requests.Session()
    if destination.token is not None:
        session.headers["Authorization"] = f"Bearer {destination.token.get_secret_value()}"
    elif destination.username and destination.password is not None:
        session.auth = (destination.username, destination.password.get_secret_value())
    client = DICOMwebClient(url=destination.url, session=session)
    try:
        response = client.store_instances([ds])
    except requests.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else None
        return _failed(f"STOW-RS HTTP {code}", code)
    except requests.RequestException as exc:
        return _failed(f"STOW-RS {type(exc).__name__}: {exc}")
    failed = response.get("FailedSOPSequence") if response is not None else None
    if failed:
        reason = failed[0].get("FailureReason")
        return _failed(f"STOW-RS refused the instance (reason {reason})", reason)
    return Delivery(True, 200, None, "delivered")


def deliver(destination: DicomDestination | DicomWebDestination, path: Path, calling_ae: str) -> Delivery:
    if isinstance(destination, DicomDestination):
        return send_dimse(destination, path, calling_ae)
    return send_stow(destination, path)
