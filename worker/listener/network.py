"""The listener's transport: pynetdicom's threaded server with a deadline on every network read, the TLS
handshake off the accept loop, and association limits enforced when a connection is accepted.

pynetdicom reads a PDU with blocking ``recv`` calls on a socket without a timeout, and its network timeout is
checked only between PDUs: a peer that sends half an A-ASSOCIATE-RQ, or stops in the middle of a P-DATA PDU,
blocks the reader for good and keeps its association slot. Here every accepted socket has a timeout, every
PDU read must be complete within ``CCFNET_NETWORK_TIMEOUT_SECONDS`` (a trickling peer is cut off too), and a
stalled read ends as a closed transport connection, so pynetdicom aborts the association and frees its slot.

Limits (``CCFNET_MAX_ASSOCIATIONS`` in all, ``CCFNET_MAX_ASSOCIATIONS_PER_PEER`` per peer address) count open
connections from the moment they are accepted, so connections that never send a complete association request
count too; one over a limit gets an A-ASSOCIATE-RJ (transient, local limit exceeded) at once and is closed.
Every connection refused or dropped before it became an association is reported to a :data:`ProblemSink`.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pynetdicom import evt
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from worker.listener.status import RejectReason

if TYPE_CHECKING:
    from pynetdicom.ae import ApplicationEntity
    from pynetdicom.association import Association
    from pynetdicom.presentation import PresentationContext

log = logging.getLogger("worker.listener")

# A PDU body longer than this is refused before it is read: P-DATA is bounded by the maximum PDU length we
# offer, and an A-ASSOCIATE-RQ with every context and syntax a modality knows stays well under 1 MiB.
MAX_PDU_READ_BYTES = 4 * 1024 * 1024
_CHUNK = 65_536
# A-ASSOCIATE-RJ PDU (PS3.8 9.3.4): type 03, reserved, length 4, reserved, then result, source, reason.
LIMIT_REJECT_PDU = bytes((0x03, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, *RejectReason.LOCAL_LIMIT_EXCEEDED.value))
_DRAIN_SECONDS = 1.0


@dataclass(frozen=True)
class ConnectionProblem:
    """A connection refused, or dropped before it became an association (nothing else records it)."""

    peer_address: str
    peer_port: int
    outcome: str  # "rejected" (refused by us) or "aborted" (dropped: the peer stalled)
    reason: str  # a short stable name: metrics label and database value
    detail: str  # for the log line
    tls: bool


ProblemSink = Callable[[ConnectionProblem], None]


class ConnectionLimits:
    """Open connections in all and per peer address; :meth:`acquire` and :meth:`release` are thread-safe."""

    def __init__(self, total: int, per_peer: int) -> None:
        self.total = total
        self.per_peer = per_peer
        self._open: Counter[str] = Counter()
        self._lock = threading.Lock()

    def acquire(self, peer: str) -> str | None:
        """Count a new connection from `peer`; None when admitted, else the limit it would exceed."""
        with self._lock:
            if sum(self._open.values()) >= self.total:
                return "local_limit_exceeded"
            if self._open[peer] >= self.per_peer:
                return "peer_limit_exceeded"
            self._open[peer] += 1
            return None

    def release(self, peer: str) -> None:
        with self._lock:
            self._open[peer] -= 1
            if self._open[peer] <= 0:
                del self._open[peer]

    def open_connections(self) -> dict[str, int]:
        with self._lock:
            return dict(self._open)


class DeadlineSocket(AssociationSocket):
    """pynetdicom's socket with a deadline on each read: the whole PDU header, or the whole PDU body, must
    arrive within the network timeout. A read past it returns what it has, which pynetdicom treats as the
    peer closing the connection (A-P-ABORT, connection closed, slot freed)."""

    problem: str | None = None  # what went wrong, for the log
    problem_reason: str | None = None  # its short name: network_timeout, pdu_too_large, connection_closed

    def recv(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        assert sock is not None
        timeout = self.assoc.network_timeout or 60.0
        data = bytearray()
        if nr_bytes > MAX_PDU_READ_BYTES:
            self._fail("pdu_too_large", f"a PDU of {nr_bytes} bytes announced (at most {MAX_PDU_READ_BYTES})")
            return data
        deadline = time.monotonic() + timeout
        try:
            while len(data) < nr_bytes:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                chunk = sock.recv(min(nr_bytes - len(data), _CHUNK))
                if not chunk:
                    if data:
                        self._fail("connection_closed", f"closed by the peer after {len(data)} of {nr_bytes} bytes")
                    break
                data.extend(chunk)
        except TimeoutError:
            self._fail("network_timeout", f"network timeout: {len(data)} of {nr_bytes} bytes in {timeout:g} s")
        except OSError as exc:
            self._fail("connection_closed", f"connection error: {exc}")
        finally:
            if self.socket is not None:
                self.socket.settimeout(timeout)  # sends keep the plain per-call timeout
        return data

    def _fail(self, reason: str, problem: str) -> None:
        self.problem_reason, self.problem = reason, problem
        requestor = self.assoc.requestor
        log.warning("peer %s:%s: %s; connection closed", requestor.address, requestor.port, problem)


class GuardedRequestHandler(RequestHandler):
    """Runs one association to its end in the connection's thread, so the server knows when the slot frees."""

    server: GuardedServer

    def handle(self) -> None:
        assoc = self._create_association()
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()
        assoc.join()
        sock = assoc.dul.socket
        if assoc.requestor.primitive is None and isinstance(sock, DeadlineSocket) and sock.problem_reason:
            # It never became an association, so no association handler saw it: report it here.
            self.server.report(
                self.client_address, "aborted", sock.problem_reason, f"no complete A-ASSOCIATE-RQ: {sock.problem}"
            )

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        # The same socket object with our read method; pynetdicom offers no hook to choose the class.
        assoc.dul.socket.__class__ = DeadlineSocket
        return assoc


def transport_problem(assoc: Any) -> str | None:
    """The short name of why an association's transport failed (a read past its deadline...), or None."""
    sock = getattr(getattr(assoc, "dul", None), "socket", None)
    return sock.problem_reason if isinstance(sock, DeadlineSocket) else None


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded association server with socket timeouts, limits and TLS in the connection thread.

    Built through ``AE.make_server(..., server_class=GuardedServer, limits=..., on_problem=...)``.
    """

    def __init__(
        self,
        ae: ApplicationEntity,
        address: tuple[str, int],
        ae_title: str,
        contexts: list[PresentationContext],
        ssl_context: ssl.SSLContext | None = None,
        evt_handlers: list[Any] | None = None,
        *,
        limits: ConnectionLimits,
        on_problem: ProblemSink,
    ) -> None:
        self.limits = limits
        self._on_problem = on_problem
        super().__init__(
            ae, address, ae_title, contexts, ssl_context, evt_handlers, request_handler=GuardedRequestHandler
        )

    @property
    def read_timeout(self) -> float:
        return float(self.ae.network_timeout or 60.0)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept only: the TLS handshake happens in the connection's thread, under the read timeout."""
        assert self.socket is not None
        client, address = self.socket.accept()
        client.settimeout(self.read_timeout)
        return client, address

    def process_request(self, request: Any, client_address: Any) -> None:
        """Count the connection against the limits (here, in the accept loop, so the count is exact), then
        serve it in its own thread."""
        verdict = self.limits.acquire(str(client_address[0]))
        thread = threading.Thread(
            target=self._serve_connection,
            args=(request, client_address, verdict),
            name=f"dicom-connection-{client_address[0]}:{client_address[1]}",
            daemon=True,
        )
        thread.start()

    def report(self, client_address: Any, outcome: str, reason: str, detail: str) -> None:
        problem = ConnectionProblem(
            str(client_address[0]), int(client_address[1]), outcome, reason, detail, self.ssl_context is not None
        )
        try:
            self._on_problem(problem)
        except Exception:  # reporting must never take the connection thread down with it
            log.exception("could not report a refused connection from %s", problem.peer_address)

    def _serve_connection(self, sock: socket.socket, client_address: Any, verdict: str | None) -> None:
        try:
            if verdict is not None:
                self._refuse_over_limit(sock, client_address, verdict)
                return
            ready = (
                self._handshake(sock, client_address) if self.ssl_context else self._first_bytes(sock, client_address)
            )
            if ready is None:
                return
            self.finish_request(ready, client_address)
        except Exception:  # the edge of a connection thread: log it, close it, keep serving the others
            log.exception("connection from %s failed", client_address[0])
            self.shutdown_request(sock)
        finally:
            if verdict is None:
                self.limits.release(str(client_address[0]))

    def _first_bytes(self, sock: socket.socket, client_address: Any) -> socket.socket | None:
        """Wait for the peer's first byte before starting an association: a connection that closes without
        a word (a port probe) is let go quietly, one that stays silent is dropped at the timeout."""
        try:
            readable, _, _ = select.select([sock], [], [], self.read_timeout)
            if not readable:
                self.report(
                    client_address, "aborted", "network_timeout", f"nothing received within {self.read_timeout:g} s"
                )
                self.shutdown_request(sock)
                return None
            if not sock.recv(1, socket.MSG_PEEK):
                log.debug("connection from %s closed without sending anything", client_address[0])
                self.shutdown_request(sock)
                return None
        except OSError:
            self.shutdown_request(sock)
            return None
        return sock

    def _handshake(self, sock: socket.socket, client_address: Any) -> ssl.SSLSocket | None:
        assert self.ssl_context is not None
        try:
            tls = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except OSError as exc:
            self.report(client_address, "rejected", "tls_handshake_failed", str(exc))
            self.shutdown_request(sock)
            return None
        try:
            tls.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            reason = tls_failure_reason(exc)
            if reason is None:
                log.debug("TLS connection from %s closed before the handshake", client_address[0])
            else:
                self.report(client_address, "rejected", reason, f"TLS handshake failed: {exc}")
            self.shutdown_request(tls)
            return None
        return tls

    def _refuse_over_limit(self, sock: socket.socket, client_address: Any, reason: str) -> None:
        """A-ASSOCIATE-RJ at once (plain DICOM), without reading the request; over TLS, only a close."""
        limit = self.limits.total if reason == "local_limit_exceeded" else self.limits.per_peer
        what = "associations" if reason == "local_limit_exceeded" else "associations from this address"
        self.report(client_address, "rejected", reason, f"already {limit} open {what}")
        if self.ssl_context is None:
            try:
                sock.settimeout(_DRAIN_SECONDS)
                sock.sendall(LIMIT_REJECT_PDU)
                sock.shutdown(socket.SHUT_WR)
                deadline = time.monotonic() + _DRAIN_SECONDS  # let the peer read the reject before we close
                while time.monotonic() < deadline and sock.recv(_CHUNK):
                    pass
            except OSError:
                pass
        self.shutdown_request(sock)


def tls_failure_reason(exc: BaseException) -> str | None:
    """A short name for why a TLS handshake failed, or None when the peer just closed (a port probe)."""
    if isinstance(exc, (ssl.SSLEOFError, ConnectionResetError, BrokenPipeError)) or (
        isinstance(exc, ssl.SSLError) and exc.reason == "UNEXPECTED_EOF_WHILE_READING"
    ):
        return None
    if isinstance(exc, TimeoutError):
        return "tls_handshake_timeout"
    reason = getattr(exc, "reason", None) or ""
    if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNSUPPORTED_PROTOCOL", "RECORD_LAYER_FAILURE"):
        return "tls_not_tls"
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return "tls_no_client_certificate"
    if reason in ("CERTIFICATE_VERIFY_FAILED", "TLSV1_ALERT_UNKNOWN_CA"):
        return "tls_certificate_not_trusted"
    return "tls_handshake_failed"
