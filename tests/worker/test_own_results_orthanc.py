"""No loop with a real PACS: Orthanc sends us a phantom study, our SR, presentation state, key image and SEG
land in it, and Orthanc then routes those result series back to us (as an auto-routing rule would). The
listener accepts them (the result classes allowed through CCFNET_EXTRA_STORAGE_SOP_CLASSES), answers Success,
and no new job is made: real PostgreSQL, Redis and inference."""

# ruff: noqa: F811  (pytest fixtures imported from intake_support are parameters of the same name)
from __future__ import annotations

import datetime as dt
import io
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from intake_support import (
    CALLED_AE,
    RedisSpace,
    make_settings,
    migrate_to_head,
    pg_url,  # noqa: F401  (fixture)
    redis_space,  # noqa: F401  (fixture)
    wait_for,
)
from orthanc import ORTHANC, ORTHANC_AE, Orthanc, free_port

from ccfnet_core.checkpoint import MODELS_DIR, PHANTOM_MODEL_NAME
from ccfnet_core.phantom import render_study, study_generator
from worker import assembly
from worker.db import repository as repo
from worker.db.models import StudyState
from worker.provenance import RESULT_KINDS
from worker.queue.celery_app import QUEUES
from worker.service import EmbeddedWorker, Service
from worker.settings import Settings
from worker.timeutil import utcnow

ANALYSED_OBJECTS = 4
pytestmark = [
    pytest.mark.services,
    pytest.mark.slow,
    pytest.mark.skipif(ORTHANC is None, reason="Orthanc is needed"),
]
MODEL = MODELS_DIR / PHANTOM_MODEL_NAME


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    pacs = Orthanc(tmp_path / "orthanc", free_port(), free_port(), CALLED_AE, free_port())
    pacs.start()
    yield pacs
    pacs.stop()


def _settings(tmp_path: Path, pacs: Orthanc, pg: str, redis: RedisSpace) -> Settings:
    return make_settings(
        tmp_path / "var", port=pacs.our_port, model_path=MODEL, study_quiet_seconds=1.0, database_url=pg,
        broker_url=redis.url, redis_key_prefix=redis.prefix, include_segmentation=True,
        extra_storage_sop_classes=",".join(RESULT_KINDS),
        destinations=[{"kind": "dicom", "name": "pacs", "ae_title": ORTHANC_AE, "host": "127.0.0.1",
                       "port": pacs.dicom_port}],
        export_backoff_seconds=0.2, export_backoff_max_seconds=1.0, reconcile_grace_seconds=2.0,
    )


@pytest.fixture
def service(tmp_path: Path, orthanc: Orthanc, pg_url: str, redis_space: RedisSpace) -> Iterator[Service]:
    """Listener, sweeper and reconciler, with Celery worker threads on every queue."""
    settings = _settings(tmp_path, orthanc, pg_url, redis_space)
    migrate_to_head(settings.effective_database_url)
    with Service(settings) as svc:
        assert svc.celery is not None
        worker = EmbeddedWorker(svc.celery, queues=QUEUES, concurrency=2)
        worker.start()
        try:
            yield svc
        finally:
            worker.stop()


def _jobs(svc: Service, study_uid: str) -> list[tuple[int, str]]:
    assert svc.sessions is not None
    with svc.sessions() as session:
        return [(job.id, job.state) for job in repo.jobs_for_study(session, study_uid)]


def _delivered(svc: Service, study_uid: str) -> dict[str, int] | None:
    """SOP Instance UID -> job of each result object, once all four are delivered to Orthanc."""
    assert svc.sessions is not None
    with svc.sessions() as session:
        jobs = list(repo.jobs_for_study(session, study_uid))
        exports = [e for job in jobs for e in repo.exports_for_job(session, job.id)]
        # An analysed study's four objects (SR, GSPS, key image, SEG); RESULT_KINDS also holds the not-analysed SR.
        if len(exports) != ANALYSED_OBJECTS or any(e.state != "delivered" for e in exports):
            return None
        return {o.sop_instance_uid: o.job_id for job in jobs for o in repo.result_objects_for_job(session, job.id)}


def test_results_routed_back_by_orthanc_are_acknowledged_and_make_no_job(
    orthanc: Orthanc, service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    datasets, truth = render_study(study_generator(41, 0), 0)
    for ds in datasets:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        orthanc.upload(buffer.getvalue())
    (study_id,) = orthanc.get("/studies")
    orthanc.send_to_us([study_id])
    results = wait_for(lambda: _delivered(service, truth.study_uid), timeout=180, interval=0.5)
    jobs_before = _jobs(service, truth.study_uid)
    assert len(results) == 4 and [state for _, state in jobs_before] == ["succeeded"]
    in_pacs = orthanc.instances_of_study(truth.study_uid)
    result_series = sorted({i["ParentSeries"] for i in in_pacs if i["MainDicomTags"]["SOPInstanceUID"] in results})
    assert len(result_series) == 4  # SR, GSPS, key image and SEG, each its own series
    caplog.set_level(logging.INFO, logger="worker.listener")

    orthanc.send_to_us(result_series)  # Orthanc's store job fails unless every C-STORE got Success

    assert service.sessions is not None
    with service.sessions() as session:
        study = repo.study_by_uid(session, truth.study_uid)
        assert study is not None and study.state == StudyState.ASSEMBLED.value
        assert repo.count_instances(session, truth.study_uid) == len(datasets)  # the MR images only
        events = [(e.detail or {}) for job_id, _ in jobs_before for e in repo.job_events(session, job_id)
                  if e.kind == "result_returned"]
    later = utcnow() + dt.timedelta(hours=1)
    assert assembly.sweep_once(service.sessions, quiet_seconds=0, model_version="any", now=later) == []
    assert _jobs(service, truth.study_uid) == jobs_before
    assert sorted(e["sop_instance_uid"] for e in events) == sorted(results)
    assert {(e["calling_ae"], e["recognised_by"]) for e in events} == {(ORTHANC_AE, "equipment")}
    logged = [r.getMessage() for r in caplog.records if "acknowledged, not analysed" in r.getMessage()]
    assert sorted(line.split()[3] for line in logged) == sorted(results)
    assert all(f"from '{ORTHANC_AE}'" in line for line in logged)
