"""The `restore` feature: stream jobs through read threads → engine → write threads.

Bounded queues on both sides keep memory flat for folders of thousands of photos: at most
``readers * 2`` decoded images wait for the model and at most ``writers * 2`` restored images
wait for the encoder. Results are reported in job order, so the run CSV is deterministic.
Every per-file failure becomes one line on stderr and one CSV row; the batch goes on.

Runs are safe to kill and to run side by side: each output is claimed (a locked hidden file
next to it) before its image is read, so two runs into one folder share the work instead of
both doing it; temp and claim files left by a killed run are removed at the next start; SIGTERM
is handled like Ctrl-C.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO, TypeVar

from restore_cli.engine import Engine, EngineOptions
from restore_cli.errors import (
    ConfigError,
    ImageWriteError,
    one_line,
    warnings_as_lines,
    with_file,
)
from restore_cli.io.atomic import OutputClaim, remove_stale_temp_files
from restore_cli.io.discover import Job, expand_inputs, plan_jobs
from restore_cli.io.image import (
    MAX_PIXELS_DEFAULT,
    DecodedImage,
    read_image,
    resize_alpha,
    write_image,
)
from restore_cli.io.shard import Shard
from restore_cli.io.signals import terminate_as_interrupt
from restore_cli.models.registry import LoadedModel, apply_mode, apply_sampling
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
    steps: int | None = None  # diffusion models: sampling steps (None = the model's default)
    seed: int | None = None  # diffusion models: noise seed (None = the model's default)
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
    readers: int = 0  # decode threads; 0 = auto (io_threads)
    writers: int = 0  # encode threads; 0 = auto
    shard: Shard | None = None  # only this shard's files (job arrays); None = all


class ClaimedElsewhere(Exception):
    """Another run holds this output, or finished it after we planned: skip it."""


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


class JobRunner:
    """Restores planned jobs: claim → read (threads) → engine → write (threads), in job order.

    The unit of work both engines share: the local driver (:class:`RestoreRun`) runs one over
    the whole job list; with ``--engine ray`` every worker actor runs one over its batches
    (restore_cli.distributed), so outputs and CSV rows are the same either way.
    """

    def __init__(self, options: RestoreOptions, model: LoadedModel) -> None:
        check_options(options)
        self.options = options
        self.model = model
        apply_conditions(model, options)
        self.engine = Engine(model, options.engine)
        threads = io_threads(self.engine.device.type)
        self.readers, self.writers = options.readers or threads, options.writers or threads
        self._writes: deque[tuple[FileRecord, Future[tuple[float, list[str]]] | None]] = deque()
        self._claims: dict[str, OutputClaim] = {}  # output path -> our claim, until finished
        self._claims_lock = threading.Lock()
        self._on_record: Callable[[FileRecord], None] = lambda record: None

    def execute(self, jobs: list[Job], on_record: Callable[[FileRecord], None]) -> bool:
        """Run ``jobs``, calling ``on_record`` once per job in job order; True if interrupted
        (Ctrl-C / SIGTERM: files already being written finish, their rows are reported)."""
        self._on_record = on_record
        interrupted = False
        readers = ThreadPoolExecutor(self.readers, thread_name_prefix="read")
        writers = ThreadPoolExecutor(self.writers, thread_name_prefix="write")
        try:
            try:
                for job, reading in prefetch(
                    readers,
                    self.read,
                    jobs,
                    2 * self.readers,
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
            for output in list(self._claims):
                self.release(output)
        return interrupted

    def read(self, job: Job) -> tuple[DecodedImage, float]:
        """Claim the output, then decode the input (in a reader thread)."""
        start = time.perf_counter()
        self.claim(job)
        decoded = read_image(job.input, max_pixels=self.options.max_pixels)
        return decoded, time.perf_counter() - start

    def claim(self, job: Job) -> None:
        """Take the output's claim, or raise ClaimedElsewhere (another run has it or made it)."""
        try:
            claim = OutputClaim.acquire(job.output)
        except OSError as error:
            reason = error.strerror or str(error)
            raise ImageWriteError(f"{job.output}: cannot write there ({reason})") from None
        if claim is None:
            raise ClaimedElsewhere("being restored by another run right now")
        with self._claims_lock:
            self._claims[str(job.output)] = claim
        if not self.options.overwrite and job.output.exists():
            raise ClaimedElsewhere("output exists (made by another run meanwhile)")

    def release(self, output: str) -> None:
        with self._claims_lock:
            claim = self._claims.pop(output, None)
        if claim is not None:
            claim.release()

    def write(self, job: Job, rgb, decoded: DecodedImage) -> tuple[float, list[str]]:
        start = time.perf_counter()
        extras = decoded.extras
        height, width = rgb.shape[:2]
        if extras.alpha is not None and extras.alpha.shape != (height, width):
            extras = replace(extras, alpha=resize_alpha(extras.alpha, height, width))
        job.output.parent.mkdir(parents=True, exist_ok=True)
        notes = write_image(job.output, rgb, extras, jpeg_quality=self.options.jpeg_quality)
        return time.perf_counter() - start, notes

    def record(self, job: Job, **values) -> FileRecord:
        return job_record(job, self.options, self.model.name, **values)

    def process(self, job: Job, reading: Future | None, writers: ThreadPoolExecutor) -> None:
        planned = planned_record(job, self.options, self.model.name)
        if planned is not None:
            self.queue_result(planned, None)
            return
        assert reading is not None
        try:
            decoded, read_seconds = reading.result()
        except ClaimedElsewhere as skipped:
            self.queue_result(self.record(job, status=STATUS_SKIPPED, error=str(skipped)), None)
            return
        except ImageWriteError as error:  # the output's folder: the message names the output
            self.queue_result(self.record(job, status=STATUS_FAILED, error=one_line(error)), None)
            return
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
            error="; ".join([*decoded.notes, *info.notes]),
            extra={f"route_{k}": v for k, v in (info.route or {}).items()},
        )
        self.queue_result(record, writers.submit(self.write, job, restored, decoded))

    def queue_result(
        self, record: FileRecord, writing: Future[tuple[float, list[str]]] | None
    ) -> None:
        self._writes.append((record, writing))
        self.drain_writes(2 * self.writers)

    def drain_writes(self, keep: int) -> None:
        """Finish queued results in job order until at most ``keep`` remain in flight.

        A result leaves the queue only once it is logged, so a Ctrl-C while waiting for a
        write loses no row: the interrupt handler drains the same queue again.
        """
        while len(self._writes) > keep:
            record, writing = self._writes[0]
            if writing is not None:
                try:
                    write_seconds, notes = writing.result()
                except Exception as error:
                    record.status = STATUS_FAILED
                    record.error = with_file(Path(record.output), one_line(error))
                else:
                    record.seconds = float(record.seconds) + write_seconds
                    record.error = "; ".join(filter(None, [record.error, *notes]))
            self._writes.popleft()
            self.finish(record)

    def finish(self, record: FileRecord) -> None:
        self.release(record.output)
        self._on_record(record)


class RestoreRun:
    """One local `restore` invocation: plan, run a :class:`JobRunner`, log; :meth:`run` returns
    the exit code."""

    def __init__(
        self, options: RestoreOptions, model: LoadedModel, streams: Streams | None = None
    ) -> None:
        check_options(options)
        self.options = options
        self.streams = streams or Streams()
        self.model = model
        self.runner = self.make_runner()  # before the CSV: a bad option leaves no files
        json_stream = self.streams.stdout if options.json else None
        extra = [f"route_{c}" for c in ROUTE_COLUMNS] if model.spec.routed else []
        self.log = RunLog(run_csv_path(options), json_stream, extra)
        self.print_paths = not options.json and not self.streams.stdout.isatty()
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
        jobs = plan_jobs(
            sources,
            options.output_dir,
            ext=options.ext,
            suffix=options.suffix,
            overwrite=options.overwrite,
        )
        if options.shard is None:
            return jobs
        # Keyed by the output path: inputs that collide on one output share a shard.
        shard = options.shard
        return [job for job in jobs if shard.owns(job.output.relative_to(options.output_dir))]

    # -- driver -------------------------------------------------------------------------------
    def run(self) -> int:
        started = time.perf_counter()
        jobs = self.plan()
        self.remove_leftovers(jobs)
        for notice in self.log.notices:
            print(f"note: {notice}", file=self.streams.stderr)
        self.progress = BatchProgress.for_stream(len(jobs), self.options.quiet, self.streams.stderr)
        try:
            with terminate_as_interrupt(), warnings_as_lines(self.streams.stderr), self.progress:
                interrupted = self.execute(jobs)
        finally:
            self.log.close()
        return self.summarise(started, interrupted)

    def make_runner(self) -> JobRunner | None:
        return JobRunner(self.options, self.model)

    def execute(self, jobs: list[Job]) -> bool:
        """Restore the planned jobs here, reporting each; True if interrupted."""
        assert self.runner is not None
        return self.runner.execute(jobs, self.report)

    def summarise(self, started: float, interrupted: bool) -> int:
        """Print the summary line; the exit code of the run."""
        if self.log.log_error:
            print(f"error: {self.log.log_error}", file=self.streams.stderr)
        if not self.options.quiet:
            summary = self.log.summary(time.perf_counter() - started, interrupted)
            print(summary, file=self.streams.stderr)
        if interrupted:
            return EXIT_INTERRUPTED
        return EXIT_FAILED if self.log.failed or self.log.log_error else EXIT_OK

    def remove_leftovers(self, jobs: list[Job]) -> None:
        """Delete temp and claim files that killed runs left in the output folders."""
        folders = {job.output.parent for job in jobs if job.output.parent.is_dir()}
        removed = remove_stale_temp_files(sorted(folders))
        if removed and not self.options.quiet:
            print(
                f"note: removed {len(removed)} temporary file(s) left by an interrupted run",
                file=self.streams.stderr,
            )

    def report(self, record: FileRecord) -> None:
        """One finished job: CSV row, error line or output path, progress."""
        self.log.add(record)
        if record.status == STATUS_FAILED:
            self.progress.print_error(record.error, self.streams.stderr)
        elif self.print_paths:
            print(record.output, file=self.streams.stdout, flush=True)
        megapixels = 0.0
        if record.status == STATUS_OK and record.height:
            megapixels = int(record.height) * int(record.width) / 1e6
        self.progress.advance(megapixels)


def io_threads(device_type: str) -> int:
    """Decode/encode threads: 2 next to a CPU model (they share its cores); next to a GPU,
    enough to keep up with it (Pillow encodes a 3840x2160 PNG at our level 4 in 1.3 s on this
    project's CPU, a JPEG in 0.03 s), up to 8."""
    if device_type != "cuda":
        return 2
    return min(8, max(2, (os.cpu_count() or 2) // 2))


def job_record(job: Job, options: RestoreOptions, model_name: str, **values) -> FileRecord:
    return FileRecord(
        input=str(job.input),
        output=str(job.output),
        model=model_name,
        mode=options.mode,
        task=",".join(options.tasks),
        **values,
    )


def planned_record(job: Job, options: RestoreOptions, model_name: str) -> FileRecord | None:
    """The row of a job settled at planning time (an early error, a skip); None if it needs
    the model."""
    if job.error:
        return job_record(job, options, model_name, status=STATUS_FAILED, error=job.error)
    if job.skip:
        return job_record(job, options, model_name, status=STATUS_SKIPPED, error=job.note)
    return None


def apply_conditions(model: LoadedModel, options: RestoreOptions) -> None:
    """--mode/--task/--granularity and --steps/--seed on the model (usage errors raise here)."""
    apply_mode(model, options.mode, options.tasks, options.granularity)
    apply_sampling(model, options.steps, options.seed)


def check_options(options: RestoreOptions) -> None:
    if options.max_pixels < 1:
        raise ConfigError(f"--max-pixels {options.max_pixels}: must be at least 1")


def run_csv_path(options: RestoreOptions) -> Path:
    """``--csv``, else OUT/restore_run.csv (per shard when sharded: shards share OUT)."""
    if options.csv_path is not None:
        return options.csv_path
    path = options.output_dir / RUN_CSV_NAME
    return path if options.shard is None else options.shard.tag(path)
