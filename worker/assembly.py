"""Study assembly (DESIGN.md step 3): quiet studies become jobs, once per exact input.

A study whose quiet period (since its last arrival, or since a listener restart) has passed is claimed with
one conditional UPDATE, so several sweepers against one database never assemble it twice. The job is keyed by
sha256 over the study UID, its sorted SOP Instance UIDs and the model version: the same input never makes a
second job. Late arrivals reopen the study; the next job supersedes the earlier ones.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from worker.db import repository as repo

log = logging.getLogger("worker.assembly")

LIVE_QUEUE = "inference"


def idempotency_key(study_uid: str, sop_instance_uids: Iterable[str], model_version: str) -> str:
    digest = hashlib.sha256()
    for part in (model_version, study_uid, *sorted(sop_instance_uids)):
        digest.update(part.encode("ascii", "replace"))
        digest.update(b"\n")
    return digest.hexdigest()


@dataclass(frozen=True)
class NewJob:
    job_id: int
    study_id: int
    queue: str
    superseded: tuple[int, ...]


def assemble_study(
    sessions: sessionmaker[Session],
    study_id: int,
    *,
    cutoff: dt.datetime,
    now: dt.datetime,
    model_version: str,
    queue: str = LIVE_QUEUE,
) -> NewJob | None:
    """Claim one stable study and make its job; None if someone else claimed it or the input ran already."""
    with sessions.begin() as session:
        if not repo.claim_stable_study(session, study_id, cutoff=cutoff, now=now):
            return None
        study_uid, uids = repo.study_uid_and_sop_uids(session, study_id)
        key = idempotency_key(study_uid, uids, model_version)
        job_id = repo.create_job(
            session,
            study_id=study_id,
            idempotency_key=key,
            model_version=model_version,
            queue=queue,
            instance_count=len(uids),
            now=now,
        )
        if job_id is None:
            log.info("study %s assembled again with the same %d instances: no new job", study_uid, len(uids))
            return None
        superseded = repo.supersede_older_jobs(session, study_id=study_id, new_job_id=job_id, now=now)
    log.info(
        "study %s assembled: job %d with %d instances%s",
        study_uid,
        job_id,
        len(uids),
        f", superseding {superseded}" if superseded else "",
    )
    return NewJob(job_id=job_id, study_id=study_id, queue=queue, superseded=tuple(superseded))


def sweep_once(
    sessions: sessionmaker[Session],
    *,
    quiet_seconds: float,
    model_version: str,
    now: dt.datetime,
    limit: int = 200,
) -> list[NewJob]:
    cutoff = now - dt.timedelta(seconds=quiet_seconds)
    with sessions() as session:
        candidates = repo.stable_study_ids(session, cutoff=cutoff, limit=limit)
    made = []
    for study_id in candidates:
        job = assemble_study(sessions, study_id, cutoff=cutoff, now=now, model_version=model_version)
        if job is not None:
            made.append(job)
    return made


def restart_quiet_clock(sessions: sessionmaker[Session], *, now: dt.datetime) -> int:
    """After a (re)start the quiet period of every open study counts from now."""
    with sessions.begin() as session:
        return repo.restart_quiet_clock(session, now=now)
