"""C-STORE SCU: one association per destination for a batch of objects, the peer's status per object."""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from worker.export.delivery import Delivery, Item, Outcome, failed, read_items
from worker.settings import DicomDestination

if TYPE_CHECKING:
    from pynetdicom import AE
    from pynetdicom.association import Association

SUCCESS = 0x0000
# C-STORE warnings (PS3.4 B.2.3): coercion of data elements, data set does not match the SOP class, elements
# discarded. The object is stored, so it is delivered; the status is kept on the attempt row.
WARNING_STATUSES = frozenset({0xB000, 0xB006, 0xB007})
# PS3.7 C.4 general warnings a storage SCP may also return.
GENERAL_WARNING_STATUSES = frozenset({0x0001, 0x0107, 0x0116})
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


def classify_status(status: int) -> Delivery:
    """A C-STORE response status as an outcome: success and warnings are delivered, anything else failed."""
    if status == SUCCESS:
        return Delivery(Outcome.DELIVERED, status)
    if status in WARNING_STATUSES or status in GENERAL_WARNING_STATUSES:
        return Delivery(Outcome.WARNING, status, f"stored with warning 0x{status:04X}")
    return failed(f"C-STORE status 0x{status:04X}", status)


def tls_context(destination: DicomDestination) -> ssl.SSLContext:
    """A client context that verifies the peer (against `tls_ca` when given) and offers our certificate."""
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(destination.tls_ca) if destination.tls_ca else None
    )
    if destination.tls_cert is not None and destination.tls_key is not None:
        context.load_cert_chain(destination.tls_cert, destination.tls_key)
    return context


def associate(
    ae: AE,
    peer: DicomDestination,
    *,
    ext_neg: list[Any] | None = None,
    evt_handlers: list[Any] | None = None,
) -> Association:
    """Request an association with a configured DICOM peer (destination or reprocess source), over TLS with
    :func:`tls_context` when the peer has ``tls``. Raises OSError or ssl.SSLError when its TLS files cannot be
    loaded; a refused connection or failed handshake gives an association that is not established."""
    tls_args = (tls_context(peer), peer.host) if peer.tls else None
    return ae.associate(
        peer.host, peer.port, ae_title=peer.ae_title, ext_neg=ext_neg, tls_args=tls_args, evt_handlers=evt_handlers
    )


def send_dimse(
    destination: DicomDestination, items: Sequence[Item], *, calling_ae: str, timeout: float
) -> dict[int, Delivery]:
    """Send every item over one association to `destination`; the result is keyed by export id."""
    from pynetdicom import AE

    readable, results = read_items(items)
    if not readable:
        return results
    ae = AE(ae_title=destination.calling_ae_title or calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    contexts = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for _, ds in readable}
    for sop_class, syntax in sorted(contexts):
        # Offer the uncompressed alternatives too: pynetdicom re-encodes between them if the peer prefers one.
        syntaxes = [syntax, *(s for s in UNCOMPRESSED if s != syntax)] if UID(syntax) in UNCOMPRESSED else [syntax]
        ae.add_requested_context(sop_class, syntaxes)
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"

    def all_failed(error: str) -> dict[int, Delivery]:
        return results | {item.export_id: failed(error) for item, _ in readable}

    try:
        assoc = associate(ae, destination)
    except (OSError, ssl.SSLError) as exc:
        return all_failed(f"association with {where} failed: {exc}")
    if not assoc.is_established:
        reason = "rejected by the peer" if assoc.is_rejected else "not established (refused, aborted or timed out)"
        return all_failed(f"association with {where} {reason}")
    try:
        for item, ds in readable:
            if not assoc.is_established:
                results[item.export_id] = failed(f"association with {where} ended before this object was sent")
                continue
            try:
                response = assoc.send_c_store(ds)
            except ValueError as exc:  # no accepted presentation context, or not encodable for it
                results[item.export_id] = failed(f"{where} did not accept SOP class {ds.SOPClassUID}: {exc}")
                continue
            if "Status" not in response:
                results[item.export_id] = failed(f"no C-STORE response from {where} (timed out or aborted)")
                continue
            results[item.export_id] = classify_status(int(response.Status))
    finally:
        if assoc.is_established:
            assoc.release()
    return results
