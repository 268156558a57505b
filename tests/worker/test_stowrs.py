"""DICOMweb intake: a study sent by STOW-RS lands in the same spool and assembly as DIMSE, is analysed, and its
results reach the PACS exactly like a DIMSE study's; tokens and allow-lists are enforced."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import uvicorn
from dicomweb_client.api import DICOMwebClient
from intake_support import make_settings, send, spool_files, wait_for
from orthanc import ORTHANC, ORTHANC_AE, Orthanc, free_port

from ccfnet_core.checkpoint import MODELS_DIR, PHANTOM_MODEL_NAME
from ccfnet_core.phantom import render_study, study_generator
from worker.db import repository as repo
from worker.ops.stowrs import create_stow_app
from worker.service import EmbeddedService, Service

pytestmark = [pytest.mark.services, pytest.mark.skipif(ORTHANC is None, reason="Orthanc is not installed")]
TOKEN = "stow-test-token"


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    pacs = Orthanc(tmp_path / "orthanc", free_port(), free_port(), "CCFNET", free_port())
    pacs.folder.mkdir()
    pacs.start()
    yield pacs
    pacs.stop()


class _Server:
    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicomweb"


def _stow_app(svc: Service) -> Any:
    assert svc.intake is not None
    return create_stow_app(svc.intake, svc.settings)


def _status(error: requests.HTTPError) -> int:
    assert error.response is not None
    return int(error.response.status_code)


def _client(url: str, token: str) -> DICOMwebClient:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    return DICOMwebClient(url=url, session=session)


def test_a_study_sent_by_stow_rs_is_analysed_and_exported_like_a_dimse_one(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    """One study by STOW-RS to the app `ccfnet serve` serves (ops token set: STOW-RS has its own), one by
    C-STORE to the listener; both records must match step for step."""
    by_stow, stow_truth = render_study(study_generator(41, 0), 0)
    by_dimse, dimse_truth = render_study(study_generator(41, 1), 1)
    stow_series = [ds for ds in by_stow if ds.SeriesInstanceUID == stow_truth.series_uid]
    dimse_series = [ds for ds in by_dimse if ds.SeriesInstanceUID == dimse_truth.series_uid]
    settings = make_settings(
        tmp_path / "var", port=orthanc.our_port, model_path=MODELS_DIR / PHANTOM_MODEL_NAME,
        study_quiet_seconds=1.0, stow_senders={"RIS": TOKEN}, http_port=0, ops_token="ops-only",
        destinations=[{"kind": "dicom", "name": "pacs", "ae_title": ORTHANC_AE, "host": "127.0.0.1",
                       "port": orthanc.dicom_port}],
    )
    with EmbeddedService(settings) as svc:
        assert svc.sessions is not None
        _client(f"http://127.0.0.1:{svc.http_port}/dicomweb", TOKEN).store_instances(stow_series)
        assert send(svc.port, dimse_series) == [0] * len(dimse_series)
        assert len(spool_files(settings.spool_path)) == len(stow_series) + len(dimse_series)

        def record(study_uid: str) -> dict[str, Any] | None:
            with svc.sessions() as session:  # type: ignore[misc]
                jobs = list(repo.jobs_for_study(session, study_uid))
                if len(jobs) != 1 or jobs[0].state != "succeeded":
                    return None
                exports = list(repo.exports_for_job(session, jobs[0].id))
                if len(exports) != 3 or any(e.state != "delivered" for e in exports):
                    return None
                objects = repo.result_objects_for_job(session, jobs[0].id)
                return {
                    "job": (jobs[0].state, jobs[0].queue, jobs[0].instance_count),
                    "spooled": len(repo.spooled_instances(session, jobs[0].study_id)),
                    "events": [e.kind for e in repo.job_events(session, jobs[0].id)],
                    "findings": len(repo.findings_for_job(session, jobs[0].id)),
                    "objects": sorted((o.kind, o.sop_class_uid) for o in objects),
                    "exports": sorted((e.destination, e.state, e.attempts) for e in exports),
                }

        stow = wait_for(lambda: record(stow_truth.study_uid), timeout=120, interval=0.5)
        dimse = wait_for(lambda: record(dimse_truth.study_uid), timeout=120, interval=0.5)
    assert stow["spooled"] == len(stow_series) and dimse["spooled"] == len(dimse_series)
    assert stow["job"] == ("succeeded", "inference", len(stow_series))
    assert {k: v for k, v in stow.items() if k not in ("spooled", "job")} == {
        k: v for k, v in dimse.items() if k not in ("spooled", "job")
    }
    assert stow["findings"] > 0 and len(stow["objects"]) == 3
    for truth in (stow_truth, dimse_truth):
        in_pacs = orthanc.sop_instance_uids(truth.study_uid)
        assert len(in_pacs) == 3 and len(set(in_pacs)) == 3


def test_stow_rs_refuses_unknown_tokens_disallowed_senders_and_other_sop_classes(tmp_path: Path) -> None:
    datasets, truth = render_study(study_generator(42, 0), 0)
    mr = datasets[0]
    settings = make_settings(tmp_path / "var", stow_senders={"RIS": TOKEN, "OTHER": "other-token"},
                             allowed_calling_aets=["RIS"])
    with EmbeddedService(settings) as svc, _Server(_stow_app(svc)) as web:
        with pytest.raises(requests.HTTPError) as no_token:
            _client(web.url, "wrong").store_instances([mr])
        assert _status(no_token.value) == 401
        with pytest.raises(requests.HTTPError) as not_allowed:
            _client(web.url, "other-token").store_instances([mr])
        assert _status(not_allowed.value) == 403
        sc = mr.copy()
        sc.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        sc.file_meta.MediaStorageSOPClassUID = sc.SOPClassUID
        with pytest.raises(requests.HTTPError) as wrong_class:
            _client(web.url, TOKEN).store_instances([sc])
        assert _status(wrong_class.value) == 409
        plain = httpx.post(f"{web.url}/studies", content=b"x", headers={
            "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/dicom"})
        assert plain.status_code == 415
    assert spool_files(settings.spool_path) == []
    assert truth.study_uid
