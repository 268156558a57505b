"""The Celery app for Flower and other ``celery -A`` tools: ``celery -A worker.ops.flower:app flower``.

Flower must see the broker exactly as the workers do (``CCFNET_REDIS_KEY_PREFIX`` as kombu's
``global_keyprefix``, the same queues and priority lists), which a bare ``celery --broker=URL flower`` does not
when a key prefix is set. ``app`` is built from the ``CCFNET_`` settings on first access (PEP 562), so importing
this module reads nothing.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from worker.queue.celery_app import make_celery
    from worker.settings import get_settings

    app = make_celery(get_settings())
    globals()["app"] = app
    return app
