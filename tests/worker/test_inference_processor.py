"""The inference processor called directly on a job the intake made, against a private PostgreSQL database:
supersede while running, the export hand-over, retries, the time limit, a missing model, a broken localizer."""

# ruff: noqa: F811  (pytest fixtures imported from intake_support are parameters of the same name)
from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest
from intake_support import make_settings, migrate_to_head, pg_url, send, wait_for  # noqa: F401  (fixture)

from ccfnet_core.checkpoint import MODELS_DIR, PHANTOM_MODEL_NAME
from ccfnet_core.phantom import render_study, study_generator
from worker import core_bridge, inference
from worker.db import repository as repo
from worker.db.models import JobState
from worker.queue.processing import JobContext, RetryableJobError
from worker.service import Service
from worker.spool import LowDiskError, Spool
from worker.timeutil import utcnow

pytestmark = pytest.mark.services
MODEL = MODELS_DIR / PHANTOM_MODEL_NAME
PACS = {"kind": "dicom", "name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 1}


@contextmanager
def job_for(
    tmp_path: Path, url: str, datasets: list[pydicom.Dataset], **overrides: Any
) -> Iterator[tuple[Service, JobContext]]:
    """Intake (listener + sweeper, no worker) stores the study and makes its job; the test runs the processor."""
    migrate_to_head(url)
    values: dict[str, Any] = {"database_url": url, "model_path": MODEL, "destinations": [PACS]}
    values.update(overrides)
    settings = make_settings(tmp_path / "var", **values)
    with Service(settings, reconcile=False) as svc:
        assert set(send(svc.port, datasets)) == {0}
        sessions = svc.sessions
        assert sessions is not None
        study_uid = str(datasets[0].StudyInstanceUID)

        def made() -> Any:
            with sessions() as session:
                jobs = list(repo.jobs_for_study(session, study_uid))
                return jobs[0] if jobs else None

        job = wait_for(made, timeout=30)
        yield svc, JobContext(job.id, job.study_id, 1, svc.settings, sessions, utcnow)


def _study(seed: int) -> tuple[list[pydicom.Dataset], Any]:
    return render_study(study_generator(seed, 0), 0)


def _supersede(ctx: JobContext) -> int:
    """What the sweeper does when more instances arrive: a newer job that supersedes this one."""
    with ctx.sessions.begin() as session:
        newer = repo.create_job(
            session, study_id=ctx.study_id, idempotency_key=uuid.uuid4().hex, model_version="test",
            queue="inference", instance_count=1, now=utcnow(),
        )
        assert newer is not None
        repo.supersede_older_jobs(session, study_id=ctx.study_id, new_job_id=newer, now=utcnow())
    return newer


def test_results_are_stored_per_job_handed_to_export_and_not_redone_on_a_retry(
    tmp_path: Path, pg_url: str
) -> None:
    datasets, truth = _study(31)
    with job_for(tmp_path, pg_url, datasets) as (svc, ctx):
        outcome = inference.process_job(ctx)
        assert outcome.state is JobState.SUCCEEDED, outcome.error
        again = inference.process_job(ctx)  # a retry after the commit: nothing new, the hand-over only
        with ctx.sessions() as session:
            findings = list(repo.findings_for_job(session, ctx.job_id))
            objects = list(repo.result_objects_for_job(session, ctx.job_id))
            exports = list(repo.exports_for_job(session, ctx.job_id))
            written = next(e.detail for e in repo.job_events(session, ctx.job_id) if e.kind == "results_written")
    assert again.state is JobState.SUCCEEDED and again.detail == {"objects": 3, "from_earlier_attempt": True}
    # The device that ran: "cpu" here; "cuda:0 (<GPU name>)" on a GPU host.
    assert written is not None and str(written["device"]).startswith(core_bridge.resolve_device("auto"))
    assert len(findings) == 11 and {f.label for f in findings} <= {"v1", "v2"}
    assert len(objects) == 3 and sorted(e.result_object_id for e in exports) == sorted(o.id for o in objects)
    results = svc.settings.data_dir / "results"
    assert sorted(p.name for p in (results / str(ctx.job_id)).iterdir()) == sorted(
        f"{o.sop_instance_uid}.dcm" for o in objects
    )
    for obj in objects:
        assert obj.path == f"{ctx.job_id}/{obj.sop_instance_uid}.dcm"
        ds = pydicom.dcmread(results / obj.path)
        assert ds.StudyInstanceUID == truth.study_uid and ds.SOPClassUID == obj.sop_class_uid


@pytest.mark.parametrize("when", ["during inference", "after the results were written"])
def test_a_job_superseded_while_running_exports_nothing(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    datasets, truth = _study(32)
    sagittal = [ds for ds in datasets if ds.SeriesInstanceUID == truth.series_uid]
    with job_for(tmp_path, pg_url, sagittal) as (_, ctx):
        target: Callable[..., Any] = (
            core_bridge.analyse_files if when == "during inference" else inference._write_results
        )

        def then_supersede(*args: Any, **kwargs: Any) -> Any:
            value = target(*args, **kwargs)
            _supersede(ctx)
            return value

        name = "analyse_files" if when == "during inference" else "_write_results"
        monkeypatch.setattr(core_bridge if when == "during inference" else inference, name, then_supersede)
        outcome = inference.process_job(ctx)
        with ctx.sessions() as session:
            objects = list(repo.result_objects_for_job(session, ctx.job_id))
            exports = list(repo.exports_for_job(session, ctx.job_id))
    assert outcome.state is JobState.SUPERSEDED and outcome.detail is not None
    assert outcome.detail["superseded_by"] > ctx.job_id
    assert exports == []
    assert len(objects) == (0 if when == "during inference" else 3)  # written results stay, for the record


def test_a_missing_checkpoint_fails_the_job_naming_the_model(tmp_path: Path, pg_url: str) -> None:
    datasets, truth = _study(33)
    sagittal = [ds for ds in datasets if ds.SeriesInstanceUID == truth.series_uid]
    with job_for(tmp_path, pg_url, sagittal, model_path=tmp_path / "gone.pt") as (_, ctx):
        outcome = inference.process_job(ctx)
    assert outcome.state is JobState.FAILED and outcome.error is not None
    assert outcome.error.startswith("model unavailable: checkpoint not found")


def test_the_time_limit_ends_the_job_as_failed(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    datasets, truth = _study(34)
    sagittal = [ds for ds in datasets if ds.SeriesInstanceUID == truth.series_uid]
    real = core_bridge.analyse_files

    def slow(*args: Any, **kwargs: Any) -> Any:
        value = real(*args, **kwargs)
        time.sleep(1.1)
        return value

    limits = {"task_time_limit_seconds": 1, "task_soft_time_limit_seconds": 1}
    with job_for(tmp_path, pg_url, sagittal, **limits) as (_, ctx):
        monkeypatch.setattr(core_bridge, "analyse_files", slow)
        outcome = inference.process_job(ctx)
    assert outcome.state is JobState.FAILED
    assert outcome.error == "time limit of 1 s reached during inference"


def test_a_full_disk_while_writing_results_is_retryable(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    datasets, truth = _study(35)
    sagittal = [ds for ds in datasets if ds.SeriesInstanceUID == truth.series_uid]
    with job_for(tmp_path, pg_url, sagittal) as (_, ctx):
        def full(self: Spool, needed: int) -> None:
            raise LowDiskError("free disk space below CCFNET_MIN_FREE_DISK_MB")

        monkeypatch.setattr(Spool, "check_space", full)
        with pytest.raises(RetryableJobError, match="writing result objects"):
            inference.process_job(ctx)
        with ctx.sessions() as session:
            assert list(repo.result_objects_for_job(session, ctx.job_id)) == []


def test_an_unreadable_file_outside_the_chosen_slices_is_left_out(tmp_path: Path, pg_url: str) -> None:
    datasets, truth = _study(36)
    with job_for(tmp_path, pg_url, datasets) as (svc, ctx):
        with ctx.sessions() as session:
            spooled = repo.spooled_instances(session, ctx.study_id)
        other = next(item for item in spooled if item.series_instance_uid != truth.series_uid)
        (svc.settings.spool_path / other.path).write_bytes(b"truncated")
        outcome = inference.process_job(ctx)
        with ctx.sessions() as session:
            events = {e.kind: e.detail for e in repo.job_events(session, ctx.job_id)}
    assert outcome.state is JobState.SUCCEEDED, outcome.error
    assert len(events["results_written"]["unreadable_files"]) == 1  # type: ignore[index]


def test_patient_coordinates_follow_the_centre_slice_geometry() -> None:
    source = pydicom.Dataset()
    source.ImagePositionPatient = [10.0, -20.0, 30.0]
    source.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # sagittal: rows run anterior->posterior, columns down
    source.PixelSpacing = [0.5, 0.7]  # between rows, between columns
    # Pixel index (column 10, row 20) is DICOM image point (10.5, 20.5).
    assert inference.patient_coordinates(source, 10.5, 20.5) == pytest.approx((10.0, -20.0 + 7.0, 30.0 - 10.0))
    del source.PixelSpacing
    assert inference.patient_coordinates(source, 10.5, 20.5) is None
