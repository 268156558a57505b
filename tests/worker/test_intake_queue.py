"""The queue: Redis losing its messages, the reconciler, exactly-once pick-up; embedded mode end to end."""

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
    send,
    spool_files,
    wait_for,
)
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from worker.assembly import sweep_once
from worker.db import repository as repo
from worker.db.models import Job, JobEvent
from worker.queue.processing import record_pickup_only
from worker.queue.reconciler import RedisInspector
from worker.service import EmbeddedService, EmbeddedWorker, Service
from worker.settings import Settings

pytestmark = pytest.mark.services


def _make_jobs(svc: Service, count: int) -> list[int]:
    assert svc.sessions is not None
    t0 = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    for _ in range(count):
        uids = f.new_study()
        sop = generate_uid(f.UID_ROOT)
        with svc.sessions.begin() as session:
            repo.record_instance(
                session,
                repo.InstanceRecord(
                    study_instance_uid=uids.study,
                    series_instance_uid=uids.series[0],
                    sop_instance_uid=sop,
                    sop_class_uid=f.MR_IMAGE_STORAGE,
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    size_bytes=1,
                    path="x",
                    calling_ae="T",
                    peer_address="127.0.0.1",
                    association_id=None,
                ),
                now=t0,
            )
    made = sweep_once(svc.sessions, quiet_seconds=1, model_version="m", now=dt.datetime.now(dt.UTC))
    return [j.job_id for j in made]


def _queue_settings(tmp_path: Path, pg_url: str, redis_space: RedisSpace, grace: float) -> Settings:
    """A migrated private database and Redis key space, with this reconcile grace period."""
    migrate_to_head(pg_url)
    return make_settings(
        tmp_path / "var", database_url=pg_url, broker_url=redis_space.url, redis_key_prefix=redis_space.prefix,
        reconcile_grace_seconds=grace,
    )


def _publish_reasons(svc: Service, job_id: int) -> list[tuple[str, str | None]]:
    assert svc.sessions is not None
    with svc.sessions() as session:
        return [(e.kind, (e.detail or {}).get("reason")) for e in repo.job_events(session, job_id)]


def test_flushed_redis_jobs_are_reenqueued_and_picked_up_exactly_once(
    tmp_path: Path,
    pg_url: str,
    redis_space: RedisSpace,
) -> None:
    settings = _queue_settings(tmp_path, pg_url, redis_space, grace=0.5)
    with Service(settings, listen=False, sweep=False, reconcile=False, processor=record_pickup_only) as svc:
        assert svc.publisher is not None and svc.celery is not None and svc.sessions is not None
        job_ids = _make_jobs(svc, 6)
        assert len(job_ids) == 6
        for job_id in job_ids:
            assert svc.publisher.publish(job_id, "inference", reason="study assembled")
        inspector = RedisInspector(redis_space.url, key_prefix=redis_space.prefix)
        assert inspector.job_ids() == set(job_ids)

        assert svc.reconcile() == 0  # everything is in the broker: nothing to do
        assert redis_space.flush() > 0  # Redis restarted empty
        assert inspector.job_ids() == set()
        time.sleep(0.6)
        assert svc.reconcile() == 6
        assert inspector.job_ids() == set(job_ids)
        # A duplicate message for two jobs (say a reconciler raced a slow publish): still one pick-up each.
        svc.publisher.publish(job_ids[0], "inference", reason="duplicate")
        svc.publisher.publish(job_ids[1], "inference", reason="duplicate")

        worker = EmbeddedWorker(svc.celery, queues=("inference",), concurrency=2)
        worker.start()
        try:

            def all_done() -> bool:
                with svc.sessions() as session:  # type: ignore[misc]
                    states = session.scalars(select(Job.state).where(Job.id.in_(job_ids))).all()
                return all(s == "picked_up" for s in states)

            wait_for(all_done, timeout=30)
            wait_for(lambda: inspector.job_ids() == set(), timeout=10)  # duplicates consumed too
        finally:
            worker.stop()
        with svc.sessions() as session:
            for job_id in job_ids:
                kinds = session.scalars(
                    select(JobEvent.kind).where(JobEvent.job_id == job_id, JobEvent.kind == "picked_up")
                ).all()
                assert len(kinds) == 1, (job_id, kinds)
                assert svc.reconcile() == 0


def test_embedded_service_end_to_end_and_across_a_restart(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "var", study_quiet_seconds=1.0)
    uids = f.new_study()
    images = list(f.study_images(uids, 4))

    def jobs(svc: Service) -> list[Job]:
        assert svc.sessions is not None
        with svc.sessions() as session:
            return list(repo.jobs_for_study(session, uids.study))

    with EmbeddedService(settings, processor=record_pickup_only) as svc:
        assert svc.settings.uses_sqlite
        assert send(svc.port, images[:3]) == [0, 0, 0]
        wait_for(lambda: (j := jobs(svc)) and j[0].state == "picked_up")
    assert len(spool_files(settings.spool_path)) == 3

    with EmbeddedService(settings, processor=record_pickup_only) as svc:  # everything survived the restart
        assert [(j.state, j.instance_count) for j in jobs(svc)] == [("picked_up", 3)]
        assert send(svc.port, images[3:]) == [0]
        wait_for(lambda: len(j := jobs(svc)) == 2 and j[1].state == "picked_up")
        first, second = jobs(svc)
        assert first.superseded_by == second.id and second.instance_count == 4
        assert svc.sessions is not None
        with svc.sessions() as session:
            assert [e.kind for e in repo.job_events(session, second.id)] == [
                "created",
                "published",
                "picked_up",
                "finished",
            ]


def test_a_job_whose_worker_died_is_republished_although_its_message_is_still_reserved(
    tmp_path: Path,
    pg_url: str,
    redis_space: RedisSpace,
) -> None:
    """kill -9 of a worker leaves its message reserved in Redis until the visibility timeout (minutes); the
    expired lease alone must bring the job back."""
    settings = _queue_settings(tmp_path, pg_url, redis_space, grace=60.0)  # the lease, not the grace, decides
    with Service(settings, listen=False, sweep=False, reconcile=False, processor=record_pickup_only) as svc:
        assert svc.publisher is not None and svc.sessions is not None
        (job_id,) = _make_jobs(svc, 1)
        assert svc.publisher.publish(job_id, "inference", reason="study assembled")
        now = dt.datetime.now(dt.UTC)
        with svc.sessions.begin() as session:  # a worker took it and died: its lease ran out a second ago
            assert repo.claim_job(session, job_id, now=now - dt.timedelta(seconds=61),
                                  lease=dt.timedelta(seconds=60), worker="gone:1", task_id=None)
        inspector = RedisInspector(redis_space.url, key_prefix=redis_space.prefix)
        assert inspector.job_ids() == {job_id}  # the dead worker's message, as far as the broker knows
        assert svc.reconcile() == 1
        with svc.sessions() as session:
            job = repo.get_job(session, job_id)
            assert job is not None and job.state == "queued"
        events = _publish_reasons(svc, job_id)
        assert ("lease_expired", None) in events
        assert events[-1] == ("published", "reconciler: lease expired")


def test_a_job_just_assembled_is_left_to_its_sweeper_for_the_grace_period(
    tmp_path: Path,
    pg_url: str,
    redis_space: RedisSpace,
) -> None:
    """The sweeper commits a job, then publishes it; a reconciler pass in between must not publish it too."""
    settings = _queue_settings(tmp_path, pg_url, redis_space, grace=60.0)
    with Service(settings, listen=False, sweep=False, reconcile=False, processor=record_pickup_only) as svc:
        assert svc.sessions is not None
        (job_id,) = _make_jobs(svc, 1)  # queued, not yet published
        assert svc.reconcile() == 0
        with svc.sessions.begin() as session:  # a minute later it is still unpublished: the sweeper died
            session.execute(update(Job).where(Job.id == job_id).values(
                updated_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=61)))
        assert svc.reconcile() == 1
        assert _publish_reasons(svc, job_id)[-1] == ("published", "reconciler: never published")
