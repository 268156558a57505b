"""The operations web app against the real PostgreSQL and Redis: the token guards every page but /metrics,
headless Chromium loads the page, sees the jobs and clicks "Retry" on a dead export (which a local C-STORE SCP
then receives), and a paused inference queue holds a study's job until it is resumed."""

# ruff: noqa: F811  (pytest fixtures imported from intake_support are parameters of the same name)
from __future__ import annotations

import base64
import json
import logging
import shutil
import subprocess
import time
from collections.abc import Iterator
from itertools import count
from pathlib import Path
from typing import Any

import dicom_factory as f
import httpx
import pytest
from intake_support import (
    RedisSpace,
    make_settings,
    migrate_to_head,
    pg_url,  # noqa: F401  (fixture)
    redis_space,  # noqa: F401  (fixture)
    send,
    wait_for,
)
from pynetdicom import AE, StoragePresentationContexts, evt
from sqlalchemy import select, update

from worker.db import repository as repo
from worker.db.models import Export, ExportAttempt, Job, ResultObject
from worker.queue.processing import record_pickup_only
from worker.service import EmbeddedWorker, Service

pytestmark = pytest.mark.services
TOKEN = "ops-token-for-tests"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@pytest.fixture
def pacs() -> Iterator[tuple[int, list[str]]]:
    """A C-STORE SCP on an ephemeral port that records the SOP Instance UIDs it receives."""
    received: list[str] = []

    def on_store(event: Any) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    ae = AE(ae_title="PACS")
    ae.supported_contexts = StoragePresentationContexts
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert server is not None
    try:
        yield int(server.server_address[1]), received
    finally:
        server.shutdown()


@pytest.fixture
def service(tmp_path: Path, pg_url: str, redis_space: RedisSpace, pacs: tuple[int, list[str]]) -> Iterator[Service]:
    migrate_to_head(pg_url)
    settings = make_settings(
        tmp_path / "var", database_url=pg_url, broker_url=redis_space.url, redis_key_prefix=redis_space.prefix,
        study_quiet_seconds=0.5, http_port=0, ops_token=TOKEN,
        destinations=[{"kind": "dicom", "name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs[0]}],
    )
    with Service(settings, processor=record_pickup_only) as svc:
        assert svc.celery is not None
        worker = EmbeddedWorker(svc.celery, queues=("inference",), concurrency=2)
        worker.start()
        try:
            yield svc
        finally:
            worker.stop()


def _base(svc: Service) -> str:
    return f"http://127.0.0.1:{svc.http_port}"


def _job_state(svc: Service, job_id: int) -> str | None:
    assert svc.sessions is not None
    with svc.sessions() as session:
        job = repo.get_job(session, job_id)
        return job.state if job else None


def _job_of(svc: Service, study_uid: str) -> int | None:
    assert svc.sessions is not None
    with svc.sessions() as session:
        jobs = repo.jobs_for_study(session, study_uid)
        return jobs[0].id if jobs else None


def test_the_token_is_required_everywhere_but_metrics(service: Service) -> None:
    base = _base(service)
    with httpx.Client(base_url=base, timeout=10) as client:
        assert client.get("/").status_code == 401
        assert client.get("/jobs/1").status_code == 401
        assert client.post("/queue/inference/pause").status_code == 401
        assert client.get("/", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/?token=wrong").status_code == 401
        assert client.get("/metrics").status_code == 200
        assert client.get("/", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        by_query = client.get(f"/?token={TOKEN}")
        assert by_query.status_code == 200 and "samesite=strict" in by_query.headers["set-cookie"].lower()
        assert client.get("/jobs/999999").status_code == 404  # the cookie now carries the token
    assert service.sessions is not None
    with service.sessions() as session:
        assert repo.paused_queues(session) == set()  # the refused POST changed nothing


class Browser:
    """Headless Chromium driven over the Chrome DevTools Protocol (websocket-client)."""

    def __init__(self, profile: Path) -> None:
        import websocket

        self._process = subprocess.Popen(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--remote-debugging-port=0", "--window-size=1280,900", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        port_file = profile / "DevToolsActivePort"
        wait_for(lambda: port_file.exists() and port_file.read_text().strip(), timeout=30)
        port = int(port_file.read_text().split()[0])
        pages = wait_for(lambda: [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json()
                                  if t["type"] == "page"], timeout=10)
        self._ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        self._ids = count(1)
        self.call("Page.enable")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        ident = next(self._ids)
        self._ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.recv())
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return dict(message.get("result", {}))

    def _wait_loaded(self, previous_url: str | None = None) -> None:
        def ready() -> bool:
            state = self.evaluate("document.readyState + ' ' + location.href")
            done, _, url = str(state).partition(" ")
            return done == "complete" and url != previous_url

        wait_for(ready, timeout=20, interval=0.1)

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self._wait_loaded()

    def evaluate(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def click_and_wait(self, selector: str) -> None:
        before = self.evaluate("location.href")
        self.evaluate("window.__marker = 1")
        assert self.evaluate(f"!!document.querySelector({json.dumps(selector)})"), selector
        self.evaluate(f"document.querySelector({json.dumps(selector)}).click()")
        # A new document replaced the old one (the marker is gone) and finished loading.
        wait_for(lambda: self.evaluate("window.__marker === undefined && document.readyState === 'complete'"),
                 timeout=20)
        del before

    def dom(self) -> str:
        return str(self.evaluate("document.documentElement.outerHTML"))

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        self._ws.close()
        self._process.terminate()
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed")
    pytest.importorskip("websocket")
    b = Browser(tmp_path / "chromium-profile")
    try:
        yield b
    finally:
        b.close()


def test_the_browser_sees_the_jobs_and_retries_a_dead_export(
    service: Service, browser: Browser, pacs: tuple[int, list[str]]
) -> None:
    svc = service
    assert svc.sessions is not None
    uids = f.new_study()
    assert send(svc.port, f.study_images(uids, 2)) == [0, 0]
    job_id = wait_for(lambda: _job_of(svc, uids.study))
    wait_for(lambda: _job_state(svc, job_id) == "picked_up")
    # A result object on disk whose export to the PACS died (the PACS was down for all its attempts).
    result = f.mr_image(uids.study, f.new_study().series[0], series_description="CCF-Net result")
    f.write(result, svc.settings.data_dir / "results", "r.dcm")
    with svc.sessions.begin() as session:
        session.add(ResultObject(job_id=job_id, kind="sr", sop_class_uid=str(result.SOPClassUID),
                                 sop_instance_uid=str(result.SOPInstanceUID),
                                 series_instance_uid=str(result.SeriesInstanceUID), path="r.dcm",
                                 size_bytes=1, created_at=svc._clock()))
        session.flush()
        (export_id,) = repo.create_exports(session, job_id, ["pacs"], now=svc._clock())
        session.execute(update(Export).where(Export.id == export_id)
                        .values(state="dead", attempts=8, last_error="association failed"))

    browser.open(f"{_base(svc)}/?token={TOKEN}")
    dom = browser.dom()
    assert f'href="/jobs/{job_id}"' in dom and uids.study in dom  # the job list
    assert f'id="retry-{export_id}"' in dom  # the dead export, with its button
    browser.screenshot(ARTIFACTS / "ops_page.png")
    browser.click_and_wait(f"#retry-{export_id}")  # a real form POST from the page, cookie-authenticated

    with svc.sessions() as session:
        export = session.get(Export, export_id)
        attempts = session.scalars(select(ExportAttempt).where(ExportAttempt.export_id == export_id)).all()
        assert export is not None and export.state == "delivered", export and export.last_error
        assert [a.outcome for a in attempts] == ["delivered"]
    assert pacs[1] == [str(result.SOPInstanceUID)]
    assert browser.evaluate("location.pathname + location.search") == "/"  # back where the button was,
    assert f'id="retry-{export_id}"' not in browser.dom()  # without the token in the address; nothing dead
    browser.open(f"{_base(svc)}/jobs/{job_id}")
    timeline = browser.dom()
    assert "delivered" in timeline and "picked_up" in timeline and uids.study in timeline

    browser.open(f"{_base(svc)}/?state=picked_up")
    assert f'href="/jobs/{job_id}"' in browser.dom()
    browser.open(f"{_base(svc)}/?state=failed")
    assert f'href="/jobs/{job_id}"' not in browser.dom()


def test_a_paused_inference_queue_holds_jobs_until_resumed(
    service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    svc = service
    caplog.set_level(logging.INFO, logger="worker.tasks")
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=_base(svc), headers=headers, timeout=10) as client:
        assert client.post("/queue/export/pause").status_code == 404  # export sends are not pausable
        assert client.post("/queue/inference/pause").status_code == 303
        page = client.get("/").text
        assert 'id="resume-inference"' in page and 'id="pause-batch"' in page and 'id="pause-export"' not in page
        uids = f.new_study()
        assert send(svc.port, f.study_images(uids, 2)) == [0, 0]
        job_id = wait_for(lambda: _job_of(svc, uids.study))
        assert svc.sessions is not None

        held = f"job {job_id}: queue inference is paused, job left queued"
        wait_for(lambda: held in caplog.text)  # a worker took its message and left the job queued
        time.sleep(2.5)  # past the reconciler's grace period: it republishes, and the workers still hold off
        assert _job_state(svc, job_id) == "queued"
        with svc.sessions() as session:
            job = session.get(Job, job_id)
            assert job is not None and job.publish_count >= 2 and job.attempts == 0
        assert client.post("/queue/inference/resume").status_code == 303
        wait_for(lambda: _job_state(svc, job_id) == "picked_up", timeout=20)
        with svc.sessions() as session:
            assert repo.paused_queues(session) == set()
