"""`ccfnet reprocess --model` against the real PostgreSQL and Redis: the batch worker loads the forced checkpoint
instead of its configured one, and the result objects name the checkpoint that ran."""

# ruff: noqa: F811  (pytest fixtures imported from intake_support are parameters of the same name)
from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
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

from ccfnet_core.checkpoint import DEFAULT_MODEL_NAME, MODELS_DIR, PHANTOM_MODEL_NAME, load_model
from ccfnet_core.phantom import render_study, study_generator
from worker.cli import app
from worker.db import repository as repo
from worker.db.models import Job, ResultObject
from worker.service import EmbeddedWorker, Service

pytestmark = pytest.mark.services
ALGORITHM_VERSION = "111003"  # DCM "Algorithm Version", TID 4019


@contextmanager
def reprocessing(
    tmp_path: Path, pg_url: str, redis_space: RedisSpace, **overrides: Any
) -> Iterator[tuple[Service, dict[str, str], Callable[..., Job]]]:
    """A listener holding one phantom study and a batch worker; `run(*options)` reprocesses the study with these
    `ccfnet reprocess` options and returns its job once finished."""
    migrate_to_head(pg_url)
    settings = make_settings(
        tmp_path / "var", database_url=pg_url, broker_url=redis_space.url, redis_key_prefix=redis_space.prefix,
        **overrides,
    )
    env = {"CCFNET_DATABASE_URL": pg_url, "CCFNET_BROKER_URL": redis_space.url,
           "CCFNET_REDIS_KEY_PREFIX": redis_space.prefix, "CCFNET_DATA_DIR": str(settings.data_dir)}
    if settings.model_path is not None:
        env["CCFNET_MODEL_PATH"] = str(settings.model_path)
    datasets, truth = render_study(study_generator(71, 0), 0)
    sagittal = [ds for ds in datasets if ds.SeriesInstanceUID == truth.series_uid]
    runner = CliRunner()
    with Service(settings, sweep=False, reconcile=False) as svc:
        assert svc.sessions is not None and svc.celery is not None
        sessions = svc.sessions
        assert send(svc.port, sagittal) == [0] * len(sagittal)

        def run(*options: str) -> Job:
            result = runner.invoke(app, ["reprocess", "--study", truth.study_uid, *options, "--json"], env=env)
            assert result.exit_code == 0, result.output
            job_id = json.loads(result.output[result.output.index("{"):])["studies"][0]["job"]

            def finished() -> Job | None:
                with sessions() as session:
                    job = session.get(Job, job_id)
                    return job if job is not None and job.finished_at is not None else None

            return wait_for(finished, timeout=120, interval=0.5)

        worker = EmbeddedWorker(svc.celery, queues=("batch",), concurrency=1)
        worker.start()
        try:
            yield svc, env, run
        finally:
            worker.stop()


def _result_objects(svc: Service, job: Job) -> list[tuple[ResultObject, pydicom.Dataset]]:
    assert svc.sessions is not None
    with svc.sessions() as session:
        rows = repo.result_objects_for_job(session, job.id)
    return [(row, pydicom.dcmread(svc.settings.data_dir / "results" / row.path)) for row in rows]


def _algorithm_versions(items: Sequence[pydicom.Dataset]) -> list[str]:
    """The TID 4019 Algorithm Version of every content item of an SR content tree."""
    found = []
    for item in items:
        if item.ConceptNameCodeSequence[0].CodeValue == ALGORITHM_VERSION:
            found.append(str(item.TextValue))
        found += _algorithm_versions(item.get("ContentSequence", []))
    return found


def test_reprocess_with_a_forced_model_runs_that_checkpoint_on_the_batch_queue(
    tmp_path: Path, pg_url: str, redis_space: RedisSpace
) -> None:
    """The configured checkpoint is a path that does not exist, so only the forced run can succeed."""
    forced = tmp_path / "forced-phantom.pt"
    shutil.copyfile(MODELS_DIR / PHANTOM_MODEL_NAME, forced)
    with reprocessing(tmp_path, pg_url, redis_space, model_path=tmp_path / "configured-but-absent.pt") as (
        svc, env, run
    ):
        default = run()
        chosen = run("--model", str(forced))
        assert svc.sessions is not None
        with svc.sessions() as session:
            results = repo.result_objects_for_job(session, chosen.id)
            forced_path = repo.forced_model_path(session, chosen.id)
            assert repo.forced_model_path(session, default.id) is None
    assert default.state == "failed" and "model unavailable" in (default.error or "")
    assert chosen.state == "succeeded" and chosen.queue == "batch" and len(results) == 3
    card = load_model(forced)[1]
    assert chosen.model_version == f"{card.version}@{card.weights_sha256[:12]}" and forced_path == str(forced.resolve())

    refused = CliRunner().invoke(
        app, ["reprocess", "--study", "1.2.3", "--model", str(tmp_path / "nope.pt")], env=env
    )
    assert refused.exit_code == 2 and "no such checkpoint" in refused.output


def test_results_name_the_checkpoint_that_ran_from_its_card_configured_or_forced(
    tmp_path: Path, pg_url: str, redis_space: RedisSpace
) -> None:
    """Configured: the Tianchi checkpoint; forced: the phantom one. Each job's objects name the checkpoint that
    ran, from its card: device UID, version and the weights' digest (no setting names a model)."""
    forced = tmp_path / "forced-phantom.pt"
    shutil.copyfile(MODELS_DIR / PHANTOM_MODEL_NAME, forced)
    configured_card = load_model(MODELS_DIR / DEFAULT_MODEL_NAME)[1]
    forced_card = load_model(forced)[1]
    forced_version = f"{forced_card.version}@{forced_card.weights_sha256[:12]}"
    configured_version = f"{configured_card.version}@{configured_card.weights_sha256[:12]}"
    assert configured_version != forced_version
    with reprocessing(tmp_path, pg_url, redis_space, model_path=MODELS_DIR / DEFAULT_MODEL_NAME) as (svc, _, run):
        runs = {configured_version: (run(), configured_card),
                forced_version: (run("--model", str(forced)), forced_card)}
        objects = {version: _result_objects(svc, job) for version, (job, _) in runs.items()}
    for version, (job, card) in runs.items():
        assert job.state == "succeeded", job.error
        assert job.model_version == version  # the job row names the checkpoint as its objects do
        assert len(objects[version]) == 3
        for row, ds in objects[version]:
            assert list(ds.SoftwareVersions)[1] == version, row.kind
            (equipment,) = [item for item in ds.ContributingEquipmentSequence if "DeviceUID" in item]  # the model
            assert (list(equipment.SoftwareVersions)[1], equipment.DeviceUID) == (version, card.device_uid)
            assert (ds.get("ContentQualification") == "RESEARCH") == card.phantom_only
        (sr,) = [ds for row, ds in objects[version] if row.kind == "sr"]
        assert set(_algorithm_versions(sr.ContentSequence)) == {version}
