"""`ccfnet reprocess --model` against the real PostgreSQL and Redis: the batch worker loads the forced checkpoint
instead of its configured one (here a path that does not exist, so only the forced run can succeed)."""

# ruff: noqa: F811  (pytest fixtures imported from intake_support are parameters of the same name)
from __future__ import annotations

import json
import shutil
from pathlib import Path

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
from typer.testing import CliRunner

from ccfnet_core.checkpoint import MODELS_DIR, PHANTOM_MODEL_NAME
from ccfnet_core.phantom import render_study, study_generator
from worker.cli import app
from worker.db import repository as repo
from worker.db.models import Job
from worker.service import EmbeddedWorker, Service

pytestmark = pytest.mark.services


def test_reprocess_with_a_forced_model_runs_that_checkpoint_on_the_batch_queue(
    tmp_path: Path, pg_url: str, redis_space: RedisSpace
) -> None:
    migrate_to_head(pg_url)
    forced = tmp_path / "forced-phantom.pt"
    shutil.copyfile(MODELS_DIR / PHANTOM_MODEL_NAME, forced)
    settings = make_settings(
        tmp_path / "var", database_url=pg_url, broker_url=redis_space.url, redis_key_prefix=redis_space.prefix,
        model_path=tmp_path / "configured-but-absent.pt",
    )
    env = {"CCFNET_DATABASE_URL": pg_url, "CCFNET_BROKER_URL": redis_space.url,
           "CCFNET_REDIS_KEY_PREFIX": redis_space.prefix, "CCFNET_DATA_DIR": str(settings.data_dir)}
    datasets, truth = render_study(study_generator(71, 0), 0)
    sagittal = [ds for ds in datasets if ds.SeriesInstanceUID == truth.series_uid]
    runner = CliRunner()
    with Service(settings, sweep=False, reconcile=False) as svc:
        assert svc.sessions is not None and svc.celery is not None
        assert send(svc.port, sagittal) == [0] * len(sagittal)

        def run(*extra: str) -> Job:
            result = runner.invoke(app, ["reprocess", "--study", truth.study_uid, *extra, "--json"], env=env)
            assert result.exit_code == 0, result.output
            job_id = json.loads(result.output[result.output.index("{"):])["studies"][0]["job"]

            def finished() -> Job | None:
                with svc.sessions() as session:  # type: ignore[misc]
                    job = session.get(Job, job_id)
                    return job if job is not None and job.finished_at is not None else None

            return wait_for(finished, timeout=120, interval=0.5)

        worker = EmbeddedWorker(svc.celery, queues=("batch",), concurrency=1)
        worker.start()
        try:
            default = run()
            chosen = run("--model", str(forced))
        finally:
            worker.stop()
        with svc.sessions() as session:
            results = repo.result_objects_for_job(session, chosen.id)
            forced_path = repo.forced_model_path(session, chosen.id)
            assert repo.forced_model_path(session, default.id) is None
    assert default.state == "failed" and "model unavailable" in (default.error or "")
    assert chosen.state == "succeeded" and chosen.queue == "batch" and len(results) == 3
    assert chosen.model_version.startswith("forced-phantom@") and forced_path == str(forced.resolve())

    refused = runner.invoke(app, ["reprocess", "--study", truth.study_uid, "--model", str(tmp_path / "nope.pt")],
                            env=env)
    assert refused.exit_code == 2 and "no such checkpoint" in refused.output
