"""The Celery export task: try one export, and schedule its next try when it failed."""

from __future__ import annotations

from celery import Celery, Task
from sqlalchemy.orm import Session, sessionmaker

from worker.export.engine import attempt_export
from worker.export.queue import TASK_EXPORT, publish_export
from worker.settings import Settings
from worker.timeutil import utcnow


def register_export_tasks(app: Celery, settings: Settings, sessions_factory: object) -> None:
    """`sessions_factory` is a zero-argument callable returning the worker's sessionmaker (made lazily)."""

    @app.task(
        bind=True, name=TASK_EXPORT, shared=False, acks_late=True, reject_on_worker_lost=True,
        ignore_result=True, max_retries=0, time_limit=settings.task_time_limit_seconds,
    )
    def send_export(self: Task, export_id: int) -> str:
        sessions: sessionmaker[Session] = sessions_factory()  # type: ignore[operator]
        result = attempt_export(int(export_id), settings, sessions, utcnow)
        if result.state == "pending" and result.retry_in is not None:
            publish_export(self.app, sessions, result.export_id, countdown=result.retry_in)
        return result.state
