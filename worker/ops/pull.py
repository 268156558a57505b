"""Pulling studies from a PACS into the spool for reprocessing: DICOMweb (QIDO-RS search, WADO-RS retrieve)
or DIMSE (C-FIND, then C-GET with the storage sub-operations on the same association). Every instance goes
through the listener's own durable store, so a pulled study is in the spool and database like a pushed one.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pydicom
from pydicom.dataset import Dataset

from worker.export.dimse import associate
from worker.listener.handlers import IntakeContext, Sender, persist_instance
from worker.listener.status import StoreStatus
from worker.settings import DicomDestination, DicomWebDestination

if TYPE_CHECKING:
    from pynetdicom import AE
    from pynetdicom.association import Association

log = logging.getLogger("worker.pull")


class PullError(Exception):
    """The PACS could not be searched or did not give the study."""


@dataclass(frozen=True)
class Pulled:
    study_instance_uid: str
    stored: int
    failed: int


def _file_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _store(ctx: IntakeContext, ds: Dataset, sender: Sender) -> bool:
    data = _file_bytes(ds)
    parsed = pydicom.dcmread(io.BytesIO(data))
    status = persist_instance(
        ctx, parsed, data, str(parsed.file_meta.TransferSyntaxUID), sender, replace_different=True
    )
    return status is StoreStatus.SUCCESS


# DICOMweb ---------------------------------------------------------------------------------------------------
def _web_client(source: DicomWebDestination):  # type: ignore[no-untyped-def]
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    if source.token is not None:
        session.headers["Authorization"] = f"Bearer {source.token.get_secret_value()}"
    elif source.username and source.password is not None:
        session.auth = (source.username, source.password.get_secret_value())
    return DICOMwebClient(url=source.url, session=session)


def find_studies_web(source: DicomWebDestination, accessions: Sequence[str]) -> list[str]:
    import requests

    client = _web_client(source)
    uids: list[str] = []
    try:
        for accession in accessions:
            for match in client.search_for_studies(search_filters={"AccessionNumber": accession}):
                uids.append(str(match["0020000D"]["Value"][0]))
    except requests.RequestException as exc:
        raise PullError(f"QIDO-RS search failed: {exc}") from exc
    return uids


def pull_study_web(ctx: IntakeContext, source: DicomWebDestination, study_uid: str) -> Pulled:
    import requests

    try:
        datasets = _web_client(source).retrieve_study(study_uid)
    except requests.RequestException as exc:
        raise PullError(f"WADO-RS retrieve of study failed: {exc}") from exc
    sender = Sender(source.name[:16], source.url[:64])
    stored = sum(_store(ctx, ds, sender) for ds in datasets)
    return Pulled(study_uid, stored, len(datasets) - stored)


# DIMSE -----------------------------------------------------------------------------------------------------
def _associate(ae: AE, source: DicomDestination, what: str, **options: Any) -> Association:
    """An established association with the source, over TLS when it has ``tls`` (as the exporter connects)."""
    try:
        assoc = associate(ae, source, **options)
    except OSError as exc:  # ssl.SSLError included: the source's CA, certificate or key cannot be loaded
        raise PullError(f"{what} association with {source.ae_title}: TLS files not usable: {exc}") from exc
    if not assoc.is_established:
        raise PullError(f"{what} association with {source.ae_title} failed")
    return assoc


def find_studies_dimse(source: DicomDestination, calling_ae: str, accessions: Sequence[str]) -> list[str]:
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

    ae = AE(ae_title=source.calling_ae_title or calling_ae)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = _associate(ae, source, "C-FIND")
    uids: list[str] = []
    try:
        for accession in accessions:
            query = Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.AccessionNumber = accession
            query.StudyInstanceUID = ""
            for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                if status and status.Status in (0xFF00, 0xFF01) and identifier is not None:
                    uids.append(str(identifier.StudyInstanceUID))
    finally:
        assoc.release()
    return uids


def pull_study_dimse(ctx: IntakeContext, source: DicomDestination, calling_ae: str, study_uid: str) -> Pulled:
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        EnhancedMRImageStorage,
        MRImageStorage,
        StudyRootQueryRetrieveInformationModelGet,
    )

    sender = Sender(source.ae_title, source.host[:64])
    counts = {"stored": 0, "failed": 0}

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        ok = _store(ctx, ds, sender)
        counts["stored" if ok else "failed"] += 1
        return 0x0000 if ok else 0xA700

    ae = AE(ae_title=source.calling_ae_title or calling_ae)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    storage = (MRImageStorage, EnhancedMRImageStorage)
    for sop_class in storage:
        ae.add_requested_context(sop_class)
    roles: list[Any] = [build_role(sop_class, scp_role=True) for sop_class in storage]
    assoc = _associate(ae, source, "C-GET", ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_uid
        final = None
        for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
            final = status
    finally:
        assoc.release()
    if final is None or final.Status not in (0x0000, 0xB000):
        code = f"0x{int(final.Status):04X}" if final is not None else "none"
        raise PullError(f"C-GET of the study ended with status {code}")
    return Pulled(study_uid, counts["stored"], counts["failed"])


def find_studies(source: DicomDestination | DicomWebDestination, calling_ae: str,
                 accessions: Sequence[str]) -> list[str]:
    if isinstance(source, DicomWebDestination):
        return find_studies_web(source, accessions)
    return find_studies_dimse(source, calling_ae, accessions)


def pull_study(ctx: IntakeContext, source: DicomDestination | DicomWebDestination, calling_ae: str,
               study_uid: str) -> Pulled:
    if isinstance(source, DicomWebDestination):
        return pull_study_web(ctx, source, study_uid)
    return pull_study_dimse(ctx, source, calling_ae, study_uid)
