"""Fixtures and helpers for the intake tests: a private PostgreSQL database and Redis key space per test,
DCMTK on the path, settings pointing at them, and a pynetdicom sender."""

from __future__ import annotations

import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE

from worker.settings import Settings, get_settings

PG_ADMIN_URL = os.environ.get("CCFNET_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
MR = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
CALLED_AE = "CCFNET"
COMPRESSED_SYNTAXES = (
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.5",
)


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_postgres() -> None:
    if not _port_open("127.0.0.1", 5432):
        pytest.skip("PostgreSQL is not running on 127.0.0.1:5432")


def require_redis() -> None:
    if not _port_open(REDIS_HOST, REDIS_PORT):
        pytest.skip("Redis is not running on 127.0.0.1:6379")


def require_dcmtk() -> None:
    if not (shutil.which("storescu") and shutil.which("echoscu")):
        pytest.skip("DCMTK (storescu, echoscu) is not installed")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, uniquely named PostgreSQL database, dropped afterwards."""
    require_postgres()
    from sqlalchemy import create_engine

    name = f"ccfnet_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@dataclass(frozen=True)
class RedisSpace:
    url: str
    prefix: str

    def flush(self) -> int:
        """Delete every key of this test (the test's equivalent of FLUSHDB, without touching others)."""
        import redis

        client = redis.Redis.from_url(self.url)
        try:
            keys = list(client.scan_iter(match=f"{self.prefix}*"))
            return int(client.delete(*keys)) if keys else 0
        finally:
            client.close()


@pytest.fixture
def redis_space() -> Iterator[RedisSpace]:
    """A unique key prefix in a Redis database, cleaned afterwards."""
    require_redis()
    space = RedisSpace(
        url=f"redis://{REDIS_HOST}:{REDIS_PORT}/{int(uuid.uuid4().int % 15) + 1}",
        prefix=f"ccfnet-test-{uuid.uuid4().hex[:10]}:",
    )
    try:
        yield space
    finally:
        space.flush()


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "port": 0,
        "bind_address": "127.0.0.1",
        "ae_title": CALLED_AE,
        "study_quiet_seconds": 1.5,
        "sweep_interval_seconds": 0.25,
        "reconcile_interval_seconds": 0.5,
        "reconcile_grace_seconds": 2.0,
        "min_free_disk_mb": 1,
        "log_level": "INFO",
    }
    values.update(overrides)
    return get_settings(**values)


def migrate_to_head(url: str) -> None:
    from worker.db import migrate
    from worker.db.engine import make_engine

    engine = make_engine(url)
    try:
        migrate.upgrade(engine)
    finally:
        engine.dispose()


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def send(
    port: int,
    datasets: Iterable[Dataset | Path],
    *,
    calling_ae: str = "MODALITY",
    called_ae: str = CALLED_AE,
    contexts: Iterable[str] = (MR, ENHANCED_MR),
) -> list[int]:
    """Send over one association; the status of each, or -1 for an instance that got no response."""
    ae = AE(ae_title=calling_ae)
    for sop_class in contexts:
        ae.add_requested_context(sop_class)
        for syntax in COMPRESSED_SYNTAXES:
            ae.add_requested_context(sop_class, syntax)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    if not assoc.is_established:
        raise ConnectionRefusedError("association not established")
    statuses = []
    try:
        for item in datasets:
            rsp = assoc.send_c_store(item)
            statuses.append(int(rsp.Status) if "Status" in rsp else -1)
    finally:
        assoc.release()
    return statuses


def spool_files(spool: Path) -> list[Path]:
    return sorted(p for p in spool.rglob("*") if p.is_file())
