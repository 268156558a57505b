"""What ``ccfnet config show`` and ``ccfnet config check`` report: settings with secrets masked, and
whether the database, broker, spool and each destination are reachable, the listener's TLS files readable and
the model's checkpoint and device there."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import SecretStr

from worker.db.engine import safe_url
from worker.settings import ENV_PREFIX, DicomDestination, DicomWebDestination, Settings, SettingsError

MASK = "**********"
_URL_FIELDS = {"database_url", "broker_url"}


def _mask(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return MASK
    if isinstance(value, dict):
        return {k: _mask(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is not None and not isinstance(value, (str, int, float, bool)):
        return str(value)
    return value


def shown_settings(settings: Settings) -> dict[str, Any]:
    """Every setting as ``CCFNET_NAME -> value``, secrets masked (URL passwords as ***)."""
    shown: dict[str, Any] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if name in _URL_FIELDS and isinstance(value, SecretStr):
            url = value.get_secret_value()
            value = url if url.startswith("filesystem") else safe_url(url)
        elif name == "destinations":
            value = [_mask(dict(d)) for d in value]
        shown[f"{ENV_PREFIX}{name.upper()}"] = _mask(value)
    shown["(effective database)"] = safe_url(settings.effective_database_url)
    broker = settings.effective_broker_url
    shown["(effective broker)"] = broker if broker.startswith("filesystem") else safe_url(broker)
    shown["(effective spool)"] = str(settings.spool_path)
    return shown


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def check_database(settings: Settings) -> Check:
    from sqlalchemy.exc import SQLAlchemyError

    from worker.db.engine import make_engine, ping
    from worker.db.migrate import current_revision, head_revision

    engine = (
        make_engine(settings.effective_database_url, pool_pre_ping=False)
        if not settings.uses_sqlite
        else make_engine(settings.effective_database_url)
    )
    try:
        ping(engine)
        current, head = current_revision(engine), head_revision()
    except SQLAlchemyError as exc:
        return Check(
            "database", False, f"{safe_url(settings.effective_database_url)}: {exc.__class__.__name__}"
        )
    finally:
        engine.dispose()
    if current != head:
        return Check(
            "database", False, f"schema at {current or 'none'}, needs {head}: run `ccfnet db upgrade`"
        )
    return Check("database", True, f"{safe_url(settings.effective_database_url)} at revision {current}")


def check_broker(settings: Settings) -> Check:
    from worker.queue.celery_app import filesystem_folders, is_filesystem_broker

    if is_filesystem_broker(settings):
        folder = filesystem_folders(settings)[0]
        ok, detail = _writable(folder)
        return Check("broker", ok, f"on-disk broker at {folder}: {detail}")
    from kombu import Connection

    url = settings.effective_broker_url
    try:
        with Connection(url, connect_timeout=3) as connection:
            connection.ensure_connection(max_retries=1, timeout=3)
    except Exception as exc:  # any transport error means "not reachable"; this is a report, not a crash
        return Check("broker", False, f"{safe_url(url)}: {exc.__class__.__name__}: {exc}")
    return Check("broker", True, f"{safe_url(url)} reachable")


def _writable(folder: Any) -> tuple[bool, str]:
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".probe-{uuid.uuid4().hex}")
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"ok")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return False, f"not writable ({exc.strerror})"
    return True, "writable"


def check_spool(settings: Settings) -> Check:
    import shutil

    ok, detail = _writable(settings.spool_path)
    if not ok:
        return Check("spool", False, f"{settings.spool_path}: {detail}")
    free_mb = shutil.disk_usage(settings.spool_path).free // (1024 * 1024)
    enough = free_mb >= settings.min_free_disk_mb
    return Check(
        "spool",
        enough,
        f"{settings.spool_path}: writable, {free_mb} MB free (minimum {settings.min_free_disk_mb} MB)",
    )


def _echo(settings: Settings, dest: DicomDestination) -> Check:
    """C-ECHO the destination connected as the exporter connects: over TLS with its certificates when it has
    ``tls``, so a TLS-only PACS passes and a certificate problem fails here as it would fail an export."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from worker.export.dimse import associate

    name = f"destination {dest.name}"
    where = f"{dest.ae_title}@{dest.host}:{dest.port}{' over TLS' if dest.tls else ''}"
    ae = AE(ae_title=dest.calling_ae_title or settings.ae_title)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 5
    try:
        assoc = associate(ae, dest)
    except OSError as exc:  # ssl.SSLError included: the CA, certificate or key file cannot be loaded
        return Check(name, False, f"{where}: TLS files not usable: {exc}")
    if not assoc.is_established:
        return Check(name, False, f"{where}: association not accepted")
    status = assoc.send_c_echo()
    assoc.release()
    ok = bool(status) and int(status.Status) == 0
    return Check(name, ok, f"{where}: C-ECHO {'succeeded' if ok else 'failed'}")


def check_destination(settings: Settings, dest: DicomDestination | DicomWebDestination) -> Check:
    if isinstance(dest, DicomDestination):
        return _echo(settings, dest)
    import requests

    from worker.export.stow import http_session

    try:
        with http_session(dest) as session:  # the exporter's credentials and CA (tls_ca), so the check means it
            response = session.get(f"{dest.url}/studies", params={"limit": 1}, timeout=5)
    except requests.RequestException as exc:
        return Check(f"destination {dest.name}", False, f"{dest.url}: {exc.__class__.__name__}")
    ok = response.status_code < 400
    return Check(f"destination {dest.name}", ok, f"{dest.url}: HTTP {response.status_code}")


def model_device(settings: Settings) -> str:
    """The device a worker on this host runs the model on (``cpu`` or ``cuda``, ``auto`` resolved as inference
    resolves it); SettingsError naming CCFNET_MODEL_DEVICE when it asks for a device that is not there."""
    from worker import core_bridge

    try:
        return core_bridge.resolve_device(settings.model_device)
    except core_bridge.DeviceUnavailable as exc:
        raise SettingsError(f"{ENV_PREFIX}MODEL_DEVICE={settings.model_device}: {exc}") from exc


def check_model(settings: Settings) -> Check:
    """The configured checkpoint's identity as every result object will state it, and the device it runs on."""
    from worker import core_bridge
    from worker.inference import model_path

    path = model_path(settings)
    try:
        device = model_device(settings)
    except SettingsError as exc:
        return Check("model", False, str(exc))
    if not path.is_file():
        return Check("model", False, f"{path}: no such checkpoint")
    try:
        card = core_bridge.model_card_summary(path)
    except ValueError as exc:
        return Check("model", False, str(exc))
    text = f"{card} ({path}) on {device}"
    if os.environ.get(f"{ENV_PREFIX}MODEL_VERSION"):
        text += f"; {ENV_PREFIX}MODEL_VERSION is set and ignored: results name the checkpoint's own card"
    return Check("model", True, text)


TLS_FILE_SETTINGS = ("tls_cert", "tls_key", "tls_ca")


def tls_file_problems(settings: Settings) -> list[str]:
    """With TLS on, each listener TLS setting that names no readable file (``CCFNET_TLS_CERT=/x.crt: no such
    file``); none with TLS off."""
    problems: list[str] = []
    if not settings.tls_enabled:
        return problems
    for name in TLS_FILE_SETTINGS:
        path = getattr(settings, name)
        if path is None:
            continue
        where = f"{ENV_PREFIX}{name.upper()}={path}"
        if not path.exists():
            problems.append(f"{where}: no such file")
        elif not path.is_file():
            problems.append(f"{where}: not a file")
        elif not os.access(path, os.R_OK):
            problems.append(f"{where}: not readable")
    return problems


def check_tls(settings: Settings) -> Check:
    if not settings.tls_enabled:
        return Check("tls", True, f"off ({ENV_PREFIX}TLS_CERT unset)")
    problems = tls_file_problems(settings)
    return Check("tls", not problems, "; ".join(problems) or "on, every file readable")


def run_checks(settings: Settings) -> list[Check]:
    checks = [check_database(settings), check_broker(settings), check_spool(settings), check_tls(settings),
              check_model(settings)]
    checks.extend(check_destination(settings, d) for d in settings.destinations)
    return checks
