"""What operations staff look at: queue depth, paused queues, jobs by state, ages, throughput, failures, dead
exports."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from worker.db import repository as repo
from worker.queue.celery_app import QUEUES, filesystem_folders, is_filesystem_broker
from worker.settings import Settings

# kombu's Redis transport keeps priority levels in sibling lists "<queue>\x06\x16<priority>".
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


def queue_depths(settings: Settings) -> dict[str, int | None]:
    """Messages waiting per queue, read from the broker; None where the broker cannot be read."""
    if is_filesystem_broker(settings):
        return _filesystem_depths(filesystem_folders(settings)[0])
    import redis

    client = redis.Redis.from_url(settings.effective_broker_url)
    try:
        return {
            queue: sum(int(client.llen(settings.redis_key_prefix + queue + s)) for s in _PRIORITY_SUFFIXES)
            for queue in QUEUES
        }
    except redis.RedisError:
        return dict.fromkeys(QUEUES)
    finally:
        client.close()


def _filesystem_depths(folder: Path) -> dict[str, int | None]:
    depths: dict[str, int | None] = dict.fromkeys(QUEUES, 0)
    for path in folder.glob("*.msg"):
        try:
            payload = json.loads(path.read_bytes())
        except (OSError, ValueError):
            continue
        queue = ((payload.get("properties") or {}).get("delivery_info") or {}).get("routing_key")
        if queue in depths:
            depths[queue] = (depths[queue] or 0) + 1
    return depths


def _age(now: dt.datetime, since: dt.datetime | None) -> float | None:
    return round((now - since).total_seconds(), 1) if since else None


def age_text(seconds: float | None) -> str:
    """An age for people: ``42 s``, or ``none`` when there is nothing to be old."""
    return "none" if seconds is None else f"{seconds:.0f} s"


def collect_status(settings: Settings, session: Session, now: dt.datetime) -> dict[str, Any]:
    waiting, oldest_study = repo.waiting_studies(session)
    hour_ago = now - dt.timedelta(hours=1)
    return {
        "at": now.isoformat(timespec="seconds"),
        "queues": queue_depths(settings),
        "paused_queues": sorted(repo.paused_queues(session)),
        "jobs_by_state": repo.job_state_counts(session),
        "studies_waiting": waiting,
        "oldest_waiting_study_seconds": _age(now, oldest_study),
        "oldest_queued_job_seconds": _age(now, repo.oldest_queued_job(session)),
        "throughput_last_hour": {
            "succeeded": repo.jobs_finished_since(session, hour_ago, "succeeded"),
            "failed": repo.jobs_finished_since(session, hour_ago, "failed"),
        },
        "recent_failures": [
            {"job": job_id, "study": study, "reason": reason, "at": at.isoformat(timespec="seconds") if at else None}
            for job_id, study, reason, at in repo.recent_failures(session)
        ],
        "exports_by_state": repo.export_state_counts(session),
        "dead_exports": [
            {"export": e.id, "job": e.job_id, "destination": e.destination, "attempts": e.attempts,
             "error": e.last_error}
            for e in repo.dead_exports(session)
        ],
    }


def association_status(session: Session, now: dt.datetime) -> dict[str, Any]:
    """Open DICOM associations and what was refused or dropped in the last hour (``ccfnet status`` only: the
    associations table has no index for this, so ``/metrics`` does not ask it on every scrape)."""
    return {
        "associations_open": [
            {"id": a.id, "calling_ae": a.calling_ae, "peer": a.peer_address, "tls": a.tls,
             "seconds": _age(now, a.started_at)}
            for a in repo.open_associations(session)
        ],
        "associations_refused_last_hour": repo.refused_association_counts(session, now - dt.timedelta(hours=1)),
    }
