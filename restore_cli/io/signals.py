"""SIGTERM handled like Ctrl-C, so batch jobs stopped by a scheduler also end cleanly.

Job schedulers, ``timeout`` and ``docker stop`` send SIGTERM, whose default action kills the
process at once: no summary, no flushed log, and the file in flight left as a temp file. While
:func:`terminate_as_interrupt` is active, SIGTERM raises KeyboardInterrupt in the main thread
instead, so the command's own Ctrl-C path runs (finish or discard the file in flight, flush the
CSV, print the summary, exit 130).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt for the duration (main thread only; else a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
