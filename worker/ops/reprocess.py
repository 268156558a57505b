"""Batch reprocessing from the spool: a new job per study on the low-priority `batch` queue.

A reprocess is a deliberate re-run, so its idempotency key carries the request time as well as the input and
model version: asking twice makes two jobs, the later superseding the earlier, as late arrivals do.

``--model`` forces a checkpoint for these jobs only: the job's model version names the file and its digest,
and the job's ``reprocess`` event carries the path, which the inference worker loads instead of its default
(``repo.forced_model_path``). The path must be readable by the workers (a shared volume, like the spool).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from worker.assembly import idempotency_key
from worker.db import repository as repo
from worker.db.models import Study
from worker.queue.publish import JobPublisher

BATCH_QUEUE = "batch"


@dataclass(frozen=True)
class ForcedModel:
    """A checkpoint chosen for one reprocess run instead of the workers' configured model."""

    path: Path
    version: str

    @classmethod
    def from_file(cls, path: Path) -> ForcedModel:
        """Names the checkpoint as its results will: its card's version and weights digest (`0.1.0@a97c0cb420a4`),
        so the job row and the objects it made agree."""
        from worker.core_bridge import checkpoint_version

        resolved = path.expanduser().resolve()
        if not resolved.is_file():
            raise ValueError(f"model: no such checkpoint file: {path}")
        return cls(resolved, checkpoint_version(resolved)[:64])


@dataclass(frozen=True)
class Planned:
    study_instance_uid: str
    instances: int
    job_id: int | None = None
    missing_files: int = 0  # instances recorded whose spool file is gone: the study needs `--from pacs`


def plan(sessions: sessionmaker[Session], studies: Sequence[Study], spool: Path) -> list[Planned]:
    """What a reprocess would run, with each study's instances whose spool file is gone (a job on such a
    study fails, or runs on the files that are left)."""
    with sessions() as session:
        planned = []
        for study in studies:
            instances = repo.spooled_instances(session, study.id)
            missing = sum(1 for i in instances if not (spool / i.path).is_file())
            planned.append(Planned(study.study_instance_uid, len(instances), missing_files=missing))
        return planned


def reprocess(
    sessions: sessionmaker[Session],
    app: Celery,
    studies: Sequence[Study],
    *,
    model_version: str,
    now: dt.datetime,
    progress: Callable[[int], None] | None = None,
    source: str = "spool",
    model: ForcedModel | None = None,
) -> list[Planned]:
    """Make and publish one batch job per study (after its commit); older jobs of the study are superseded."""
    detail: dict[str, str] = {"from": source}
    if model is not None:
        model_version = model.version
        detail["model"] = str(model.path)
    publisher = JobPublisher(app, sessions)
    made = []
    for study in studies:
        with sessions.begin() as session:
            study_uid, uids = repo.study_uid_and_sop_uids(session, study.id)
            key = idempotency_key(study_uid, [*uids, f"reprocess@{now.isoformat()}"], model_version)
            job_id = repo.create_job(
                session, study_id=study.id, idempotency_key=key, model_version=model_version,
                queue=BATCH_QUEUE, instance_count=len(uids), now=now,
            )
            if job_id is not None:
                repo.add_job_event(session, job_id, "reprocess", now=now, detail=detail)
                repo.supersede_older_jobs(session, study_id=study.id, new_job_id=job_id, now=now)
                repo.mark_study_assembled(session, study.id, now=now)
        if job_id is not None:
            publisher.publish(job_id, BATCH_QUEUE, reason="reprocess")
        made.append(Planned(study_uid, len(uids), job_id))
        if progress:
            progress(1)
    return made
