"""Export delivery against in-process peers and the real PostgreSQL: C-STORE statuses per object (warnings are
delivered), one association per destination, backoff and the bound, dead exports and `retry-exports`, a
delivered object never sent twice (also when two exporters race), the export reconciler, STOW-RS auth and
per-object outcomes, DICOM TLS."""

# ruff: noqa: F811  (pytest fixtures imported from intake_support are parameters of the same name)
from __future__ import annotations

import base64
import datetime as dt
import io
import json
import shutil
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dicom_factory as f
import pydicom
import pytest
from intake_support import make_settings, migrate_to_head, pg_url, wait_for  # noqa: F401  (fixture)
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.events import Event
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from worker.cli import app
from worker.db import repository as repo
from worker.db.engine import make_engine, make_session_factory
from worker.db.models import Export, Job, ResultObject, Study
from worker.export.engine import attempt_exports, backoff_delay
from worker.export.queue import TASK_EXPORT, reconcile_exports
from worker.settings import Settings, SettingsError, get_settings
from worker.timeutil import utcnow

pytestmark = pytest.mark.services

PACS_AE = "FAKEPACS"
OUT_OF_RESOURCES = 0xA700


# Peers ------------------------------------------------------------------------------------------------------
@dataclass
class FakePacs:
    """A pynetdicom C-STORE SCP that records what it received and answers the status it is told to."""

    statuses: dict[str, int] = field(default_factory=dict)
    delay: float = 0.0
    received: list[str] = field(default_factory=list)
    associations: int = 0
    server: Any = None

    def start(self, port: int = 0, ssl_context: ssl.SSLContext | None = None) -> FakePacs:
        ae = AE(ae_title=PACS_AE)
        ae.add_supported_context(f.MR_IMAGE_STORAGE)
        handlers: list[Any] = [(evt.EVT_C_STORE, self._store), (evt.EVT_ACCEPTED, self._accepted)]
        self.server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers,
                                      ssl_context=ssl_context)
        return self

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def _accepted(self, event: Event) -> None:
        self.associations += 1

    def _store(self, event: Event) -> int:
        time.sleep(self.delay)
        uid = str(event.dataset.SOPInstanceUID)
        self.received.append(uid)
        return self.statuses.get(uid, 0x0000)


@pytest.fixture
def pacs() -> Iterator[FakePacs]:
    peer = FakePacs().start()
    yield peer
    peer.stop()


def _dimse(port: int, **extra: Any) -> dict[str, Any]:
    return {"kind": "dicom", "name": "pacs", "ae_title": PACS_AE, "host": "127.0.0.1", "port": port, **extra}


# Database -----------------------------------------------------------------------------------------------------
@dataclass
class Bench:
    settings: Settings
    sessions: sessionmaker[Session]
    job_id: int
    export_ids: list[int]
    uids: list[str]

    def exports(self) -> list[Export]:
        with self.sessions() as session:
            return list(repo.exports_for_job(session, self.job_id))

    def attempts(self, export_id: int) -> list[tuple[str, int | None]]:
        with self.sessions() as session:
            return [(a.outcome, a.status_code) for a in repo.export_attempts(session, export_id)]


@pytest.fixture
def bench_for(tmp_path: Path, pg_url: str) -> Iterator[Callable[..., Bench]]:
    """A job with three result objects on disk and their exports to the given destinations (PostgreSQL)."""
    migrate_to_head(pg_url)
    engine = make_engine(pg_url)
    sessions = make_session_factory(engine)

    def make(destinations: list[dict[str, Any]], **overrides: Any) -> Bench:
        values: dict[str, Any] = {"database_url": pg_url, "destinations": destinations,
                                  "export_backoff_seconds": 0.2, "export_max_attempts": 3, **overrides}
        settings = make_settings(tmp_path / "var", **values)
        now = utcnow()
        uids = f.new_study()
        with sessions.begin() as session:
            study = Study(study_instance_uid=uids.study, state="assembled", first_received_at=now,
                          last_received_at=now, quiet_since=now)
            session.add(study)
            session.flush()
            job = Job(study_id=study.id, idempotency_key=uuid.uuid4().hex, model_version="test", state="succeeded",
                      queue="inference", instance_count=3, created_at=now, updated_at=now)
            session.add(job)
            session.flush()
            sop_uids = []
            for index in range(3):
                ds = f.mr_image(uids.study, uids.series[0], index)
                path = f.write(ds, settings.data_dir / "results" / str(job.id))
                sop_uids.append(str(ds.SOPInstanceUID))
                session.add(ResultObject(
                    job_id=job.id, kind="sc", sop_class_uid=str(ds.SOPClassUID), sop_instance_uid=ds.SOPInstanceUID,
                    series_instance_uid=uids.series[0], path=f"{job.id}/{path.name}", size_bytes=path.stat().st_size,
                    created_at=now,
                ))
            session.flush()
            ids = repo.create_exports(session, job.id, [d["name"] for d in destinations], now=now)
            job_id = job.id
        return Bench(settings, sessions, job_id, ids, sop_uids)

    try:
        yield make
    finally:
        engine.dispose()


def later(seconds: float) -> Callable[[], dt.datetime]:
    return lambda: utcnow() + dt.timedelta(seconds=seconds)


# C-STORE --------------------------------------------------------------------------------------------------------
def test_warning_statuses_are_delivered_and_travel_on_one_association(
    bench_for: Callable[..., Bench], pacs: FakePacs
) -> None:
    bench = bench_for([_dimse(pacs.port)])
    pacs.statuses = dict(zip(bench.uids, (0xB000, 0xB007, 0xB006), strict=True))
    results = attempt_exports(bench.export_ids[0], bench.settings, bench.sessions, utcnow)
    assert [r.state for r in results] == ["delivered"] * 3
    assert pacs.associations == 1 and sorted(pacs.received) == sorted(bench.uids)
    assert [bench.attempts(i) for i in bench.export_ids] == [
        [("warning", 0xB000)], [("warning", 0xB007)], [("warning", 0xB006)]
    ]
    # Delivered is final: another message for any of them sends nothing.
    for export_id in bench.export_ids:
        assert [r.state for r in attempt_exports(export_id, bench.settings, bench.sessions, later(60))] == ["skipped"]
    assert len(pacs.received) == 3


def test_a_refused_object_is_retried_alone_after_its_backoff(bench_for: Callable[..., Bench], pacs: FakePacs) -> None:
    bench = bench_for([_dimse(pacs.port)])
    refused = bench.export_ids[1]
    pacs.statuses = {bench.uids[1]: OUT_OF_RESOURCES}
    results = {r.export_id: r for r in attempt_exports(bench.export_ids[0], bench.settings, bench.sessions, utcnow,
                                                       jitter=lambda: 0.5)}
    assert results[refused].state == "pending" and "0xA700" in (results[refused].error or "")
    assert results[refused].retry_in == pytest.approx(0.15)  # base 0.2 s, equal jitter at 0.5
    assert attempt_exports(refused, bench.settings, bench.sessions, utcnow)[0].state == "skipped"  # not yet due
    pacs.statuses.clear()
    assert [r.state for r in attempt_exports(refused, bench.settings, bench.sessions, later(1))] == ["delivered"]
    assert sorted(pacs.received) == sorted([*bench.uids, bench.uids[1]])
    assert bench.attempts(refused) == [("failed", OUT_OF_RESOURCES), ("delivered", 0)]
    assert pacs.associations == 2


def test_past_the_bound_an_export_is_dead_and_retry_exports_delivers_it_once(
    bench_for: Callable[..., Bench], pacs: FakePacs
) -> None:
    port = pacs.port
    pacs.stop()
    bench = bench_for([_dimse(port)])
    offset = 0.0
    delays = []
    while {e.state for e in bench.exports()} != {"dead"}:
        results = attempt_exports(bench.export_ids[0], bench.settings, bench.sessions, later(offset),
                                  jitter=lambda: 0.99)
        delays += [r.retry_in for r in results if r.retry_in is not None]
        offset += 1.0
        assert offset < 10, "never went dead"
    assert all(e.attempts == 3 and "association" in (e.last_error or "") for e in bench.exports())
    assert [round(d, 2) for d in delays] == [0.2] * 3 + [0.4] * 3  # 0.2 s doubling, 3 attempts
    assert all([o for o, _ in bench.attempts(i)] == ["failed"] * 3 for i in bench.export_ids)

    back = FakePacs().start(port)
    try:
        env = {"CCFNET_DATABASE_URL": str(bench.settings.effective_database_url),
               "CCFNET_DATA_DIR": str(bench.settings.data_dir), "CCFNET_AE_TITLE": bench.settings.ae_title,
               "CCFNET_DESTINATIONS": json.dumps([_dimse(port)])}
        runner = CliRunner()
        first = runner.invoke(app, ["retry-exports", "--job", str(bench.job_id), "--json"], env=env)
        assert first.exit_code == 0, first.output
        report = json.loads(first.output)
        assert report["revived"] == 3 and {r["state"] for r in report["results"]} == {"delivered"}
        second = runner.invoke(app, ["retry-exports", "--all-dead"], env=env)
        assert second.exit_code == 0 and "0 dead export(s)" in second.output
        assert sorted(back.received) == sorted(bench.uids) and back.associations == 1
    finally:
        back.stop()
    usage = CliRunner().invoke(app, ["retry-exports"], env=env)
    assert usage.exit_code == 2


def test_two_exporters_racing_for_one_export_send_each_object_once(
    bench_for: Callable[..., Bench], pacs: FakePacs
) -> None:
    bench = bench_for([_dimse(pacs.port)])
    pacs.delay = 0.2
    barrier = threading.Barrier(3)
    outcomes: list[list[str]] = []

    def exporter(export_id: int) -> None:
        barrier.wait()
        outcomes.append([r.state for r in attempt_exports(export_id, bench.settings, bench.sessions, utcnow)])

    threads = [threading.Thread(target=exporter, args=(i,)) for i in (bench.export_ids[0], bench.export_ids[0])]
    threads += [threading.Thread(target=exporter, args=(bench.export_ids[2],))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(pacs.received) == sorted(bench.uids)
    assert {e.state for e in bench.exports()} == {"delivered"}
    assert sorted(s for states in outcomes for s in states).count("skipped") >= 1


class _Broker:
    """Stands in for the Celery app: records what would be published."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[Any], float | None]] = []

    def send_task(self, name: str, args: list[Any], queue: str, countdown: float | None = None) -> None:
        assert queue == "export"
        self.sent.append((name, args, countdown))


def test_reconciler_republishes_lost_messages_and_frees_stuck_exports(
    bench_for: Callable[..., Bench], pacs: FakePacs
) -> None:
    bench = bench_for([_dimse(pacs.port)], reconcile_grace_seconds=5, task_time_limit_seconds=60,
                      task_soft_time_limit_seconds=50)
    broker = _Broker()
    assert reconcile_exports(broker, bench.settings, bench.sessions) == 3
    assert broker.sent == [(TASK_EXPORT, [i], None) for i in bench.export_ids]
    assert reconcile_exports(broker, bench.settings, bench.sessions) == 0
    stale = utcnow() - dt.timedelta(minutes=5)
    with bench.sessions.begin() as session:  # an exporter died mid-send an hour ago
        session.execute(update(Export).where(Export.id == bench.export_ids[0])
                        .values(state="sending", updated_at=stale, published_at=stale))
    assert reconcile_exports(broker, bench.settings, bench.sessions) == 1
    assert broker.sent[-1] == (TASK_EXPORT, [bench.export_ids[0]], None)
    assert bench.exports()[0].state == "pending"


def test_backoff_doubles_up_to_the_cap_with_equal_jitter() -> None:
    assert [backoff_delay(n, base=1, cap=10, jitter=1.0) for n in (1, 2, 3, 4, 5)] == [1, 2, 4, 8, 10]
    assert [backoff_delay(n, base=1, cap=10, jitter=0.0) for n in (1, 2, 5)] == [0.5, 1, 5]


# STOW-RS ------------------------------------------------------------------------------------------------------
def _stowed_uids(content_type: str, body: bytes) -> list[str]:
    """The SOP Instance UIDs of a multipart/related; type="application/dicom" request body."""
    boundary = content_type.split("boundary=")[1].split(";")[0].strip('"').encode()
    uids = []
    for part in body.split(b"--" + boundary)[1:]:
        if part.startswith(b"--"):
            break
        payload = part.split(b"\r\n\r\n", 1)[1].removesuffix(b"\r\n")
        uids.append(str(pydicom.dcmread(io.BytesIO(payload)).SOPInstanceUID))
    return uids


@dataclass
class FakeStow:
    """A STOW-RS endpoint: checks the Authorization header, answers a store response per instance."""

    authorization: str
    status: int = 200
    refuse: dict[str, int] = field(default_factory=dict)
    warn: dict[str, int] = field(default_factory=dict)
    bodies: list[bytes] = field(default_factory=list)
    server: Any = None

    def start(self) -> FakeStow:
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Authorization") != peer.authorization:
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                peer.bodies.append(body)
                sop_uids = _stowed_uids(self.headers.get("Content-Type", ""), body)
                answer = Dataset()
                answer.ReferencedSOPSequence = []
                answer.FailedSOPSequence = []
                for uid in sorted(sop_uids):
                    item = Dataset()
                    item.ReferencedSOPClassUID = f.MR_IMAGE_STORAGE
                    item.ReferencedSOPInstanceUID = uid
                    if uid in peer.refuse:
                        item.FailureReason = peer.refuse[uid]
                        answer.FailedSOPSequence.append(item)
                    elif uid in peer.warn:
                        item.WarningReason = peer.warn[uid]
                        answer.ReferencedSOPSequence.append(item)
                    else:
                        answer.ReferencedSOPSequence.append(item)
                payload = json.dumps(answer.to_json_dict()).encode()
                self.send_response(peer.status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_stow_rs_bearer_token_and_a_partial_failure(
    bench_for: Callable[..., Bench], caplog: pytest.LogCaptureFixture
) -> None:
    stow = FakeStow("Bearer s3cret-token", status=409).start()
    try:
        bench = bench_for([{"kind": "dicomweb", "name": "web", "url": stow.url, "token": "s3cret-token"}])
        stow.refuse = {bench.uids[2]: OUT_OF_RESOURCES}
        results = {r.export_id: r for r in attempt_exports(bench.export_ids[0], bench.settings, bench.sessions,
                                                           utcnow)}
        assert len(stow.bodies) == 1  # one request for the three objects
        assert [results[i].state for i in bench.export_ids] == ["delivered", "delivered", "pending"]
        assert bench.attempts(bench.export_ids[2]) == [("failed", OUT_OF_RESOURCES)]
        assert bench.attempts(bench.export_ids[0]) == [("delivered", 409)]
    finally:
        stow.stop()
    assert "s3cret" not in caplog.text and "s3cret" not in str(bench.exports()[2].last_error)


def test_stow_rs_basic_auth_warnings_and_a_refused_login(bench_for: Callable[..., Bench]) -> None:
    stow = FakeStow("Basic " + base64.b64encode(b"ccfnet:pw").decode(), status=202).start()
    try:
        bench = bench_for([{"kind": "dicomweb", "name": "web", "url": stow.url, "username": "ccfnet",
                            "password": "pw"}])
        stow.warn = {bench.uids[0]: 0xB000}
        attempt_exports(bench.export_ids[0], bench.settings, bench.sessions, utcnow)
        assert [bench.attempts(i) for i in bench.export_ids] == [
            [("warning", 0xB000)], [("warning", 202)], [("warning", 202)]
        ]
        wrong = bench_for([{"kind": "dicomweb", "name": "web", "url": stow.url, "username": "ccfnet",
                            "password": "wrong"}])
        results = attempt_exports(wrong.export_ids[0], wrong.settings, wrong.sessions, utcnow)
        assert {r.state for r in results} == {"pending"} and all("HTTP 401" in (r.error or "") for r in results)
    finally:
        stow.stop()


def test_destination_settings_are_checked() -> None:
    with pytest.raises(SettingsError, match="distinct names"):
        get_settings(destinations=[_dimse(104), _dimse(105)])
    with pytest.raises(SettingsError, match="together"):
        get_settings(destinations=[{"kind": "dicomweb", "name": "w", "url": "http://x", "username": "u"}])
    with pytest.raises(SettingsError, match="CCFNET_DESTINATIONS"):
        get_settings(destinations=[{"kind": "dicomweb", "name": "w", "url": "ftp://x"}])


# DICOM TLS ------------------------------------------------------------------------------------------------------
def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True, timeout=60)


def test_c_store_over_tls_verifies_the_pacs_certificate(
    bench_for: Callable[..., Bench], tmp_path: Path
) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    pki = tmp_path / "pki"
    pki.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
             "-keyout", "ca.key", "-out", "ca.crt", cwd=pki)
    (pki / "ext").write_text("basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
                             "subjectAltName=IP:127.0.0.1\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=pacs", "-keyout", "pacs.key", "-out", "pacs.csr",
             cwd=pki)
    _openssl("x509", "-req", "-in", "pacs.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days",
             "2", "-extfile", "ext", "-out", "pacs.crt", cwd=pki)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(pki / "pacs.crt", pki / "pacs.key")
    secure = FakePacs().start(ssl_context=server_context)
    try:
        bench = bench_for([_dimse(secure.port, tls=True, tls_ca=str(pki / "ca.crt"))])
        assert {r.state for r in attempt_exports(bench.export_ids[0], bench.settings, bench.sessions, utcnow)} == {
            "delivered"}
        untrusted = bench_for([_dimse(secure.port, tls=True)])  # the system CAs do not know our test CA
        results = attempt_exports(untrusted.export_ids[0], untrusted.settings, untrusted.sessions, utcnow)
        assert {r.state for r in results} == {"pending"}
    finally:
        secure.stop()
    assert sorted(secure.received) == sorted(bench.uids)
