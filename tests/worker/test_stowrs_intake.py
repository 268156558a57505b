"""STOW-RS intake under abuse (issue 24): the body is streamed to disk under a size cap (413 above it, memory
flat, /metrics answering meanwhile); a body cut short, without parts or of the wrong type is refused whole
with nothing stored; every part is checked as a C-STORE instance is (the bad-input table again)."""

# ruff: noqa: F811  (pytest fixtures imported from intake_support are parameters of the same name)
from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dicom_factory as f
import httpx
import pytest
from intake_support import make_settings, migrate_to_head, pg_url, spool_files  # noqa: F401  (fixture)
from sqlalchemy import func, select
from test_intake_bad_input import bad_inputs

from worker.db.models import Instance
from worker.service import Service

pytestmark = pytest.mark.services
TOKEN = "stow-intake-token"
CAP_MB = 16
BOUNDARY = "ccfnet-test-boundary"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


@pytest.fixture
def service(tmp_path: Path, pg_url: str) -> Iterator[Service]:
    migrate_to_head(pg_url)
    settings = make_settings(
        tmp_path / "var", database_url=pg_url, stow_senders={"gateway": TOKEN},
        stow_max_request_mb=CAP_MB, http_port=0,
    )
    svc = Service(settings, sweep=False, reconcile=False, http=True).start()
    try:
        yield svc
    finally:
        svc.stop()


def _url(svc: Service) -> str:
    return f"http://127.0.0.1:{svc.http_port}/dicomweb/studies"


def _multipart(*parts: bytes, close: bool = True) -> bytes:
    body = b"".join(
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n" for part in parts
    )
    return body + (f"--{BOUNDARY}--\r\n".encode() if close else b"")


def _post(svc: Service, body: bytes, content_type: str = CONTENT_TYPE) -> httpx.Response:
    return httpx.post(_url(svc), content=body, timeout=60,
                      headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": content_type})


def _file_bytes(ds: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _good_part() -> bytes:
    uids = f.new_study()
    return _file_bytes(f.mr_image(uids.study, uids.series[0], rows=128, columns=128))


def _nothing_stored(svc: Service) -> None:
    assert spool_files(svc.settings.spool_path) == []
    assert svc.sessions is not None
    with svc.sessions() as session:
        assert session.scalar(select(func.count(Instance.id))) == 0


def test_broken_bodies_are_refused_whole_and_store_nothing(service: Service) -> None:
    good = _good_part()
    whole = _multipart(good, good)
    cases = {
        "unterminated": (_multipart(good, close=False), CONTENT_TYPE, 400),
        "cut inside pixel data": (whole[: len(whole) - 3000], CONTENT_TYPE, 400),
        "hello world": (b"hello world", CONTENT_TYPE, 400),
        "empty": (b"", CONTENT_TYPE, 400),
        "no parts": (f"--{BOUNDARY}--\r\n".encode(), CONTENT_TYPE, 409),
        "type dicom+json": (whole, f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}', 415),
        "not multipart": (good, "application/dicom", 415),
    }
    got = {name: _post(service, body, ctype).status_code for name, (body, ctype, _) in cases.items()}
    assert got == {name: status for name, (_, _, status) in cases.items()}
    _nothing_stored(service)
    assert not list(service.settings.spool_path.joinpath(".incoming").iterdir())  # no part files left
    assert _post(service, _multipart(good)).status_code == 200  # and the endpoint still works


def test_the_bad_input_table_over_stow_rs(service: Service, tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    reasons = {}
    for case in bad_inputs():
        response = _post(service, _multipart(case.build(folder).read_bytes()))
        assert response.status_code == 409, (case.name, response.text)
        (failed,) = response.json()["00081198"]["Value"]
        reasons[case.name] = failed["00081197"]["Value"][0]
    expected = {case.name: STOW_REASONS.get(case.name, int(case.status)) for case in bad_inputs()}
    assert {k: hex(v) for k, v in reasons.items()} == {k: hex(v) for k, v in expected.items()}
    _nothing_stored(service)


# The Failure Reason is the C-STORE status, but for a SOP class we do not take: STOW-RS has no presentation
# context to refuse it with, so it is PS3.18's 0122 "SOP Class not supported".
STOW_REASONS = {"sop-class-not-ours-in-mr-context": 0x0122}


def _declared_gigabyte(svc: Service) -> bytes:
    """Headers that announce a 1 GB body, then no body: the status line of the answer."""
    import socket

    with socket.create_connection(("127.0.0.1", svc.http_port), timeout=30) as sock:
        sock.sendall(
            f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: {CONTENT_TYPE}\r\nContent-Length: {10**9}\r\n\r\n".encode()
        )
        return sock.recv(4096).split(b"\r\n", 1)[0]


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


SENDER = r"""
import sys, httpx
url, token, boundary, total = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
def body():
    yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    chunk = b"\0" * (1 << 20)
    for _ in range(total >> 20):
        yield chunk
    yield f"\r\n--{boundary}--\r\n".encode()
headers = {"Authorization": f"Bearer {token}",
           "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
try:
    print(httpx.post(url, content=body(), headers=headers, timeout=120).status_code)
except httpx.HTTPError as exc:  # the server may close while we still send: it has answered by then
    print("closed", type(exc).__name__)
"""


def test_a_1_gb_request_is_refused_at_the_cap_with_memory_flat_and_metrics_live(service: Service) -> None:
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to measure resident memory")
    assert _declared_gigabyte(service).startswith(b"HTTP/1.1 413")  # refused before reading the body

    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) of this process: the service's
    before = _rss_kb("VmRSS")
    metrics_ok: list[bool] = []
    stop = threading.Event()

    def poll_metrics() -> None:
        while not stop.is_set():
            try:
                metrics_ok.append(httpx.get(f"http://127.0.0.1:{service.http_port}/metrics", timeout=1.0)
                                  .status_code == 200)
            except httpx.TimeoutException:
                metrics_ok.append(False)

    poller = threading.Thread(target=poll_metrics, daemon=True)
    poller.start()
    sent = subprocess.run(  # streamed, no Content-Length: only the cap stops it
        [sys.executable, "-c", SENDER, _url(service), TOKEN, BOUNDARY, str(10**9)],
        capture_output=True, text=True, timeout=300,
    )
    stop.set()
    poller.join(5)
    grown_mb = (_rss_kb("VmHWM") - before) / 1024
    print(f"STOW-RS 1 GB streamed request: peak resident growth {grown_mb:.1f} MB; /metrics polls {len(metrics_ok)}")
    assert sent.stdout.split()[0] in ("413", "closed"), sent.stdout + sent.stderr
    assert grown_mb < 100
    assert metrics_ok and all(metrics_ok)
    _nothing_stored(service)
    assert not list(service.settings.spool_path.joinpath(".incoming").iterdir())


def test_a_part_of_another_media_type_fails_alone(service: Service) -> None:
    good = _good_part()
    other = f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\n\r\nJFIF\r\n".encode()
    body = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + good + b"\r\n" + other
    body += f"--{BOUNDARY}--\r\n".encode()
    response = _post(service, body)
    assert response.status_code == 202, response.text
    assert len(response.json()["00081199"]["Value"]) == 1
