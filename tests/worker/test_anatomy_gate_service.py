"""The anatomy gate through the real service: a shoulder MR (pydicom's MR2 series, the study that was once reported
as 11 lumbar findings) ends not_analysed with its reason, no findings, and a valid "not analysed" SR that the ops
page, /metrics and `ccfnet jobs show` all show; without its study description only the image evidence is left, and
it still declines."""

# ruff: noqa: F811  (pytest fixtures imported from intake_support are parameters of the same name)
from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
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
from results_fixtures import DCIODVFY, dciodvfy_errors, dciodvfy_report
from typer.testing import CliRunner

from ccfnet_core.checkpoint import MODELS_DIR, PHANTOM_MODEL_NAME, default_model_path
from worker.cli import app
from worker.db import repository as repo
from worker.service import EmbeddedService, EmbeddedWorker, Service

pytestmark = pytest.mark.services
TERMINAL = {"succeeded", "failed", "no_eligible_series", "not_analysed", "superseded"}
TOKEN = "gate-ops-token"


def shoulder_mr() -> list[pydicom.Dataset]:
    """pydicom's MR2 series (a shoulder, T1 SE, 1024 x 1024, oriented so that it reads as sagittal): the two
    uncompressed instances, which have their own SOP instance UIDs."""
    from pydicom.data import get_testdata_file

    paths = [get_testdata_file(f"MR2_{name}.dcm") for name in ("UNCI", "UNCR")]
    if not all(paths):
        pytest.skip("pydicom's MR2 test files are not installed (pip install pydicom-data, the [test] extra)")
    return [pydicom.dcmread(path) for path in paths if path is not None]


def _final_job(svc: Service, study_uid: str, timeout: float = 300) -> Any:
    assert svc.sessions is not None

    def done() -> Any:
        with svc.sessions() as session:  # type: ignore[misc]
            jobs = list(repo.jobs_for_study(session, study_uid))
            return jobs[-1] if jobs and jobs[-1].state in TERMINAL else None

    return wait_for(done, timeout=timeout, interval=0.3)


def _impression(sr: pydicom.Dataset) -> str:
    """The TEXT of the Impression (DCM 121073) in the Impressions section of the report."""
    (section,) = [item for item in sr.ContentSequence if item.ValueType == "CONTAINER"]
    (item,) = [i for i in section.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121073"]
    return str(item.TextValue)


def test_a_shoulder_mr_is_not_analysed_and_says_so_in_an_sr_on_postgres(
    tmp_path: Path, pg_url: str, redis_space: RedisSpace
) -> None:
    migrate_to_head(pg_url)
    settings = make_settings(
        tmp_path / "var", database_url=pg_url, broker_url=redis_space.url, redis_key_prefix=redis_space.prefix,
        model_path=default_model_path(), http_port=0, ops_token=TOKEN,
    )
    datasets = shoulder_mr()
    study_uid = str(datasets[0].StudyInstanceUID)
    with Service(settings, reconcile=False) as svc:
        assert svc.celery is not None and svc.sessions is not None
        worker = EmbeddedWorker(svc.celery, queues=("inference",), concurrency=1)
        worker.start()
        try:
            assert send(svc.port, datasets) == [0, 0]
            job = _final_job(svc, study_uid)
        finally:
            worker.stop()
        with svc.sessions() as session:
            findings = list(repo.findings_for_job(session, job.id))
            objects = list(repo.result_objects_for_job(session, job.id))
            finished = [e.detail or {} for e in repo.job_events(session, job.id) if e.kind == "finished"]
        with httpx.Client(base_url=f"http://127.0.0.1:{svc.http_port}", timeout=30) as client:
            page = client.get("/?state=not_analysed", headers={"Authorization": f"Bearer {TOKEN}"}).text
            metrics = client.get("/metrics").text
    assert job.state == "not_analysed"
    assert job.error == "description 'SHOULDER' names shoulder, not the lumbar spine"
    assert findings == []
    assert finished and finished[0]["rule"] == "description" and finished[0]["objects"] == 1
    assert f'<a href="/jobs/{job.id}">{job.id}</a>' in page and "names shoulder" in page
    assert 'ccfnet_anatomy_gate_declined_total{reason="description"}' in metrics

    (report,) = objects
    assert report.kind == "declined"
    path = settings.data_dir / "results" / report.path
    sr = pydicom.dcmread(path)
    assert _impression(sr) == f"not analysed: {job.error}"
    assert sr.StudyInstanceUID == study_uid and sr.SeriesInstanceUID != datasets[0].SeriesInstanceUID
    assert (sr.SeriesNumber, sr.SeriesDescription) == (9005, "CCF-Net not analysed")
    assert (sr.VerificationFlag, sr.PreliminaryFlag, sr.CompletionFlag) == ("UNVERIFIED", "PRELIMINARY", "COMPLETE")
    assert sr.PatientID == datasets[0].PatientID
    (equipment,) = [item for item in sr.ContributingEquipmentSequence if "DeviceUID" in item]
    assert equipment.ManufacturerModelName == sr.ManufacturerModelName and "unverified" in str(
        equipment.ContributionDescription
    )
    if DCIODVFY is not None:  # tests/worker/test_results_declined_sr.py fails loudly without it where it matters
        assert dciodvfy_errors(path) == [], dciodvfy_report(path)

    env = {"CCFNET_DATABASE_URL": pg_url, "CCFNET_DATA_DIR": str(settings.data_dir)}
    shown = CliRunner().invoke(app, ["jobs", "show", str(job.id)], env=env)
    assert shown.exit_code == 0, shown.output
    assert f"job {job.id}: not_analysed (inference) - {job.error}" in shown.output


@pytest.mark.parametrize(
    "checkpoint", [default_model_path(), MODELS_DIR / PHANTOM_MODEL_NAME], ids=["default", "phantom"]
)
def test_without_a_study_description_the_image_evidence_declines_it(tmp_path: Path, checkpoint: Path) -> None:
    """Headers silent about the anatomy (no description, no body part): the model's own points decline it. With
    CCFNET_DECLINED_SR=false nothing is written."""
    datasets = shoulder_mr()
    for ds in datasets:
        del ds.StudyDescription
    settings = make_settings(tmp_path / "var", model_path=checkpoint, study_quiet_seconds=1.0, declined_sr=False)
    with EmbeddedService(settings) as svc:
        assert send(svc.port, datasets) == [0, 0]
        job = _final_job(svc, str(datasets[0].StudyInstanceUID))
        assert svc.sessions is not None
        with svc.sessions() as session:
            findings = list(repo.findings_for_job(session, job.id))
            objects = list(repo.result_objects_for_job(session, job.id))
            (finished,) = [e.detail or {} for e in repo.job_events(session, job.id) if e.kind == "finished"]
    assert job.state == "not_analysed", job.error
    assert finished["rule"] in ("order", "spacing", "confidence"), finished
    assert set(finished["measurements"]) >= {"order_tau", "median_step_mm", "median_confidence"}
    assert (findings, objects, finished["objects"]) == ([], [], 0)


def test_the_not_analysed_sr_is_handed_to_export_and_a_retry_does_not_redo_it(tmp_path: Path, pg_url: str) -> None:
    """The processor on the job the intake made: the declined SR becomes an export to each destination, and an
    attempt after the commit ends not_analysed again, with the same reason and nothing new written."""
    from test_inference_processor import job_for

    from worker import inference
    from worker.db.models import JobState

    with job_for(tmp_path, pg_url, shoulder_mr()) as (_, ctx):
        outcome = inference.process_job(ctx)
        again = inference.process_job(ctx)
        with ctx.sessions() as session:
            objects = list(repo.result_objects_for_job(session, ctx.job_id))
            exports = list(repo.exports_for_job(session, ctx.job_id))
    assert outcome.state is JobState.NOT_ANALYSED and outcome.error is not None and "shoulder" in outcome.error
    assert again.state is JobState.NOT_ANALYSED and again.error == outcome.error
    assert again.detail is not None and again.detail["from_earlier_attempt"] is True
    assert [o.kind for o in objects] == ["declined"]
    assert [(e.result_object_id, e.destination) for e in exports] == [(objects[0].id, "pacs")]
