"""Live studies first: a live study sent while 30 batch (reprocess) jobs wait finishes before them."""

# ruff: noqa: F811  (pytest fixtures imported from intake_support are parameters of the same name)
from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import dicom_factory as f
import pytest
from intake_support import (
    RedisSpace,
    make_settings,
    migrate_to_head,
    pg_url,  # noqa: F401  (fixture)
    redis_space,  # noqa: F401  (fixture)
    wait_for,
)
from pydicom.uid import generate_uid

from worker.assembly import sweep_once
from worker.db import repository as repo
from worker.db.models import JobState
from worker.ops.reprocess import reprocess
from worker.queue.processing import JobContext, JobOutcome
from worker.service import EmbeddedWorker, Service

pytestmark = pytest.mark.services


def _slow_processor(ctx: JobContext) -> JobOutcome:
    time.sleep(0.15)
    return JobOutcome(JobState.SUCCEEDED)


def _study(svc: Service, when: dt.datetime) -> str:
    assert svc.sessions is not None
    uid = generate_uid(f.UID_ROOT)
    with svc.sessions.begin() as session:
        repo.record_instance(session, repo.InstanceRecord(
            study_instance_uid=uid, series_instance_uid=generate_uid(f.UID_ROOT),
            sop_instance_uid=generate_uid(f.UID_ROOT), sop_class_uid=f.MR_IMAGE_STORAGE,
            transfer_syntax_uid="1.2.840.10008.1.2.1", size_bytes=1, path="x", calling_ae="T",
            peer_address="127.0.0.1", association_id=None,
        ), now=when)
    return uid


def test_a_live_study_overtakes_thirty_waiting_batch_jobs(
    tmp_path: Path, pg_url: str, redis_space: RedisSpace
) -> None:
    migrate_to_head(pg_url)
    settings = make_settings(tmp_path / "var", database_url=pg_url, broker_url=redis_space.url,
                             redis_key_prefix=redis_space.prefix)
    old = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    with Service(settings, listen=False, sweep=False, reconcile=False, processor=_slow_processor) as svc:
        assert svc.sessions is not None and svc.celery is not None and svc.publisher is not None
        batch_uids = [_study(svc, dt.datetime.now(dt.UTC)) for _ in range(30)]  # not stable: no live job
        with svc.sessions() as session:
            studies = repo.studies_for_reprocess(session, uids=batch_uids)
        batch = [p.job_id for p in reprocess(svc.sessions, svc.celery, studies, model_version="m",
                                              now=dt.datetime.now(dt.UTC))]
        worker = EmbeddedWorker(svc.celery, queues=("inference", "batch"), concurrency=1)
        worker.start()
        try:
            def finished() -> list[int]:
                with svc.sessions() as session:  # type: ignore[misc]
                    return [j.id for j, _ in repo.list_jobs(session, state="succeeded")]

            wait_for(lambda: len(finished()) >= 2, timeout=60)  # the batch is being worked through
            live_uid = _study(svc, old)
            made = sweep_once(svc.sessions, quiet_seconds=600, model_version="m", now=dt.datetime.now(dt.UTC))
            (live,) = [j.job_id for j in made]
            assert svc.publisher.publish(live, "inference", reason="study assembled")
            batch_done_when_live_sent = len(finished())
            wait_for(lambda: len(finished()) == 31, timeout=120)
        finally:
            worker.stop()
        with svc.sessions() as session:
            jobs = {j.id: (j, uid) for j, uid in repo.list_jobs(session)}
    finished_at = {job_id: job.finished_at for job_id, (job, _) in jobs.items() if job.finished_at is not None}
    order = sorted(finished_at, key=finished_at.__getitem__)
    assert len(order) == 31 and None not in batch
    position = order.index(live)
    assert jobs[live][1] == live_uid and jobs[live][0].queue == "inference"
    assert all(jobs[b][0].queue == "batch" for b in batch if b is not None)
    waiting_then = 30 - batch_done_when_live_sent
    # At most the batch job in the worker's hands (plus one prefetched) finishes between sending and the live one.
    assert position <= batch_done_when_live_sent + 2, (position, batch_done_when_live_sent)
    assert waiting_then >= 20  # it really overtook a queue of waiting batch jobs
