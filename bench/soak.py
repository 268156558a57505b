"""Soak test under faults: the production shape on one machine, with parts killed while studies flow.

Started here, each its own process: a PostgreSQL cluster and a Redis server of the run's own (so that restarting
them disturbs nothing else), one Orthanc (the PACS: it sends half of the studies and receives every result),
2 listeners (`ccfnet serve`), 2 workers (`ccfnet worker -Q inference,batch`, prefork, one job at a time) and an
exporter (`ccfnet worker -Q export`), as deploy/ runs them; each restarted one second after it dies, as the
systemd units (Restart=on-failure) do. 4 senders push the phantom studies at once: two modality
simulators (pynetdicom; they resend only what was not acknowledged, so an acknowledged instance that got lost
shows up as missing) and two Orthanc store jobs (a PACS forwarding whole studies; it resends the study).

Faults, each once, at a random point of the run's progress (seeded): kill -9 of a listener during a send,
a PostgreSQL restart (fast shutdown) during the sends, a Redis restart (it keeps nothing on disk) while jobs are
queued, kill -9 of a worker while a job is in inference, Orthanc down for a while once results are flowing, and
kill -9 of the exporter while results are being delivered.

The run ends when every study's results are delivered, or at the timeout. It prints a table and exits 0 only if
every acknowledged instance is in the spool and the database, every study has exactly one set of results at the
PACS, no duplicates, nothing dead.

    python bench/soak.py                      # the full run: 50 studies, > 3,000 instances, Orthanc down 60 s
    python bench/soak.py --studies 8 --sagittal-slices 9 --outage 10 --quiet 15   # the short one `make test` runs
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "worker"))

import httpx  # noqa: E402
from orthanc import ORTHANC, OUR_MODALITY, Orthanc, free_port  # noqa: E402  (tests/worker/orthanc.py)
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.filewriter import dcmwrite  # noqa: E402
from pynetdicom import AE  # noqa: E402
from sqlalchemy import create_engine, func, select  # noqa: E402
from sqlalchemy.engine import Engine  # noqa: E402
from sqlalchemy.exc import SQLAlchemyError  # noqa: E402

MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
RESULT_SERIES_PREFIX = "CCF-Net "  # every result series' description (worker/results/_common.py)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, step: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if predicate():
                return
        time.sleep(step)
    raise TimeoutError(f"{what}: not within {timeout:g} s")


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# --- Services of the run's own -------------------------------------------------------------------------------
def postgres_bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if found:
        return str(found[-1])
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"PostgreSQL's {name} is not installed")
    return path


class PostgresCluster:
    """A throwaway cluster (initdb, trust auth) on its own port; as root it runs as the postgres user."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="ccfnet-soak-pg-"))
        self.port = free_port()
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as:
            shutil.chown(self.folder, "postgres", "postgres")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as, *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start(self) -> None:
        data = self.folder / "data"
        if not data.exists():
            self._run(postgres_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
        self._ctl("start", "-w")

    def _ctl(self, *args: str) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c max_connections=200"
        self._run(postgres_bin("pg_ctl"), "-D", str(self.folder / "data"), "-l", str(self.folder / "log"),
                  "-o", options, *args)

    def restart(self) -> None:
        self._ctl("restart", "-m", "fast", "-w")

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._ctl("stop", "-m", "immediate", "-w")
        shutil.rmtree(self.folder, ignore_errors=True)


class RedisServer:
    """redis-server on its own port, nothing kept on disk: a restart comes back empty."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        redis = shutil.which("redis-server")
        if redis is None:
            raise RuntimeError("redis-server is not installed")
        self.process = subprocess.Popen(
            [redis, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: port_open(self.port), 10, "redis-server")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def messages(self) -> int:
        """Messages Redis holds for Celery now: waiting in the queues, or reserved by a worker (unacked)."""
        import redis

        try:
            client = redis.Redis(port=self.port, socket_timeout=2)
            with client:
                waiting = sum(int(client.llen(queue)) for queue in ("inference", "batch", "export"))
                return waiting + int(client.hlen("unacked"))
        except redis.RedisError:
            return 0


@dataclass
class Supervised:
    """One of our processes, restarted a second after it dies (as deploy/systemd's Restart=on-failure would)."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        self.starts += 1

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill9(self) -> None:
        """SIGKILL to the whole process group: the main process and its pool children, no clean-up."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.kill9()
            self.process.wait()


class Supervisor(threading.Thread):
    def __init__(self, processes: list[Supervised]) -> None:
        super().__init__(daemon=True, name="supervisor")
        self.processes = processes
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.25):
            for proc in self.processes:
                if not proc.alive() and not self.stopping.is_set():
                    time.sleep(1.0)
                    if not self.stopping.is_set():
                        proc.start()


# --- Senders ------------------------------------------------------------------------------------------------
@dataclass
class StudyToSend:
    study_uid: str
    datasets: list[Dataset]
    orthanc_id: str | None = None  # set for the studies Orthanc sends


@dataclass
class SenderTally:
    name: str
    sent: int = 0  # C-STORE requests (modality) or instances asked of Orthanc (PACS), resends included
    acknowledged: set[str] = field(default_factory=set)
    retries: int = 0
    done: bool = False


class ModalitySender(threading.Thread):
    """A modality: one association per study; after a failure it reconnects and sends only what was not
    acknowledged with a success status."""

    def __init__(self, name: str, port: int, studies: list[StudyToSend], stop: threading.Event) -> None:
        super().__init__(daemon=True, name=name)
        self.port = port
        self.studies = studies
        self.stop_event = stop
        self.tally = SenderTally(name)
        self.ae = AE(ae_title=name.upper()[:16])
        self.ae.add_requested_context(MR_STORAGE)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 30

    def run(self) -> None:
        for study in self.studies:
            pending = list(study.datasets)
            while pending and not self.stop_event.is_set():
                pending = self._send(pending)
                if pending:
                    self.tally.retries += 1
                    time.sleep(1.0)
        self.tally.done = True

    def _send(self, pending: list[Dataset]) -> list[Dataset]:
        try:
            assoc = self.ae.associate("127.0.0.1", self.port, ae_title="CCFNET")
        except Exception:  # a refused or reset connection: try again
            return pending
        if not assoc.is_established:
            return pending
        try:
            while pending:
                self.tally.sent += 1
                response = assoc.send_c_store(pending[0])
                status = int(response.Status) if response is not None and "Status" in response else -1
                if status != 0:
                    break
                self.tally.acknowledged.add(str(pending[0].SOPInstanceUID))
                pending = pending[1:]
        except Exception:  # the listener died mid-association
            pass
        finally:
            with contextlib.suppress(Exception):
                if assoc.is_established:
                    assoc.release()
                else:
                    assoc.abort()
        return pending


class OrthancSender(threading.Thread):
    """The PACS forwarding whole studies (Orthanc's synchronous store job); a failed job is asked again."""

    def __init__(self, name: str, url: str, modality: str, studies: list[StudyToSend], stop: threading.Event
                 ) -> None:
        super().__init__(daemon=True, name=name)
        self.url, self.modality = url, modality
        self.studies = studies
        self.stop_event = stop
        self.tally = SenderTally(name)

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=600) as client:
            for study in self.studies:
                while not self.stop_event.is_set():
                    self.tally.sent += len(study.datasets)
                    if self._store(client, study):
                        self.tally.acknowledged.update(str(d.SOPInstanceUID) for d in study.datasets)
                        break
                    self.tally.retries += 1
                    time.sleep(2.0)
        self.tally.done = True

    def _store(self, client: httpx.Client, study: StudyToSend) -> bool:
        try:
            response = client.post(f"/modalities/{self.modality}/store",
                                   json={"Resources": [study.orthanc_id], "Synchronous": True})
        except httpx.HTTPError:
            return False
        if response.status_code != 200:
            return False
        body = response.json()
        return int(body.get("FailedInstancesCount", 0)) == 0 and int(body.get("InstancesCount", 0)) == len(
            study.datasets)


# --- The run ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SoakConfig:
    studies: int = 50
    sagittal_slices: int = 28
    quiet_seconds: float = 30.0
    outage_seconds: float = 60.0
    timeout_seconds: float = 1800.0
    seed: int = 2022
    keep: bool = False
    work: Path | None = None


@dataclass
class Fault:
    name: str
    at: float | None = None  # seconds since the senders started
    detail: str = ""


@dataclass
class SoakResult:
    rows: list[tuple[str, str]]
    faults: list[Fault]
    problems: list[str]
    numbers: dict[str, Any]

    @property
    def ok(self) -> bool:
        return not self.problems

    def table(self) -> str:
        width = max(len(k) for k, _ in self.rows)
        lines = [f"| {'quantity'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
        lines += [f"| {k.ljust(width)} | {v} |" for k, v in self.rows]
        lines.append("")
        lines.append("| fault | at (s) | detail |")
        lines.append("|-------|--------|--------|")
        for fault in self.faults:
            at = "not reached" if fault.at is None else f"{fault.at:.1f}"
            lines.append(f"| {fault.name} | {at} | {fault.detail} |")
        return "\n".join(lines)


def _encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def make_studies(config: SoakConfig) -> list[StudyToSend]:
    from ccfnet_core.phantom import render_study, study_generator

    studies = []
    for index in range(config.studies):
        datasets, truth = render_study(study_generator(config.seed, index), index,
                                       sagittal_slices=config.sagittal_slices)
        studies.append(StudyToSend(truth.study_uid, datasets))
    return studies


class Soak:
    def __init__(self, config: SoakConfig) -> None:
        if ORTHANC is None:
            raise RuntimeError("Orthanc is not installed")
        self.config = config
        self.rng = random.Random(config.seed)
        self.work = config.work or Path(tempfile.mkdtemp(prefix="ccfnet-soak-"))
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "logs").mkdir(exist_ok=True)
        self.stop_senders = threading.Event()
        self.faults = [Fault(n) for n in ("listener kill -9 during a send", "PostgreSQL restart",
                                          "Redis restart", "worker kill -9 during inference",
                                          f"Orthanc down {config.outage_seconds:g} s",
                                          "exporter kill -9 while delivering")]
        self.t0 = 0.0

    # Setting up ------------------------------------------------------------------------------------------
    def _settings_env(self, listener_port: int, orthanc_dicom_port: int) -> dict[str, str]:
        from ccfnet_core.checkpoint import MODELS_DIR, PHANTOM_MODEL_NAME

        env = {k: v for k, v in os.environ.items() if not k.startswith("CCFNET_")}
        env.update({
            "CCFNET_AE_TITLE": "CCFNET",
            "CCFNET_PORT": str(listener_port),
            "CCFNET_BIND_ADDRESS": "127.0.0.1",
            "CCFNET_DATA_DIR": str(self.work / "var"),
            "CCFNET_MIN_FREE_DISK_MB": "100",
            "CCFNET_DATABASE_URL": self.pg.url,
            "CCFNET_BROKER_URL": self.redis.url,
            "CCFNET_STUDY_QUIET_SECONDS": f"{self.config.quiet_seconds:g}",
            "CCFNET_SWEEP_INTERVAL_SECONDS": "2",
            "CCFNET_RECONCILE_INTERVAL_SECONDS": "5",
            "CCFNET_RECONCILE_GRACE_SECONDS": "15",
            "CCFNET_TASK_TIME_LIMIT_SECONDS": "30",
            "CCFNET_TASK_SOFT_TIME_LIMIT_SECONDS": "25",
            "CCFNET_JOB_LEASE_MARGIN_SECONDS": "5",
            "CCFNET_MODEL_PATH": str(MODELS_DIR / PHANTOM_MODEL_NAME),
            "CCFNET_MODEL_DEVICE": "cpu",
            "CCFNET_DESTINATIONS": json.dumps([{"kind": "dicom", "name": "pacs", "ae_title": "ORTHANC",
                                                "host": "127.0.0.1", "port": orthanc_dicom_port}]),
            "CCFNET_EXPORT_MAX_ATTEMPTS": "40",
            "CCFNET_EXPORT_BACKOFF_SECONDS": "2",
            "CCFNET_EXPORT_BACKOFF_MAX_SECONDS": "15",
            "CCFNET_NETWORK_TIMEOUT_SECONDS": "20",
            "CCFNET_LOG_LEVEL": "INFO",
            "OMP_NUM_THREADS": "1",
        })
        return env

    def start(self, studies: list[StudyToSend]) -> None:
        self.pg = PostgresCluster()
        self.pg.start()
        self.redis = RedisServer(self.work)
        self.redis.start()
        ports = {"a": free_port(), "b": free_port()}
        self.orthanc = Orthanc(self.work / "orthanc", free_port(), free_port(), "CCFNET", ports["a"],
                               extra_modalities={"ccfnet-b": ("CCFNET", ports["b"])}, concurrent_jobs=4)
        self.orthanc.start()
        self.modality_names = {"a": OUR_MODALITY, "b": "ccfnet-b"}
        self.ports = ports
        ccfnet = str(Path(sys.executable).with_name("ccfnet"))
        env = self._settings_env(ports["a"], self.orthanc.dicom_port)
        subprocess.run([ccfnet, "db", "upgrade"], env=env, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        self.listeners = {
            key: Supervised(f"listener-{key}", [ccfnet, "serve", "--http-port", "0"],
                            self._settings_env(port, self.orthanc.dicom_port),
                            self.work / "logs" / f"listener-{key}.log")
            for key, port in ports.items()
        }
        # As deploy/ runs them: GPU-style workers on the job queues, one job at a time; results go out through
        # an exporter of their own, so deliveries never wait behind queued inference.
        self.workers = [
            Supervised(f"worker-{n}", [ccfnet, "worker", "-Q", "inference,batch", "-c", "1"], env,
                       self.work / "logs" / f"worker-{n}.log")
            for n in (1, 2)
        ]
        self.exporter = Supervised("exporter", [ccfnet, "worker", "-Q", "export", "-c", "2"], env,
                                   self.work / "logs" / "exporter.log")
        for proc in [*self.listeners.values(), *self.workers, self.exporter]:
            proc.start()
        for key, port in ports.items():
            wait_until(lambda p=port: port_open(p), 60, f"listener {key}")  # type: ignore[misc]
        self.supervisor = Supervisor([*self.listeners.values(), *self.workers, self.exporter])
        self.supervisor.start()
        self.engine: Engine = create_engine(self.pg.url, pool_pre_ping=True)
        # The PACS half: uploaded to Orthanc first (not timed), Orthanc forwards them during the run.
        for study in studies[1::2]:
            ids = [self.orthanc.upload(_encode(ds)) for ds in study.datasets]
            study.orthanc_id = str(self.orthanc.get(f"/instances/{ids[0]}/study")["ID"])

    def stop(self) -> None:
        self.stop_senders.set()
        if hasattr(self, "supervisor"):
            self.supervisor.stopping.set()
            self.supervisor.join(5)
        for proc in [*getattr(self, "listeners", {}).values(), *getattr(self, "workers", []),
                     *([self.exporter] if hasattr(self, "exporter") else [])]:
            proc.stop()
        if hasattr(self, "orthanc"):
            self.orthanc.stop()
        if hasattr(self, "engine"):
            self.engine.dispose()
        if hasattr(self, "redis"):
            self.redis.stop()
        if hasattr(self, "pg"):
            self.pg.stop()
        if not self.config.keep:
            shutil.rmtree(self.work, ignore_errors=True)

    # Watching --------------------------------------------------------------------------------------------
    def _counts(self) -> dict[str, Any]:
        from worker.db.models import Export, Job, Study

        with self.engine.connect() as conn:
            jobs = dict(conn.execute(select(Job.state, func.count()).group_by(Job.state)).all())
            exports = dict(conn.execute(select(Export.state, func.count()).group_by(Export.state)).all())
            studies = conn.execute(select(func.count()).select_from(Study)).scalar_one()
        return {"jobs": jobs, "exports": exports, "studies": studies}

    def _running_job_worker(self) -> str | None:
        """The worker name of a job in inference now, if any: picked up under a second ago (a job takes one to
        two seconds here), no results written yet. An older `running` job may be one whose task Celery cancelled
        when the broker went away, waiting for its lease: killing its worker would hit an idle process."""
        from worker.db.models import Job, JobEvent

        now = dt.datetime.now(dt.UTC)
        with self.engine.connect() as conn:
            for job_id in conn.execute(select(Job.id).where(Job.state == "running")).scalars():
                events = conn.execute(select(JobEvent.kind, JobEvent.detail, JobEvent.at)
                                      .where(JobEvent.job_id == job_id).order_by(JobEvent.id)).all()
                if events and events[-1][0] == "picked_up" and now - events[-1][2] < dt.timedelta(seconds=1):
                    return str((events[-1][1] or {}).get("worker", ""))
        return None

    def _elapsed(self) -> float:
        return time.monotonic() - self.t0

    def _inject(self, senders: list[Any], total: int) -> None:
        """Each fault once, when the run's progress passes a point drawn at random."""
        acked_share = [self.rng.uniform(0.15, 0.6), self.rng.uniform(0.4, 0.9)]  # listener kill, PostgreSQL
        jobs_share = self.rng.uniform(0.1, 0.5)  # Redis: a share of the studies has a job
        done_share = [self.rng.uniform(0.0, 0.3), self.rng.uniform(0.2, 0.6)]  # worker kill, Orthanc down
        exporter_share = self.rng.uniform(0.0, 0.4)  # exporter kill, preferably with a delivery in flight
        exporter_eligible_since: float | None = None
        listener_key = self.rng.choice(sorted(self.listeners))
        pending = set(range(len(self.faults)))
        while pending and not self.stop_senders.is_set():
            time.sleep(0.05)
            acked = sum(len(s.tally.acknowledged) for s in senders) / total
            try:
                counts = self._counts()
            except SQLAlchemyError:
                continue
            made = sum(counts["jobs"].values()) / self.config.studies
            done = counts["jobs"].get("succeeded", 0) / self.config.studies
            if 0 in pending and acked >= acked_share[0]:
                self.listeners[listener_key].kill9()
                self._record(0, f"listener {listener_key} at {acked:.0%} acknowledged")
                pending.discard(0)
            if 1 in pending and acked >= acked_share[1]:
                self.pg.restart()
                self._record(1, f"at {acked:.0%} acknowledged")
                pending.discard(1)
            if 2 in pending and made >= jobs_share:
                waiting = self.redis.messages()  # restart when it loses something, or once every job is done
                if waiting or done >= 1.0:
                    self.redis.restart()
                    self._record(2, f"{waiting} message(s) lost, {counts['jobs'].get('queued', 0)} job(s) queued")
                    pending.discard(2)
            if 3 in pending and done >= done_share[0]:
                with contextlib.suppress(SQLAlchemyError):
                    name = self._running_job_worker()
                    if name is not None:
                        self._kill_worker(name)
                        pending.discard(3)
            if 4 in pending and done >= done_share[1]:
                threading.Thread(target=self._orthanc_outage, daemon=True).start()
                pending.discard(4)
            exporting = counts["exports"].get("sending", 0), counts["exports"].get("pending", 0)
            if 5 in pending and done >= exporter_share and any(exporting):
                exporter_eligible_since = exporter_eligible_since or time.monotonic()
                if exporting[0] or time.monotonic() - exporter_eligible_since > 5:
                    self.exporter.kill9()
                    self._record(5, f"{exporting[0]} export(s) sending, {exporting[1]} pending")
                    pending.discard(5)

    def _record(self, index: int, detail: str) -> None:
        self.faults[index].at = self._elapsed()
        self.faults[index].detail = detail
        print(f"  [{self._elapsed():6.1f} s] fault: {self.faults[index].name} ({detail})", flush=True)

    def _kill_worker(self, worker_name: str) -> None:
        """Kill the worker process group whose pid is in the job's worker name (host:pid of its main thread)."""
        pid = int(worker_name.rsplit(":", 1)[-1]) if worker_name.rsplit(":", 1)[-1].isdigit() else -1
        target = next((w for w in self.workers if w.process is not None and
                       (w.process.pid == pid or _parent_pid(pid) == w.process.pid)), None)
        target = target or self.rng.choice(self.workers)
        target.kill9()
        self._record(3, f"{target.name}, in inference")

    def _orthanc_outage(self) -> None:
        self.orthanc.stop()
        self._record(4, "results were being delivered")
        time.sleep(self.config.outage_seconds)
        self.orthanc.start(timeout=60)
        print(f"  [{self._elapsed():6.1f} s] Orthanc is back", flush=True)

    def _finished(self, senders: list[Any]) -> bool:
        """Everything sent and settled, Orthanc back from its outage (a fault never reached fails the run)."""
        if not all(s.tally.done for s in senders) or self.faults[4].at is None or self.orthanc.process is None:
            return False
        counts = self._counts()
        jobs, exports = counts["jobs"], counts["exports"]
        settled = not jobs.get("queued") and not jobs.get("running") and not exports.get("pending") and not \
            exports.get("sending")
        return settled and jobs.get("succeeded", 0) + jobs.get("failed", 0) + jobs.get(
            "no_eligible_series", 0) >= self.config.studies

    # The whole run ---------------------------------------------------------------------------------------
    def run(self) -> SoakResult:
        config = self.config
        print(f"rendering {config.studies} phantom studies ...", flush=True)
        studies = make_studies(config)
        total = sum(len(s.datasets) for s in studies)
        print(f"{config.studies} studies, {total} instances; starting PostgreSQL, Redis, Orthanc, 2 listeners, "
              f"2 workers, an exporter in {self.work}", flush=True)
        try:
            self.start(studies)
            by_sender: list[list[StudyToSend]] = [studies[0::4], studies[1::4], studies[2::4], studies[3::4]]
            senders: list[Any] = [
                ModalitySender("modality-a", self.ports["a"], by_sender[0], self.stop_senders),
                OrthancSender("pacs-a", self.orthanc.url, self.modality_names["a"], by_sender[1], self.stop_senders),
                ModalitySender("modality-b", self.ports["b"], by_sender[2], self.stop_senders),
                OrthancSender("pacs-b", self.orthanc.url, self.modality_names["b"], by_sender[3], self.stop_senders),
            ]
            self.t0 = time.monotonic()
            for sender in senders:
                sender.start()
            injector = threading.Thread(target=self._inject, args=(senders, total), daemon=True)
            injector.start()
            deadline = self.t0 + config.timeout_seconds
            last_print = 0.0
            while time.monotonic() < deadline:
                time.sleep(1.0)
                try:
                    if self._finished(senders):
                        break
                    counts = self._counts()
                except SQLAlchemyError:
                    continue
                if self._elapsed() - last_print >= 10:
                    last_print = self._elapsed()
                    acked = sum(len(s.tally.acknowledged) for s in senders)
                    print(f"  [{last_print:6.1f} s] acknowledged {acked}/{total}, studies {counts['studies']}, "
                          f"jobs {dict(counts['jobs'])}, exports {dict(counts['exports'])}", flush=True)
            wall = self._elapsed()
            self.stop_senders.set()
            return self._verify(studies, senders, wall)
        finally:
            self.stop()

    def _verify(self, studies: list[StudyToSend], senders: list[Any], wall: float) -> SoakResult:
        from worker.db.models import Export, ExportAttempt, Instance, Job, JobEvent, ResultObject, Study

        total = sum(len(s.datasets) for s in studies)
        acknowledged: set[str] = set().union(*(s.tally.acknowledged for s in senders))
        spool = self.work / "var" / "spool"
        with self.engine.connect() as conn:
            in_db = dict(conn.execute(select(Instance.sop_instance_uid, Instance.path)).all())
            received = conn.execute(select(func.coalesce(func.sum(Instance.receive_count), 0))).scalar_one()
            study_rows = dict(conn.execute(select(Study.id, Study.study_instance_uid)).all())
            jobs = conn.execute(select(Job.id, Job.study_id, Job.state)).all()
            objects = conn.execute(select(ResultObject.job_id, ResultObject.sop_instance_uid)).all()
            exports = conn.execute(select(Export.id, Export.job_id, Export.state)).all()
            publishes = Counter(
                str((detail or {}).get("reason", "")).removeprefix("reconciler: ")
                for detail in conn.execute(select(JobEvent.detail).where(JobEvent.kind == "published")).scalars()
            )
            claimed_attempts = conn.execute(select(func.coalesce(func.sum(Export.attempts), 0))).scalar_one()
            recorded_attempts = conn.execute(select(func.count()).select_from(ExportAttempt)).scalar_one()
        in_spool = {uid for uid, path in in_db.items() if (spool / path).is_file()}
        spool_files = sum(1 for p in spool.rglob("*.dcm") if p.is_file()) if spool.exists() else 0
        job_state = Counter(state for _, _, state in jobs)
        delivered_jobs = {job_id for _, job_id, state in exports if state == "delivered"}
        expected_at_pacs: dict[str, set[str]] = {}
        job_study = {job_id: study_rows[study_id] for job_id, study_id, _ in jobs}
        for job_id, uid in objects:
            if job_id in delivered_jobs:
                expected_at_pacs.setdefault(job_study[job_id], set()).add(uid)
        if self.orthanc.process is None:  # the run timed out during the outage
            self.orthanc.start(timeout=60)
        at_pacs = {s.study_uid: self._results_at_pacs(s.study_uid) for s in studies}
        duplicates = sum(len(found - expected_at_pacs.get(uid, set())) for uid, found in at_pacs.items())
        missing_at_pacs = sum(len(expected_at_pacs.get(uid, set()) - found) for uid, found in at_pacs.items())
        studies_with_results = sum(1 for uid, found in at_pacs.items() if found)
        studies_with_two_jobs_delivered = Counter(job_study[j] for j in delivered_jobs)
        export_states = Counter(state for _, _, state in exports)
        cut_off = int(claimed_attempts) - int(recorded_attempts)  # claimed by an exporter that died before recording
        sent = sum(s.tally.sent for s in senders)
        problems = []
        lost_spool = acknowledged - in_spool
        lost_db = acknowledged - set(in_db)
        if len(acknowledged) < total:
            problems.append(f"only {len(acknowledged)} of {total} instances were ever acknowledged")
        if lost_spool:
            problems.append(f"{len(lost_spool)} acknowledged instance(s) are not in the spool")
        if lost_db:
            problems.append(f"{len(lost_db)} acknowledged instance(s) are not in the database")
        if studies_with_results != len(studies):
            problems.append(f"{len(studies) - studies_with_results} studies have no results at the PACS")
        if duplicates:
            problems.append(f"{duplicates} duplicate result object(s) at the PACS")
        if missing_at_pacs:
            problems.append(f"{missing_at_pacs} delivered result object(s) are missing at the PACS")
        if any(n > 1 for n in studies_with_two_jobs_delivered.values()):
            problems.append("a study had the results of two jobs delivered")
        if export_states.get("dead"):
            problems.append(f"{export_states['dead']} export(s) dead")
        bad_faults = [f.name for f in self.faults if f.at is None]
        if bad_faults:
            problems.append(f"faults not injected: {', '.join(bad_faults)}")
        objects_delivered = sum(len(v) for v in expected_at_pacs.values())
        rows = [
            ("studies / instances in the cohort", f"{len(studies)} / {total}"),
            ("instances sent (C-STORE requests and Orthanc-forwarded, resends included)", str(sent)),
            ("sender retries after a failure", str(sum(s.tally.retries for s in senders))),
            ("instances acknowledged (distinct)", str(len(acknowledged))),
            ("acknowledged, in spool / in database",
             f"{len(acknowledged & in_spool)} / {len(acknowledged & set(in_db))}"),
            ("instances in spool (files) / in database (rows)", f"{spool_files} / {len(in_db)}"),
            ("receipts recorded (repeats included)", str(received)),
            ("studies in database", str(len(study_rows))),
            ("jobs (by state)", ", ".join(f"{k} {v}" for k, v in sorted(job_state.items()))),
            ("job messages republished: broker lost them / lease expired",
             f"{publishes.get('lost by the broker', 0)} / {publishes.get('lease expired', 0)}"),
            ("studies with results at the PACS", f"{studies_with_results} / {len(studies)}"),
            ("result objects delivered (distinct, at the PACS)", f"{objects_delivered}"),
            ("duplicate result objects at the PACS", str(duplicates)),
            ("export attempts cut off by a kill (then resent with the same UIDs)", str(cut_off)),
            ("exports dead", str(export_states.get("dead", 0))),
            ("process restarts (listeners, workers, exporter)",
             str(sum(p.starts - 1 for p in [*self.listeners.values(), *self.workers, self.exporter]))),
            ("wall time, senders start to last delivery", f"{wall:.1f} s"),
            ("throughput", f"{len(acknowledged) / wall:.1f} instances/s, {60 * len(studies) / wall:.1f} studies/min"),
        ]
        numbers = {"total": total, "acknowledged": len(acknowledged), "lost_spool": len(lost_spool),
                   "lost_db": len(lost_db), "duplicates": duplicates, "dead": export_states.get("dead", 0),
                   "studies_with_results": studies_with_results, "wall_seconds": wall, "cut_off": cut_off,
                   "republished": dict(publishes),
                   "jobs": dict(job_state)}
        return SoakResult(rows, self.faults, problems, numbers)

    def _results_at_pacs(self, study_uid: str) -> set[str]:
        """SOP Instance UIDs of the result objects (our "CCF-Net ..." series) Orthanc holds for a study."""
        found = set()
        series = httpx.post(f"{self.orthanc.url}/tools/find", json={
            "Level": "Series", "Query": {"StudyInstanceUID": study_uid}, "Expand": True}, timeout=60).json()
        for item in series:
            # Ours by series description: the key image carries the source's modality (MR), like the images.
            if str(item["MainDicomTags"].get("SeriesDescription", "")).startswith(RESULT_SERIES_PREFIX):
                for instance in self.orthanc.get(f"/series/{item['ID']}/instances"):
                    found.add(instance["MainDicomTags"]["SOPInstanceUID"])
        return found


def _parent_pid(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=50)
    parser.add_argument("--sagittal-slices", type=int, default=28, help="per sagittal series (2 series a study)")
    parser.add_argument("--quiet", type=float, default=30.0, help="the study quiet period, seconds")
    parser.add_argument("--outage", type=float, default=60.0, help="how long Orthanc is down, seconds")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--seed", type=int, default=2022)
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, spool) afterwards")
    parser.add_argument("--work", type=Path, help="the work folder (default: a new temporary one)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    config = SoakConfig(studies=args.studies, sagittal_slices=args.sagittal_slices, quiet_seconds=args.quiet,
                        outage_seconds=args.outage, timeout_seconds=args.timeout, seed=args.seed, keep=args.keep,
                        work=args.work)
    def _terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # so that run()'s clean-up stops every process it started

    signal.signal(signal.SIGTERM, _terminate)
    try:
        result = Soak(config).run()
    except (RuntimeError, TimeoutError, subprocess.CalledProcessError) as exc:
        print(f"soak: cannot run: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    print()
    print(result.table())
    if args.json:
        args.json.write_text(json.dumps({**result.numbers, "problems": result.problems,
                                         "faults": [f.__dict__ for f in result.faults]}, indent=1))
    if result.problems:
        print("\nFAILED: " + "; ".join(result.problems))
        raise SystemExit(1)
    print("\nOK: every acknowledged instance stored, every study's results delivered once, no duplicates")


if __name__ == "__main__":
    main()
