"""SIGTERM, SIGHUP and Ctrl-C, handled from the first step until the process is done with the
run. SIGHUP is what a closed terminal or a dropped SSH session sends: like a preemption, it
checkpoints the step and stops with the resume command, instead of killing the run."""

from __future__ import annotations

import signal
import threading
from typing import Any

from hftrain.errors import RunStopped


class StopRequest:
    """During training, turns SIGTERM, SIGHUP and the first Ctrl-C into a request that the loop
    reads after each step: it checkpoints and stops (a second Ctrl-C stops at once). Once training
    is over and its last step checkpointed, `raise_from_now_on` makes either signal raise
    `RunStopped` at once, so a preempted final evaluation or export ends cleanly and
    `--resume` redoes it. The previous handlers are restored on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT,
               *((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ()))  # no SIGHUP: Windows

    def __init__(self) -> None:
        self.signum = 0
        self.phase: str | None = None
        self.advice: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS
                              if signal.getsignal(s) is not signal.SIG_IGN}  # nohup: kept
        return self

    def raise_from_now_on(self, phase: str, advice: str | None = None) -> None:
        """Signals from now on stop the process during `phase` (updated as the run goes on);
        `advice` says what to do then (default: resume)."""
        self.phase, self.advice = phase, advice

    def _handle(self, signum: int, frame: Any) -> None:
        if self.phase is not None:
            raise RunStopped(signum, self.phase, self.advice)
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
