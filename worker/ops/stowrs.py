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

from worker.listener.handlers import IntakeContext, Sender, admit, persist_instance
from worker.listener.scp import storage_sop_classes
from worker.listener.status import StoreStatus
from worker.settings import Settings

log = logging.getLogger("worker.stowrs")
router = APIRouter()
DICOM_JSON = "application/dicom+json"
# PS3.18 failure reasons in FailedSOPSequence.
FAILURE_PROCESSING = 0x0110
FAILURE_SOP_CLASS = 0x0122
FAILURE_OUT_OF_RESOURCES = 0xA700


def _sender(request: Request, settings: Settings) -> str | None:
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else ""
    if not token:
        return None
    for name, secret in settings.stow_senders.items():
        if hmac.compare_digest(token.encode(), secret.get_secret_value().encode()):
            return name
    return None


def _parts(body: bytes, content_type: str) -> list[bytes]:
    """Body parts of a multipart/related request (RFC 2387), headers stripped."""
    params = dict(
        p.strip().split("=", 1) for p in content_type.split(";")[1:] if "=" in p
    )
    boundary = params.get("boundary", "").strip('"')
    if not boundary:
        raise ValueError("multipart/related without a boundary")
    delimiter = b"--" + boundary.encode()
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        chunk = chunk[2:] if chunk.startswith(b"\r\n") else chunk
        _head, sep, payload = chunk.partition(b"\r\n\r\n")
        if not sep:
            continue
        parts.append(payload[:-2] if payload.endswith(b"\r\n") else payload)
    return parts


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
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/related"):
        return JSONResponse({"error": "expected multipart/related; type=\"application/dicom\""}, status_code=415)
    try:
        parts = _parts(await request.body(), content_type)
    except ValueError as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)
    accepted = {str(uid) for uid in storage_sop_classes(settings)}
    stored: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for data in parts:
        try:
            ds = pydicom.dcmread(io.BytesIO(data))
            ds.walk(lambda _dataset, _element: None)  # decode every element: a broken one fails here
            transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
        except (InvalidDicomError, AttributeError, ValueError, OSError, EOFError):
            failed.append({"00081197": {"vr": "US", "Value": [FAILURE_PROCESSING]}})
            continue
        if str(ds.get("SOPClassUID", "")) not in accepted:
            failed.append({**_reference(ds), "00081197": {"vr": "US", "Value": [FAILURE_SOP_CLASS]}})
            continue
        status = persist_instance(ctx, ds, data, transfer_syntax, Sender(sender, address))
        if status is StoreStatus.SUCCESS:
            stored.append(_reference(ds))
        else:
            reason = FAILURE_OUT_OF_RESOURCES if status is StoreStatus.OUT_OF_RESOURCES else FAILURE_PROCESSING
            failed.append({**_reference(ds), "00081197": {"vr": "US", "Value": [reason]}})
    body: dict[str, Any] = {}
    if stored:
        body["00081199"] = {"vr": "SQ", "Value": stored}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    code = 200 if not failed else (202 if stored else 409)
    log.info("STOW-RS from %s: %d stored, %d failed", sender, len(stored), len(failed))
    return JSONResponse(body, status_code=code, media_type=DICOM_JSON)


def create_stow_app(ctx: IntakeContext, settings: Settings) -> FastAPI:
    """A standalone app serving only the STOW-RS endpoint (the ops app includes `router` the same way)."""
    app = FastAPI(title="ccfnet STOW-RS intake", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.intake = ctx
    app.state.settings = settings
    app.include_router(router)
    return app
