"""Export attempts end to end: claim, send, record, and decide delivered / retry later / dead.

Used by the Celery export task, by `ccfnet retry-exports` and by the ops page; the database row is the record,
the broker message only says "try export N now". Exports of one job to one destination that are due together
are claimed together and travel together (one association, one STOW-RS request); each still gets its own
attempt row and its own state.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from worker.db import repository as repo
from worker.export.delivery import Delivery, Item, failed
from worker.export.send import deliver
from worker.ops import metrics
from worker.settings import DicomDestination, DicomWebDestination, Settings
from worker.timeutil import Clock

log = logging.getLogger("worker.export")

Jitter = Callable[[], float]  # a number in [0, 1)


@dataclass(frozen=True)
class AttemptResult:
    export_id: int
    state: str  # delivered | pending | dead | skipped (not claimable: delivered, dead, not due, or busy)
    retry_in: float | None = None
    error: str | None = None


def destinations_by_name(settings: Settings) -> dict[str, DicomDestination | DicomWebDestination]:
    return {d.name: d for d in settings.destinations}


def backoff_delay(attempts: int, *, base: float, cap: float, jitter: float) -> float:
    """Exponential backoff with "equal jitter": the n-th retry waits between half and all of
    min(cap, base * 2**(n-1)), so that exports that failed together do not all come back together."""
    full = min(cap, base * 2 ** max(attempts - 1, 0))
    return full / 2 + full / 2 * jitter


def _send(
    destination: DicomDestination | DicomWebDestination | None, name: str, items: Sequence[Item], settings: Settings
) -> dict[int, Delivery]:
    if destination is None:
        return {i.export_id: failed(f"destination {name!r} is no longer configured") for i in items}
    try:
        results = deliver(destination, items, calling_ae=settings.ae_title, timeout=settings.network_timeout_seconds)
    except Exception as exc:  # the export's retry-or-fail edge: a sender bug must not strand the rows in `sending`
        log.exception("exporter error sending to %s", name)
        return {i.export_id: failed(f"exporter error: {type(exc).__name__}: {exc}") for i in items}
    missing = failed("the sender gave no result for this object")
    return {i.export_id: results.get(i.export_id, missing) for i in items}


def attempt_exports(
    export_id: int,
    settings: Settings,
    sessions: sessionmaker[Session],
    clock: Clock,
    *,
    jitter: Jitter = random.random,
) -> list[AttemptResult]:
    """Try `export_id` once, with the due exports of the same job and destination; a result per claimed export
    (one `skipped` result when `export_id` is not claimable)."""
    started = clock()
    with sessions.begin() as session:
        claimed = repo.claim_exports(session, export_id, now=started)
        if not claimed:
            return [AttemptResult(export_id, "skipped")]
        name = claimed[0][0].destination
        items = [Item(e.id, (settings.data_dir / "results" / o.path).resolve(), o.sop_instance_uid)
                 for e, o in claimed]
    deliveries = _send(destinations_by_name(settings).get(name), name, items, settings)
    finished = clock()
    shared_jitter = jitter()  # one draw per batch: the batch stays together on its next try

    def backoff(attempts: int) -> float:
        return backoff_delay(attempts, base=settings.export_backoff_seconds,
                             cap=settings.export_backoff_max_seconds, jitter=shared_jitter)

    results = []
    with sessions.begin() as session:
        for item in items:
            delivery = deliveries[item.export_id]
            repo.record_export_attempt(
                session, item.export_id, started=started, finished=finished, outcome=delivery.outcome.value,
                status_code=delivery.status_code, error=delivery.error,
            )
            metrics.export_attempt(delivery.outcome.value)  # metrics hook
            state, retry_in = repo.finish_export(
                session, item.export_id, delivered=delivery.delivered, now=finished, error=delivery.error,
                max_attempts=settings.export_max_attempts, backoff=backoff,
            )
            results.append(AttemptResult(item.export_id, state, retry_in, None if delivery.delivered else
                                         delivery.error))
    for result in results:
        if result.state == "dead":
            log.error("export %d to %s is dead after %d attempt(s): %s", result.export_id, name,
                      settings.export_max_attempts, result.error)
        elif result.state == "pending":
            log.warning("export %d to %s failed (%s); retry in %.1f s", result.export_id, name, result.error,
                        result.retry_in or 0)
        else:
            log.info("export %d delivered to %s", result.export_id, name)
    return results


def attempt_export(
    export_id: int, settings: Settings, sessions: sessionmaker[Session], clock: Clock
) -> AttemptResult:
    """Try one export (and whatever travels with it); the result of `export_id` itself."""
    results = attempt_exports(export_id, settings, sessions, clock)
    return next(r for r in results if r.export_id == export_id)
