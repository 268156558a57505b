"""Publishing a job: record it in the database first, then send a message that carries only the job id."""

from __future__ import annotations

import logging
import re

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from worker.db import repository as repo
from worker.queue.celery_app import TASK_RUN_JOB
from worker.timeutil import Clock, utcnow

log = logging.getLogger("worker.queue")

_TASK_ID = re.compile(r"^ccfnet-job-(\d+)-(\d+)$")


def task_id_for(job_id: int, publish_number: int) -> str:
    """Task ids name the job, so the reconciler can tell which jobs have a message in the broker."""
    return f"ccfnet-job-{job_id}-{publish_number}"


def job_id_from_task_id(task_id: str) -> int | None:
    match = _TASK_ID.match(task_id)
    return int(match.group(1)) if match else None


class JobPublisher:
    def __init__(self, app: Celery, sessions: sessionmaker[Session], clock: Clock = utcnow) -> None:
        self._app = app
        self._sessions = sessions
        self._clock = clock

    def publish(self, job_id: int, queue: str, *, reason: str, countdown: float | None = None) -> bool:
        """Record the publish, commit, then send. False if the job is no longer queued."""
        with self._sessions.begin() as session:
            number = repo.mark_published(session, job_id, now=self._clock(), reason=reason)
        if number is None:
            return False
        self._app.send_task(
            TASK_RUN_JOB, args=[job_id], queue=queue, task_id=task_id_for(job_id, number), countdown=countdown
        )
        log.info("job %d published to %s (%s, #%d)", job_id, queue, reason, number)
        return True
