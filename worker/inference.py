"""The inference processor: one claimed job -> findings and DICOM result objects in the database.

It reads the job's instances from the spool, lets the model library choose the series and slice, runs the
model (loaded once per process), writes the SR / presentation state / key image (and optional segmentation)
durably under `<data_dir>/results/<job id>/`, and records findings and result objects in one transaction. How a job
ends is an outcome, never a crash: no usable series, not a lumbar spine (the anatomy gate: no findings, and by
default a "not analysed" SR, exported like the other objects), an unreadable file, a superseded job.
"""

from __future__ import annotations

import io
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import pydicom

from worker import core_bridge
from worker.core_bridge import (
    ModelIdentity,
    ModelOutOfMemory,
    ModelUnavailable,
    NoEligibleInput,
    NotLumbarSpine,
    StudyAnalysis,
    UnreadableInput,
)
from worker.db import repository as repo
from worker.db.models import Finding, JobState, ResultObject
from worker.ops import metrics
from worker.provenance import MANUFACTURER, RESULT_KINDS
from worker.queue.processing import JobContext, JobOutcome, JobProcessor, RetryableJobError
from worker.results import build_results
from worker.results.declined_sr import DeclinedStudy, build_declined_sr
from worker.results.findings import AlgorithmIdentity, AnalysisResult, StructureFinding
from worker.settings import Settings
from worker.spool import Spool, SpoolError, SpoolPaths, validate_uid

log = logging.getLogger("worker.inference")

DECLINED_EVENT = "declined_report_written"


def model_path(settings: Settings) -> Path:
    return settings.model_path if settings.model_path is not None else core_bridge.default_model_path()


def configured_model_version(settings: Settings) -> str:
    """The configured checkpoint's name in job keys and results (card version @ weights sha256 prefix), read from
    the file itself: no setting can disagree with it. An unreadable checkpoint still gets a label, so studies
    become jobs that fail visibly ("model unavailable") instead of waiting unseen."""
    path = model_path(settings)
    try:
        return core_bridge.checkpoint_version(path)
    except (OSError, ValueError) as exc:
        log.error("model checkpoint %s cannot be read: %s", path, exc)
        return f"unreadable:{path.name}"[:64]


def results_root(settings: Settings) -> Path:
    """Result objects live at `<results_root>/<job id>/<SOPInstanceUID>.dcm`; rows store the relative path."""
    return settings.data_dir / "results"


def patient_coordinates(source: pydicom.Dataset, column: float, row: float) -> tuple[float, float, float] | None:
    """Patient (x, y, z) in mm of an image point (DICOM image coordinates, pixel centre at index + 0.5)."""
    try:
        origin = [float(v) for v in source.ImagePositionPatient]
        orientation = [float(v) for v in source.ImageOrientationPatient]
        row_spacing, column_spacing = (float(v) for v in source.PixelSpacing)
    except (AttributeError, TypeError, ValueError):
        return None
    if len(origin) != 3 or len(orientation) != 6:
        return None
    row_dir, col_dir = orientation[:3], orientation[3:]
    i, j = column - 0.5, row - 0.5  # ImagePositionPatient is the centre of the first pixel
    return tuple(  # type: ignore[return-value]
        origin[a] + row_dir[a] * column_spacing * i + col_dir[a] * row_spacing * j for a in range(3)
    )


def _algorithm(model: ModelIdentity) -> AlgorithmIdentity:
    """The algorithm the results name: the checkpoint that ran, by its own card (name, version with the weights'
    sha256 prefix, the full sha256, device UID), whichever path chose it."""
    return AlgorithmIdentity(
        manufacturer=MANUFACTURER,
        model_name=model.name,
        software_version=model.software_version,
        model_version=model.checkpoint_version,
        device_uid=model.device_uid,
        weights_sha256=model.weights_sha256,
        phantom_only=model.phantom_only,
    )


class _TimeLimit(Exception):
    """The job ran past CCFNET_TASK_SOFT_TIME_LIMIT_SECONDS (checked between stages; Celery's own limits do not
    reach the embedded worker threads)."""


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds

    def check(self, stage: str) -> None:
        if time.monotonic() > self._end:
            raise _TimeLimit(f"time limit of {self.seconds:g} s reached {stage}")


def _write_results(
    settings: Settings, job_id: int, datasets: list[pydicom.Dataset]
) -> list[tuple[pydicom.Dataset, str, int]]:
    """Write each object durably (temp, fsync, rename) as results/<job id>/<SOPInstanceUID>.dcm.

    Called only while the job has no recorded result objects, so anything already in its folder is left by an
    interrupted attempt and is removed first.
    """
    store = Spool(results_root(settings), min_free_bytes=settings.min_free_disk_mb * 1024 * 1024)
    store.incoming.mkdir(parents=True, exist_ok=True)  # not prepare(): it would delete other jobs' temp files
    folder = store.root / str(job_id)
    shutil.rmtree(folder, ignore_errors=True)
    written = []
    for ds in datasets:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        name = validate_uid(ds.SOPInstanceUID, "SOPInstanceUID") + ".dcm"
        paths = SpoolPaths(final=folder / name, relative=f"{job_id}/{name}")
        size = store.write(paths, buffer.getvalue())
        written.append((ds, paths.relative, size))
    return written


def _finding_rows(analysis: StudyAnalysis) -> list[Finding]:
    rows = []
    for s in analysis.structures:
        patient = patient_coordinates(analysis.source, s.column, s.row)
        rows.append(Finding(
            structure=s.name, kind=s.kind, source_sop_instance_uid=analysis.centre_sop_instance_uid,
            column_px=s.column, row_px=s.row,
            patient_x_mm=patient[0] if patient else None,
            patient_y_mm=patient[1] if patient else None,
            patient_z_mm=patient[2] if patient else None,
            label=s.label, diagnosis=s.grade or s.diagnosis, probability=s.probability, confidence=s.confidence,
        ))
    return rows


def _analyse(
    ctx: JobContext, paths: list[Path], checkpoint: Path
) -> StudyAnalysis | NotLumbarSpine | JobOutcome:
    """Run the model on the study's files, or say how the job ends without findings."""
    settings = ctx.settings
    try:
        return core_bridge.analyse_files(
            paths, checkpoint, settings.model_device,
            with_heatmaps=settings.include_segmentation and settings.segmentation_type == "fractional",
        )
    except NotLumbarSpine as exc:
        return exc
    except NoEligibleInput as exc:
        log.info("job %d: no eligible series: %s", ctx.job_id, exc.reason)
        return JobOutcome(JobState.NO_ELIGIBLE_SERIES, error=exc.reason)
    except UnreadableInput as exc:
        return JobOutcome(JobState.FAILED, error=f"unreadable input: {exc}"[:2000])
    except ModelUnavailable as exc:
        return JobOutcome(JobState.FAILED, error=f"model unavailable: {exc}"[:2000])
    except ModelOutOfMemory as exc:
        raise RetryableJobError(f"device out of memory: {exc}") from exc


def process_job(ctx: JobContext) -> JobOutcome:
    """Run CCF-Net on one job's study and store what it found."""
    try:
        return _process(ctx, _Deadline(ctx.settings.task_soft_time_limit_seconds))
    except _TimeLimit as exc:
        log.error("job %d: %s", ctx.job_id, exc)
        return JobOutcome(JobState.FAILED, error=str(exc))


def _process(ctx: JobContext, deadline: _Deadline) -> JobOutcome:
    settings = ctx.settings
    with ctx.sessions.begin() as session:
        newer = repo.superseding_job(session, ctx.job_id)
        instances = repo.spooled_instances(session, ctx.study_id)
        stored_before = len(repo.result_objects_for_job(session, ctx.job_id))
        declined_before = next(
            (e.detail or {} for e in repo.job_events(session, ctx.job_id) if e.kind == DECLINED_EVENT), None
        )
        forced = repo.forced_model_path(session, ctx.job_id)  # `ccfnet reprocess --model` chose the checkpoint
    if newer is not None:
        return JobOutcome(JobState.SUPERSEDED, detail={"superseded_by": newer})
    if stored_before:
        # An earlier attempt committed the results and stopped before the hand-over: finish that, nothing else.
        _hand_over_to_export(ctx)
        if declined_before is not None:
            return JobOutcome(JobState.NOT_ANALYSED, error=str(declined_before.get("reason", "not analysed")),
                              detail={**declined_before, "objects": stored_before, "from_earlier_attempt": True})
        return JobOutcome(JobState.SUCCEEDED, detail={"objects": stored_before, "from_earlier_attempt": True})
    if not instances:
        return JobOutcome(JobState.NO_ELIGIBLE_SERIES, error="the study has no stored instances")
    spool_root = settings.spool_path.resolve()
    checkpoint = Path(forced) if forced is not None else model_path(settings)
    analysis = _analyse(ctx, [spool_root / item.path for item in instances], checkpoint)
    if isinstance(analysis, JobOutcome):
        return analysis
    if isinstance(analysis, NotLumbarSpine):
        return _declined(ctx, analysis)
    deadline.check("during inference")
    with ctx.sessions.begin() as session:
        newer = repo.superseding_job(session, ctx.job_id)
    if newer is not None:
        log.info("job %d: superseded by job %d during inference; results not written", ctx.job_id, newer)
        return JobOutcome(JobState.SUPERSEDED, detail={"superseded_by": newer, "results": "not written"})

    findings = [
        StructureFinding(
            name=s.name, kind=s.kind, point_px=(s.column, s.row),  # type: ignore[arg-type]
            label=s.grade_label or s.label,  # the stated grade ("abnormal" where none is supported)
            probability=s.probability, confidence=min(max(s.confidence, 0.0), 1.0),
        )
        for s in analysis.structures
    ]
    try:
        result = AnalysisResult(
            source_dataset=analysis.source, findings=tuple(findings),
            algorithm=_algorithm(analysis.model), heatmaps=analysis.heatmaps,
            level_warning=analysis.level_warning,
        )
        datasets = build_results(
            result, include_segmentation=settings.include_segmentation,
            segmentation_kind=settings.segmentation_type,
        )
    except (ValueError, TypeError) as exc:
        return JobOutcome(JobState.FAILED, error=f"cannot build result objects: {exc}"[:2000])
    deadline.check("while building result objects")
    try:
        written = _write_results(settings, ctx.job_id, datasets)
    except (SpoolError, OSError) as exc:
        raise RetryableJobError(f"writing result objects: {exc}") from exc

    now = ctx.clock()
    detail: dict[str, Any] = {
        "series_uid": analysis.series_uid, "source_sop_instance_uid": analysis.centre_sop_instance_uid,
        "selection": analysis.selection_reason, "objects": len(written),
        "inference_seconds": round(analysis.seconds, 3), "device": analysis.device, "model": analysis.model.path,
    }
    if analysis.skipped_files:
        detail["unreadable_files"] = list(analysis.skipped_files[:20])
    if analysis.gate:
        detail["anatomy_gate"] = analysis.gate
    with ctx.sessions.begin() as session:
        newer = repo.superseding_job_locked(session, ctx.job_id)
        repo.replace_findings(session, ctx.job_id, _finding_rows(analysis))
        for ds, relative, size in written:
            repo.add_result_object(session, ResultObject(
                job_id=ctx.job_id, kind=RESULT_KINDS.get(str(ds.SOPClassUID), "other"),
                sop_class_uid=str(ds.SOPClassUID), sop_instance_uid=str(ds.SOPInstanceUID),
                series_instance_uid=str(ds.SeriesInstanceUID), path=relative, size_bytes=size, created_at=now,
            ))
        repo.add_job_event(session, ctx.job_id, "results_written", now=now, detail=detail)
    metrics.observe_inference(analysis.seconds)  # metrics hook
    if newer is not None:
        log.info("job %d: superseded by job %d while running; results kept, not exported", ctx.job_id, newer)
        return JobOutcome(JobState.SUPERSEDED, detail={"superseded_by": newer, "results": "stored, not exported"})
    _hand_over_to_export(ctx)
    return JobOutcome(JobState.SUCCEEDED, detail={"objects": len(written),
                                                  "inference_seconds": round(analysis.seconds, 3)})


def _declined(ctx: JobContext, declined: NotLumbarSpine) -> JobOutcome:
    """The anatomy gate declined the study: no findings; unless CCFNET_DECLINED_SR=false, a "not analysed" SR
    written, recorded and exported like any result object, so the radiologist sees that the AI looked and why
    it stopped. The reason is the job's error; logs name only the rule (descriptions may hold anything)."""
    settings = ctx.settings
    log.info("job %d: not analysed, the anatomy gate declined it (%s)", ctx.job_id, declined.rule)
    metrics.anatomy_gate_declined(declined.rule)
    detail: dict[str, Any] = {"rule": declined.rule, "reason": declined.reason, "series_uid": declined.series_uid}
    if declined.measurements:
        detail["measurements"] = {k: round(v, 3) for k, v in declined.measurements.items()}
    if not settings.declined_sr:
        return JobOutcome(JobState.NOT_ANALYSED, error=declined.reason, detail={**detail, "objects": 0})
    with ctx.sessions.begin() as session:
        newer = repo.superseding_job(session, ctx.job_id)
    if newer is not None:
        return JobOutcome(JobState.SUPERSEDED, detail={"superseded_by": newer, "results": "not written"})
    try:
        report = build_declined_sr(DeclinedStudy(
            source_dataset=declined.source, algorithm=_algorithm(declined.model),
            reason=declined.reason,
        ))
    except (ValueError, TypeError) as exc:
        log.warning("job %d: the not-analysed SR could not be built: %s", ctx.job_id, exc)
        return JobOutcome(JobState.NOT_ANALYSED, error=declined.reason,
                          detail={**detail, "objects": 0, "report_error": str(exc)[:500]})
    try:
        written = _write_results(settings, ctx.job_id, [report])
    except (SpoolError, OSError) as exc:
        raise RetryableJobError(f"writing the not-analysed SR: {exc}") from exc
    now = ctx.clock()
    with ctx.sessions.begin() as session:
        newer = repo.superseding_job_locked(session, ctx.job_id)
        for ds, relative, size in written:
            repo.add_result_object(session, ResultObject(
                job_id=ctx.job_id, kind=RESULT_KINDS[str(ds.SOPClassUID)], sop_class_uid=str(ds.SOPClassUID),
                sop_instance_uid=str(ds.SOPInstanceUID), series_instance_uid=str(ds.SeriesInstanceUID),
                path=relative, size_bytes=size, created_at=now,
            ))
        repo.add_job_event(session, ctx.job_id, DECLINED_EVENT, now=now, detail=detail)
    if newer is not None:
        return JobOutcome(JobState.SUPERSEDED, detail={"superseded_by": newer, "results": "stored, not exported"})
    _hand_over_to_export(ctx)
    return JobOutcome(JobState.NOT_ANALYSED, error=declined.reason, detail={**detail, "objects": len(written)})


def _hand_over_to_export(ctx: JobContext) -> None:
    """Create the job's exports (worker.export.queue) and publish them through the running task's Celery app
    when there is one. A broker that is down is not the job's failure: the export reconciler publishes
    pending exports later."""
    if not ctx.settings.destinations:
        return
    from celery import current_task
    from kombu.exceptions import OperationalError as BrokerError

    from worker.export.queue import enqueue_exports

    app = current_task.app if current_task else None
    try:
        enqueue_exports(ctx.settings, ctx.sessions, ctx.job_id, app, ctx.clock)
    except BrokerError as exc:
        log.warning("job %d: exports recorded, publishing deferred to the reconciler: %s", ctx.job_id, exc)


def inference_processor(settings: Settings) -> JobProcessor:
    """The processor `ccfnet worker` and the embedded worker threads run (worker.queue.processing)."""
    return process_job
