"""Creating a job's exports after its results are stored, publishing them on the `export` queue after the
commit, and the export reconciler that republishes what the broker lost."""

from __future__ import annotations

import datetime as dt
import logging

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from worker.db import repository as repo
from worker.settings import Settings
from worker.timeutil import Clock, utcnow

log = logging.getLogger("worker.export")
TASK_EXPORT = "ccfnet.export.send"


def publish_export(
    app: Celery, sessions: sessionmaker[Session], export_id: int, *, clock: Clock = utcnow,
    countdown: float | None = None,
) -> None:
    """Record when the message is due, commit, then send it (it carries only the export id)."""
    due = clock() + dt.timedelta(seconds=countdown or 0)
    with sessions.begin() as session:
        repo.mark_export_published(session, export_id, due=due)
    app.send_task(TASK_EXPORT, args=[export_id], queue="export", countdown=countdown)


def enqueue_exports(
    settings: Settings, sessions: sessionmaker[Session], job_id: int, app: Celery | None,
    clock: Clock = utcnow,
) -> list[int]:
    """One export per (result object, destination), committed; then published when a Celery app is at hand,
    else the export reconciler publishes them on its next pass."""
    names = [d.name for d in settings.destinations]
    if not names:
        return []
    with sessions.begin() as session:
        created = repo.create_exports(session, job_id, names, now=clock())
    if app is not None:
        for export_id in created:
            publish_export(app, sessions, export_id, clock=clock)
    log.info("job %d: %d export(s) to %s", job_id, len(created), ", ".join(names))
    return created


def reconcile_exports(
    app: Celery, settings: Settings, sessions: sessionmaker[Session], clock: Clock = utcnow
) -> int:
    """Publish pending exports that are due and whose message is missing or overdue by the grace period (lost
    by the broker, or never sent), and give back exports left `sending` by an exporter that died."""
    now = clock()
    grace = dt.timedelta(seconds=settings.reconcile_grace_seconds)
    with sessions.begin() as session:
        stuck = repo.requeue_stuck_exports(
            session, updated_before=now - dt.timedelta(seconds=settings.task_time_limit_seconds), now=now
        )
        due = repo.due_exports(session, now=now, published_before=now - grace)
    if stuck:
        log.warning("%d export(s) left sending by a stopped exporter are pending again", stuck)
    for export_id in due:
        publish_export(app, sessions, export_id, clock=clock)
    if due:
        log.info("export reconciler republished %d export(s)", len(due))
    return len(due)
