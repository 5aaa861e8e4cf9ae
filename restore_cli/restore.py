"""The `restore` feature: stream jobs through read threads → engine → write threads.

Bounded queues on both sides keep memory flat for folders of thousands of photos: at most
``readers * 2`` decoded images wait for the model and at most ``writers * 2`` restored images
wait for the encoder. Results are reported in job order, so the run CSV is deterministic.
Every per-file failure becomes one line on stderr and one CSV row; the batch goes on.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO, TypeVar

from restore_cli.engine import Engine, EngineOptions
from restore_cli.errors import one_line, with_file
from restore_cli.io.discover import Job, expand_inputs, plan_jobs
from restore_cli.io.image import (
    MAX_PIXELS_DEFAULT,
    DecodedImage,
    read_image,
    resize_alpha,
    write_image,
)
from restore_cli.models.registry import LoadedModel, apply_mode
from restore_cli.progress import BatchProgress
from restore_cli.report import STATUS_FAILED, STATUS_OK, STATUS_SKIPPED, FileRecord, RunLog
from restore_cli.routing import ROUTE_COLUMNS

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_OUTPUT_DIR = Path("restored")
RUN_CSV_NAME = "restore_run.csv"
EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130


@dataclass
class RestoreOptions:
    inputs: list[str]
    output_dir: Path = DEFAULT_OUTPUT_DIR
    model: str | None = None
    weights: Path | None = None
    mode: str = "auto"
    tasks: list[str] = field(default_factory=list)
    granularity: str | None = None  # routed models: force all / type / degree experts
    engine: EngineOptions = field(default_factory=EngineOptions)
    recursive: bool = False
    ext: str = "same"
    suffix: str = ""
    overwrite: bool = False
    csv_path: Path | None = None  # default: OUTPUT_DIR/restore_run.csv
    json: bool = False
    quiet: bool = False
    max_pixels: int = MAX_PIXELS_DEFAULT
    jpeg_quality: int = 95
    readers: int = 2
    writers: int = 2


@dataclass
class Streams:
    stdin: TextIO | None = None
    stdout: TextIO = field(default_factory=lambda: sys.stdout)
    stderr: TextIO = field(default_factory=lambda: sys.stderr)


def prefetch(
    executor: ThreadPoolExecutor,
    function: Callable[[T], R],
    items: Iterable[T],
    depth: int,
    wanted: Callable[[T], bool],
) -> Iterator[tuple[T, Future[R] | None]]:
    """Yield ``(item, future)`` in order, keeping at most ``depth`` submitted ahead."""
    pending: deque[tuple[T, Future[R] | None]] = deque()
    for item in items:
        pending.append((item, executor.submit(function, item) if wanted(item) else None))
        if len(pending) > depth:
            yield pending.popleft()
    while pending:
        yield pending.popleft()


class RestoreRun:
    """State of one `restore` invocation; :meth:`run` returns the exit code."""

    def __init__(
        self, options: RestoreOptions, model: LoadedModel, streams: Streams | None = None
    ) -> None:
        self.options = options
        self.streams = streams or Streams()
        self.model = model
        apply_mode(model, options.mode, options.tasks, options.granularity)
        self.engine = Engine(model, options.engine)
        csv_path = options.csv_path or options.output_dir / RUN_CSV_NAME
        json_stream = self.streams.stdout if options.json else None
        extra = [f"route_{c}" for c in ROUTE_COLUMNS] if model.spec.routed else []
        self.log = RunLog(csv_path, json_stream, extra)
        self.print_paths = not options.json and not self.streams.stdout.isatty()
        self._writes: deque[tuple[FileRecord, Future[float] | None]] = deque()
        self.progress = BatchProgress(0, enabled=False)  # replaced by run()

    # -- stages -------------------------------------------------------------------------------
    def plan(self) -> list[Job]:
        options = self.options
        sources = expand_inputs(
            options.inputs,
            recursive=options.recursive,
            stdin=self.streams.stdin,
            exclude=options.output_dir,
        )
        return plan_jobs(
            sources,
            options.output_dir,
            ext=options.ext,
            suffix=options.suffix,
            overwrite=options.overwrite,
        )

    def read(self, job: Job) -> tuple[DecodedImage, float]:
        start = time.perf_counter()
        return read_image(
            job.input, max_pixels=self.options.max_pixels
        ), time.perf_counter() - start

    def write(self, job: Job, rgb, decoded: DecodedImage) -> float:
        start = time.perf_counter()
        extras = decoded.extras
        height, width = rgb.shape[:2]
        if extras.alpha is not None and extras.alpha.shape != (height, width):
            extras = replace(extras, alpha=resize_alpha(extras.alpha, height, width))
        job.output.parent.mkdir(parents=True, exist_ok=True)
        write_image(job.output, rgb, extras, jpeg_quality=self.options.jpeg_quality)
        return time.perf_counter() - start

    def record(self, job: Job, **values) -> FileRecord:
        tasks = ",".join(self.options.tasks)
        return FileRecord(
            input=str(job.input),
            output=str(job.output),
            model=self.model.name,
            mode=self.options.mode,
            task=tasks,
            **values,
        )

    # -- driver -------------------------------------------------------------------------------
    def run(self) -> int:
        started = time.perf_counter()
        jobs = self.plan()
        progress = BatchProgress.for_stream(len(jobs), self.options.quiet, self.streams.stderr)
        interrupted = False
        readers = ThreadPoolExecutor(self.options.readers, thread_name_prefix="read")
        writers = ThreadPoolExecutor(self.options.writers, thread_name_prefix="write")
        try:
            self.progress = progress
            with progress:
                for job, reading in prefetch(
                    readers,
                    self.read,
                    jobs,
                    2 * self.options.readers,
                    wanted=lambda j: not (j.skip or j.error),
                ):
                    self.process(job, reading, writers)
                self.drain_writes(0)
        except KeyboardInterrupt:
            interrupted = True
            readers.shutdown(wait=False, cancel_futures=True)
            self.drain_writes(0)  # files already handed to writers finish (atomically)
        finally:
            readers.shutdown(wait=True, cancel_futures=True)
            writers.shutdown(wait=True)
            self.log.close()
        if not self.options.quiet:
            summary = self.log.summary(time.perf_counter() - started, interrupted)
            print(summary, file=self.streams.stderr)
        if interrupted:
            return EXIT_INTERRUPTED
        return EXIT_FAILED if self.log.failed else EXIT_OK

    def process(self, job: Job, reading: Future | None, writers: ThreadPoolExecutor) -> None:
        if job.error:
            self.queue_result(self.record(job, status=STATUS_FAILED, error=job.error), None)
            return
        if job.skip:
            self.queue_result(self.record(job, status=STATUS_SKIPPED, error="output exists"), None)
            return
        assert reading is not None
        try:
            decoded, read_seconds = reading.result()
        except Exception as error:  # one bad file never stops the batch
            message = with_file(job.input, one_line(error))
            self.queue_result(self.record(job, status=STATUS_FAILED, error=message), None)
            return
        height, width = decoded.rgb.shape[:2]
        start = time.perf_counter()
        try:
            restored, info = self.engine.restore(decoded.rgb)
        except Exception as error:
            message = with_file(job.input, one_line(error))
            record = self.record(
                job, height=height, width=width, status=STATUS_FAILED, error=message
            )
            self.queue_result(record, None)
            return
        seconds = read_seconds + time.perf_counter() - start
        record = self.record(
            job,
            height=height,
            width=width,
            tile=info.tile,
            precision=info.precision,
            device=info.device,
            seconds=seconds,
            status=STATUS_OK,
            error="; ".join(info.notes),
            extra={f"route_{k}": v for k, v in (info.route or {}).items()},
        )
        self.queue_result(record, writers.submit(self.write, job, restored, decoded))

    def queue_result(self, record: FileRecord, writing: Future[float] | None) -> None:
        self._writes.append((record, writing))
        self.drain_writes(2 * self.options.writers)

    def drain_writes(self, keep: int) -> None:
        """Finish queued results in job order until at most ``keep`` remain in flight."""
        while len(self._writes) > keep:
            record, writing = self._writes.popleft()
            if writing is not None:
                try:
                    record.seconds = float(record.seconds) + writing.result()
                except Exception as error:
                    record.status = STATUS_FAILED
                    record.error = with_file(Path(record.output), one_line(error))
            self.finish(record)

    def finish(self, record: FileRecord) -> None:
        self.log.add(record)
        if record.status == STATUS_FAILED:
            self.progress.print_error(record.error, self.streams.stderr)
        elif self.print_paths:
            print(record.output, file=self.streams.stdout, flush=True)
        megapixels = 0.0
        if record.status == STATUS_OK and record.height:
            megapixels = int(record.height) * int(record.width) / 1e6
        self.progress.advance(megapixels)
