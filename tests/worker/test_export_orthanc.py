"""Results back to a real PACS, end to end on the real PostgreSQL and Redis with the real inference pipeline:
Orthanc sends us a phantom study, and our SR, presentation state and key image land in the same study in
Orthanc exactly once, by C-STORE and by STOW-RS; exports survive Orthanc being down, go dead past the bound,
and `ccfnet retry-exports` delivers them without duplicates."""

# ruff: noqa: F811  (pytest fixtures imported from intake_support are parameters of the same name)
from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest
from intake_support import (
    CALLED_AE,
    RedisSpace,
    make_settings,
    migrate_to_head,
    pg_url,  # noqa: F401  (fixture)
    redis_space,  # noqa: F401  (fixture)
    send,
    wait_for,
)
from orthanc import ORTHANC, ORTHANC_AE, Orthanc, free_port, has_dicomweb
from typer.testing import CliRunner

from ccfnet_core.checkpoint import MODELS_DIR, PHANTOM_MODEL_NAME
from ccfnet_core.phantom import render_study, study_generator
from worker.cli import app
from worker.db import repository as repo
from worker.queue.celery_app import QUEUES
from worker.service import EmbeddedWorker, Service
from worker.settings import Settings

pytestmark = [
    pytest.mark.services,
    pytest.mark.slow,
    pytest.mark.skipif(ORTHANC is None or not has_dicomweb(), reason="Orthanc with its DICOMweb plugin is needed"),
]
MODEL = MODELS_DIR / PHANTOM_MODEL_NAME
STOW_USER, STOW_PASSWORD = "ccfnet", "stow-secret"
RESULT_KINDS = ["gsps", "sc", "sr"]


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    pacs = Orthanc(tmp_path / "orthanc", free_port(), free_port(), CALLED_AE, free_port(),
                   users={STOW_USER: STOW_PASSWORD})
    pacs.start()
    yield pacs
    pacs.stop()


def _destination(pacs: Orthanc, kind: str) -> dict[str, Any]:
    if kind == "dicom":
        return {"kind": "dicom", "name": "pacs", "ae_title": ORTHANC_AE, "host": "127.0.0.1",
                "port": pacs.dicom_port}
    return {"kind": "dicomweb", "name": "pacs-web", "url": pacs.dicomweb_url, "username": STOW_USER,
            "password": STOW_PASSWORD}


def _settings(
    tmp_path: Path, pacs: Orthanc, kind: str, pg: str, redis: RedisSpace, **overrides: Any
) -> Settings:
    values: dict[str, Any] = {
        "port": pacs.our_port, "model_path": MODEL, "study_quiet_seconds": 1.0, "database_url": pg,
        "broker_url": redis.url, "redis_key_prefix": redis.prefix, "destinations": [_destination(pacs, kind)],
        "export_backoff_seconds": 0.2, "export_backoff_max_seconds": 1.0, "reconcile_grace_seconds": 2.0,
        "reconcile_interval_seconds": 0.5,
    }
    values.update(overrides)
    return make_settings(tmp_path / "var", **values)


@contextmanager
def running(settings: Settings) -> Iterator[Service]:
    """Listener, sweeper and reconciler, with Celery worker threads on every queue (PostgreSQL + Redis)."""
    migrate_to_head(settings.effective_database_url)
    with Service(settings) as svc:
        assert svc.celery is not None
        worker = EmbeddedWorker(svc.celery, queues=QUEUES, concurrency=2)
        worker.start()
        try:
            yield svc
        finally:
            worker.stop()


def _phantom(seed: int) -> tuple[list[pydicom.Dataset], Any]:
    return render_study(study_generator(seed, 0), 0)


def _exports(svc: Service, study_uid: str) -> list[Any]:
    assert svc.sessions is not None
    with svc.sessions() as session:
        jobs = list(repo.jobs_for_study(session, study_uid))
        return [e for job in jobs for e in repo.exports_for_job(session, job.id)]


def _results(svc: Service, study_uid: str) -> dict[str, str]:
    """kind -> SOP Instance UID of the study's result objects."""
    assert svc.sessions is not None
    with svc.sessions() as session:
        jobs = list(repo.jobs_for_study(session, study_uid))
        return {o.kind: o.sop_instance_uid for job in jobs for o in repo.result_objects_for_job(session, job.id)}


def _all(svc: Service, study_uid: str, state: str) -> bool:
    exports = _exports(svc, study_uid)
    return len(exports) == len(RESULT_KINDS) and all(e.state == state for e in exports)


def _attempt_outcomes(svc: Service, study_uid: str) -> list[list[str]]:
    assert svc.sessions is not None
    with svc.sessions() as session:
        return [[a.outcome for a in repo.export_attempts(session, e.id)] for e in _exports(svc, study_uid)]


@pytest.mark.parametrize("kind", ["dicom", "dicomweb"])
def test_orthanc_sends_a_study_and_gets_sr_gsps_and_key_image_back_once(
    tmp_path: Path, orthanc: Orthanc, pg_url: str, redis_space: RedisSpace, kind: str
) -> None:
    datasets, truth = _phantom(31)
    for ds in datasets:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        orthanc.upload(buffer.getvalue())
    study_id = orthanc.get("/studies")[0]
    with running(_settings(tmp_path, orthanc, kind, pg_url, redis_space)) as svc:
        orthanc.send_to_us([study_id])  # Orthanc is the sending peer (C-STORE SCU) to our listener
        wait_for(lambda: _all(svc, truth.study_uid, "delivered"), timeout=150, interval=0.5)
        results = _results(svc, truth.study_uid)
        outcomes = _attempt_outcomes(svc, truth.study_uid)
    assert sorted(results) == RESULT_KINDS
    assert outcomes == [["delivered"]] * 3  # one attempt each, first time right
    found = orthanc.instances_of_study(truth.study_uid)
    in_pacs = [i["MainDicomTags"]["SOPInstanceUID"] for i in found]
    assert len(in_pacs) == len(datasets) + 3 and len(set(in_pacs)) == len(in_pacs)
    assert all(in_pacs.count(uid) == 1 for uid in results.values())
    assert orthanc.get("/studies") == [study_id]  # the same study in the PACS, not a new one
    ours = [i for i in found if i["MainDicomTags"]["SOPInstanceUID"] in results.values()]
    origins = {orthanc.metadata(i["ID"]).get("Origin") for i in ours}
    if kind == "dicom":
        assert origins == {"DicomProtocol"}
        assert {orthanc.metadata(i["ID"]).get("RemoteAET") for i in ours} == {CALLED_AE}
    else:
        assert "DicomProtocol" not in origins
    modalities = {s["MainDicomTags"].get("Modality") for s in orthanc.get(f"/studies/{study_id}/series")}
    assert {"MR", "SR", "PR"} <= modalities


def test_exports_wait_for_orthanc_and_land_once_when_it_is_back(
    tmp_path: Path, orthanc: Orthanc, pg_url: str, redis_space: RedisSpace
) -> None:
    datasets, truth = _phantom(32)
    sagittal = [ds for ds in datasets if ds.SeriesInstanceUID == truth.series_uid]
    orthanc.stop()
    settings = _settings(tmp_path, orthanc, "dicom", pg_url, redis_space, export_max_attempts=30)
    with running(settings) as svc:
        assert set(send(svc.port, sagittal)) == {0}
        wait_for(lambda: all(e.attempts >= 2 and e.state != "dead" for e in _exports(svc, truth.study_uid))
                 and len(_exports(svc, truth.study_uid)) == 3, timeout=150, interval=0.3)
        orthanc.start()  # same ports, same storage
        wait_for(lambda: _all(svc, truth.study_uid, "delivered"), timeout=60, interval=0.3)
        results = _results(svc, truth.study_uid)
        outcomes = _attempt_outcomes(svc, truth.study_uid)
    assert all(o[-1] == "delivered" and set(o[:-1]) == {"failed"} for o in outcomes)
    in_pacs = orthanc.sop_instance_uids(truth.study_uid)
    assert sorted(in_pacs) == sorted(results.values())  # only our 3 objects (the study came by our own sender)


def test_past_the_bound_exports_are_dead_and_retry_exports_delivers_them_without_duplicates(
    tmp_path: Path, orthanc: Orthanc, pg_url: str, redis_space: RedisSpace
) -> None:
    datasets, truth = _phantom(33)
    sagittal = [ds for ds in datasets if ds.SeriesInstanceUID == truth.series_uid]
    orthanc.stop()
    settings = _settings(tmp_path, orthanc, "dicom", pg_url, redis_space, export_max_attempts=3)
    with running(settings) as svc:
        assert set(send(svc.port, sagittal)) == {0}
        wait_for(lambda: _all(svc, truth.study_uid, "dead"), timeout=150, interval=0.3)
        assert all(e.attempts == 3 and e.last_error for e in _exports(svc, truth.study_uid))
        assert svc.sessions is not None
        with svc.sessions() as session:
            assert len(repo.dead_exports(session)) == 3  # visible to `ccfnet status`
    orthanc.start()
    env = {
        "CCFNET_DATABASE_URL": pg_url,
        "CCFNET_DATA_DIR": str(settings.data_dir),
        "CCFNET_AE_TITLE": settings.ae_title,
        "CCFNET_DESTINATIONS": json.dumps([_destination(orthanc, "dicom")]),
    }
    runner = CliRunner()
    first = runner.invoke(app, ["retry-exports", "--all-dead", "--json"], env=env)
    assert first.exit_code == 0, first.output
    report = json.loads(first.output)
    assert report["revived"] == 3 and {r["state"] for r in report["results"]} == {"delivered"}
    count = len(orthanc.sop_instance_uids(truth.study_uid))
    second = runner.invoke(app, ["retry-exports", "--all-dead", "--json"], env=env)
    assert second.exit_code == 0 and json.loads(second.output)["revived"] == 0
    in_pacs = orthanc.sop_instance_uids(truth.study_uid)
    assert count == 3 and len(in_pacs) == count and len(set(in_pacs)) == 3
    with Service(settings, listen=False, sweep=False, reconcile=False) as svc:
        outcomes = _attempt_outcomes(svc, truth.study_uid)
    assert outcomes == [["failed", "failed", "failed", "delivered"]] * 3  # sent once after revival, never again
