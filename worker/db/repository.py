"""Every SQL statement the service issues, as plain functions over a session (the one package that does SQL).

Functions take an open session and leave committing to the caller, so one transaction can span several.
Statements that must be safe with several listeners and workers against one database are single atomic
UPDATEs or INSERT ... ON CONFLICT, which behave the same on PostgreSQL and SQLite.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Insert, Select, case, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from worker.db.models import (
    Association,
    AssociationState,
    Export,
    ExportAttempt,
    ExportState,
    Finding,
    Instance,
    Job,
    JobEvent,
    JobState,
    QueueControl,
    ResultObject,
    Series,
    Study,
    StudyState,
)


def _insert(session: Session, table: Any) -> Any:
    """A dialect-specific INSERT that supports ``on_conflict_*`` on both PostgreSQL and SQLite."""
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"unsupported database dialect {name!r}")


# Associations ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AssociationRecord:
    listener: str
    calling_ae: str
    called_ae: str
    peer_address: str
    peer_port: int
    tls: bool


def record_association(
    session: Session,
    rec: AssociationRecord,
    *,
    state: AssociationState,
    now: dt.datetime,
    reject_reason: str | None = None,
) -> int:
    row = Association(
        listener=rec.listener,
        calling_ae=rec.calling_ae,
        called_ae=rec.called_ae,
        peer_address=rec.peer_address,
        peer_port=rec.peer_port,
        tls=rec.tls,
        state=state.value,
        reject_reason=reject_reason,
        started_at=now,
        ended_at=None if state is AssociationState.ACCEPTED else now,
        instances_stored=0,
        instances_failed=0,
    )
    session.add(row)
    session.flush()
    return row.id


def end_association(
    session: Session,
    association_id: int,
    *,
    state: AssociationState,
    stored: int,
    failed: int,
    now: dt.datetime,
    reason: str | None = None,
) -> None:
    """Close an association's row; `reason` says why an aborted one ended (kept in ``reject_reason``)."""
    session.execute(
        update(Association)
        .where(Association.id == association_id)
        .values(
            state=state.value, ended_at=now, instances_stored=stored, instances_failed=failed, reject_reason=reason
        )
    )


def open_associations(session: Session) -> Sequence[Association]:
    """Associations accepted and not yet ended, oldest first."""
    return session.scalars(
        select(Association)
        .where(Association.state == AssociationState.ACCEPTED.value, Association.ended_at.is_(None))
        .order_by(Association.started_at)
    ).all()


def refused_association_counts(session: Session, since: dt.datetime) -> dict[str, int]:
    """Rejected connections and associations aborted with a reason since `since`, by ``state:reason``."""
    rows = session.execute(
        select(Association.state, Association.reject_reason, func.count(Association.id))
        .where(
            Association.started_at >= since,
            Association.state.in_([AssociationState.REJECTED.value, AssociationState.ABORTED.value]),
            Association.reject_reason.is_not(None),
        )
        .group_by(Association.state, Association.reject_reason)
    ).all()
    return {f"{state}:{reason}": int(count) for state, reason, count in rows}


# Instances ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InstanceRecord:
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    size_bytes: int
    path: str
    calling_ae: str
    peer_address: str
    association_id: int | None
    modality: str | None = None
    series_number: int | None = None


@dataclass(frozen=True)
class RecordedInstance:
    instance_id: int
    study_id: int
    receive_count: int


def find_instance_path(session: Session, sop_instance_uid: str) -> str | None:
    return session.scalar(select(Instance.path).where(Instance.sop_instance_uid == sop_instance_uid))


class ConflictingInstanceError(ValueError):
    """The SOP Instance UID is already recorded in another study or series."""


def record_instance(
    session: Session, rec: InstanceRecord, *, now: dt.datetime, move: bool = False
) -> RecordedInstance:
    """Upsert study, series and instance; any arrival (re)opens the study and restarts its quiet period.

    The study row is written first so that a concurrent sweeper either sees this arrival or has already
    assembled the study, in which case this arrival reopens it. An instance already recorded at another
    path (another study or series) raises :class:`ConflictingInstanceError` unless `move`.
    """
    stmt = _insert(session, Study).values(
        study_instance_uid=rec.study_instance_uid,
        state=StudyState.RECEIVING.value,
        first_received_at=now,
        last_received_at=now,
        quiet_since=now,
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=[Study.study_instance_uid],
        set_={"state": StudyState.RECEIVING.value, "last_received_at": now, "quiet_since": now},
    ).returning(Study.id)
    study_id: int = session.execute(stmt).scalar_one()

    stmt = _insert(session, Series).values(
        study_id=study_id,
        series_instance_uid=rec.series_instance_uid,
        modality=rec.modality,
        series_number=rec.series_number,
        first_received_at=now,
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=[Series.series_instance_uid],
        set_={"modality": stmt.excluded.modality, "series_number": stmt.excluded.series_number},
    ).returning(Series.id)
    series_id: int = session.execute(stmt).scalar_one()

    values = {
        "study_id": study_id,
        "series_id": series_id,
        "association_id": rec.association_id,
        "sop_instance_uid": rec.sop_instance_uid,
        "sop_class_uid": rec.sop_class_uid,
        "transfer_syntax_uid": rec.transfer_syntax_uid,
        "size_bytes": rec.size_bytes,
        "path": rec.path,
        "calling_ae": rec.calling_ae,
        "peer_address": rec.peer_address,
        "received_at": now,
    }
    stmt = _insert(session, Instance).values(**values, first_received_at=now, receive_count=1)
    update_values = {k: v for k, v in values.items() if k != "sop_instance_uid"}
    stmt = stmt.on_conflict_do_update(
        index_elements=[Instance.sop_instance_uid],
        set_={**update_values, "receive_count": Instance.receive_count + 1},
        where=None if move else Instance.path == stmt.excluded.path,
    ).returning(Instance.id, Instance.receive_count)
    row = session.execute(stmt).one_or_none()
    if row is None:
        raise ConflictingInstanceError("SOP Instance UID already recorded in another study or series")
    instance_id, receive_count = row
    return RecordedInstance(instance_id=instance_id, study_id=study_id, receive_count=receive_count)


def restart_quiet_clock(session: Session, *, now: dt.datetime) -> int:
    """Studies still receiving start their quiet period again (a listener just (re)started)."""
    result = session.execute(
        update(Study)
        .where(Study.state == StudyState.RECEIVING.value, Study.quiet_since < now)
        .values(quiet_since=now)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def count_instances(session: Session, study_instance_uid: str | None = None) -> int:
    stmt: Select[tuple[int]] = select(func.count(Instance.id))
    if study_instance_uid is not None:
        stmt = stmt.join(Study, Study.id == Instance.study_id).where(
            Study.study_instance_uid == study_instance_uid
        )
    return int(session.scalar(stmt) or 0)


# Study assembly -------------------------------------------------------------------------------------------
def stable_study_ids(session: Session, *, cutoff: dt.datetime, limit: int) -> list[int]:
    return list(
        session.scalars(
            select(Study.id)
            .where(Study.state == StudyState.RECEIVING.value, Study.quiet_since <= cutoff)
            .order_by(Study.quiet_since)
            .limit(limit)
        )
    )


def claim_stable_study(session: Session, study_id: int, *, cutoff: dt.datetime, now: dt.datetime) -> bool:
    """Atomically move one quiet study from receiving to assembled; False if another sweeper got it first
    or an instance arrived in the meantime."""
    result = session.execute(
        update(Study)
        .where(Study.id == study_id, Study.state == StudyState.RECEIVING.value, Study.quiet_since <= cutoff)
        .values(state=StudyState.ASSEMBLED.value, assembled_at=now)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def study_uid_and_sop_uids(session: Session, study_id: int) -> tuple[str, list[str]]:
    study_uid = session.execute(select(Study.study_instance_uid).where(Study.id == study_id)).scalar_one()
    uids = list(
        session.scalars(
            select(Instance.sop_instance_uid)
            .where(Instance.study_id == study_id)
            .order_by(Instance.sop_instance_uid)
        )
    )
    return study_uid, uids


# Jobs -----------------------------------------------------------------------------------------------------
def add_job_event(
    session: Session, job_id: int, kind: str, *, now: dt.datetime, detail: dict[str, Any] | None = None
) -> None:
    session.add(JobEvent(job_id=job_id, at=now, kind=kind, detail=detail))


def create_job(
    session: Session,
    *,
    study_id: int,
    idempotency_key: str,
    model_version: str,
    queue: str,
    instance_count: int,
    now: dt.datetime,
) -> int | None:
    """Insert a queued job; None when a job with this idempotency key already exists."""
    stmt: Insert = _insert(session, Job).values(
        study_id=study_id,
        idempotency_key=idempotency_key,
        model_version=model_version,
        state=JobState.QUEUED.value,
        queue=queue,
        instance_count=instance_count,
        created_at=now,
        updated_at=now,
        publish_count=0,
        attempts=0,
    )
    stmt = stmt.on_conflict_do_nothing(index_elements=[Job.idempotency_key]).returning(Job.id)  # type: ignore[attr-defined]
    job_id = session.execute(stmt).scalar_one_or_none()
    if job_id is not None:
        add_job_event(session, job_id, "created", now=now, detail={"instances": instance_count})
    return job_id


def supersede_older_jobs(session: Session, *, study_id: int, new_job_id: int, now: dt.datetime) -> list[int]:
    """Point every earlier job of the study at the new one; those not yet started will not run."""
    older = list(
        session.scalars(
            select(Job.id).where(Job.study_id == study_id, Job.id != new_job_id, Job.superseded_by.is_(None))
        )
    )
    if not older:
        return []
    session.execute(
        update(Job)
        .where(Job.id.in_(older))
        .values(
            superseded_by=new_job_id,
            updated_at=now,
            state=case((Job.state == JobState.QUEUED.value, JobState.SUPERSEDED.value), else_=Job.state),
        )
    )
    for job_id in older:
        add_job_event(session, job_id, "superseded", now=now, detail={"by": new_job_id})
    return older


def get_job(session: Session, job_id: int) -> Job | None:
    return session.get(Job, job_id)


def jobs_for_study(session: Session, study_instance_uid: str) -> Sequence[Job]:
    return session.scalars(
        select(Job)
        .join(Study, Study.id == Job.study_id)
        .where(Study.study_instance_uid == study_instance_uid)
        .order_by(Job.id)
    ).all()


def job_events(session: Session, job_id: int) -> Sequence[JobEvent]:
    return session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)).all()


def mark_published(session: Session, job_id: int, *, now: dt.datetime, reason: str) -> int | None:
    """Record a publish of a still-queued job; return its publish number (None if no longer queued)."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.QUEUED.value)
        .values(publish_count=Job.publish_count + 1, published_at=now, updated_at=now)
        .returning(Job.publish_count)
    )
    count = result.scalar_one_or_none()
    if count is not None:
        add_job_event(session, job_id, "published", now=now, detail={"n": count, "reason": reason})
    return count


def claim_job(
    session: Session, job_id: int, *, now: dt.datetime, lease: dt.timedelta, worker: str, task_id: str | None
) -> bool:
    """queued -> running in one atomic UPDATE (or take over a running job whose lease ran out).

    Exactly one of several deliveries of the same job wins; the others see False and do nothing.
    """
    result = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            (Job.state == JobState.QUEUED.value)
            | ((Job.state == JobState.RUNNING.value) & (Job.lease_expires_at < now)),
        )
        .values(
            state=JobState.RUNNING.value,
            claimed_at=now,
            lease_expires_at=now + lease,
            attempts=Job.attempts + 1,
            updated_at=now,
        )
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    add_job_event(session, job_id, "picked_up", now=now, detail={"worker": worker, "task_id": task_id})
    return True


def finish_job(
    session: Session,
    job_id: int,
    *,
    state: JobState,
    now: dt.datetime,
    error: str | None = None,
    detail: dict[str, Any] | None = None,
) -> bool:
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.RUNNING.value)
        .values(state=state.value, finished_at=now, updated_at=now, error=error, lease_expires_at=None)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    event_detail: dict[str, Any] = {"state": state.value, **(detail or {})}
    if error:
        event_detail["error"] = error
    add_job_event(session, job_id, "finished", now=now, detail=event_detail)
    return True


def release_job(session: Session, job_id: int, *, now: dt.datetime, reason: str) -> bool:
    """running -> queued after a retryable failure, so the next delivery can claim it again."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.RUNNING.value)
        .values(state=JobState.QUEUED.value, lease_expires_at=None, updated_at=now)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    add_job_event(session, job_id, "retry", now=now, detail={"reason": reason})
    return True


@dataclass(frozen=True)
class QueuedJob:
    job_id: int
    queue: str
    published_at: dt.datetime | None


def queued_jobs_published_before(
    session: Session, *, cutoff: dt.datetime, also: Collection[int] = (), limit: int = 1000
) -> list[QueuedJob]:
    """Queued jobs last published before `cutoff` (or never, and untouched since), and the queued jobs `also`."""
    rows = session.execute(
        select(Job.id, Job.queue, Job.published_at)
        .where(
            Job.state == JobState.QUEUED.value,
            # Never published: give the sweeper that just made it the same grace to publish it itself.
            (Job.published_at.is_(None) & (Job.updated_at <= cutoff))
            | (Job.published_at <= cutoff)
            | Job.id.in_(list(also)),
        )
        .order_by(Job.id)
        .limit(limit)
    ).all()
    return [QueuedJob(job_id=r[0], queue=r[1], published_at=r[2]) for r in rows]


def requeue_expired_leases(session: Session, *, now: dt.datetime) -> list[int]:
    """Running jobs whose worker vanished past its lease go back to queued (the reconciler republishes)."""
    ids = list(
        session.scalars(select(Job.id).where(Job.state == JobState.RUNNING.value, Job.lease_expires_at < now))
    )
    for job_id in ids:
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.RUNNING.value, Job.lease_expires_at < now)
            .values(state=JobState.QUEUED.value, published_at=None, updated_at=now)
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            add_job_event(session, job_id, "lease_expired", now=now)
    return ids


def job_state_counts(session: Session) -> dict[str, int]:
    return {
        state: int(n) for state, n in session.execute(select(Job.state, func.count()).group_by(Job.state))
    }


# Findings and result objects --------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpooledInstance:
    series_instance_uid: str
    sop_instance_uid: str
    path: str  # relative to the spool folder


def spooled_instances(session: Session, study_id: int) -> list[SpooledInstance]:
    """Every instance of a study with its series, as the worker reads them from the spool."""
    rows = session.execute(
        select(Series.series_instance_uid, Instance.sop_instance_uid, Instance.path)
        .join(Series, Series.id == Instance.series_id)
        .where(Instance.study_id == study_id)
        .order_by(Series.series_instance_uid, Instance.sop_instance_uid)
    )
    return [SpooledInstance(*row) for row in rows]


def superseding_job(session: Session, job_id: int) -> int | None:
    """The id of the newer job that replaced this one, if any."""
    return session.execute(select(Job.superseded_by).where(Job.id == job_id)).scalar_one_or_none()


def superseding_job_locked(session: Session, job_id: int) -> int | None:
    """Like `superseding_job`, holding the job row until the transaction ends (PostgreSQL), so a supersede
    cannot slip in between this check and the results being recorded."""
    return session.execute(
        select(Job.superseded_by).where(Job.id == job_id).with_for_update()
    ).scalar_one_or_none()


def replace_findings(session: Session, job_id: int, findings: Sequence[Finding]) -> None:
    """Store a job's findings; a retried job replaces what an earlier attempt stored."""
    for old in session.scalars(select(Finding).where(Finding.job_id == job_id)):
        session.delete(old)
    session.flush()
    for finding in findings:
        finding.job_id = job_id
        session.add(finding)


def add_result_object(session: Session, result: ResultObject) -> None:
    session.add(result)


def job_of_result_object(session: Session, sop_instance_uid: str) -> int | None:
    """The job that wrote the result object with this SOP Instance UID, if we wrote one."""
    return session.scalar(select(ResultObject.job_id).where(ResultObject.sop_instance_uid == sop_instance_uid))


def findings_for_job(session: Session, job_id: int) -> Sequence[Finding]:
    return session.scalars(select(Finding).where(Finding.job_id == job_id).order_by(Finding.id)).all()


def result_objects_for_job(session: Session, job_id: int) -> Sequence[ResultObject]:
    return session.scalars(
        select(ResultObject).where(ResultObject.job_id == job_id).order_by(ResultObject.id)
    ).all()


# Exports ------------------------------------------------------------------------------------------------------
def create_exports(session: Session, job_id: int, destinations: Sequence[str], *, now: dt.datetime) -> list[int]:
    """One pending export per (result object of the job, destination); existing ones are left as they are."""
    objects = result_objects_for_job(session, job_id)
    existing = {
        (e.result_object_id, e.destination)
        for e in session.scalars(select(Export).where(Export.job_id == job_id))
    }
    created = []
    for obj in objects:
        for name in destinations:
            if (obj.id, name) in existing:
                continue
            export = Export(
                job_id=job_id, result_object_id=obj.id, destination=name, state=ExportState.PENDING.value,
                attempts=0, next_attempt_at=now, created_at=now, updated_at=now,
            )
            session.add(export)
            session.flush()
            created.append(export.id)
    return created


def mark_export_published(session: Session, export_id: int, *, due: dt.datetime) -> None:
    """Remember when the export's latest message is due to run (now, or now + its countdown): the export
    reconciler republishes only exports whose message is overdue by its grace period."""
    session.execute(update(Export).where(Export.id == export_id).values(published_at=due))


def _claim_one(session: Session, export_id: int, now: dt.datetime, *extra: Any) -> bool:
    """pending and due -> sending, as one conditional update: of two exporters only one wins the row, and a
    delivered or dead export is never claimed."""
    result = session.execute(
        update(Export)
        .where(Export.id == export_id, Export.state == ExportState.PENDING.value, Export.next_attempt_at <= now,
               *extra)
        .values(state=ExportState.SENDING.value, attempts=Export.attempts + 1, updated_at=now)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def claim_exports(session: Session, export_id: int, *, now: dt.datetime) -> list[tuple[Export, ResultObject]]:
    """Claim `export_id` and, with it, the other due pending exports of the same job to the same destination,
    so that they travel together (one association, one STOW-RS request). Empty when `export_id` itself is not
    claimable (delivered, dead, sending elsewhere, or not yet due)."""
    if not _claim_one(session, export_id, now):
        return []
    first = session.get(Export, export_id)
    assert first is not None
    # The only wait is on the first row, before this transaction holds any other: siblings that another
    # exporter has locked are skipped, not waited for, so two exporters never wait on each other in a cycle.
    siblings = session.scalars(
        select(Export.id).where(
            Export.job_id == first.job_id, Export.destination == first.destination, Export.id != export_id,
            Export.state == ExportState.PENDING.value, Export.next_attempt_at <= now,
        ).order_by(Export.id).with_for_update(skip_locked=True)
    ).all()
    claimed = [export_id] + [sid for sid in siblings if _claim_one(session, sid, now)]
    rows = []
    for cid in claimed:
        export = session.get(Export, cid)
        assert export is not None
        session.refresh(export)
        obj = session.get(ResultObject, export.result_object_id)
        assert obj is not None
        rows.append((export, obj))
    return rows


def record_export_attempt(
    session: Session,
    export_id: int,
    *,
    started: dt.datetime,
    finished: dt.datetime,
    outcome: str,
    status_code: int | None,
    error: str | None,
) -> None:
    session.add(ExportAttempt(
        export_id=export_id, started_at=started, finished_at=finished, outcome=outcome,
        status_code=status_code, error=error,
    ))


def finish_export(
    session: Session,
    export_id: int,
    *,
    delivered: bool,
    now: dt.datetime,
    error: str | None,
    max_attempts: int,
    backoff: Callable[[int], float],
) -> tuple[str, float | None]:
    """sending -> delivered, or back to pending after `backoff(attempts)` seconds, or dead after max_attempts.

    Returns the new state and, for pending, the delay until the next attempt."""
    export = session.get(Export, export_id)
    assert export is not None
    export.updated_at = now
    if delivered:
        export.state, export.delivered_at, export.last_error = ExportState.DELIVERED.value, now, None
        return export.state, None
    export.last_error = error
    if export.attempts >= max_attempts:
        export.state = ExportState.DEAD.value
        return export.state, None
    delay = backoff(export.attempts)
    export.state = ExportState.PENDING.value
    export.next_attempt_at = now + dt.timedelta(seconds=delay)
    return export.state, delay


def due_exports(session: Session, *, now: dt.datetime, published_before: dt.datetime) -> list[int]:
    """Pending exports whose attempt is due and whose message is missing or overdue (the export reconciler)."""
    return list(session.scalars(
        select(Export.id).where(
            Export.state == ExportState.PENDING.value,
            Export.next_attempt_at <= now,
            (Export.published_at.is_(None)) | (Export.published_at < published_before),
        ).order_by(Export.id)
    ))


def requeue_stuck_exports(session: Session, *, updated_before: dt.datetime, now: dt.datetime) -> int:
    """An exporter that died while sending leaves `sending`: give it back to pending (it was not delivered)."""
    result = session.execute(
        update(Export)
        .where(Export.state == ExportState.SENDING.value, Export.updated_at < updated_before)
        .values(state=ExportState.PENDING.value, next_attempt_at=now, updated_at=now)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def exports_for_job(session: Session, job_id: int) -> Sequence[Export]:
    return session.scalars(select(Export).where(Export.job_id == job_id).order_by(Export.id)).all()


def export_attempts(session: Session, export_id: int) -> Sequence[ExportAttempt]:
    return session.scalars(
        select(ExportAttempt).where(ExportAttempt.export_id == export_id).order_by(ExportAttempt.id)
    ).all()


def revive_dead_exports(session: Session, *, job_id: int | None, now: dt.datetime) -> list[int]:
    """dead -> pending (attempts reset) for one job or all; delivered exports are never touched."""
    query = select(Export.id).where(Export.state == ExportState.DEAD.value).order_by(Export.id).with_for_update()
    if job_id is not None:
        query = query.where(Export.job_id == job_id)
    ids = list(session.scalars(query))
    if ids:
        session.execute(
            update(Export).where(Export.id.in_(ids), Export.state == ExportState.DEAD.value)
            .values(state=ExportState.PENDING.value, attempts=0, next_attempt_at=now, updated_at=now)
        )
    return ids


def exports_by_id(session: Session, export_ids: Sequence[int]) -> list[Export]:
    return list(session.scalars(select(Export).where(Export.id.in_(list(export_ids))).order_by(Export.id)))


def last_instance_received_at(session: Session, study_id: int) -> dt.datetime | None:
    """When the study's most recent instance was stored (the end of its transfer)."""
    return session.execute(select(func.max(Instance.received_at)).where(Instance.study_id == study_id)).scalar()


# Operations -----------------------------------------------------------------------------------------------
def oldest(session: Session, column: Any, *conditions: Any) -> dt.datetime | None:
    return session.execute(select(func.min(column)).where(*conditions)).scalar()


def waiting_studies(session: Session) -> tuple[int, dt.datetime | None]:
    """Studies still receiving (not yet a job): how many, and since when the oldest has been waiting."""
    condition = Study.state == StudyState.RECEIVING.value
    count = session.execute(select(func.count()).select_from(Study).where(condition)).scalar_one()
    return int(count), oldest(session, Study.first_received_at, condition)


def oldest_queued_job(session: Session) -> dt.datetime | None:
    return oldest(session, Job.created_at, Job.state == JobState.QUEUED.value)


def jobs_finished_since(session: Session, since: dt.datetime, state: str) -> int:
    return int(session.execute(
        select(func.count()).select_from(Job).where(Job.state == state, Job.finished_at >= since)
    ).scalar_one())


def recent_failures(session: Session, limit: int = 10) -> list[tuple[int, str, str | None, dt.datetime | None]]:
    rows = session.execute(
        select(Job.id, Study.study_instance_uid, Job.error, Job.finished_at)
        .join(Study, Study.id == Job.study_id)
        .where(Job.state.in_([JobState.FAILED.value, JobState.NO_ELIGIBLE_SERIES.value]))
        .order_by(Job.finished_at.desc(), Job.id.desc())
        .limit(limit)
    )
    return [(int(r[0]), str(r[1]), r[2], r[3]) for r in rows]


def export_state_counts(session: Session) -> dict[str, int]:
    return {s: int(n) for s, n in session.execute(select(Export.state, func.count()).group_by(Export.state))}


def dead_exports(session: Session, limit: int = 50) -> list[Export]:
    return list(session.scalars(
        select(Export).where(Export.state == ExportState.DEAD.value).order_by(Export.id).limit(limit)
    ))


def list_jobs(
    session: Session, *, state: str | None = None, since: dt.datetime | None = None, limit: int | None = None
) -> list[tuple[Job, str]]:
    """Jobs (newest first) with their StudyInstanceUID; all of them unless `limit` is given."""
    query = select(Job, Study.study_instance_uid).join(Study, Study.id == Job.study_id)
    if state:
        query = query.where(Job.state == state)
    if since:
        query = query.where(Job.created_at >= since)
    return [(job, str(uid)) for job, uid in session.execute(query.order_by(Job.id.desc()).limit(limit))]


def study_by_uid(session: Session, study_instance_uid: str) -> Study | None:
    return session.scalars(select(Study).where(Study.study_instance_uid == study_instance_uid)).first()


def studies_for_reprocess(
    session: Session,
    *,
    uids: Sequence[str] = (),
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    last_job_state: str | None = None,
) -> list[Study]:
    """Studies chosen by UID, by receipt time, or by the state of their latest job."""
    query = select(Study)
    if uids:
        query = query.where(Study.study_instance_uid.in_(list(uids)))
    if since:
        query = query.where(Study.last_received_at >= since)
    if until:
        query = query.where(Study.last_received_at < until)
    studies = list(session.scalars(query.order_by(Study.id)))
    if last_job_state:
        latest = {}
        for job in session.scalars(select(Job).order_by(Job.id)):
            latest[job.study_id] = job.state
        studies = [s for s in studies if latest.get(s.id) == last_job_state]
    return studies


# Queue controls and the ops page ---------------------------------------------------------------------------
def queue_paused(session: Session, queue: str) -> bool:
    return bool(session.execute(select(QueueControl.paused).where(QueueControl.queue == queue)).scalar())


def paused_queues(session: Session) -> set[str]:
    return set(session.scalars(select(QueueControl.queue).where(QueueControl.paused.is_(True))))


def set_queue_paused(session: Session, queue: str, *, paused: bool, now: dt.datetime) -> None:
    statement = _insert(session, QueueControl).values(queue=queue, paused=paused, changed_at=now)
    session.execute(
        statement.on_conflict_do_update(index_elements=[QueueControl.queue], set_={"paused": paused,
                                                                                   "changed_at": now})
    )


def queued_jobs_of_queue(session: Session, queue: str) -> list[int]:
    return list(session.scalars(
        select(Job.id).where(Job.state == JobState.QUEUED.value, Job.queue == queue).order_by(Job.id)
    ))


def get_export(session: Session, export_id: int) -> Export | None:
    return session.get(Export, export_id)


def revive_dead_export(session: Session, export_id: int, *, now: dt.datetime) -> bool:
    """One dead export -> pending with its attempts reset; False when it is not dead."""
    result = session.execute(
        update(Export).where(Export.id == export_id, Export.state == ExportState.DEAD.value)
        .values(state=ExportState.PENDING.value, attempts=0, next_attempt_at=now, updated_at=now)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def mark_study_assembled(session: Session, study_id: int, *, now: dt.datetime) -> None:
    """A study handed to a batch job directly: the sweeper must not also make a live job of it."""
    session.execute(
        update(Study).where(Study.id == study_id).values(state=StudyState.ASSEMBLED.value, assembled_at=now)
    )


def get_study(session: Session, study_id: int) -> Study | None:
    return session.get(Study, study_id)


def job_with_study(session: Session, job_id: int) -> tuple[Job, str] | None:
    row = session.execute(
        select(Job, Study.study_instance_uid).join(Study, Study.id == Job.study_id).where(Job.id == job_id)
    ).first()
    return (row[0], str(row[1])) if row else None


def forced_model_path(session: Session, job_id: int) -> str | None:
    """The checkpoint `ccfnet reprocess --model` chose for this job, if any (from its `reprocess` event)."""
    details = session.scalars(
        select(JobEvent.detail).where(JobEvent.job_id == job_id, JobEvent.kind == "reprocess")
        .order_by(JobEvent.id.desc())
    )
    for detail in details:
        if isinstance(detail, dict) and isinstance(detail.get("model"), str):
            return str(detail["model"])
    return None
