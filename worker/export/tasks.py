"""The Celery export task: try one export (with what travels with it) and schedule the next try of each
export that failed and is not dead."""

from __future__ import annotations

from collections.abc import Callable

from celery import Celery, Task
from sqlalchemy.orm import Session, sessionmaker

from worker.export.engine import attempt_exports
from worker.export.queue import TASK_EXPORT, publish_export
from worker.settings import Settings
from worker.timeutil import utcnow


def register_export_tasks(
    app: Celery, settings: Settings, sessions_factory: Callable[[], sessionmaker[Session]]
) -> None:
    """`sessions_factory` returns the worker process's sessionmaker (made lazily, after any fork)."""
    short_wait = float(settings.task_time_limit_seconds)

    @app.task(
        bind=True, name=TASK_EXPORT, shared=False, acks_late=True, reject_on_worker_lost=True,
        ignore_result=True, max_retries=0, time_limit=settings.task_time_limit_seconds,
    )
    def send_export(self: Task, export_id: int) -> list[str]:
        sessions = sessions_factory()
        results = attempt_exports(int(export_id), settings, sessions, utcnow)
        for result in results:
            # A short wait rides on a countdown message. A long one is left to the export reconciler, which
            # publishes it when due: a Redis message held longer than the visibility timeout would be
            # delivered twice (harmless, the claim decides, but noisy).
            if result.state == "pending" and result.retry_in is not None and result.retry_in <= short_wait:
                publish_export(self.app, sessions, result.export_id, countdown=result.retry_in)
        return [r.state for r in results]
