"""The inference processor: one claimed job -> findings and DICOM result objects in the database.

It reads the job's instances from the spool, lets the model library choose the series and slice, runs the
model (loaded once per process), writes the SR / presentation state / key image (and optional segmentation)
durably under `<data_dir>/results/`, and records findings and result objects in one transaction. How a job
ends is an outcome, never a crash: no usable series, an unreadable file, a superseded job.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from worker import core_bridge
from worker.core_bridge import NoEligibleInput, StudyAnalysis, UnreadableInput
from worker.db import repository as repo
from worker.db.models import Finding, JobState, ResultObject
from worker.queue.processing import JobContext, JobOutcome, JobProcessor
from worker.results import build_results
from worker.results.findings import AlgorithmIdentity, AnalysisResult, StructureFinding
from worker.settings import Settings
from worker.spool import Spool

log = logging.getLogger("worker.inference")

RESULT_KINDS = {
    "1.2.840.10008.5.1.4.1.1.88.34": "sr",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.11.1": "gsps",
    "1.2.840.10008.5.1.4.1.1.7": "sc",
    "1.2.840.10008.5.1.4.1.1.66.4": "seg",
}
MANUFACTURER = "ccfnet-worker"


def model_path(settings: Settings) -> Path:
    return settings.model_path if settings.model_path is not None else core_bridge.default_model_path()


def results_root(settings: Settings) -> Path:
    return settings.data_dir / "results"


def patient_coordinates(source: pydicom.Dataset, column: float, row: float) -> tuple[float, float, float] | None:
    """Patient (x, y, z) in mm of an image point (DICOM image coordinates, pixel centre at index + 0.5)."""
    try:
        origin = [float(v) for v in source.ImagePositionPatient]
        orientation = [float(v) for v in source.ImageOrientationPatient]
        row_spacing, column_spacing = (float(v) for v in source.PixelSpacing)
    except (AttributeError, TypeError, ValueError):
        return None
    row_dir, col_dir = orientation[:3], orientation[3:]
    i, j = column - 0.5, row - 0.5  # ImagePositionPatient is the centre of the first pixel
    return tuple(  # type: ignore[return-value]
        origin[a] + row_dir[a] * column_spacing * i + col_dir[a] * row_spacing * j for a in range(3)
    )


def _algorithm(analysis: StudyAnalysis, settings: Settings) -> AlgorithmIdentity:
    return AlgorithmIdentity(
        manufacturer=MANUFACTURER,
        model_name=analysis.model.name,
        software_version=analysis.model.software_version,
        model_version=settings.model_version,
        device_uid=analysis.model.device_uid,
        phantom_only=analysis.model.phantom_only,
    )


def _write_results(settings: Settings, datasets: list[pydicom.Dataset]) -> list[tuple[pydicom.Dataset, str, int]]:
    """Write each object durably (temp, fsync, rename) under results/<study>/<series>/<sop>.dcm."""
    store = Spool(results_root(settings))
    store.prepare()
    written = []
    for ds in datasets:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        paths = store.paths_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        size = store.write(paths, buffer.getvalue())
        written.append((ds, paths.relative, size))
    return written


def process_job(ctx: JobContext) -> JobOutcome:
    """Run CCF-Net on one job's study and store what it found."""
    settings = ctx.settings
    with ctx.sessions.begin() as session:
        newer = repo.superseding_job(session, ctx.job_id)
        instances = repo.spooled_instances(session, ctx.study_id)
    if newer is not None:
        return JobOutcome(JobState.SUPERSEDED, detail={"superseded_by": newer})
    if not instances:
        return JobOutcome(JobState.NO_ELIGIBLE_SERIES, error="the study has no stored instances")
    spool_root = settings.spool_path.resolve()
    paths = [spool_root / item.path for item in instances]
    try:
        analysis = core_bridge.analyse_files(
            paths, model_path(settings), settings.model_device, with_heatmaps=settings.include_segmentation
        )
    except NoEligibleInput as exc:
        log.info("job %d: no eligible series: %s", ctx.job_id, exc.reason)
        return JobOutcome(JobState.NO_ELIGIBLE_SERIES, error=exc.reason)
    except UnreadableInput as exc:
        return JobOutcome(JobState.FAILED, error=f"unreadable input: {exc}")

    source_path = next(
        (p for p, item in zip(paths, instances, strict=True)
         if item.sop_instance_uid == analysis.centre_sop_instance_uid),
        None,
    )
    if source_path is None:
        return JobOutcome(JobState.FAILED, error="the chosen slice is not among the job's instances")
    try:
        source = pydicom.dcmread(source_path)
    except (InvalidDicomError, OSError) as exc:
        return JobOutcome(JobState.FAILED, error=f"unreadable input: {exc}")
    findings = [
        StructureFinding(
            name=s.name, kind=s.kind, point_px=(s.column, s.row), label=s.label,  # type: ignore[arg-type]
            probability=s.probability, confidence=min(max(s.confidence, 0.0), 1.0),
        )
        for s in analysis.structures
    ]
    result = AnalysisResult(
        source_dataset=source, findings=tuple(findings), algorithm=_algorithm(analysis, settings),
        heatmaps=analysis.heatmaps,
    )
    datasets = build_results(
        result, sr_tracking=settings.sr_tracking, include_segmentation=settings.include_segmentation
    )
    written = _write_results(settings, datasets)
    now = ctx.clock()
    with ctx.sessions.begin() as session:
        rows = []
        for s in analysis.structures:
            patient = patient_coordinates(source, s.column, s.row)
            rows.append(Finding(
                structure=s.name, kind=s.kind, source_sop_instance_uid=analysis.centre_sop_instance_uid,
                column_px=s.column, row_px=s.row,
                patient_x_mm=patient[0] if patient else None,
                patient_y_mm=patient[1] if patient else None,
                patient_z_mm=patient[2] if patient else None,
                label=s.label, diagnosis=s.diagnosis, probability=s.probability, confidence=s.confidence,
            ))
        repo.replace_findings(session, ctx.job_id, rows)
        for ds, relative, size in written:
            repo.add_result_object(session, ResultObject(
                job_id=ctx.job_id, kind=RESULT_KINDS.get(str(ds.SOPClassUID), "other"),
                sop_class_uid=str(ds.SOPClassUID), sop_instance_uid=str(ds.SOPInstanceUID),
                series_instance_uid=str(ds.SeriesInstanceUID), path=relative, size_bytes=size, created_at=now,
            ))
        repo.add_job_event(session, ctx.job_id, "results_written", now=now, detail={
            "series_uid": analysis.series_uid, "source_sop_instance_uid": analysis.centre_sop_instance_uid,
            "selection": analysis.selection_reason, "objects": len(written),
            "inference_seconds": round(analysis.seconds, 3), "model": analysis.model.path,
        })
    _hand_over_to_export(ctx)
    return JobOutcome(JobState.SUCCEEDED, detail={"objects": len(written),
                                                  "inference_seconds": round(analysis.seconds, 3)})


def _hand_over_to_export(ctx: JobContext) -> None:
    """Create the job's exports; publish them through the running task's Celery app when there is one (the
    export reconciler publishes them otherwise)."""
    if not ctx.settings.destinations:
        return
    from celery import current_task

    from worker.export.queue import enqueue_exports

    app = current_task.app if current_task else None
    enqueue_exports(ctx.settings, ctx.sessions, ctx.job_id, app, ctx.clock)


def inference_processor(settings: Settings) -> JobProcessor:
    return process_job
