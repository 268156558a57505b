"""Prometheus metrics: counters and a histogram bumped where things happen, gauges read from the database.

Counters live in prometheus-client's default registry. With ``PROMETHEUS_MULTIPROC_DIR`` set (required for a
prefork Celery worker, whose children do the work) prometheus-client writes them to files in that folder and a
scrape sums them through ``MultiProcessCollector``. The gauges (studies waiting, jobs by state, age of the
oldest queued job, paused queues) are computed at scrape time from :func:`worker.ops.status.collect_status`, so every
process that serves ``/metrics`` reports the same database truth and nothing needs to be kept in step.

Labels carry outcomes and reasons only, never UIDs or patient data.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from worker.settings import Settings
    from worker.timeutil import Clock

log = logging.getLogger("worker.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
NAMESPACE = "ccfnet"

INSTANCES_RECEIVED = Counter(
    "instances_received", "Instances stored durably and recorded (C-STORE or STOW-RS).", namespace=NAMESPACE
)
OWN_RESULTS_RETURNED = Counter(
    "own_results_returned", "Our own result objects sent back to us: acknowledged, not analysed.",
    namespace=NAMESPACE,
)
ASSOCIATIONS = Counter(
    "associations", "DICOM association requests by outcome; reason is set for rejections.",
    ["outcome", "reason"], namespace=NAMESPACE,
)
EXPORT_ATTEMPTS = Counter(
    "export_attempts", "Export attempts by outcome (delivered, warning, failed).", ["outcome"], namespace=NAMESPACE
)
ANATOMY_GATE_DECLINED = Counter(
    "anatomy_gate_declined", "Studies the anatomy gate declined (not analysed), by the rule that declined them.",
    ["reason"], namespace=NAMESPACE,
)
INFERENCE_SECONDS = Histogram(
    "inference_seconds", "Model inference time per job.", namespace=NAMESPACE,
    buckets=(0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0),
)


# Hooks: one call at each place where the thing happens ----------------------------------------------------
def instance_received() -> None:
    INSTANCES_RECEIVED.inc()


def own_result_returned() -> None:
    OWN_RESULTS_RETURNED.inc()


def association(outcome: str, reason: str = "") -> None:
    ASSOCIATIONS.labels(outcome=outcome, reason=reason).inc()


def export_attempt(outcome: str) -> None:
    EXPORT_ATTEMPTS.labels(outcome=outcome).inc()


def anatomy_gate_declined(rule: str) -> None:
    ANATOMY_GATE_DECLINED.labels(reason=rule).inc()


def observe_inference(seconds: float) -> None:
    INFERENCE_SECONDS.observe(seconds)


# Scrape side ---------------------------------------------------------------------------------------------
class _Delegate(Collector):
    """Expose another registry's metrics through a per-app registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        return self._registry.collect()


class DatabaseCollector(Collector):
    """Gauges computed at scrape time from the database (and the broker's queue depths)."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], clock: Clock) -> None:
        self._settings = settings
        self._sessions = sessions
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        from sqlalchemy.exc import SQLAlchemyError

        from worker.ops.queues import PAUSABLE_QUEUES
        from worker.ops.status import collect_status

        up = GaugeMetricFamily(f"{NAMESPACE}_database_up", "1 when the status gauges could be read.")
        try:
            with self._sessions() as session:
                status = collect_status(self._settings, session, self._clock())
        except SQLAlchemyError:
            log.warning("metrics: cannot read the database", exc_info=True)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield GaugeMetricFamily(
            f"{NAMESPACE}_studies_waiting", "Studies still receiving (not yet a job).", value=status["studies_waiting"]
        )
        jobs = GaugeMetricFamily(f"{NAMESPACE}_jobs", "Jobs by state.", labels=["state"])
        for state, count in sorted(status["jobs_by_state"].items()):
            jobs.add_metric([state], count)
        yield jobs
        yield GaugeMetricFamily(
            f"{NAMESPACE}_oldest_waiting_job_seconds", "Age of the oldest queued job (0 when none).",
            value=status["oldest_queued_job_seconds"] or 0.0,
        )
        depth = GaugeMetricFamily(f"{NAMESPACE}_queue_depth", "Messages waiting in the broker.", labels=["queue"])
        for queue, count in sorted(status["queues"].items()):
            if count is not None:
                depth.add_metric([queue], count)
        yield depth
        paused = GaugeMetricFamily(f"{NAMESPACE}_queue_paused", "1 while the queue is paused.", labels=["queue"])
        for queue in PAUSABLE_QUEUES:
            paused.add_metric([queue], 1 if queue in status["paused_queues"] else 0)
        yield paused
        exports = GaugeMetricFamily(f"{NAMESPACE}_exports", "Exports by state.", labels=["state"])
        for state, count in sorted(status["exports_by_state"].items()):
            exports.add_metric([state], count)
        yield exports


def process_registry() -> CollectorRegistry:
    """This process's counters, or every process's when ``PROMETHEUS_MULTIPROC_DIR`` is set."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        registry = CollectorRegistry(auto_describe=False)
        multiprocess.MultiProcessCollector(registry)
        return registry
    return REGISTRY


def scrape_registry(settings: Settings, sessions: sessionmaker[Session], clock: Clock) -> CollectorRegistry:
    """The registry ``/metrics`` renders: the counters plus the database gauges."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Delegate(process_registry()))
    registry.register(DatabaseCollector(settings, sessions, clock))
    return registry


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    return generate_latest(registry), CONTENT_TYPE_LATEST


def serve_worker_metrics(port: int, address: str) -> None:
    """``ccfnet worker``'s ``/metrics`` (counters and the inference histogram, no database gauges), on the
    address of the listener's ops page (CCFNET_HTTP_BIND). OSError when the port is taken."""
    from prometheus_client import start_http_server

    start_http_server(port, addr=address, registry=process_registry())
    log.info("worker metrics on %s:%d", address, port)
