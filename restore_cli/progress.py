"""A rich progress bar for batches: images/s, MP/s and ETA on stderr, or nothing at all.

It is off with ``--quiet`` and whenever stderr is not a terminal, so pipelines and logs get
clean lines; error lines go through the bar's console while it is shown so they do not tear it.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class BatchProgress:
    def __init__(self, total: int, *, enabled: bool, description: str = "restoring") -> None:
        self.total = total
        self.enabled = enabled
        self._started = time.perf_counter()
        self._done = 0
        self._megapixels = 0.0
        self._progress: Progress | None = None
        if enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=Console(file=sys.stderr),
                transient=False,
            )
            self._task = self._progress.add_task(description, total=total, rate="")

    @classmethod
    def for_stream(cls, total: int, quiet: bool, stream: TextIO | None = None) -> BatchProgress:
        return cls(total, enabled=not quiet and (stream or sys.stderr).isatty())

    def __enter__(self) -> BatchProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def advance(self, megapixels: float = 0.0) -> None:
        self._done += 1
        self._megapixels += megapixels
        if self._progress is not None:
            elapsed = max(time.perf_counter() - self._started, 1e-9)
            rate = f"{self._done / elapsed:.2f} img/s {self._megapixels / elapsed:.2f} MP/s"
            self._progress.update(self._task, advance=1, rate=rate)

    def print_error(self, message: str, stream: TextIO) -> None:
        if self._progress is not None:
            self._progress.console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
        else:
            print(f"error: {message}", file=stream, flush=True)
