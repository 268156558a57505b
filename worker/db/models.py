"""SQLAlchemy 2 models: the record of every association, instance, study and job.

The schema only changes through a migration in ``migrations/versions``; a test checks that these models and
the migrations agree.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from worker.db.types import BigId, UTCDateTime

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class StudyState(enum.StrEnum):
    RECEIVING = "receiving"  # instances arriving; becomes a job once quiet
    ASSEMBLED = "assembled"  # turned into a job (or matched an existing one); reopens on a late arrival


class AssociationState(enum.StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    RELEASED = "released"
    ABORTED = "aborted"


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    PICKED_UP = "picked_up"  # reached a worker that has no processor installed yet
    SUCCEEDED = "succeeded"
    NO_ELIGIBLE_SERIES = "no_eligible_series"
    NOT_ANALYSED = "not_analysed"  # the anatomy gate declined it: not a sagittal lumbar spine MR; no findings
    FAILED = "failed"
    SUPERSEDED = "superseded"  # a newer job for the same study replaced it before it ran


TERMINAL_JOB_STATES = frozenset(
    {
        JobState.PICKED_UP,
        JobState.SUCCEEDED,
        JobState.NO_ELIGIBLE_SERIES,
        JobState.NOT_ANALYSED,
        JobState.FAILED,
        JobState.SUPERSEDED,
    }
)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Association(Base):
    """One DICOM association request, accepted or rejected."""

    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    listener: Mapped[str] = mapped_column(String(128))
    calling_ae: Mapped[str] = mapped_column(String(16))
    called_ae: Mapped[str] = mapped_column(String(16))
    peer_address: Mapped[str] = mapped_column(String(64))
    peer_port: Mapped[int] = mapped_column(Integer)
    tls: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    state: Mapped[str] = mapped_column(String(16))
    reject_reason: Mapped[str | None] = mapped_column(String(200))
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    ended_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    instances_stored: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    instances_failed: Mapped[int] = mapped_column(Integer, server_default=text("0"))


class Study(Base):
    __tablename__ = "studies"
    __table_args__ = (Index("ix_studies_state_quiet_since", "state", "quiet_since"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    state: Mapped[str] = mapped_column(String(16))
    first_received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    last_received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    # The quiet period counts from here: the last arrival, or a listener restart, whichever is later.
    quiet_since: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    assembled_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    first_received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    association_id: Mapped[int | None] = mapped_column(
        ForeignKey("associations.id", ondelete="SET NULL"), index=True
    )
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    path: Mapped[str] = mapped_column(String(256))  # relative to the spool folder
    calling_ae: Mapped[str] = mapped_column(String(16))
    peer_address: Mapped[str] = mapped_column(String(64))
    first_received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    receive_count: Mapped[int] = mapped_column(Integer, server_default=text("1"))


class Job(Base):
    """One analysis of one exact set of instances with one model version."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    # sha256 over study UID, sorted SOP Instance UIDs and model version: the same input never runs twice.
    idempotency_key: Mapped[str] = mapped_column(String(64), unique=True)
    model_version: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(24), index=True)
    queue: Mapped[str] = mapped_column(String(16))
    instance_count: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    published_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    publish_count: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    claimed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    superseded_by: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    error: Mapped[str | None] = mapped_column(Text)


class JobEvent(Base):
    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    kind: Mapped[str] = mapped_column(String(32))
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class Finding(Base):
    """One of the 11 structures the model reported for a job: where it is and what it looks like."""

    __tablename__ = "findings"
    __table_args__ = (UniqueConstraint("job_id", "structure"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    structure: Mapped[str] = mapped_column(String(8))
    kind: Mapped[str] = mapped_column(String(10))
    source_sop_instance_uid: Mapped[str] = mapped_column(String(64))
    column_px: Mapped[float] = mapped_column(Float)
    row_px: Mapped[float] = mapped_column(Float)
    patient_x_mm: Mapped[float | None] = mapped_column(Float)
    patient_y_mm: Mapped[float | None] = mapped_column(Float)
    patient_z_mm: Mapped[float | None] = mapped_column(Float)
    label: Mapped[str] = mapped_column(String(4))
    diagnosis: Mapped[str] = mapped_column(String(32))
    probability: Mapped[float] = mapped_column(Float)
    confidence: Mapped[float] = mapped_column(Float)


class ResultObject(Base):
    """A DICOM object written for a job (SR, GSPS, key image, segmentation), kept on disk until exported."""

    __tablename__ = "result_objects"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(8))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class ExportState(enum.StrEnum):
    PENDING = "pending"  # waiting for its next attempt (next_attempt_at)
    SENDING = "sending"  # claimed by one exporter
    DELIVERED = "delivered"  # never sent again
    DEAD = "dead"  # gave up after the bounded attempts; `ccfnet retry-exports` revives it


class Export(Base):
    """One result object to one destination."""

    __tablename__ = "exports"
    __table_args__ = (UniqueConstraint("result_object_id", "destination"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    result_object_id: Mapped[int] = mapped_column(ForeignKey("result_objects.id", ondelete="CASCADE"))
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(12), index=True)
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    published_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class ExportAttempt(Base):
    __tablename__ = "export_attempts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    export_id: Mapped[int] = mapped_column(ForeignKey("exports.id", ondelete="CASCADE"), index=True)
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    outcome: Mapped[str] = mapped_column(String(12))
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)


class QueueControl(Base):
    """An operator's pause of one queue; every worker checks it before claiming a job of that queue."""

    __tablename__ = "queue_controls"

    queue: Mapped[str] = mapped_column(String(16), primary_key=True)
    paused: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    changed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
