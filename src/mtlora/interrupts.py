"""Ctrl-C and SIGTERM: a training run stops cleanly at the end of its step, never mid-write.

``graceful_stop()`` turns the first SIGINT/SIGTERM into a flag the training loop reads after each
step (it then writes a checkpoint and raises :class:`Interrupted`); a second SIGINT abandons the
step at once (``KeyboardInterrupt``). Outside the loop, ``raise_on_sigterm`` makes SIGTERM an
``Interrupted`` exception so the CLI can answer it like Ctrl-C. Exit codes: 128 + the signal number
(130 for SIGINT, 143 for SIGTERM), the shell convention.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Interrupted(BaseException):
    """A run stopped by a signal; ``message`` says where its last checkpoint is (if any)."""

    def __init__(self, signum: int, message: str = "interrupted", checkpoint_step: int | None = None):
        self.signum = signum
        self.message = message
        self.checkpoint_step = checkpoint_step
        super().__init__(message)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopFlag:
    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None


@contextmanager
def graceful_stop() -> Iterator[StopFlag]:
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag  # signals are delivered to the main thread only
        return

    def handler(signum, frame):
        if flag.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: abandon the step now
        flag.signum = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def raise_on_sigterm() -> None:
    """Make SIGTERM raise :class:`Interrupted` in the main thread (the default would kill silently)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        raise Interrupted(signum)

    signal.signal(signal.SIGTERM, handler)
