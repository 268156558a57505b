"""DICOM TLS for real, with certificates made by openssl: the listener (in process, real PostgreSQL, as the
intake tests run it) against DCMTK's echoscu/storescu, and our C-STORE exporter against Orthanc."""

# ruff: noqa: F811  (pytest fixtures imported from intake_support are parameters of the same name)
from __future__ import annotations

import http.server
import io
import json
import logging
import shutil
import socket
import ssl
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dicom_factory as f
import httpx
import pytest
from click.testing import Result
from intake_support import (
    CALLED_AE,
    make_settings,
    migrate_to_head,
    pg_url,  # noqa: F401  (fixture)
    require_dcmtk,
    wait_for,
)
from orthanc import ORTHANC, ORTHANC_AE, Orthanc, free_port
from sqlalchemy import select
from typer.testing import CliRunner

from worker.cli import app
from worker.db import repository as repo
from worker.db.engine import make_engine, make_session_factory
from worker.db.models import Association, Instance
from worker.ops import metrics
from worker.service import Service
from worker.settings import DicomDestination, DicomWebDestination

pytestmark = pytest.mark.services

DCMTK_TIMEOUT = ["-to", "10", "-ta", "10", "-td", "10"]


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate signed by a CA the listener does not trust
    rogue_key: Path


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.crt"
    ca_extensions = ["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign"]
    _openssl(
        *["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2"],
        *["-subj", f"/CN={name}", *ca_extensions, "-keyout", key, "-out", cert],
        cwd=folder,
    )
    return cert, key


def _make_leaf(folder: Path, name: str, ca: tuple[Path, Path], usage: str) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1/localhost signed by `ca`, for `usage` (serverAuth or clientAuth)."""
    key, csr, cert, ext = (folder / f"{name}.{suffix}" for suffix in ("key", "csr", "crt", "ext"))
    ext.write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        f"extendedKeyUsage={usage}\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
        encoding="ascii",
    )
    _openssl(
        *["req", "-newkey", "rsa:2048", "-nodes", "-sha256"],
        "-subj",
        f"/CN={name}",
        "-keyout",
        key,
        "-out",
        csr,
        cwd=folder,
    )
    _openssl(
        *["x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial"],
        *["-days", "2", "-sha256", "-extfile", ext, "-out", cert],
        cwd=folder,
    )
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("pki")
    ca = _make_ca(folder, "test-ca")
    rogue_ca = _make_ca(folder, "rogue-ca")
    server = _make_leaf(folder, "server", ca, "serverAuth")
    client = _make_leaf(folder, "client", ca, "clientAuth")
    rogue = _make_leaf(folder, "rogue-client", rogue_ca, "clientAuth")
    return Pki(ca[0], *server, *client, *rogue)


ServiceFactory = Callable[..., Service]


@pytest.fixture
def dcmtk() -> None:
    require_dcmtk()


@pytest.fixture
def tls_service(dcmtk: None, tmp_path: Path, pg_url: str, pki: Pki) -> Iterator[ServiceFactory]:
    """Start the listener with TLS (server certificate, client CA); keyword arguments override settings."""
    migrate_to_head(pg_url)
    started: list[Service] = []

    def start(**overrides: object) -> Service:
        values: dict[str, object] = {
            "database_url": pg_url,
            "allowed_calling_aets": "ECHOSCU,STORESCU",
            "tls_cert": pki.server_cert,
            "tls_key": pki.server_key,
            "tls_ca": pki.ca,
            "tls_require_client_cert": True,
        }
        values.update(overrides)
        svc = Service(make_settings(tmp_path / "var", **values), sweep=False, reconcile=False).start()
        started.append(svc)
        return svc

    try:
        yield start
    finally:
        for svc in started:
            svc.stop()


def _client_tls(pki: Pki, cert: Path | None = None, key: Path | None = None) -> list[str]:
    """DCMTK's TLS options: our client certificate (or none: anonymous TLS) and our CA for the server's."""
    if cert is None or key is None:
        return ["+tla", "+cf", str(pki.ca)]
    return ["+tls", str(key), str(cert), "+cf", str(pki.ca)]


def _echoscu(port: int, tls: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["echoscu", *DCMTK_TIMEOUT, *tls, "-aet", "ECHOSCU", "-aec", CALLED_AE, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _associations(svc: Service) -> list[Association]:
    assert svc.sessions is not None
    with svc.sessions() as session:
        return list(session.scalars(select(Association).order_by(Association.id)))


def _instances(svc: Service) -> list[Instance]:
    assert svc.sessions is not None
    with svc.sessions() as session:
        return list(session.scalars(select(Instance)))


def test_echoscu_with_a_client_certificate_is_accepted_over_tls(tls_service: ServiceFactory, pki: Pki) -> None:
    svc = tls_service()
    result = _echoscu(svc.port, _client_tls(pki, pki.client_cert, pki.client_key))
    assert result.returncode == 0, result.stdout + result.stderr
    rows = wait_for(lambda: [a for a in _associations(svc) if a.state != "accepted"], timeout=10)
    assert [(a.calling_ae, a.tls, a.state) for a in rows] == [("ECHOSCU", True, "released")]


def test_storescu_over_tls_stores_the_instance(tls_service: ServiceFactory, pki: Pki, tmp_path: Path) -> None:
    svc = tls_service()
    uids = f.new_study()
    ds = next(iter(f.study_images(uids, 1)))
    path = tmp_path / "image.dcm"
    ds.save_as(path, enforce_file_format=True)
    result = subprocess.run(
        [
            "storescu",
            *DCMTK_TIMEOUT,
            *_client_tls(pki, pki.client_cert, pki.client_key),
            "-aet",
            "STORESCU",
            "-aec",
            CALLED_AE,
            "127.0.0.1",
            str(svc.port),
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = _instances(svc)
    assert [r.sop_instance_uid for r in rows] == [ds.SOPInstanceUID]
    assert (svc.settings.spool_path / rows[0].path).is_file()
    assert rows[0].calling_ae == "STORESCU"
    associations = [a for a in _associations(svc) if a.id == rows[0].association_id]
    assert associations and associations[0].tls


def _assert_refusal_recorded(svc: Service, reason: str, caplog: pytest.LogCaptureFixture, before: float) -> None:
    """A refused TLS connection is a row (rejected, its reason, the peer), a log line and a counter."""
    rows = wait_for(_associations_of(svc), timeout=10)
    assert [(a.state, a.reject_reason, a.peer_address, a.tls) for a in rows] == [
        ("rejected", reason, "127.0.0.1", True)
    ]
    assert any(f"127.0.0.1:{rows[0].peer_port}" in r.getMessage() and reason in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)
    assert metrics.ASSOCIATIONS.labels(outcome="rejected", reason=reason)._value.get() == before + 1


def _associations_of(svc: Service) -> Callable[[], list[Association]]:
    return lambda: _associations(svc)


def _refused_count(reason: str) -> float:
    return metrics.ASSOCIATIONS.labels(outcome="rejected", reason=reason)._value.get()


def test_plain_tcp_to_the_tls_port_is_refused(
    tls_service: ServiceFactory, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    svc = tls_service()
    before = _refused_count("tls_not_tls")
    result = _echoscu(svc.port, [])
    assert result.returncode != 0, result.stdout + result.stderr
    _assert_refusal_recorded(svc, "tls_not_tls", caplog, before)


def test_client_without_a_certificate_is_refused_when_one_is_required(
    tls_service: ServiceFactory, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    svc = tls_service()
    before = _refused_count("tls_no_client_certificate")
    result = _echoscu(svc.port, _client_tls(pki))
    assert result.returncode != 0, result.stdout + result.stderr
    _assert_refusal_recorded(svc, "tls_no_client_certificate", caplog, before)


def test_client_certificate_from_an_untrusted_ca_is_refused(
    tls_service: ServiceFactory, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    svc = tls_service()
    before = _refused_count("tls_certificate_not_trusted")
    result = _echoscu(svc.port, _client_tls(pki, pki.rogue_cert, pki.rogue_key))
    assert result.returncode != 0, result.stdout + result.stderr
    _assert_refusal_recorded(svc, "tls_certificate_not_trusted", caplog, before)


def test_a_silent_tls_connection_does_not_block_the_listener(
    tls_service: ServiceFactory, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """The handshake runs in the connection's thread under the network timeout, not in the accept loop."""
    svc = tls_service(network_timeout_seconds=2)
    before = _refused_count("tls_handshake_timeout")
    with socket.create_connection(("127.0.0.1", svc.port)) as silent:
        result = _echoscu(svc.port, _client_tls(pki, pki.client_cert, pki.client_key))
        assert result.returncode == 0, result.stdout + result.stderr
        silent.settimeout(10)
        assert silent.recv(1) == b""  # closed by the listener at the timeout
    rows = wait_for(lambda: [a for a in _associations(svc) if a.state == "rejected"], timeout=10)
    assert [a.reject_reason for a in rows] == ["tls_handshake_timeout"]
    assert _refused_count("tls_handshake_timeout") == before + 1


def test_client_certificate_is_optional_when_not_required(tls_service: ServiceFactory, pki: Pki) -> None:
    svc = tls_service(tls_require_client_cert=False)
    result = _echoscu(svc.port, _client_tls(pki))
    assert result.returncode == 0, result.stdout + result.stderr
    # Still TLS: plain TCP is refused.
    assert _echoscu(svc.port, []).returncode != 0


def test_tls_does_not_bypass_the_calling_ae_allow_list(tls_service: ServiceFactory, pki: Pki) -> None:
    svc = tls_service(allowed_calling_aets="STORESCU")
    result = _echoscu(svc.port, _client_tls(pki, pki.client_cert, pki.client_key))
    assert result.returncode != 0, result.stdout + result.stderr
    rows = wait_for(_associations_of(svc), timeout=10)  # written just after the A-ASSOCIATE-RJ goes out
    assert [(a.calling_ae, a.tls, a.state) for a in rows] == [("ECHOSCU", True, "rejected")]


# --- our C-STORE exporter (worker/export/dimse.py) against Orthanc with DICOM TLS ---------------------------


@pytest.fixture(scope="module")
def tls_orthanc(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Orthanc]:
    """Orthanc whose DICOM port speaks only TLS and requires a client certificate from our CA."""
    if ORTHANC is None:
        pytest.skip("Orthanc is not installed")
    pytest.importorskip("worker.export.dimse", reason="the C-STORE exporter module is not in this checkout")

    class TlsOrthanc(Orthanc):
        def write_config(self) -> Path:
            path = super().write_config()
            config = json.loads(path.read_text())
            config |= {
                "DicomTlsEnabled": True,
                "DicomTlsCertificate": str(pki.server_cert),
                "DicomTlsPrivateKey": str(pki.server_key),
                "DicomTlsTrustedCertificates": str(pki.ca),
                "DicomTlsRemoteCertificateRequired": True,
            }
            path.write_text(json.dumps(config, indent=1))
            return path

    folder = tmp_path_factory.mktemp("orthanc-tls")
    pacs = TlsOrthanc(folder, free_port(), free_port(), our_ae=CALLED_AE, our_port=free_port()).start()
    try:
        yield pacs
    finally:
        pacs.stop()


def _export(pacs: Orthanc, tmp_path: Path, **tls: Any) -> tuple[Any, str, str]:
    """Send one new MR image to `pacs` with our exporter; its Delivery, study UID and SOP Instance UID."""
    from worker.export.delivery import Item
    from worker.export.dimse import send_dimse

    ds = next(iter(f.study_images(f.new_study(), 1)))
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    destination = DicomDestination(name="pacs", ae_title=ORTHANC_AE, host="127.0.0.1", port=pacs.dicom_port, **tls)
    item = Item(export_id=1, path=path, sop_instance_uid=ds.SOPInstanceUID)
    results = send_dimse(destination, [item], calling_ae=CALLED_AE, timeout=10)
    return results[1], ds.StudyInstanceUID, ds.SOPInstanceUID


def test_exporter_delivers_over_tls_with_our_ca_and_client_certificate(
    tls_orthanc: Orthanc, pki: Pki, tmp_path: Path
) -> None:
    delivery, study, sop = _export(
        tls_orthanc, tmp_path, tls=True, tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key
    )
    assert delivery.outcome == "delivered", delivery
    assert tls_orthanc.sop_instance_uids(study) == [sop]


@pytest.mark.parametrize(
    "case",
    ["plain TCP", "server certificate not trusted", "no client certificate"],
)
def test_exporter_fails_without_a_verified_tls_connection(
    tls_orthanc: Orthanc, pki: Pki, tmp_path: Path, case: str
) -> None:
    client = {"tls_cert": pki.client_cert, "tls_key": pki.client_key}
    tls: dict[str, Any] = {
        "plain TCP": {"tls": False},
        # No tls_ca: the system's CAs, which do not include the test CA.
        "server certificate not trusted": {"tls": True, **client},
        "no client certificate": {"tls": True, "tls_ca": pki.ca},
    }[case]
    delivery, study, _ = _export(tls_orthanc, tmp_path, **tls)
    assert delivery.outcome == "failed", delivery
    assert tls_orthanc.sop_instance_uids(study) == []


# --- `ccfnet config check` and `ccfnet reprocess --from pacs` against the same TLS-only Orthanc --------------


def _tls_peer(pacs: Orthanc, pki: Pki, *, tls: bool = True) -> dict[str, Any]:
    """The TLS Orthanc as a destination or reprocess source: verified with our CA, our client certificate."""
    peer: dict[str, Any] = {
        "kind": "dicom", "name": "pacs", "ae_title": ORTHANC_AE, "host": "127.0.0.1", "port": pacs.dicom_port,
    }
    if tls:
        peer |= {"tls": True, "tls_ca": str(pki.ca), "tls_cert": str(pki.client_cert), "tls_key": str(pki.client_key)}
    return peer


def _cli_env(tmp_path: Path, pg_url: str, **settings: str) -> dict[str, str]:
    """CCFNET_ variables for a command: our migrated PostgreSQL database, the on-disk broker, our AE title."""
    migrate_to_head(pg_url)
    env = {
        "CCFNET_DATABASE_URL": pg_url,
        "CCFNET_DATA_DIR": str(tmp_path / "var"),
        "CCFNET_AE_TITLE": CALLED_AE,  # the modality the TLS Orthanc knows
        "CCFNET_MIN_FREE_DISK_MB": "1",
    }
    return env | {f"CCFNET_{name.upper()}": value for name, value in settings.items()}


def _destination_check(result: Result) -> dict[str, Any]:
    checks = {c["name"]: c for c in json.loads(result.stdout)}
    return dict(checks["destination pacs"])


def test_config_check_echoes_a_tls_destination_over_tls(
    tls_orthanc: Orthanc, pki: Pki, tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env but ours
    env = _cli_env(tmp_path, pg_url, destinations=json.dumps([_tls_peer(tls_orthanc, pki)]))
    runner = CliRunner()
    result = runner.invoke(app, ["config", "check", "--json"], env=env)
    assert result.exit_code == 0, result.output
    where = f"{ORTHANC_AE}@127.0.0.1:{tls_orthanc.dicom_port}"
    assert _destination_check(result) == {
        "name": "destination pacs", "ok": True, "detail": f"{where} over TLS: C-ECHO succeeded",
    }
    # The peer speaks only TLS: the same destination without "tls" is not reached.
    plain = json.dumps([_tls_peer(tls_orthanc, pki, tls=False)])
    result = runner.invoke(app, ["config", "check", "--json"], env=env | {"CCFNET_DESTINATIONS": plain})
    assert result.exit_code == 1, result.output
    assert _destination_check(result) == {
        "name": "destination pacs", "ok": False, "detail": f"{where}: association not accepted",
    }


@pytest.fixture
def https_dicomweb(tls_orthanc: Orthanc, pki: Pki) -> Iterator[str]:
    """Orthanc's DICOMweb behind an HTTPS front with a server certificate from our CA, as sites put it behind a
    TLS-terminating proxy (Debian's Orthanc 1.10 crashes serving HTTPS itself with OpenSSL 3). Yields its URL."""

    class Forward(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._forward(httpx.get(f"{tls_orthanc.url}{self.path}", timeout=30))

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            headers = {name: self.headers[name] for name in ("Content-Type", "Accept") if self.headers[name]}
            self._forward(httpx.post(f"{tls_orthanc.url}{self.path}", content=body, headers=headers, timeout=60))

        def _forward(self, upstream: httpx.Response) -> None:
            self.send_response(upstream.status_code)
            self.send_header("Content-Type", upstream.headers.get("Content-Type", "application/octet-stream"))
            self.send_header("Content-Length", str(len(upstream.content)))
            self.end_headers()
            self.wfile.write(upstream.content)

        def log_message(self, format: str, *args: Any) -> None:
            return

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Forward)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/dicom-web"
    finally:
        server.shutdown()
        server.server_close()


def test_stow_exporter_trusts_the_destination_ca_even_with_a_ca_bundle_in_the_environment(
    https_dicomweb: str, tls_orthanc: Orthanc, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """requests lets REQUESTS_CA_BUNDLE replace a session's CA; the destination's `tls_ca` must still be the one."""
    from worker.export.delivery import Item
    from worker.export.stow import send_stow

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    ds = next(iter(f.study_images(f.new_study(), 1)))
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    item = Item(export_id=1, path=path, sop_instance_uid=ds.SOPInstanceUID)
    untrusted = DicomWebDestination(name="pacs", url=https_dicomweb)
    assert send_stow(untrusted, [item], timeout=10)[1].outcome == "failed"
    assert tls_orthanc.sop_instance_uids(ds.StudyInstanceUID) == []
    trusted = DicomWebDestination(name="pacs", url=https_dicomweb, tls_ca=pki.ca)
    delivery = send_stow(trusted, [item], timeout=10)[1]
    assert delivery.outcome == "delivered", delivery
    assert tls_orthanc.sop_instance_uids(ds.StudyInstanceUID) == [ds.SOPInstanceUID]


def test_config_check_reaches_an_https_dicomweb_destination_with_its_own_ca(
    https_dicomweb: str, pki: Pki, tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check uses the exporter's HTTP session, so a destination's `tls_ca` counts there too."""
    monkeypatch.chdir(tmp_path)
    web = {"kind": "dicomweb", "name": "pacs", "url": https_dicomweb, "tls_ca": str(pki.ca)}
    env = _cli_env(tmp_path, pg_url, destinations=json.dumps([web]))
    runner = CliRunner()
    result = runner.invoke(app, ["config", "check", "--json"], env=env)
    assert result.exit_code == 0, result.output
    assert _destination_check(result) == {
        "name": "destination pacs", "ok": True, "detail": f"{https_dicomweb}: HTTP 200",
    }
    # Without our CA the server's certificate is not trusted: the check fails as the exporter would.
    untrusted = json.dumps([{k: v for k, v in web.items() if k != "tls_ca"}])
    result = runner.invoke(app, ["config", "check", "--json"], env=env | {"CCFNET_DESTINATIONS": untrusted})
    assert result.exit_code == 1, result.output
    assert _destination_check(result) == {
        "name": "destination pacs", "ok": False, "detail": f"{https_dicomweb}: SSLError",
    }


def test_reprocess_from_a_tls_pacs_finds_and_pulls_the_study_over_tls(
    tls_orthanc: Orthanc, pki: Pki, tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """C-FIND by accession, then C-GET into the spool and a batch job, all on TLS associations."""
    monkeypatch.chdir(tmp_path)
    accession = uuid.uuid4().hex[:16]  # the module's Orthanc also holds the exporter tests' studies
    images = list(f.study_images(f.new_study(), 3))
    for ds in images:
        ds.AccessionNumber = accession
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        tls_orthanc.upload(buffer.getvalue())  # over Orthanc's (plain) REST API; its DICOM port is TLS only
    study_uid = str(images[0].StudyInstanceUID)
    runner = CliRunner()
    command = ["reprocess", "--from", "pacs", "--accession", accession, "--json"]

    plain = json.dumps(_tls_peer(tls_orthanc, pki, tls=False))
    refused = runner.invoke(app, command, env=_cli_env(tmp_path, pg_url, reprocess_source=plain))
    assert refused.exit_code == 1 and f"C-FIND association with {ORTHANC_AE} failed" in refused.output

    source = json.dumps(_tls_peer(tls_orthanc, pki))
    result = runner.invoke(app, command, env=_cli_env(tmp_path, pg_url, reprocess_source=source))
    assert result.exit_code == 0, result.output
    assert f"pulled {study_uid} from pacs: 3 stored, 0 failed" in result.output
    assert [row["study"] for row in json.loads(result.stdout)["studies"]] == [study_uid]
    engine = make_engine(pg_url)
    try:
        with make_session_factory(engine)() as session:
            stored = session.scalars(select(Instance.sop_instance_uid).where(Instance.calling_ae == ORTHANC_AE))
            assert sorted(stored) == sorted(str(ds.SOPInstanceUID) for ds in images)
            (job,) = repo.jobs_for_study(session, study_uid)
            assert job.queue == "batch"
    finally:
        engine.dispose()
