"""One export attempt end to end: claim, send, record, and decide delivered / retry later / dead.

Used by the Celery export task and by `ccfnet retry-exports`; the database row is the record, the broker
message only says "try export N now".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from worker.db import repository as repo
from worker.export.send import Delivery, deliver
from worker.settings import DicomDestination, DicomWebDestination, Settings
from worker.timeutil import Clock

log = logging.getLogger("worker.export")


@dataclass(frozen=True)
class AttemptResult:
    export_id: int
    state: str  # delivered | pending | dead | skipped
    retry_in: float | None = None
    error: str | None = None


def destinations_by_name(settings: Settings) -> dict[str, DicomDestination | DicomWebDestination]:
    return {d.name: d for d in settings.destinations}


def attempt_export(
    export_id: int, settings: Settings, sessions: sessionmaker[Session], clock: Clock
) -> AttemptResult:
    """Try one export once. A delivered, dead, not-yet-due or concurrently-claimed export is skipped."""
    started = clock()
    with sessions.begin() as session:
        claimed = repo.claim_export(session, export_id, now=started)
        if claimed is None:
            return AttemptResult(export_id, "skipped")
        export, obj = claimed
        destination_name, relative = export.destination, obj.path
    destination = destinations_by_name(settings).get(destination_name)
    if destination is None:
        delivery = Delivery(False, None, f"destination {destination_name!r} is no longer configured", "failed")
    else:
        path = (settings.data_dir / "results" / relative).resolve()
        delivery = deliver(destination, path, settings.ae_title)
    finished = clock()
    with sessions.begin() as session:
        repo.record_export_attempt(
            session, export_id, started=started, finished=finished, outcome=delivery.outcome,
            status_code=delivery.status_code, error=delivery.error,
        )
        state, retry_in = repo.finish_export(
            session, export_id, delivered=delivery.delivered, now=finished, error=delivery.error,
            max_attempts=settings.export_max_attempts, backoff_seconds=settings.export_backoff_seconds,
        )
    if state == "dead":
        log.error("export %d to %s is dead: %s", export_id, destination_name, delivery.error)
    elif not delivery.delivered:
        log.warning("export %d to %s failed (%s); retry in %.1f s", export_id, destination_name,
                    delivery.error, retry_in or 0)
    return AttemptResult(export_id, state, retry_in, delivery.error)
