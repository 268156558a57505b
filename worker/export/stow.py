"""STOW-RS with dicomweb-client: one request per destination for a batch of objects, the store response's
Referenced/Failed SOP sequences decide per object."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydicom.dataset import Dataset

from worker.export.delivery import Delivery, Item, Outcome, failed, read_items
from worker.settings import DicomWebDestination

HTTP_OK, HTTP_ACCEPTED_WITH_WARNINGS = 200, 202


def _session_keeping_its_ca() -> Any:
    """A requests session whose own `verify` wins over REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE.

    requests lets those variables replace `Session.verify` on every request (psf/requests issue 3829), so on a host
    that sets them (many images do) a destination's `tls_ca` would be silently ignored and its certificate refused.
    """
    import requests

    class CaKeepingSession(requests.Session):
        def merge_environment_settings(self, *args: Any, **kwargs: Any) -> Any:
            settings = super().merge_environment_settings(*args, **kwargs)
            settings["verify"] = self.verify
            return settings

    return CaKeepingSession()


def http_session(destination: DicomWebDestination) -> Any:
    """A requests session with the destination's credentials and CA: the exporter's, and `config check`'s."""
    import requests

    session = requests.Session() if destination.tls_ca is None else _session_keeping_its_ca()
    if destination.token is not None:
        session.headers["Authorization"] = f"Bearer {destination.token.get_secret_value()}"
    elif destination.username is not None and destination.password is not None:
        session.auth = (destination.username, destination.password.get_secret_value())
    if destination.tls_ca is not None:
        session.verify = str(destination.tls_ca)
    return session


def _response_dataset(response: Any) -> Dataset | None:
    """The store response body of an error response (409 carries FailedSOPSequence), when it has one."""
    if response is None or not response.content:
        return None
    content_type = response.headers.get("Content-Type", "").split(";")[0].strip()
    if content_type not in ("application/dicom+json", "application/json"):
        return None
    try:
        return Dataset.from_json(response.json())
    except ValueError:
        return None


def _stored(reference: Dataset, http_status: int) -> Delivery:
    warning = reference.get("WarningReason")
    if warning is not None:
        return Delivery(Outcome.WARNING, int(warning), f"stored with warning 0x{int(warning):04X}")
    if http_status == HTTP_ACCEPTED_WITH_WARNINGS:
        return Delivery(Outcome.WARNING, http_status, "stored with warnings (HTTP 202)")
    return Delivery(Outcome.DELIVERED, http_status)


def _per_object(items: Sequence[Item], body: Dataset | None, http_status: int) -> dict[int, Delivery]:
    referenced: dict[str, Dataset] = {}
    refused: dict[str, Dataset] = {}
    if body is not None:
        referenced = {str(r.get("ReferencedSOPInstanceUID", "")): r for r in body.get("ReferencedSOPSequence", [])}
        refused = {str(r.get("ReferencedSOPInstanceUID", "")): r for r in body.get("FailedSOPSequence", [])}
    results: dict[int, Delivery] = {}
    for item in items:
        if item.sop_instance_uid in refused:
            reason = refused[item.sop_instance_uid].get("FailureReason")
            results[item.export_id] = (
                failed(f"STOW-RS refused the object (HTTP {http_status})", http_status) if reason is None
                else failed(f"STOW-RS refused the object (HTTP {http_status}, reason 0x{int(reason):04X})",
                            int(reason))
            )
        elif item.sop_instance_uid in referenced:  # stored, also when others of the request failed (409)
            results[item.export_id] = _stored(referenced[item.sop_instance_uid], http_status)
        elif http_status >= 400:
            results[item.export_id] = failed(f"STOW-RS HTTP {http_status}", http_status)
        else:  # a success status that does not list the object: the status speaks for it
            results[item.export_id] = _stored(Dataset(), http_status)
    return results


def send_stow(destination: DicomWebDestination, items: Sequence[Item], *, timeout: float) -> dict[int, Delivery]:
    """POST every readable item in one STOW-RS request; the result is keyed by export id."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    readable, results = read_items(items)
    if not readable:
        return results
    statuses: list[int] = []

    def remember_status(response: Any, *args: Any, **kwargs: Any) -> Any:
        statuses.append(int(response.status_code))
        return response

    client = DICOMwebClient(url=destination.url, session=http_session(destination), timeout=timeout,
                            callback=remember_status)
    sent = [item for item, _ in readable]
    try:
        body = client.store_instances([ds for _, ds in readable])
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        return results | _per_object(sent, _response_dataset(exc.response), status)
    except requests.RequestException as exc:
        return results | {i.export_id: failed(f"STOW-RS to {destination.url}: {type(exc).__name__}: {exc}")
                          for i in sent}
    except ValueError as exc:  # a response body dicomweb-client could not read
        return results | {i.export_id: failed(f"STOW-RS response not understood: {exc}") for i in sent}
    return results | _per_object(sent, body, statuses[-1] if statuses else HTTP_OK)
