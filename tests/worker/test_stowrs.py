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
from intake_support import make_settings, spool_files, wait_for
from orthanc import ORTHANC, ORTHANC_AE, Orthanc, free_port

from ccfnet_core.checkpoint import MODELS_DIR, PHANTOM_MODEL_NAME
from ccfnet_core.phantom import render_study, study_generator
from worker.db import repository as repo
from worker.ops.stowrs import create_stow_app
from worker.service import EmbeddedService

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


def _client(url: str, token: str) -> DICOMwebClient:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    return DICOMwebClient(url=url, session=session)


def test_a_study_sent_by_stow_rs_is_analysed_and_exported_like_a_dimse_one(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    datasets, truth = render_study(study_generator(41, 0), 0)
    sagittal = [ds for ds in datasets if ds.SeriesInstanceUID == truth.series_uid]
    settings = make_settings(
        tmp_path / "var", port=orthanc.our_port, model_path=MODELS_DIR / PHANTOM_MODEL_NAME,
        study_quiet_seconds=1.0, stow_senders={"RIS": TOKEN},
        destinations=[{"kind": "dicom", "name": "pacs", "ae_title": ORTHANC_AE, "host": "127.0.0.1",
                       "port": orthanc.dicom_port}],
    )
    with EmbeddedService(settings) as svc, _Server(create_stow_app(svc.intake, svc.settings)) as web:
        assert svc.intake is not None and svc.sessions is not None
        _client(web.url, TOKEN).store_instances(sagittal)
        assert len(spool_files(settings.spool_path)) == len(sagittal)

        def delivered() -> Any:
            with svc.sessions() as session:  # type: ignore[misc]
                jobs = list(repo.jobs_for_study(session, truth.study_uid))
                if not jobs or jobs[-1].state != "succeeded":
                    return None
                exports = list(repo.exports_for_job(session, jobs[-1].id))
                return jobs if len(exports) == 3 and all(e.state == "delivered" for e in exports) else None

        jobs = wait_for(delivered, timeout=120, interval=0.5)
        with svc.sessions() as session:
            spooled = repo.spooled_instances(session, jobs[-1].study_id)
    assert len(jobs) == 1 and len(spooled) == len(sagittal)
    in_pacs = orthanc.sop_instance_uids(truth.study_uid)
    assert len(in_pacs) == 3 and len(set(in_pacs)) == 3


def test_stow_rs_refuses_unknown_tokens_disallowed_senders_and_other_sop_classes(tmp_path: Path) -> None:
    datasets, truth = render_study(study_generator(42, 0), 0)
    mr = datasets[0]
    settings = make_settings(tmp_path / "var", stow_senders={"RIS": TOKEN, "OTHER": "other-token"},
                             allowed_calling_aets=["RIS"])
    with EmbeddedService(settings) as svc, _Server(create_stow_app(svc.intake, svc.settings)) as web:
        with pytest.raises(requests.HTTPError) as no_token:
            _client(web.url, "wrong").store_instances([mr])
        assert no_token.value.response.status_code == 401
        with pytest.raises(requests.HTTPError) as not_allowed:
            _client(web.url, "other-token").store_instances([mr])
        assert not_allowed.value.response.status_code == 403
        sc = mr.copy()
        sc.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        sc.file_meta.MediaStorageSOPClassUID = sc.SOPClassUID
        with pytest.raises(requests.HTTPError) as wrong_class:
            _client(web.url, TOKEN).store_instances([sc])
        assert wrong_class.value.response.status_code == 409
        plain = httpx.post(f"{web.url}/studies", content=b"x", headers={
            "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/dicom"})
        assert plain.status_code == 415
    assert spool_files(settings.spool_path) == []
    assert truth.study_uid
