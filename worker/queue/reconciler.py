"""The reconciler: the database says which jobs are queued; re-publish those whose message the broker lost.

A job counts as lost when it has been queued for longer than the grace period since its last publish and no
message naming it is in the broker (waiting, or reserved by a worker), or when its worker vanished past its
lease: that worker's message sits reserved in the broker until the visibility timeout, so it is not waited for.
Publishing twice is harmless: the task claims a job with an atomic queued -> running update, so only one
delivery runs it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy.orm import Session, sessionmaker

from worker.db import repository as repo
from worker.queue.celery_app import QUEUES, REDIS_UNACKED_KEY, filesystem_folders, is_filesystem_broker
from worker.queue.publish import JobPublisher, job_id_from_task_id
from worker.settings import Settings

log = logging.getLogger("worker.reconciler")

# kombu's Redis transport: priority 0 uses the queue's own key, others "<queue>\x06\x16<priority>".
_PRIORITY_SEPARATOR = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)


class BrokerInspector(Protocol):
    def job_ids(self) -> set[int] | None:
        """Job ids with a message in the broker, or None when the broker cannot be read."""


def _job_id_of_message(raw: bytes | str) -> int | None:
    try:
        payload: Any = json.loads(raw)
    except (ValueError, TypeError):
        return None
    if isinstance(payload, list) and payload:  # unacked entries are [message, exchange, routing_key]
        payload = payload[0]
    if not isinstance(payload, dict):
        return None
    task_id = (payload.get("headers") or {}).get("id") or (payload.get("properties") or {}).get(
        "correlation_id"
    )
    return job_id_from_task_id(str(task_id)) if task_id else None


class RedisInspector:
    def __init__(self, url: str, *, key_prefix: str = "", queues: tuple[str, ...] = QUEUES) -> None:
        self._url = url
        self._prefix = key_prefix
        self._queues = queues

    def job_ids(self) -> set[int] | None:
        import redis

        client = redis.Redis.from_url(self._url)
        try:
            found: set[int] = set()
            for queue in self._queues:
                keys = [queue, *(f"{queue}{_PRIORITY_SEPARATOR}{p}" for p in _PRIORITY_STEPS)]
                for key in keys:
                    for raw in client.lrange(self._prefix + key, 0, -1):
                        if (job_id := _job_id_of_message(raw)) is not None:
                            found.add(job_id)
            for raw in client.hvals(self._prefix + REDIS_UNACKED_KEY):
                if (job_id := _job_id_of_message(raw)) is not None:
                    found.add(job_id)
            return found
        except redis.RedisError:
            log.warning("cannot read the broker; reconciling by age only", exc_info=True)
            return None
        finally:
            client.close()


class FilesystemInspector:
    def __init__(self, folder: Path) -> None:
        self._folder = folder

    def job_ids(self) -> set[int] | None:
        found: set[int] = set()
        for path in self._folder.glob("*.msg"):
            try:
                raw = path.read_bytes()
            except OSError:
                continue  # taken by a worker while we looked
            if (job_id := _job_id_of_message(raw)) is not None:
                found.add(job_id)
        return found


def make_inspector(settings: Settings) -> BrokerInspector:
    if is_filesystem_broker(settings):
        return FilesystemInspector(filesystem_folders(settings)[0])
    return RedisInspector(settings.effective_broker_url, key_prefix=settings.redis_key_prefix)


@dataclass(frozen=True)
class ReconcileReport:
    lease_expired: tuple[int, ...]
    republished: tuple[int, ...]


def reconcile_once(
    sessions: sessionmaker[Session],
    publisher: JobPublisher,
    inspector: BrokerInspector,
    *,
    grace_seconds: float,
    now: dt.datetime,
) -> ReconcileReport:
    with sessions.begin() as session:
        expired = repo.requeue_expired_leases(session, now=now)
    with sessions() as session:
        candidates = repo.queued_jobs_published_before(
            session, cutoff=now - dt.timedelta(seconds=grace_seconds), also=expired
        )
    if not candidates:
        return ReconcileReport(tuple(expired), ())
    in_broker = inspector.job_ids() or set()
    republished = []
    for job in candidates:
        if job.job_id in expired:
            reason = "lease expired"  # its message is the dead worker's, reserved until the visibility timeout
        elif job.job_id in in_broker:
            continue
        else:
            reason = "never published" if job.published_at is None else "lost by the broker"
        if publisher.publish(job.job_id, job.queue, reason=f"reconciler: {reason}"):
            republished.append(job.job_id)
    if republished:
        log.warning("reconciler re-published %d job(s): %s", len(republished), republished)
    return ReconcileReport(tuple(expired), tuple(republished))
