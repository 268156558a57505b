"""Celery tasks. One base class owns the cross-cutting work: the database session, the claim, the log
context, and the choice between retrying and failing (the second of the three error edges)."""

from __future__ import annotations

import datetime as dt
import logging
import socket
import threading
from typing import Any

from celery import Celery, Task
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from worker.db import repository as repo
from worker.db.engine import make_engine, make_session_factory
from worker.db.models import TERMINAL_JOB_STATES, JobState
from worker.queue.processing import JobContext, JobProcessor, RetryableJobError, default_processor
from worker.settings import Settings
from worker.timeutil import Clock, utcnow

log = logging.getLogger("worker.tasks")

MAX_RETRIES = 3
RETRY_BACKOFF_SECONDS = 30.0


class WorkerRuntime:
    """Per-process resources of a worker, created on first use (after any fork), never at import."""

    def __init__(
        self,
        settings: Settings,
        processor: JobProcessor | None = None,
        sessions: sessionmaker[Session] | None = None,
        clock: Clock = utcnow,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self._processor = processor
        self._sessions = sessions
        self._engine: Engine | None = None
        self._lock = threading.Lock()
        self.worker_name = f"{socket.gethostname()}:{threading.get_native_id()}"

    @property
    def sessions(self) -> sessionmaker[Session]:
        with self._lock:
            if self._sessions is None:
                self._engine = make_engine(self.settings.effective_database_url)
                self._sessions = make_session_factory(self._engine)
            return self._sessions

    @property
    def processor(self) -> JobProcessor:
        if self._processor is None:
            self._processor = default_processor(self.settings)
        return self._processor

    @property
    def lease(self) -> dt.timedelta:
        return dt.timedelta(seconds=self.settings.task_time_limit_seconds + self.settings.job_lease_margin_seconds)

    def dispose(self) -> None:
        if self._engine is not None:
            self._engine.dispose()


class JobTask(Task):
    """Base of tasks that act on one job row: explicit late ack, time limits from settings."""

    acks_late = True
    reject_on_worker_lost = True
    ignore_result = True
    runtime: WorkerRuntime

    def claim(self, job_id: int) -> JobContext | None:
        """Reload the job; return early if it is done; claim it atomically (exactly one delivery wins)."""
        rt = self.runtime
        now = rt.clock()
        with rt.sessions.begin() as session:
            job = repo.get_job(session, job_id)
            if job is None:
                log.warning("job %d: no such job, message dropped", job_id)
                return None
            if JobState(job.state) in TERMINAL_JOB_STATES:
                log.info("job %d already %s: duplicate message ignored", job_id, job.state)
                return None
            # Paused by an operator (worker.ops.web): the job stays queued and this message is dropped; the
            # reconciler republishes it after its grace period, and resuming republishes the queue at once.
            if repo.queue_paused(session, job.queue):
                log.info("job %d: queue %s is paused, job left queued", job_id, job.queue)
                return None
            if not repo.claim_job(
                session, job_id, now=now, lease=rt.lease, worker=rt.worker_name, task_id=self.request.id
            ):
                log.info("job %d is being run elsewhere: duplicate message ignored", job_id)
                return None
            attempt = job.attempts + 1
            study_id = job.study_id
        return JobContext(
            job_id=job_id,
            study_id=study_id,
            attempt=attempt,
            settings=rt.settings,
            sessions=rt.sessions,
            clock=rt.clock,
        )

    def finish(
        self,
        ctx: JobContext,
        state: JobState,
        *,
        error: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        with self.runtime.sessions.begin() as session:
            repo.finish_job(
                session, ctx.job_id, state=state, now=self.runtime.clock(), error=error, detail=detail
            )

    def release_for_retry(self, ctx: JobContext, reason: str) -> None:
        from worker.queue.publish import JobPublisher

        with self.runtime.sessions.begin() as session:
            job = repo.get_job(session, ctx.job_id)
            queue = job.queue if job is not None else "inference"
            repo.release_job(session, ctx.job_id, now=self.runtime.clock(), reason=reason)
        countdown = RETRY_BACKOFF_SECONDS * 2 ** (ctx.attempt - 1)
        JobPublisher(self.app, self.runtime.sessions, self.runtime.clock).publish(
            ctx.job_id, queue, reason="retry", countdown=countdown
        )

    def run_claimed(self, ctx: JobContext) -> str:
        """Run the processor; classify what went wrong as retryable or fatal."""
        try:
            outcome = self.runtime.processor(ctx)
        except (RetryableJobError, OperationalError) as exc:
            if ctx.attempt <= MAX_RETRIES:
                log.warning("job %d attempt %d: retryable failure: %s", ctx.job_id, ctx.attempt, exc)
                self.release_for_retry(ctx, type(exc).__name__)
                return "retrying"
            log.error("job %d: giving up after %d attempts", ctx.job_id, ctx.attempt)
            self.finish(ctx, JobState.FAILED, error=f"{type(exc).__name__}: {exc}"[:2000])
            return JobState.FAILED.value
        except SoftTimeLimitExceeded:
            log.error("job %d: time limit reached", ctx.job_id)
            self.finish(ctx, JobState.FAILED, error="time limit reached")
            return JobState.FAILED.value
        except Exception as exc:  # the task edge: anything else is fatal for this job, logged in full
            log.exception("job %d failed", ctx.job_id)
            self.finish(ctx, JobState.FAILED, error=f"{type(exc).__name__}: {exc}"[:2000])
            return JobState.FAILED.value
        self.finish(ctx, outcome.state, error=outcome.error, detail=outcome.detail)
        log.info("job %d finished: %s", ctx.job_id, outcome.state.value)
        return outcome.state.value


def register_tasks(app: Celery, settings: Settings, processor: JobProcessor | None = None) -> WorkerRuntime:
    runtime = WorkerRuntime(settings, processor)
    base = type("CcfnetJobTask", (JobTask,), {"runtime": runtime})

    @app.task(
        bind=True,
        base=base,
        name="ccfnet.run_job",
        shared=False,
        acks_late=True,
        reject_on_worker_lost=True,
        time_limit=settings.task_time_limit_seconds,
        soft_time_limit=settings.task_soft_time_limit_seconds,
        max_retries=0,
    )
    def run_job(self: JobTask, job_id: int) -> str:
        """Run one job by id: the message carries nothing else."""
        ctx = self.claim(int(job_id))
        if ctx is None:
            return "ignored"
        return self.run_claimed(ctx)

    app.ccfnet_runtime = runtime
    return runtime
