"""Pausing and resuming the job queues: a row in ``queue_controls`` that every worker checks before it claims a
job (``worker.queue.tasks``), shared by the ops page and ``ccfnet queue pause|resume``."""

from __future__ import annotations

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from worker.db import repository as repo
from worker.queue.publish import JobPublisher
from worker.timeutil import Clock

# The job queues, whose task checks `queue_controls` before claiming; export sends are not paused.
PAUSABLE_QUEUES = ("inference", "batch")


def set_queue_paused(
    sessions: sessionmaker[Session], celery: Celery, queue: str, *, paused: bool, clock: Clock
) -> list[int]:
    """Pause or resume ``queue`` (one of PAUSABLE_QUEUES). On resume its queued jobs are published at once: the
    workers dropped their messages while it was paused, and the reconciler would publish them only later.
    Returns the ids of the jobs published."""
    if queue not in PAUSABLE_QUEUES:
        raise ValueError(f"queue {queue!r} cannot be paused; choose {' or '.join(PAUSABLE_QUEUES)}")
    with sessions.begin() as session:
        repo.set_queue_paused(session, queue, paused=paused, now=clock())
        waiting = repo.queued_jobs_of_queue(session, queue) if not paused else []
    publisher = JobPublisher(celery, sessions, clock)
    return [job_id for job_id in waiting if publisher.publish(job_id, queue, reason="queue resumed")]
