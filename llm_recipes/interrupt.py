"""SIGTERM (a cluster preempting the job) and SIGINT (Ctrl-C) during training: finish the step, save, exit.

The first signal only sets a flag. The training loop looks at it after every optimizer step, all processes
together (an all-reduce: under torchrun they stop at the same step even when the signal reaches them at
different moments), saves a resumable checkpoint and exits with 128 + the signal's number, the convention
schedulers read. A second signal exits at once without saving: a checkpoint being written then stays a
temporary folder, which the next run removes.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Optional

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Context manager that turns the first SIGTERM / SIGINT into `received` (the signal's number)."""

    def __init__(self):
        self.received: Optional[int] = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # Python only delivers signals there
            for number in SIGNALS:
                self._previous[number] = signal.signal(number, self.handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def handle(self, number: int, frame=None) -> None:
        name = signal.Signals(number).name
        if self.received is not None:
            sys.stderr.write(f"\n{name} again: exiting now without saving\n")
            sys.stderr.flush()
            os._exit(128 + number)
        self.received = number
        sys.stderr.write(f"\n{name}: saving a checkpoint after this step, then stopping "
                         f"({name} again exits at once without saving)\n")
        sys.stderr.flush()

    @property
    def name(self) -> str:
        return signal.Signals(self.received or signal.SIGTERM).name
