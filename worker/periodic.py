"""A background thread that runs one function every N seconds until stopped."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("worker.periodic")


class PeriodicThread:
    def __init__(self, name: str, interval: float, func: Callable[[], object]) -> None:
        self.name = name
        self.interval = interval
        self._func = func
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._func()
            except Exception:  # a loop edge: log with the traceback and try again next round
                log.exception("%s failed; retrying in %.1f s", self.name, self.interval)
            self._stop.wait(self.interval)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
