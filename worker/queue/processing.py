"""What a worker does with a job it has claimed: a pluggable processor.

The task (``worker.queue.tasks``) owns claiming, the session, logging and retry-vs-fatal; the processor only
does the work and says how it ended. The default processor is CCF-Net inference (worker.inference);
`record_pickup_only` is kept for tests of the queue alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from worker.db.models import JobState
from worker.settings import Settings
from worker.timeutil import Clock


class RetryableJobError(Exception):
    """A transient failure (a peer or the database briefly unavailable): the job is tried again later."""


@dataclass(frozen=True)
class JobContext:
    job_id: int
    study_id: int
    attempt: int
    settings: Settings
    sessions: sessionmaker[Session]
    clock: Clock


@dataclass(frozen=True)
class JobOutcome:
    state: JobState
    detail: dict[str, Any] | None = None
    error: str | None = None


JobProcessor = Callable[[JobContext], JobOutcome]


def record_pickup_only(ctx: JobContext) -> JobOutcome:
    """Placeholder until inference exists: the job stays recorded as picked up."""
    return JobOutcome(state=JobState.PICKED_UP, detail={"note": "no processor installed"})


def default_processor(settings: Settings) -> JobProcessor:
    """The processor a worker uses when none is given: CCF-Net inference (worker.inference)."""
    from worker.inference import inference_processor

    return inference_processor(settings)
