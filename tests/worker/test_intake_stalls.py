"""Peers that stall cannot take the listener offline: raw sockets that stop half-way through an association
request or a P-DATA PDU lose their slot at the network timeout, over-limit connections are refused at once,
and a normal DCMTK send gets through (issue 24). Real PostgreSQL, real storescu."""

# ruff: noqa: F811  (pytest fixtures imported from intake_support are parameters of the same name)
from __future__ import annotations

import json
import logging
import os
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import dicom_factory as f
import pytest
from intake_support import (
    CALLED_AE,
    MR,
    make_settings,
    migrate_to_head,
    pg_url,  # noqa: F401  (fixture)
    require_dcmtk,
    send,
    spool_files,
    wait_for,
)
from sqlalchemy import select
from typer.testing import CliRunner

from worker.cli import app
from worker.db.models import Association, Instance
from worker.listener.network import LIMIT_REJECT_PDU
from worker.ops import metrics
from worker.service import Service

pytestmark = pytest.mark.services

TIMEOUT = 3.0  # CCFNET_NETWORK_TIMEOUT_SECONDS in these tests
MAX = 3  # CCFNET_MAX_ASSOCIATIONS
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def association_rq(calling: str = "STALLER", called: str = CALLED_AE) -> bytes:
    """A minimal A-ASSOCIATE-RQ PDU (PS3.8 9.3.2): MR Image Storage in Explicit VR Little Endian."""
    context = _item(0x30, MR.encode()) + _item(0x40, EXPLICIT_LE.encode())
    items = (
        _item(0x10, b"1.2.840.10008.3.1.1.1")
        + _item(0x20, bytes((1, 0, 0, 0)) + context)
        + _item(0x50, _item(0x51, struct.pack(">I", 16384)))
    )
    fixed = struct.pack(">HH16s16s32s", 1, 0, called.ljust(16).encode(), calling.ljust(16).encode(), b"\0" * 32)
    body = fixed + items
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    header = _read_exactly(sock, 6)
    kind, _, length = struct.unpack(">BBI", header)
    return kind, _read_exactly(sock, length)


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def stall_in_request(port: int) -> socket.socket:
    """Connect and send the first half of an A-ASSOCIATE-RQ, then nothing."""
    sock = _connect(port)
    rq = association_rq()
    sock.sendall(rq[: len(rq) // 2])
    return sock


def stall_in_p_data(port: int) -> socket.socket:
    """Associate for real, then start a P-DATA-TF PDU of 10 000 bytes and stop after 100."""
    sock = _connect(port)
    sock.sendall(association_rq())
    kind, _ = _read_pdu(sock)
    assert kind == 0x02, "association not accepted"  # A-ASSOCIATE-AC
    sock.sendall(struct.pack(">BBI", 0x04, 0, 10_000) + b"\x00" * 100)
    return sock


def stall_in_release(port: int) -> socket.socket:
    """Associate for real, then send 6 of the 10 bytes of an A-RELEASE-RQ."""
    sock = _connect(port)
    sock.sendall(association_rq())
    kind, _ = _read_pdu(sock)
    assert kind == 0x02, "association not accepted"
    sock.sendall(struct.pack(">BBI", 0x05, 0, 4))
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed the connection (whatever it sent before)."""
    sock.settimeout(0.05)
    try:
        while True:
            if not sock.recv(4096):
                return True
    except TimeoutError:
        return False
    except OSError:
        return True


def storescu(port: int, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["storescu", "-to", "10", "-ta", "10", "-td", "10", "-aet", "STORESCU", "-aec", CALLED_AE,
         "127.0.0.1", str(port), str(path)],
        capture_output=True, text=True, timeout=30, env={**os.environ, "TCP_NODELAY": "1"},
    )


def _associations(svc: Service) -> list[Association]:
    assert svc.sessions is not None
    with svc.sessions() as session:
        return list(session.scalars(select(Association).order_by(Association.id)))


def _counter(outcome: str, reason: str) -> float:
    return metrics.ASSOCIATIONS.labels(outcome=outcome, reason=reason)._value.get()


@pytest.fixture
def service(tmp_path: Path, pg_url: str) -> Iterator[Service]:
    migrate_to_head(pg_url)
    settings = make_settings(
        tmp_path / "var", database_url=pg_url, max_associations=MAX, network_timeout_seconds=TIMEOUT
    )
    svc = Service(settings, sweep=False, reconcile=False).start()
    try:
        yield svc
    finally:
        svc.stop()


def test_stalled_peers_lose_their_slots_and_storescu_gets_through(
    service: Service, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_dcmtk()
    caplog.set_level(logging.WARNING, logger="worker.listener")
    timeouts_before = _counter("aborted", "network_timeout")
    limit_before = _counter("rejected", "local_limit_exceeded")
    image = f.write(f.mr_image(*_one_study()), tmp_path / "good")

    started = time.monotonic()
    in_p_data = stall_in_p_data(service.port)
    in_release = stall_in_release(service.port)
    in_request = stall_in_request(service.port)  # every slot now held by a stalled peer
    held = [in_p_data, in_release, in_request]
    over_limit = [stall_in_request(service.port), stall_in_p_data_refused(service.port)]
    over_limit += [stall_in_request(service.port) for _ in range(2 * MAX - len(held) - 2)]
    stalled = [*held, *over_limit]
    assert len(stalled) == 2 * MAX

    # While they stall, the two that associated are open associations.
    wait_for(lambda: [a.state for a in _associations(service) if a.state == "accepted"] == ["accepted"] * 2,
             timeout=2)

    # A normal send: refused while the slots are held, through once the stalled peers are dropped.
    wait_for(lambda: storescu(service.port, image).returncode == 0, timeout=TIMEOUT + 5, interval=0.2)
    assert time.monotonic() - started < TIMEOUT + 5
    assert all(closed_by_server(s) for s in stalled)

    # Stored, and the half-sent instance is nowhere.
    assert service.sessions is not None
    with service.sessions() as session:
        assert session.scalars(select(Instance.calling_ae)).all() == ["STORESCU"]
    assert len(spool_files(service.settings.spool_path)) == 1

    # Gone from `ccfnet status`; every stalled peer logged with its address and port.
    monkeypatch.setenv("CCFNET_DATABASE_URL", service.settings.effective_database_url)
    monkeypatch.setenv("CCFNET_DATA_DIR", str(service.settings.data_dir))
    status = CliRunner().invoke(app, ["status", "--json"])
    assert status.exit_code == 0, status.output
    report = json.loads(status.output)
    assert report["associations_open"] == []
    assert report["associations_refused_last_hour"]["aborted:network_timeout"] == len(held)
    assert report["associations_refused_last_hour"]["rejected:local_limit_exceeded"] >= len(over_limit)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    for sock in stalled:
        port = sock.getsockname()[1]
        assert any(f"127.0.0.1:{port}" in w for w in warnings), (port, warnings)
    for sock in held:
        port = sock.getsockname()[1]
        assert any(f"127.0.0.1:{port}" in w and "network timeout" in w.lower() for w in warnings), port

    rows = _associations(service)
    aborted = [(a.state, a.reject_reason) for a in rows if a.state == "aborted"]
    assert aborted == [("aborted", "network_timeout")] * len(held)
    assert all(a.peer_address == "127.0.0.1" and a.ended_at is not None for a in rows if a.state != "released")
    assert _counter("aborted", "network_timeout") - timeouts_before == len(held)
    assert _counter("rejected", "local_limit_exceeded") - limit_before >= len(over_limit)
    for sock in stalled:
        sock.close()


def stall_in_p_data_refused(port: int) -> socket.socket:
    """An over-limit peer that would have stalled in P-DATA: it is refused with A-ASSOCIATE-RJ at once."""
    sock = _connect(port)
    sock.sendall(association_rq())
    kind, body = _read_pdu(sock)
    assert struct.pack(">BBI", kind, 0, len(body)) + body == LIMIT_REJECT_PDU
    return sock


def test_per_peer_limit_leaves_room_for_other_addresses(tmp_path: Path, pg_url: str) -> None:
    migrate_to_head(pg_url)
    settings = make_settings(
        tmp_path / "var", database_url=pg_url, max_associations=8, max_associations_per_peer=2,
        network_timeout_seconds=30,
    )
    with Service(settings, sweep=False, reconcile=False) as svc:
        held = [stall_in_p_data(svc.port) for _ in range(2)]
        third = _connect(svc.port)
        third.sendall(association_rq())
        kind, body = _read_pdu(third)
        assert struct.pack(">BBI", kind, 0, len(body)) + body == LIMIT_REJECT_PDU
        assert closed_by_server(third)
        with pytest.raises(ConnectionRefusedError):
            send(svc.port, [])  # pynetdicom from the same address: rejected too
        # Another address is served while 127.0.0.1 is at its limit.
        other = _connect(svc.port, source="127.0.0.2")
        other.sendall(association_rq())
        assert _read_pdu(other)[0] == 0x02
        other.close()
        for sock in held:  # they go away: 127.0.0.1 is served again
            sock.close()
        wait_for(lambda: _send_ok(svc.port), timeout=10, interval=0.2)
        rejected = [a.reject_reason for a in _associations(svc) if a.state == "rejected"]
        assert rejected.count("peer_limit_exceeded") >= 2


def _send_ok(port: int) -> bool:
    try:
        return send(port, [f.mr_image(*_one_study())]) == [0]
    except ConnectionRefusedError:
        return False


def _one_study() -> tuple[str, str]:
    uids = f.new_study()
    return uids.study, uids.series[0]
