"""Event handlers of the DICOM listener: admit, echo, store and record; never the model.

Each handler is a plain function of the pynetdicom event and an :class:`IntakeContext`, and returns a member
of a status enum. This is one of the three places where exceptions become something else: a DIMSE status.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, cast

from pydicom.dataset import Dataset, FileMetaDataset
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.events import Event
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from worker.db import repository as repo
from worker.db.models import AssociationState
from worker.listener import validation
from worker.listener.network import transport_problem
from worker.listener.status import EchoStatus, RejectReason, StoreStatus, store_response
from worker.listener.validation import TruncatedDatasetError
from worker.listener.validation import parse_fully as _parse_fully
from worker.ops import metrics
from worker.provenance import RESULT_KINDS, own_output
from worker.settings import IpNetwork
from worker.spool import InvalidUIDError, LowDiskError, Spool, validate_uid
from worker.timeutil import Clock, utcnow

log = logging.getLogger("worker.listener")


@dataclass(frozen=True)
class AdmissionPolicy:
    """Who may open an association: our called AE, and optional calling-AE and peer-address allow-lists."""

    ae_title: str
    allowed_calling_aets: frozenset[str] = frozenset()
    allowed_networks: tuple[IpNetwork, ...] = ()


def admit(policy: AdmissionPolicy, *, calling_ae: str, called_ae: str, address: str) -> RejectReason | None:
    """None when the request may proceed, else why it is refused."""
    if called_ae.strip() != policy.ae_title:
        return RejectReason.CALLED_AE_NOT_RECOGNISED
    if policy.allowed_calling_aets and calling_ae.strip() not in policy.allowed_calling_aets:
        return RejectReason.CALLING_AE_NOT_RECOGNISED
    if policy.allowed_networks:
        try:
            peer = ipaddress.ip_address(address)
        except ValueError:
            return RejectReason.PEER_ADDRESS_NOT_ALLOWED
        if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
            peer = peer.ipv4_mapped
        if not any(peer in net for net in policy.allowed_networks):
            return RejectReason.PEER_ADDRESS_NOT_ALLOWED
    return None


@dataclass
class _Tally:
    association_id: int | None
    calling_ae: str
    peer_address: str
    stored: int = 0
    failed: int = 0


@dataclass
class IntakeContext:
    """What the handlers need: the spool, the database, the admission policy and a clock."""

    spool: Spool
    sessions: sessionmaker[Session]
    policy: AdmissionPolicy
    listener_name: str
    tls: bool = False
    clock: Clock = utcnow
    _tallies: weakref.WeakKeyDictionary[Any, _Tally] = field(default_factory=weakref.WeakKeyDictionary)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def tally(self, assoc: Any) -> _Tally:
        with self._lock:
            found = self._tallies.get(assoc)
            if found is None:
                requestor = assoc.requestor
                found = _Tally(None, str(requestor.ae_title).strip(), str(requestor.address))
                self._tallies[assoc] = found
            return found

    def forget(self, assoc: Any) -> _Tally | None:
        with self._lock:
            return self._tallies.pop(assoc, None)


def _association_record(event: Event, ctx: IntakeContext) -> repo.AssociationRecord:
    requestor = event.assoc.requestor
    primitive = requestor.primitive
    called = str(getattr(primitive, "called_ae_title", "") or "").strip()
    calling = str(getattr(primitive, "calling_ae_title", "") or requestor.ae_title or "").strip()
    return repo.AssociationRecord(
        listener=ctx.listener_name,
        calling_ae=calling[:16],
        called_ae=called[:16],
        peer_address=str(requestor.address),
        peer_port=int(requestor.port or 0),
        tls=ctx.tls,
    )


def handle_requested(event: Event, ctx: IntakeContext) -> None:
    """EVT_REQUESTED: apply the admission policy; a refusal is sent as A-ASSOCIATE-RJ and recorded."""
    rec = _association_record(event, ctx)
    reason = admit(ctx.policy, calling_ae=rec.calling_ae, called_ae=rec.called_ae, address=rec.peer_address)
    if reason is None:
        return
    log.warning(
        "association rejected: %s (calling AE %r, called AE %r, peer %s)",
        reason.name.lower(),
        rec.calling_ae,
        rec.called_ae,
        rec.peer_address,
    )
    event.assoc.acse.send_reject(*reason.value)
    metrics.association("rejected", reason.name.lower())  # metrics hook
    try:
        with ctx.sessions.begin() as session:
            repo.record_association(
                session,
                rec,
                state=AssociationState.REJECTED,
                now=ctx.clock(),
                reject_reason=reason.name.lower(),
            )
    except SQLAlchemyError:
        log.exception("could not record a rejected association")


def handle_established(event: Event, ctx: IntakeContext) -> None:
    rec = _association_record(event, ctx)
    tally = ctx.tally(event.assoc)
    metrics.association("accepted")  # metrics hook
    try:
        with ctx.sessions.begin() as session:
            tally.association_id = repo.record_association(
                session, rec, state=AssociationState.ACCEPTED, now=ctx.clock()
            )
    except SQLAlchemyError:
        log.exception("could not record an association")
    log.info("association %s accepted from %r at %s", tally.association_id, rec.calling_ae, rec.peer_address)


def _handle_end(event: Event, ctx: IntakeContext, state: AssociationState, reason: str | None = None) -> None:
    tally = ctx.forget(event.assoc)
    if tally is None or tally.association_id is None:
        return
    try:
        with ctx.sessions.begin() as session:
            repo.end_association(
                session,
                tally.association_id,
                state=state,
                stored=tally.stored,
                failed=tally.failed,
                now=ctx.clock(),
                reason=reason,
            )
    except SQLAlchemyError:
        log.exception("could not record the end of association %s", tally.association_id)
    log.log(
        logging.WARNING if reason else logging.INFO,
        "association %s from %s %s%s: %d stored, %d failed",
        tally.association_id,
        tally.peer_address,
        state.value,
        f" ({reason})" if reason else "",
        tally.stored,
        tally.failed,
    )


def handle_released(event: Event, ctx: IntakeContext) -> None:
    _handle_end(event, ctx, AssociationState.RELEASED)


def handle_aborted(event: Event, ctx: IntakeContext) -> None:
    """EVT_ABORTED: by the peer, or by us when it stalled (a read past its deadline, or idle too long:
    both are the network timeout)."""
    reason = transport_problem(event.assoc)
    if reason is None and event.assoc.dul.idle_timer_expired():
        reason = "network_timeout"
    if reason is not None:
        metrics.association("aborted", reason)  # metrics hook
    _handle_end(event, ctx, AssociationState.ABORTED, reason)


def handle_echo(event: Event, ctx: IntakeContext) -> EchoStatus:
    return EchoStatus.SUCCESS


def _optional_int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def handle_store(event: Event, ctx: IntakeContext) -> StoreStatus | Dataset:
    """EVT_C_STORE: validate, write durably, record, and only then report success (a failure goes with an
    Error Comment naming the problem)."""
    tally = ctx.tally(event.assoc)
    status = _store(event, ctx, tally)
    if status is StoreStatus.SUCCESS:
        tally.stored += 1
        return status
    tally.failed += 1
    return store_response(status)


def _store(event: Event, ctx: IntakeContext, tally: _Tally) -> StoreStatus:
    request = cast(C_STORE, event.request)
    affected_sop = str(request.AffectedSOPInstanceUID or "")
    try:
        ctx.spool.check_space(0)
    except LowDiskError:
        log.error("refusing instance %s: free disk below the minimum", affected_sop)
        return StoreStatus.OUT_OF_RESOURCES

    try:
        encoded = event.encoded_dataset(include_meta=False)
        if not encoded:
            raise TruncatedDatasetError("an empty data set")
        dataset = event.dataset
        validation.note_read_encoding(dataset)
        _parse_fully(dataset, encoded)
    except Exception:  # pydicom raises many types for malformed input; this is the DIMSE edge
        log.warning("instance %s: dataset could not be decoded", affected_sop, exc_info=True)
        return StoreStatus.DATASET_DECODE_FAILED

    try:
        sop_uid = validate_uid(dataset.get("SOPInstanceUID"), "SOPInstanceUID")
        sop_class = validate_uid(dataset.get("SOPClassUID"), "SOPClassUID")
    except InvalidUIDError as exc:
        log.warning("instance %s refused: %s", affected_sop, exc)
        return StoreStatus.INVALID_UID

    if sop_class != str(event.context.abstract_syntax) or sop_uid != affected_sop:
        log.warning("instance %s refused: SOP class or instance UID differs from the request", affected_sop)
        return StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS

    file_meta: FileMetaDataset = event.file_meta
    file_meta.SourceApplicationEntityTitle = tally.calling_ae or "UNKNOWN"
    data = b"".join((b"\x00" * 128, b"DICM", encode_file_meta(file_meta), encoded))
    sender = Sender(tally.calling_ae, tally.peer_address, tally.association_id)
    return persist_instance(ctx, dataset, data, str(file_meta.TransferSyntaxUID), sender)


@dataclass(frozen=True)
class Sender:
    """Who sent an instance: a DIMSE peer (calling AE) or a DICOMweb client (its sender name)."""

    calling_ae: str
    peer_address: str
    association_id: int | None = None


def persist_instance(
    ctx: IntakeContext,
    dataset: Dataset,
    data: bytes,
    transfer_syntax_uid: str,
    sender: Sender,
    *,
    replace_different: bool = False,
) -> StoreStatus:
    """The part of storing every intake path shares (C-STORE and STOW-RS): UIDs checked before they become
    path parts, the image checked against its attributes, durable write, database row committed, and only
    then success. Nothing half-done stays. A SOP Instance UID already stored with other pixels (or in another
    series) is refused, unless `replace_different` (a pull from the PACS, the source of truth)."""
    try:
        study_uid = validate_uid(dataset.get("StudyInstanceUID"), "StudyInstanceUID")
        series_uid = validate_uid(dataset.get("SeriesInstanceUID"), "SeriesInstanceUID")
        sop_uid = validate_uid(dataset.get("SOPInstanceUID"), "SOPInstanceUID")
        sop_class = validate_uid(dataset.get("SOPClassUID"), "SOPClassUID")
        paths = ctx.spool.paths_for(study_uid, series_uid, sop_uid)
    except InvalidUIDError as exc:
        log.warning("instance refused: %s", exc)
        return StoreStatus.INVALID_UID

    if _acknowledge_own_output(ctx, dataset, study_uid, sop_uid, sop_class, sender):
        return StoreStatus.SUCCESS

    problem = validation.check_instance(dataset, transfer_syntax_uid, sop_class)
    if problem is not None:
        log.warning("instance %s refused (%04X): %s", sop_uid, problem.status, problem.detail)
        return problem.status

    existed = paths.final.exists()
    if existed and not replace_different:
        difference = validation.differs_from_stored(paths.final, dataset, transfer_syntax_uid)
        if difference is not None:
            log.warning("instance %s refused: %s", sop_uid, difference)
            return StoreStatus.CONFLICTING_DUPLICATE
    try:
        size = ctx.spool.write(paths, data)
    except LowDiskError:
        log.error("instance %s refused: disk full", sop_uid)
        return StoreStatus.OUT_OF_RESOURCES
    except OSError:
        log.exception("instance %s: spool write failed", sop_uid)
        return StoreStatus.OUT_OF_RESOURCES

    record = repo.InstanceRecord(
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        sop_class_uid=sop_class,
        transfer_syntax_uid=transfer_syntax_uid,
        size_bytes=size,
        path=paths.relative,
        calling_ae=sender.calling_ae[:16],
        peer_address=sender.peer_address[:64],
        association_id=sender.association_id,
        modality=str(dataset.get("Modality") or "")[:16] or None,
        series_number=_optional_int(dataset.get("SeriesNumber")),
    )
    try:
        with ctx.sessions.begin() as session:
            repo.record_instance(session, record, now=ctx.clock(), move=replace_different)
    except repo.ConflictingInstanceError as exc:
        log.warning("instance %s refused: %s", sop_uid, exc)
        if not existed:
            ctx.spool.remove(paths)
        return StoreStatus.CONFLICTING_DUPLICATE
    except Exception:  # the database is down or refused: the sender must retry; nothing half-recorded stays
        log.exception("instance %s: database commit failed", sop_uid)
        if not existed:
            ctx.spool.remove(paths)
        return StoreStatus.OUT_OF_RESOURCES
    log.debug("stored instance %s of study %s", sop_uid, study_uid)
    metrics.instance_received()  # metrics hook
    return StoreStatus.SUCCESS


def _acknowledge_own_output(
    ctx: IntakeContext, dataset: Dataset, study_uid: str, sop_uid: str, sop_class: str, sender: Sender
) -> bool:
    """True when `dataset` is one of our own result objects sent back (a PACS routing rule, a pull).

    It is acknowledged, so the sender does not retry it forever, but neither spooled nor recorded as an
    instance: it never reopens its study, so it never makes a job. Ours by its equipment signature, or by its
    SOP Instance UID when this database recorded it as a result object (whose job then gets a
    `result_returned` event). Another vendor's object of the same class is an ordinary instance.
    """
    signature = own_output(dataset)
    if signature is None and sop_class not in RESULT_KINDS:
        return False
    job_id: int | None = None
    try:
        with ctx.sessions.begin() as session:
            job_id = repo.job_of_result_object(session, sop_uid)
            if job_id is not None:
                repo.add_job_event(session, job_id, "result_returned", now=ctx.clock(), detail={
                    "sop_instance_uid": sop_uid,
                    "sop_class_uid": sop_class,
                    "calling_ae": sender.calling_ae,
                    "peer_address": sender.peer_address,
                    "recognised_by": "equipment" if signature is not None else "sop_instance_uid",
                })
    except SQLAlchemyError:
        log.exception("own result object check of %s: database unavailable", sop_uid)
    if signature is None and job_id is None:
        return False
    log.info(
        "own result object %s (study %s, job %s, device %s) from %r at %s: acknowledged, not analysed",
        sop_uid,
        study_uid,
        job_id if job_id is not None else "unknown here",
        signature.device_uid if signature is not None else "unnamed",
        sender.calling_ae,
        sender.peer_address,
    )
    metrics.own_result_returned()  # metrics hook
    return True
