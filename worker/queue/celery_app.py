"""The Celery application: Redis in production, kombu's on-disk transport in the embedded mode.

The database is the record of every job; a message carries only a job id, is published after the commit,
and is acknowledged late, so a worker that dies mid-job hands the message to another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from worker.queue.processing import JobProcessor
from worker.settings import Settings

QUEUES = ("inference", "export", "batch")
TASK_RUN_JOB = "ccfnet.run_job"
# Kombu's Redis transport keeps reserved-but-unacknowledged messages here (under the key prefix).
REDIS_UNACKED_KEY = "unacked"
# Generous: a message of a worker that died comes back after this; the job lease decides who may run it.
VISIBILITY_MARGIN_SECONDS = 300


def filesystem_folders(settings: Settings) -> tuple[Path, Path]:
    """(messages, control) folders of the on-disk broker."""
    root = settings.broker_folder
    return root / "messages", root / "control"


def is_filesystem_broker(settings: Settings) -> bool:
    return settings.effective_broker_url.startswith("filesystem")


def transport_options(settings: Settings) -> dict[str, Any]:
    if is_filesystem_broker(settings):
        messages, control = filesystem_folders(settings)
        messages.mkdir(parents=True, exist_ok=True)
        control.mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(messages),
            "data_folder_out": str(messages),
            "control_folder": str(control),
            "polling_interval": 0.2,
        }
    return {
        "visibility_timeout": settings.task_time_limit_seconds + VISIBILITY_MARGIN_SECONDS,
        "global_keyprefix": settings.redis_key_prefix,
        # Consume queues in the order given, so a worker on "inference,batch" always prefers live studies.
        "queue_order_strategy": "priority",
    }


def make_celery(settings: Settings, *, processor: JobProcessor | None = None) -> Celery:
    """A new Celery app for these settings, with the job task registered (nothing global)."""
    from worker.queue.tasks import register_tasks

    app = Celery("ccfnet", set_as_current=False)
    app.conf.update(
        broker_url="filesystem://localhost//"
        if is_filesystem_broker(settings)
        else settings.effective_broker_url,
        broker_transport_options=transport_options(settings),
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5},
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        task_time_limit=settings.task_time_limit_seconds,
        task_soft_time_limit=settings.task_soft_time_limit_seconds,
        task_queues=[Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES],
        task_default_queue="inference",
        task_default_exchange="inference",
        task_default_routing_key="inference",
        task_routes={TASK_RUN_JOB: {"queue": "inference"}, "ccfnet.export.*": {"queue": "export"}},
        task_create_missing_queues=False,
        worker_enable_remote_control=not is_filesystem_broker(settings),
    )
    runtime = register_tasks(app, settings, processor)
    from worker.export.tasks import register_export_tasks

    register_export_tasks(app, settings, lambda: runtime.sessions)
    return app
