"""The running service: listener, sweeper and reconciler threads, and (embedded) Celery worker threads.

``Service(settings).start()`` / ``.stop()`` is the in-process API that ``ccfnet serve``, ``ccfnet demo`` and
the tests use. ``EmbeddedService`` is the zero-services mode: SQLite, the on-disk broker, and a Celery worker
running in threads of the same process.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from celery import Celery
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from worker.assembly import restart_quiet_clock, sweep_once
from worker.db.engine import make_engine, make_session_factory, safe_url
from worker.db.migrate import ensure_schema
from worker.inference import configured_model_version
from worker.listener.handlers import AdmissionPolicy, IntakeContext
from worker.listener.scp import Listener
from worker.periodic import PeriodicThread
from worker.queue.celery_app import QUEUES, make_celery
from worker.queue.processing import JobProcessor
from worker.queue.publish import JobPublisher
from worker.queue.reconciler import make_inspector, reconcile_once
from worker.settings import Settings
from worker.spool import Spool
from worker.timeutil import Clock, utcnow

log = logging.getLogger("worker.service")


class EmbeddedWorker:
    """A Celery worker consuming in threads of this process (the embedded mode)."""

    def __init__(self, app: Celery, *, queues: tuple[str, ...], concurrency: int) -> None:
        from celery.worker import WorkController

        # The threads pool runs tasks under Celery's *default* app (prefork children set theirs), so this
        # app must be the default one for its task to be found.
        app.set_default()
        self._controller: Any = WorkController(
            app=app,
            pool_cls="threads",
            concurrency=concurrency,
            queues=list(queues),
            hostname=f"embedded@{socket.gethostname()}-{os.getpid()}",
            loglevel="WARNING",
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
        )
        self._thread = threading.Thread(target=self._controller.start, name="celery-embedded", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 15.0) -> None:
        self._controller.stop(in_sighandler=False)
        self._thread.join(timeout)


class HttpServer:
    """uvicorn in a thread of this process (the ops page, /metrics and STOW-RS)."""

    def __init__(self, app: Any, host: str, port: int) -> None:
        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="http", daemon=True)
        self.port = port

    def start(self, timeout: float = 10.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.02)
        sockets = [s for server in self._server.servers for s in server.sockets]
        if sockets:
            self.port = int(sockets[0].getsockname()[1])

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)


class Service:
    def __init__(
        self,
        settings: Settings,
        *,
        embedded: bool = False,
        processor: JobProcessor | None = None,
        listen: bool = True,
        sweep: bool = True,
        reconcile: bool = True,
        http: bool | None = None,
        clock: Clock = utcnow,
    ) -> None:
        """`http`: serve the ops page and /metrics; None means "when settings.http_port is set"."""
        self.settings = settings.for_embedded() if embedded else settings
        self.embedded = embedded
        self._processor = processor
        self._listen, self._sweep, self._reconcile = listen, sweep, reconcile
        self._http = settings.http_port is not None if http is None else http
        self._http_server: HttpServer | None = None
        self._clock = clock
        self.engine: Engine | None = None
        self.sessions: sessionmaker[Session] | None = None
        self.celery: Celery | None = None
        self.publisher: JobPublisher | None = None
        self._listener: Listener | None = None
        self._threads: list[PeriodicThread] = []
        self._worker: EmbeddedWorker | None = None
        self.intake: IntakeContext | None = None

    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("service not listening")
        return self._listener.port

    @property
    def http_port(self) -> int:
        if self._http_server is None:
            raise RuntimeError("service not serving HTTP")
        return self._http_server.port

    def start(self) -> Service:
        s = self.settings
        spool = Spool(s.spool_path, min_free_bytes=s.min_free_disk_mb * 1024 * 1024)
        removed = spool.prepare()
        if removed:
            log.warning("removed %d temporary file(s) left by an interrupted write", removed)
        self.engine = make_engine(s.effective_database_url)
        ensure_schema(self.engine, apply=s.uses_sqlite)
        self.sessions = make_session_factory(self.engine)
        reopened = restart_quiet_clock(self.sessions, now=self._clock())
        log.info(
            "database %s; %d open studies restart their quiet period",
            safe_url(s.effective_database_url),
            reopened,
        )
        self.celery = make_celery(s, processor=self._processor)
        self.publisher = JobPublisher(self.celery, self.sessions, self._clock)
        if self.embedded:
            self._worker = EmbeddedWorker(self.celery, queues=QUEUES, concurrency=s.embedded_worker_threads)
            self._worker.start()
        if self._listen:
            context = IntakeContext(
                spool=spool,
                sessions=self.sessions,
                policy=AdmissionPolicy(
                    s.ae_title, frozenset(s.allowed_calling_aets), tuple(s.allowed_peer_addresses)
                ),
                listener_name=f"{socket.gethostname()}:{os.getpid()}",
                tls=s.tls_enabled,
                clock=self._clock,
            )
            self.intake = context  # shared with the STOW-RS endpoint
            self._listener = Listener(s, context)
            self._listener.start()
        if self._sweep:
            self._threads.append(PeriodicThread("sweeper", s.sweep_interval_seconds, self.sweep))
        if self._reconcile:
            self._threads.append(PeriodicThread("reconciler", s.reconcile_interval_seconds, self.reconcile))
        for thread in self._threads:
            thread.start()
        if self._http:
            from worker.ops.web import create_app

            app = create_app(s, self.sessions, self.celery, intake=self.intake, clock=self._clock)
            self._http_server = HttpServer(app, s.http_bind, s.http_port or 0)
            self._http_server.start()
            log.info("operations page and /metrics on %s:%d", s.http_bind, self._http_server.port)
        return self

    def sweep(self) -> int:
        """One sweep: assemble stable studies and publish their jobs (after the commit)."""
        assert self.sessions is not None and self.publisher is not None
        made = sweep_once(
            self.sessions,
            quiet_seconds=self.settings.study_quiet_seconds,
            model_version=configured_model_version(self.settings),
            now=self._clock(),
        )
        for job in made:
            self.publisher.publish(job.job_id, job.queue, reason="study assembled")
        return len(made)

    def reconcile(self) -> int:
        assert self.sessions is not None and self.publisher is not None
        report = reconcile_once(
            self.sessions,
            self.publisher,
            make_inspector(self.settings),
            grace_seconds=self.settings.reconcile_grace_seconds,
            now=self._clock(),
        )
        exports = 0
        if self.celery is not None and self.settings.destinations:
            from worker.export.queue import reconcile_exports

            exports = reconcile_exports(self.celery, self.settings, self.sessions, self._clock)
        return len(report.republished) + exports

    def stop(self) -> None:
        if self._http_server is not None:
            self._http_server.stop()
            self._http_server = None
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
        for thread in self._threads:
            thread.stop()
        self._threads.clear()
        if self._worker is not None:
            self._worker.stop()
            self._worker = None
        if self.celery is not None:
            runtime = getattr(self.celery, "ccfnet_runtime", None)
            if runtime is not None:
                runtime.dispose()
            self.celery.close()
        if self.engine is not None:
            self.engine.dispose()
            self.engine = None

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class EmbeddedService(Service):
    """Everything in one process with no outside services (what ``ccfnet demo`` runs)."""

    def __init__(
        self, settings: Settings, *, processor: JobProcessor | None = None, clock: Clock = utcnow
    ) -> None:
        super().__init__(settings, embedded=True, processor=processor, clock=clock)
