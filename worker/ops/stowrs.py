"""DICOMweb intake: `POST /dicomweb/studies` (STOW-RS) into the same durable spool and study assembly as the
DIMSE listener, with the same admission rules. A sender is named by its bearer token
(`CCFNET_STOW_SENDERS`, name -> token); the name then plays the calling AE's part in the allow-list.

The app that includes `router` sets `app.state.intake` (the listener's IntakeContext) and `app.state.settings`.
"""

from __future__ import annotations

import hmac
import io
import logging
from typing import Any

import pydicom
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydicom.errors import InvalidDicomError
from starlette.concurrency import run_in_threadpool

from worker.listener.handlers import IntakeContext, Sender, admit, persist_instance
from worker.listener.scp import storage_sop_classes
from worker.listener.status import StoreStatus
from worker.listener.validation import note_read_encoding, parse_fully
from worker.ops.stow_body import MultipartReceiver, ReceivedPart, StowBodyError
from worker.settings import Settings

log = logging.getLogger("worker.stowrs")
router = APIRouter()
DICOM_JSON = "application/dicom+json"
# PS3.18 failure reasons in FailedSOPSequence.
FAILURE_PROCESSING = 0x0110
FAILURE_SOP_CLASS = 0x0122


def _sender(request: Request, settings: Settings) -> str | None:
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else ""
    if not token:
        return None
    for name, secret in settings.stow_senders.items():
        if hmac.compare_digest(token.encode(), secret.get_secret_value().encode()):
            return name
    return None


def _reference(ds: Any) -> dict[str, Any]:
    return {"00081150": {"vr": "UI", "Value": [str(ds.get("SOPClassUID", ""))]},
            "00081155": {"vr": "UI", "Value": [str(ds.get("SOPInstanceUID", ""))]}} if ds is not None else {}


@router.post("/dicomweb/studies")
async def store_instances(request: Request) -> JSONResponse:
    ctx: IntakeContext = request.app.state.intake
    settings: Settings = request.app.state.settings
    address = request.client.host if request.client else ""
    sender = _sender(request, settings)
    if sender is None:
        log.warning("STOW-RS from %s refused: no valid sender token", address)
        return JSONResponse({"error": "a valid sender bearer token is required"}, status_code=401)
    refused = admit(ctx.policy, calling_ae=sender, called_ae=ctx.policy.ae_title, address=address)
    if refused is not None:
        log.warning("STOW-RS from %s (%s) refused: %s", sender, address, refused.name)
        return JSONResponse({"error": f"sender refused: {refused.name.lower()}"}, status_code=403)
    max_bytes = settings.stow_max_request_mb * 1024 * 1024
    try:
        receiver = MultipartReceiver(request.headers.get("content-type", ""), ctx.spool.incoming, max_bytes)
        declared = int(request.headers.get("content-length") or 0)
        if declared > max_bytes:
            raise StowBodyError(413, f"request body of {declared} bytes, over CCFNET_STOW_MAX_REQUEST_MB")
    except (StowBodyError, ValueError) as exc:
        return _refuse(sender, address, exc)
    try:
        async for chunk in request.stream():
            receiver.feed(chunk)
        parts = receiver.finish()
        # Parsing, checks, fsync and the database run off the event loop: /metrics and the ops page stay live.
        stored, failed = await run_in_threadpool(_store_parts, ctx, settings, parts, Sender(sender, address))
    except StowBodyError as exc:
        return _refuse(sender, address, exc)
    finally:
        receiver.discard()
    body: dict[str, Any] = {}
    if stored:
        body["00081199"] = {"vr": "SQ", "Value": stored}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    code = 200 if not failed else (202 if stored else 409)
    log.info("STOW-RS from %s: %d stored, %d failed", sender, len(stored), len(failed))
    return JSONResponse(body, status_code=code, media_type=DICOM_JSON)


def _refuse(sender: str, address: str, exc: Exception) -> JSONResponse:
    status = exc.status if isinstance(exc, StowBodyError) else 400
    log.warning("STOW-RS from %s (%s) refused (%d): %s", sender, address, status, exc)
    return JSONResponse({"error": str(exc)}, status_code=status)


def _store_parts(
    ctx: IntakeContext, settings: Settings, parts: list[ReceivedPart], sender: Sender
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Each part checked and stored as a C-STORE instance would be; (stored, failed) references."""
    accepted = {str(uid) for uid in storage_sop_classes(settings)}
    stored: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for part in parts:
        if part.content_type not in ("", "application/dicom"):
            failed.append({"00081197": {"vr": "US", "Value": [FAILURE_PROCESSING]}})
            continue
        data = part.path.read_bytes()
        try:
            ds = pydicom.dcmread(io.BytesIO(data))
            note_read_encoding(ds)
            parse_fully(ds, data)  # every element decoded and as long as it says: a truncated one fails here
            transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
            if not len(ds):
                raise ValueError("an empty data set")
        except (InvalidDicomError, AttributeError, ValueError, OSError, EOFError, KeyError, TypeError):
            failed.append({"00081197": {"vr": "US", "Value": [int(StoreStatus.DATASET_DECODE_FAILED)]}})
            continue
        if str(ds.get("SOPClassUID", "")) not in accepted:
            failed.append({**_reference(ds), "00081197": {"vr": "US", "Value": [FAILURE_SOP_CLASS]}})
            continue
        meta = ds.file_meta
        if (meta.get("MediaStorageSOPClassUID"), meta.get("MediaStorageSOPInstanceUID")) != (
            ds.get("SOPClassUID"), ds.get("SOPInstanceUID")
        ):  # what a C-STORE request's Affected SOP Class / Instance UID would have caught
            failed.append({**_reference(ds), "00081197": {"vr": "US", "Value": [0xA900]}})
            continue
        status = persist_instance(ctx, ds, data, transfer_syntax, sender)
        if status is StoreStatus.SUCCESS:
            stored.append(_reference(ds))
        else:
            failed.append({**_reference(ds), "00081197": {"vr": "US", "Value": [_failure_reason(status)]}})
    return stored, failed


def _failure_reason(status: StoreStatus) -> int:
    """The Failure Reason (0008,1197) of a refused instance: the C-STORE status where PS3.18 takes one
    (A700 out of resources, A900 does not match the SOP class, Cxxx cannot understand), else 0110."""
    if status in (StoreStatus.OUT_OF_RESOURCES, StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS) or status >= 0xC000:
        return int(status)
    return FAILURE_PROCESSING


def create_stow_app(ctx: IntakeContext, settings: Settings) -> FastAPI:
    """A standalone app serving only the STOW-RS endpoint (the ops app includes `router` the same way)."""
    app = FastAPI(title="ccfnet STOW-RS intake", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.intake = ctx
    app.state.settings = settings
    app.include_router(router)
    return app
