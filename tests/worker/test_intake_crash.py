"""kill -9 of ``ccfnet serve`` in the middle of a 300-instance send: every instance that got a success
response is on disk and in the database after the restart, and the study gets exactly one job. Also: ``ccfnet serve``
refuses an outdated PostgreSQL schema and names the command that upgrades it."""

# ruff: noqa: F811  (pytest fixtures imported from intake_support are parameters of the same name)
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import dicom_factory as f
import pytest
from intake_support import (
    CALLED_AE,
    MR,
    RedisSpace,
    pg_url,  # noqa: F401  (fixture)
    redis_space,  # noqa: F401  (fixture)
    send,
    wait_for,
)
from sqlalchemy import select

from worker.db import repository as repo
from worker.db.engine import make_engine, make_session_factory
from worker.db.models import Instance

pytestmark = pytest.mark.services

QUIET = 3.0
CCFNET = [sys.executable, "-c", "from worker.cli import main; main()"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(tmp_path: Path, pg: str, redis: RedisSpace, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCFNET_")}
    env.update(
        {
            "CCFNET_DATABASE_URL": pg,
            "CCFNET_BROKER_URL": redis.url,
            "CCFNET_REDIS_KEY_PREFIX": redis.prefix,
            "CCFNET_DATA_DIR": str(tmp_path / "var"),
            "CCFNET_PORT": str(port),
            "CCFNET_BIND_ADDRESS": "127.0.0.1",
            "CCFNET_AE_TITLE": CALLED_AE,
            "CCFNET_STUDY_QUIET_SECONDS": str(QUIET),
            "CCFNET_SWEEP_INTERVAL_SECONDS": "0.25",
            "CCFNET_MIN_FREE_DISK_MB": "1",
            "CCFNET_LOG_LEVEL": "WARNING",
            "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        }
    )
    return env


def _start(env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        proc = subprocess.Popen([*CCFNET, "serve"], env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)

    def listening() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            with socket.create_connection(("127.0.0.1", int(env["CCFNET_PORT"])), timeout=0.5):
                return True
        except OSError:
            return False

    wait_for(listening, timeout=60, interval=0.2)
    return proc


def test_serve_refuses_an_outdated_schema_then_upgrade_works(
    tmp_path: Path,
    pg_url: str,
    redis_space: RedisSpace,
) -> None:
    env = _env(tmp_path, pg_url, redis_space, _free_port())
    refused = subprocess.run(
        [*CCFNET, "serve"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 3
    assert "ccfnet db upgrade" in refused.stderr
    upgraded = subprocess.run(
        [*CCFNET, "db", "upgrade"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert upgraded.returncode == 0, upgraded.stderr
    from worker.db.migrate import head_revision

    assert f"-> {head_revision()}" in upgraded.stdout


def test_kill_9_mid_send_loses_no_acknowledged_instance(
    tmp_path: Path,
    pg_url: str,
    redis_space: RedisSpace,
) -> None:
    env = _env(tmp_path, pg_url, redis_space, _free_port())
    subprocess.run(
        [*CCFNET, "db", "upgrade"], env=env, cwd=tmp_path, check=True, capture_output=True, timeout=120
    )
    log = tmp_path / "serve.log"
    proc = _start(env, tmp_path, log)

    uids = f.new_study()
    images = list(f.study_images(uids, 300))
    statuses: dict[str, int] = {}

    def sender() -> None:
        from pynetdicom import AE

        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(MR)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        assoc = ae.associate("127.0.0.1", int(env["CCFNET_PORT"]), ae_title=CALLED_AE)
        for ds in images:
            if not assoc.is_established:
                break
            rsp = assoc.send_c_store(ds)
            if "Status" in rsp:
                statuses[ds.SOPInstanceUID] = int(rsp.Status)
        if assoc.is_established:
            assoc.release()

    thread = threading.Thread(target=sender)
    thread.start()
    wait_for(lambda: len(statuses) >= 120, timeout=120, interval=0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    thread.join(60)
    acknowledged = {uid for uid, status in statuses.items() if status == 0}
    assert 120 <= len(acknowledged) < 300

    proc = _start(env, tmp_path, log)
    try:
        engine = make_engine(pg_url)
        sessions = make_session_factory(engine)
        spool = tmp_path / "var" / "spool"
        with sessions() as session:
            rows = {r.sop_instance_uid: r for r in session.scalars(select(Instance))}
        assert acknowledged <= set(rows)
        for uid in acknowledged:
            assert (spool / rows[uid].path).stat().st_size == rows[uid].size_bytes
        assert not list((spool / ".incoming").iterdir())  # temporary files of the crash were cleaned

        # The sender retries what was not acknowledged; the study then becomes exactly one job.
        remaining = [ds for ds in images if ds.SOPInstanceUID not in acknowledged]
        assert send(int(env["CCFNET_PORT"]), remaining) == [0] * len(remaining)

        def jobs() -> list[object]:
            with sessions() as session:
                return list(repo.jobs_for_study(session, uids.study))

        wait_for(jobs, timeout=30)
        time.sleep(QUIET + 1.0)
        found = jobs()
        assert len(found) == 1
        assert found[0].instance_count == 300  # type: ignore[attr-defined]
        with sessions() as session:
            assert repo.count_instances(session, uids.study) == 300
        engine.dispose()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
