"""Operations commands against the real PostgreSQL and Redis: status numbers equal the database, jobs
list/show, and reprocess (dry run changes nothing; a real run queues batch jobs that supersede)."""

# ruff: noqa: F811  (pytest fixtures imported from intake_support are parameters of the same name)
from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dicom_factory as f
import pytest
import redis
from intake_support import (
    RedisSpace,
    make_settings,
    migrate_to_head,
    pg_url,  # noqa: F401  (fixture)
    redis_space,  # noqa: F401  (fixture)
)
from pydicom.uid import generate_uid
from sqlalchemy import func, select, update
from typer.testing import CliRunner

from worker.assembly import sweep_once
from worker.cli import app
from worker.db import repository as repo
from worker.db.engine import make_engine, make_session_factory
from worker.db.models import Export, Job, JobState, ResultObject, Study
from worker.queue.celery_app import make_celery
from worker.queue.publish import JobPublisher

pytestmark = pytest.mark.services


def _instance(session: Any, study_uid: str, when: dt.datetime, spool: Path) -> None:
    series_uid, sop_uid = generate_uid(f.UID_ROOT), generate_uid(f.UID_ROOT)
    path = f"{study_uid}/{series_uid}/{sop_uid}.dcm"
    (spool / path).parent.mkdir(parents=True, exist_ok=True)
    (spool / path).write_bytes(b"x")  # reprocess checks that the spool file is there, not what it holds
    repo.record_instance(session, repo.InstanceRecord(
        study_instance_uid=study_uid, series_instance_uid=series_uid,
        sop_instance_uid=sop_uid, sop_class_uid=f.MR_IMAGE_STORAGE,
        transfer_syntax_uid="1.2.840.10008.1.2.1", size_bytes=1, path=path, calling_ae="T",
        peer_address="127.0.0.1", association_id=None,
    ), now=when)


@pytest.fixture
def scripted(tmp_path: Path, pg_url: str, redis_space: RedisSpace) -> Iterator[dict[str, Any]]:
    """Two waiting studies; jobs queued (in the broker), running, succeeded, failed; one dead export."""
    migrate_to_head(pg_url)
    now = dt.datetime.now(dt.UTC)  # per test, not per module: the ages asserted below count from here
    settings = make_settings(tmp_path / "var", database_url=pg_url, broker_url=redis_space.url,
                             redis_key_prefix=redis_space.prefix)
    engine = make_engine(pg_url)
    sessions = make_session_factory(engine)
    old = now - dt.timedelta(minutes=30)
    uids = [generate_uid(f.UID_ROOT) for _ in range(6)]
    with sessions.begin() as session:
        for uid in uids[:4]:
            _instance(session, uid, old, settings.spool_path)
    jobs = sweep_once(sessions, quiet_seconds=1, model_version="m", now=now - dt.timedelta(minutes=20))
    with sessions.begin() as session:
        for uid in uids[4:]:
            _instance(session, uid, now - dt.timedelta(seconds=90), settings.spool_path)  # still receiving
    queued, running, done, failed = (j.job_id for j in jobs)
    celery = make_celery(settings)
    JobPublisher(celery, sessions).publish(queued, "inference", reason="test")
    with sessions.begin() as session:
        for job_id, state in ((running, None), (done, JobState.SUCCEEDED), (failed, JobState.FAILED)):
            repo.claim_job(session, job_id, now=now - dt.timedelta(minutes=5), lease=dt.timedelta(hours=1),
                           worker="w", task_id="t")
            if state is not None:
                repo.finish_job(session, job_id, state=state, now=now - dt.timedelta(minutes=1),
                                error="model exploded" if state is JobState.FAILED else None)
        session.add(ResultObject(job_id=done, kind="sr", sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                                 sop_instance_uid=generate_uid(f.UID_ROOT), series_instance_uid="1.2.3",
                                 path="a.dcm", size_bytes=1, created_at=now))
        session.flush()
        repo.create_exports(session, done, ["pacs"], now=now)
        session.execute(update(Export).values(state="dead", attempts=8, last_error="association failed"))
    celery.close()
    env = {"CCFNET_DATABASE_URL": pg_url, "CCFNET_BROKER_URL": redis_space.url,
           "CCFNET_REDIS_KEY_PREFIX": redis_space.prefix, "CCFNET_DATA_DIR": str(tmp_path / "var")}
    yield {"env": env, "sessions": sessions, "uids": uids, "jobs": (queued, running, done, failed),
           "redis": redis_space, "now": now, "spool": settings.spool_path}
    engine.dispose()


def test_status_json_matches_the_database_and_the_broker(scripted: dict[str, Any]) -> None:
    result = CliRunner().invoke(app, ["status", "--json"], env=scripted["env"])
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    sessions = scripted["sessions"]
    with sessions() as session:
        by_state = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        waiting = session.execute(select(func.count()).select_from(Study).where(Study.state == "receiving")).scalar()
        dead = session.scalars(select(Export.id).where(Export.state == "dead")).all()
        first_waiting = session.execute(
            select(func.min(Study.first_received_at)).where(Study.state == "receiving")).scalar_one()
        first_queued = session.execute(select(func.min(Job.created_at)).where(Job.state == "queued")).scalar_one()
        hour_ago = dt.datetime.fromisoformat(status["at"]) - dt.timedelta(hours=1)
        done_in_hour = dict(session.execute(
            select(Job.state, func.count()).where(Job.finished_at >= hour_ago).group_by(Job.state)).all())
        failures = session.execute(select(Job.id, Job.error).where(Job.state == "failed")).all()
    assert status["jobs_by_state"] == by_state == {"queued": 1, "running": 1, "succeeded": 1, "failed": 1}
    assert status["studies_waiting"] == waiting == 2
    at = dt.datetime.fromisoformat(status["at"])  # "at" is rounded down to the second: ages within 1 s
    assert status["oldest_waiting_study_seconds"] == pytest.approx((at - first_waiting).total_seconds(), abs=1.1)
    assert status["oldest_queued_job_seconds"] == pytest.approx((at - first_queued).total_seconds(), abs=1.1)
    assert 85 <= status["oldest_waiting_study_seconds"] <= 300
    assert 20 * 60 <= status["oldest_queued_job_seconds"] <= 25 * 60
    client = redis.Redis.from_url(scripted["redis"].url)
    assert status["queues"]["inference"] == client.llen(scripted["redis"].prefix + "inference") == 1
    assert status["queues"]["batch"] == 0
    assert status["throughput_last_hour"] == done_in_hour == {"succeeded": 1, "failed": 1}
    assert [(fl["job"], fl["reason"]) for fl in status["recent_failures"]] == [tuple(r) for r in failures]
    assert failures == [(scripted["jobs"][3], "model exploded")]
    assert [d["export"] for d in status["dead_exports"]] == list(dead) and len(dead) == 1
    assert status["exports_by_state"] == {"dead": 1}
    assert status["paused_queues"] == []


def test_status_of_a_fresh_install_prints_no_empty_values(tmp_path: Path, pg_url: str, redis_space: RedisSpace) -> None:
    migrate_to_head(pg_url)
    env = {"CCFNET_DATABASE_URL": pg_url, "CCFNET_BROKER_URL": redis_space.url,
           "CCFNET_REDIS_KEY_PREFIX": redis_space.prefix, "CCFNET_DATA_DIR": str(tmp_path / "var")}
    result = CliRunner().invoke(app, ["status"], env=env)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "queues:   inference 0  export 0  batch 0",
        "jobs:     none",
        "waiting:  0 studies; oldest queued job none",
        "last hour: 0 succeeded, 0 failed",
        "dicom:    0 open association(s)",
        "exports:  none",
    ]


def test_a_queue_paused_from_the_cli_shows_in_status_and_resuming_publishes_its_queued_job(
    scripted: dict[str, Any]
) -> None:
    runner, env, sessions = CliRunner(), scripted["env"], scripted["sessions"]
    queued = scripted["jobs"][0]
    refused = runner.invoke(app, ["queue", "pause", "export"], env=env)
    assert refused.exit_code == 2 and "cannot be paused" in refused.output
    paused = runner.invoke(app, ["queue", "pause", "inference"], env=env)
    assert paused.exit_code == 0 and paused.output == "queue inference paused\n"
    assert json.loads(runner.invoke(app, ["status", "--json"], env=env).output)["paused_queues"] == ["inference"]
    text = runner.invoke(app, ["status"], env=env).output
    assert text.splitlines()[0] == "queues:   inference 1 (paused)  export 0  batch 0"

    with sessions() as session:
        job = session.get(Job, queued)
        assert job is not None
        published_before = job.publish_count
    resumed = runner.invoke(app, ["queue", "resume", "inference"], env=env)
    assert resumed.exit_code == 0 and resumed.output == "queue inference resumed; 1 queued job(s) published\n"
    with sessions() as session:
        job = session.get(Job, queued)
        assert job is not None and job.publish_count == published_before + 1
        assert repo.paused_queues(session) == set()
    client = redis.Redis.from_url(scripted["redis"].url)
    assert client.llen(scripted["redis"].prefix + "inference") == 2  # the first message and the new one
    assert "(paused)" not in runner.invoke(app, ["status"], env=env).output


def test_jobs_list_has_every_job_with_its_study_and_show_has_its_record(scripted: dict[str, Any]) -> None:
    runner = CliRunner()
    listed = json.loads(runner.invoke(app, ["jobs", "list", "--json"], env=scripted["env"]).output)
    assert sorted(row["id"] for row in listed) == sorted(scripted["jobs"])
    assert set(row["study"] for row in listed) == set(scripted["uids"][:4])
    failed = json.loads(runner.invoke(app, ["jobs", "list", "--state", "failed", "--json"], env=scripted["env"]).output)
    assert [row["id"] for row in failed] == [scripted["jobs"][3]]
    later = (scripted["now"] + dt.timedelta(minutes=1)).isoformat()
    none_yet = runner.invoke(app, ["jobs", "list", "--since", later, "--json"], env=scripted["env"])
    assert json.loads(none_yet.output) == []
    newest = json.loads(runner.invoke(app, ["jobs", "list", "--limit", "2", "--json"], env=scripted["env"]).output)
    assert [row["id"] for row in newest] == sorted(scripted["jobs"], reverse=True)[:2]
    shown = json.loads(runner.invoke(app, ["jobs", "show", str(scripted["jobs"][2]), "--json"],
                                     env=scripted["env"]).output)
    assert [e["kind"] for e in shown["events"]] == ["created", "picked_up", "finished"]
    assert shown["state"] == "succeeded"
    assert shown["exports"][0]["state"] == "dead"
    missing = runner.invoke(app, ["jobs", "show", "999999"], env=scripted["env"])
    assert missing.exit_code == 1 and "no job 999999" in missing.output


def test_reprocess_dry_run_changes_nothing_and_a_real_run_queues_superseding_batch_jobs(
    scripted: dict[str, Any]
) -> None:
    runner = CliRunner()
    failed_study = scripted["uids"][3]
    sessions = scripted["sessions"]

    def job_count() -> int:
        with sessions() as session:
            return int(session.execute(select(func.count()).select_from(Job)).scalar_one())

    before = job_count()
    dry = runner.invoke(app, ["reprocess", "--state", "failed", "--dry-run", "--json"], env=scripted["env"])
    assert dry.exit_code == 0, dry.output
    assert [s["study"] for s in json.loads(dry.output)["studies"]] == [failed_study]
    assert job_count() == before
    real = runner.invoke(app, ["reprocess", "--study", failed_study, "--json"], env=scripted["env"])
    assert real.exit_code == 0, real.output
    new_job = json.loads(real.output[real.output.index("{"):])["studies"][0]["job"]
    assert job_count() == before + 1
    with sessions() as session:
        job = session.get(Job, new_job)
        old = session.get(Job, scripted["jobs"][3])
        assert job is not None and old is not None
        assert job.queue == "batch" and job.state == "queued" and old.superseded_by == new_job
    client = redis.Redis.from_url(scripted["redis"].url)
    assert client.llen(scripted["redis"].prefix + "batch") == 1
    nothing = runner.invoke(app, ["reprocess"], env=scripted["env"])
    assert nothing.exit_code == 2 and "choose studies" in nothing.output


def test_reprocess_of_an_unknown_study_exits_non_zero_and_queues_nothing(scripted: dict[str, Any]) -> None:
    unknown = generate_uid(f.UID_ROOT)
    sessions = scripted["sessions"]
    with sessions() as session:
        before = session.scalar(select(func.count()).select_from(Job))
    for extra in ([], ["--dry-run"]):
        result = CliRunner().invoke(app, ["reprocess", "--study", unknown, *extra], env=scripted["env"])
        assert result.exit_code == 1, result.output
        assert f"not found: {unknown}" in result.output and "--from pacs" in result.output
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == before


def test_reprocess_checks_the_spool_files_and_points_to_from_pacs(scripted: dict[str, Any]) -> None:
    study = scripted["uids"][3]
    for path in (scripted["spool"] / study).rglob("*.dcm"):
        path.unlink()
    runner = CliRunner()
    dry = runner.invoke(app, ["reprocess", "--study", study, "--dry-run", "--json"], env=scripted["env"])
    assert dry.exit_code == 1, dry.output
    report = json.loads(dry.output)
    assert report["studies"] == []
    assert report["spool_files_missing"] == [{"study": study, "instances": 1, "missing_files": 1}]
    text = runner.invoke(app, ["reprocess", "--study", study], env=scripted["env"])
    assert text.exit_code == 1 and "spool files are gone" in text.output and "--from pacs" in text.output
    with scripted["sessions"]() as session:
        assert not session.scalars(select(Job).where(Job.queue == "batch")).all()


@pytest.mark.parametrize("command", [["status"], ["jobs", "list"], ["jobs", "show", "1"]])
def test_read_only_commands_on_a_missing_sqlite_database_exit_2_and_create_nothing(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CCFNET_DATABASE_URL", raising=False)
    data_dir = tmp_path / "no" / "such" / "dir"
    result = CliRunner().invoke(app, command, env={"CCFNET_DATA_DIR": str(data_dir)})
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and "CCFNET_DATA_DIR" in result.output, result.output
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_read_only_commands_on_a_wrong_postgres_url_exit_2_naming_the_setting(pg_url: str) -> None:
    wrong = pg_url.rsplit("/", 1)[0] + "/ccfnet_no_such_database"
    for command in (["status"], ["jobs", "list"]):
        result = CliRunner().invoke(app, command, env={"CCFNET_DATABASE_URL": wrong})
        assert result.exit_code == 2, result.output
        assert result.output.count("\n") == 1 and "CCFNET_DATABASE_URL" in result.output, result.output
    empty = CliRunner().invoke(app, ["status"], env={"CCFNET_DATABASE_URL": pg_url})  # exists, no schema
    assert empty.exit_code == 3 and "ccfnet db upgrade" in empty.output, empty.output
    garbled = CliRunner().invoke(app, ["status"], env={"CCFNET_DATABASE_URL": "not a url"})
    assert garbled.exit_code == 2 and garbled.output.count("\n") == 1, garbled.output
    assert "CCFNET_DATABASE_URL" in garbled.output
