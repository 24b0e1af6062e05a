"""Graceful stop: the first SIGINT/SIGTERM asks the loop to stop at the next safe point, a second
one stops at once (KeyboardInterrupt)."""
from __future__ import annotations

import signal
import sys
import threading
from typing import Callable

__all__ = ["GracefulStop"]


class GracefulStop:
    """`with GracefulStop() as stop:` ... `stop.signum` is the first signal received, else None."""

    def __init__(self, waits_for: Callable[[], str] | None = None):
        self.signum: int | None = None
        self._previous: dict = {}
        # What the stop waits for before the episodes in progress end (e.g. the updates of a
        # training phase, which run to the end: a stop must not change what the run does).
        self.waits_for = waits_for

    def _on_signal(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # second signal: stop now
        self.signum = signum
        try:
            first = self.waits_for() if self.waits_for is not None else ""
        except Exception:  # noqa: BLE001 - the stop itself must not fail over its message
            first = ""
        print(f"\n{signal.Signals(signum).name}: finishing the episodes in progress{' after ' + first if first else ''}, "
              f"then saving a checkpoint (send it again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():  # handlers only from the main thread
            self._previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
