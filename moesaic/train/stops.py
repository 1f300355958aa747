"""Ctrl-C and SIGTERM during training: every rank stops at the same step.

A signal's ``KeyboardInterrupt`` raised where it lands can be lost (Python drops exceptions
raised inside a finalizer or weakref callback) or leave one rank mid-step while the others wait
in a collective for it. So while the epochs run, SIGINT and SIGTERM only note the request; the
training loop sums the ranks' requests in the all-reduce it already makes each step (and once
after each epoch's evaluation) and, when any rank has one, every rank raises
``KeyboardInterrupt`` there, between steps. A second signal raises at once.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    """Whether this process was asked to stop (``requested``), by a signal or a test."""

    def __init__(self) -> None:
        self.requested = False

    def _on_signal(self, signum, frame) -> None:
        if self.requested:  # asked twice: stop now, wherever that is
            raise KeyboardInterrupt
        self.requested = True
        if os.environ.get("RANK", "0") == "0":  # one line per job, not per rank
            with contextlib.suppress(OSError):  # stderr may be gone (a closed pipe)
                os.write(2, f"\nmoesaic: {signal.Signals(signum).name}: stopping after this "
                            "step (send it again to stop at once)\n".encode())

    @contextlib.contextmanager
    def deferred(self):
        """SIGINT and SIGTERM only note a request inside this block (main thread only: other
        threads cannot install handlers, and keep the handlers they had)."""
        self.requested = False
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.getsignal(s) for s in SIGNALS}
        for s in SIGNALS:
            signal.signal(s, self._on_signal)
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
