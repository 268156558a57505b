"""Recording of connections that never became a normal association: refused by a limit, a failed TLS
handshake, a peer that stalled before its request, and requests pynetdicom itself rejected.

Each is logged with the peer address, counted (``ccfnet_associations_total{outcome,reason}``) and written to
the associations table (state ``rejected`` or ``aborted``, the reason in ``reject_reason``).
"""

from __future__ import annotations

import logging

from pynetdicom.events import Event
from sqlalchemy.exc import SQLAlchemyError

from worker.db import repository as repo
from worker.db.models import AssociationState
from worker.listener.handlers import IntakeContext
from worker.listener.network import ConnectionProblem
from worker.ops import metrics

log = logging.getLogger("worker.listener")

# A-ASSOCIATE-RJ (source, diagnostic) -> reason, for rejections pynetdicom makes itself (PS3.8 9.3.4).
_PYNETDICOM_REJECTIONS = {
    (0x01, 0x02): "application_context_not_supported",
    (0x02, 0x01): "user_identity_not_accepted",
    (0x02, 0x02): "protocol_version_not_supported",
    (0x03, 0x01): "temporary_congestion",
    (0x03, 0x02): "local_limit_exceeded",
}


def record_problem(ctx: IntakeContext, problem: ConnectionProblem) -> None:
    """Log, count and record one refused or dropped connection."""
    log.warning(
        "connection from %s:%d %s (%s): %s",
        problem.peer_address,
        problem.peer_port,
        problem.outcome,
        problem.reason,
        problem.detail,
    )
    metrics.association(problem.outcome, problem.reason)
    rec = repo.AssociationRecord(
        listener=ctx.listener_name,
        calling_ae="",
        called_ae="",
        peer_address=problem.peer_address[:64],
        peer_port=problem.peer_port,
        tls=problem.tls,
    )
    try:
        with ctx.sessions.begin() as session:
            repo.record_association(
                session, rec, state=AssociationState(problem.outcome), now=ctx.clock(), reject_reason=problem.reason
            )
    except SQLAlchemyError:
        log.exception("could not record a refused connection from %s", problem.peer_address)


def handle_rejected(event: Event, ctx: IntakeContext) -> None:
    """EVT_REJECTED: pynetdicom refused a request itself (our own refusals are recorded where they are made)."""
    requestor = event.assoc.requestor
    sent = event.assoc.acceptor.primitive
    key = (getattr(sent, "result_source", None), getattr(sent, "diagnostic", None))
    reason = _PYNETDICOM_REJECTIONS.get(key, "rejected")  # type: ignore[arg-type]
    primitive = requestor.primitive
    calling = str(getattr(primitive, "calling_ae_title", "") or "").strip()[:16]
    called = str(getattr(primitive, "called_ae_title", "") or "").strip()[:16]
    log.warning("association rejected: %s (calling AE %r, peer %s)", reason, calling, requestor.address)
    metrics.association("rejected", reason)
    rec = repo.AssociationRecord(
        listener=ctx.listener_name,
        calling_ae=calling,
        called_ae=called,
        peer_address=str(requestor.address)[:64],
        peer_port=int(requestor.port or 0),
        tls=ctx.tls,
    )
    try:
        with ctx.sessions.begin() as session:
            repo.record_association(
                session, rec, state=AssociationState.REJECTED, now=ctx.clock(), reject_reason=reason
            )
    except SQLAlchemyError:
        log.exception("could not record a rejected association")
