"""Build and run the Storage SCP: presentation contexts, admission, optional TLS, concurrent associations."""

from __future__ import annotations

import functools
import logging
import ssl
import threading
from collections.abc import Sequence
from typing import cast

from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import EnhancedMRImageStorage, MRImageStorage, Verification  # type: ignore[attr-defined]

from worker.listener import connections, handlers
from worker.listener.handlers import IntakeContext
from worker.listener.network import ConnectionLimits, GuardedServer
from worker.settings import Settings

log = logging.getLogger("worker.listener")

# Uncompressed, deflate, and the compressed syntaxes that pylibjpeg / GDCM / pydicom (RLE) can decode.
TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)
STORAGE_SOP_CLASSES: tuple[UID, ...] = (UID(MRImageStorage), UID(EnhancedMRImageStorage))
MAX_PDU_BYTES = 262_144


def storage_sop_classes(settings: Settings) -> list[UID]:
    return [*STORAGE_SOP_CLASSES, *(UID(u) for u in settings.extra_storage_sop_classes)]


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=settings.tls_cert, keyfile=settings.tls_key)
    if settings.tls_ca is not None:
        context.load_verify_locations(cafile=settings.tls_ca)
        context.verify_mode = ssl.CERT_REQUIRED if settings.tls_require_client_cert else ssl.CERT_OPTIONAL
    return context


def build_ae(settings: Settings, sop_classes: Sequence[UID]) -> AE:
    ae = AE(ae_title=settings.ae_title)
    # The limit is enforced when a connection is accepted (network.ConnectionLimits); pynetdicom's own check
    # counts the same threads and stays as a backstop.
    ae.maximum_associations = settings.max_associations
    ae.network_timeout = settings.network_timeout_seconds
    ae.acse_timeout = settings.network_timeout_seconds  # also how long a connection may take to ask
    ae.maximum_pdu_size = MAX_PDU_BYTES
    ae.add_supported_context(Verification)
    for sop_class in sop_classes:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    return ae


class Listener:
    """The DICOM listener: runs pynetdicom's threaded server, one thread per association."""

    def __init__(self, settings: Settings, context: IntakeContext) -> None:
        self._settings = settings
        self._context = context
        self._ae = build_ae(settings, storage_sop_classes(settings))
        self._server: GuardedServer | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("listener not started")
        return int(self._server.server_address[1])

    def start(self) -> int:
        ctx = self._context
        evt_handlers = [
            (evt.EVT_REQUESTED, handlers.handle_requested, [ctx]),
            (evt.EVT_ESTABLISHED, handlers.handle_established, [ctx]),
            (evt.EVT_RELEASED, handlers.handle_released, [ctx]),
            (evt.EVT_ABORTED, handlers.handle_aborted, [ctx]),
            (evt.EVT_REJECTED, connections.handle_rejected, [ctx]),
            (evt.EVT_C_ECHO, handlers.handle_echo, [ctx]),
            (evt.EVT_C_STORE, handlers.handle_store, [ctx]),
        ]
        server = cast(
            GuardedServer,
            self._ae.make_server(
                (self._settings.bind_address, self._settings.port),
                ssl_context=tls_context(self._settings),
                evt_handlers=evt_handlers,  # type: ignore[arg-type]
                server_class=GuardedServer,
                limits=ConnectionLimits(self._settings.max_associations, self._settings.max_associations_per_peer),
                on_problem=functools.partial(connections.record_problem, ctx),
            ),
        )
        # As AE.start_server does for its own server: the AE shuts down the servers it knows.
        self._ae._servers.append(server)
        threading.Thread(target=server.serve_forever, name="dicom-accept", daemon=True).start()
        self._server = server
        log.info(
            "listening as %s on %s:%d%s",
            self._settings.ae_title,
            self._settings.bind_address,
            self.port,
            " (TLS)" if self._settings.tls_enabled else "",
        )
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self._ae.shutdown()
