"""Graceful stop: the first SIGINT/SIGTERM asks the loop to stop at the next safe point, a second
one stops at once (KeyboardInterrupt)."""
from __future__ import annotations

import signal
import sys
import threading

__all__ = ["GracefulStop"]


class GracefulStop:
    """`with GracefulStop() as stop:` ... `stop.signum` is the first signal received, else None."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _on_signal(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # second signal: stop now
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing the episodes in progress, then saving a "
              f"checkpoint (send it again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():  # handlers only from the main thread
            self._previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
