"""Study assembly against the real PostgreSQL (and Redis as the broker): quiet period, idempotency,
late-arrival supersede, restart, and two sweepers racing."""

# ruff: noqa: F811  (pytest fixtures imported from intake_support are parameters of the same name)
from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
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
    wait_for,
)
from pydicom.uid import generate_uid

from worker.assembly import idempotency_key, restart_quiet_clock, sweep_once
from worker.db import repository as repo
from worker.db.engine import make_engine, make_session_factory
from worker.db.models import Job
from worker.service import Service

pytestmark = pytest.mark.services

QUIET = 1.5


@pytest.fixture
def service(tmp_path: Path, pg_url: str, redis_space: RedisSpace) -> Iterator[Service]:
    migrate_to_head(pg_url)
    settings = make_settings(
        tmp_path / "var",
        database_url=pg_url,
        broker_url=redis_space.url,
        redis_key_prefix=redis_space.prefix,
        study_quiet_seconds=QUIET,
        reconcile_interval_seconds=60,
    )
    with Service(settings) as svc:
        yield svc


def _jobs(svc: Service, study_uid: str) -> list[Job]:
    assert svc.sessions is not None
    with svc.sessions() as session:
        return list(repo.jobs_for_study(session, study_uid))


def test_two_halves_with_a_short_pause_make_one_job(service: Service) -> None:
    uids = f.new_study()
    images = list(f.study_images(uids, 10))
    assert send(service.port, images[:5]) == [0] * 5
    time.sleep(QUIET / 3)
    assert send(service.port, images[5:]) == [0] * 5
    jobs = wait_for(lambda: _jobs(service, uids.study))
    time.sleep(QUIET + 1.0)
    jobs = _jobs(service, uids.study)
    assert len(jobs) == 1
    assert jobs[0].instance_count == 10 and jobs[0].state == "queued" and jobs[0].publish_count == 1


def test_two_halves_with_a_long_pause_make_two_jobs_the_second_supersedes(service: Service) -> None:
    uids = f.new_study()
    images = list(f.study_images(uids, 10))
    assert send(service.port, images[:5]) == [0] * 5
    first = wait_for(lambda: _jobs(service, uids.study))[0]
    assert first.instance_count == 5
    assert send(service.port, images[5:]) == [0] * 5
    jobs = wait_for(lambda: (j := _jobs(service, uids.study)) and len(j) == 2 and j)
    assert jobs[1].instance_count == 10
    assert jobs[0].superseded_by == jobs[1].id and jobs[0].state == "superseded"
    assert jobs[1].superseded_by is None and jobs[1].state == "queued"


def test_resending_the_same_study_makes_no_new_job(service: Service) -> None:
    uids = f.new_study()
    images = list(f.study_images(uids, 4))
    assert send(service.port, images) == [0] * 4
    wait_for(lambda: _jobs(service, uids.study))
    assert send(service.port, images) == [0] * 4
    time.sleep(QUIET + 1.5)  # long enough for the re-opened study to be swept again
    jobs = _jobs(service, uids.study)
    assert len(jobs) == 1 and jobs[0].instance_count == 4
    assert service.sessions is not None
    with service.sessions() as session:
        assert repo.count_instances(session, uids.study) == 4


def _record(sessions: object, study: str, series: str, sop: str, now: dt.datetime) -> None:
    with sessions.begin() as session:  # type: ignore[attr-defined]
        repo.record_instance(
            session,
            repo.InstanceRecord(
                study_instance_uid=study,
                series_instance_uid=series,
                sop_instance_uid=sop,
                sop_class_uid=f.MR_IMAGE_STORAGE,
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                size_bytes=1,
                path=f"{study}/{series}/{sop}.dcm",
                calling_ae="T",
                peer_address="127.0.0.1",
                association_id=None,
            ),
            now=now,
        )


def test_quiet_period_counts_from_a_restart(pg_url: str) -> None:
    migrate_to_head(pg_url)
    engine = make_engine(pg_url)
    sessions = make_session_factory(engine)
    t0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    uids = f.new_study()
    _record(sessions, uids.study, uids.series[0], generate_uid(f.UID_ROOT), t0)
    restart_quiet_clock(sessions, now=t0 + dt.timedelta(seconds=50))
    assert sweep_once(sessions, quiet_seconds=60, model_version="m", now=t0 + dt.timedelta(seconds=70)) == []
    made = sweep_once(sessions, quiet_seconds=60, model_version="m", now=t0 + dt.timedelta(seconds=111))
    assert len(made) == 1
    engine.dispose()


def test_two_sweepers_racing_make_each_job_once(pg_url: str) -> None:
    migrate_to_head(pg_url)
    engines = [make_engine(pg_url) for _ in range(2)]
    factories = [make_session_factory(e) for e in engines]
    t0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    studies: dict[str, list[str]] = {}
    for n in range(30):
        uids = f.new_study()
        studies[uids.study] = [generate_uid(f.UID_ROOT) for _ in range(3)]
        for sop in studies[uids.study]:
            _record(factories[0], uids.study, uids.series[0], sop, t0 + dt.timedelta(seconds=n))
    later = t0 + dt.timedelta(hours=1)
    made: list[list[int]] = [[], []]
    barrier = threading.Barrier(2)

    def sweeper(k: int) -> None:
        barrier.wait()
        for _ in range(3):
            made[k].extend(
                j.job_id for j in sweep_once(factories[k], quiet_seconds=5, model_version="m", now=later)
            )

    threads = [threading.Thread(target=sweeper, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(made[0]) + len(made[1]) == 30
    assert not set(made[0]) & set(made[1])
    with factories[0]() as session:
        for study, sops in studies.items():
            jobs = repo.jobs_for_study(session, study)
            assert len(jobs) == 1
            assert jobs[0].idempotency_key == idempotency_key(study, sops, "m")
    for e in engines:
        e.dispose()
