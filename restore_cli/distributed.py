"""``--engine ray``: `restore`, `eval` and `synthesize` on a Ray cluster, through Ray Data.

Ray Data rather than our own scheduler: it already places actors on nodes by their CPUs and
GPUs, streams batches to them with back-pressure, and restarts work lost with a node. What runs
inside each actor is the local path unchanged: a :class:`~restore_cli.restore.JobRunner` (one
model copy per actor) claims, reads, restores and atomically writes each file, so outputs are
byte-identical to a local run and a killed cluster leaves nothing half-written. The driver plans
the jobs exactly as a local run does (skips, collisions, ``--shard``), sends only the files that
need a model, and writes the run CSV itself, in input order (Ray Data keeps the order).

Every node must see the inputs, the output folder and the weights at the same paths (a shared
filesystem), and have restore-cli installed (``pip install 'restore-cli[ray]'``). Ray is
Apache-2.0 licensed.
"""

from __future__ import annotations

import itertools
import json
import logging
import pickle
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from restore_cli.errors import ConfigError
from restore_cli.io.discover import Job
from restore_cli.models.registry import LoadedModel
from restore_cli.report import FileRecord
from restore_cli.restore import (
    JobRunner,
    RestoreOptions,
    RestoreRun,
    Streams,
    apply_conditions,
    planned_record,
)
from restore_cli.synthesize import PairJob, SynthesizeOptions, make_pair_reported

JOBS_PER_BATCH = 4  # files per actor call: small, so progress and the CSV advance steadily


@dataclass
class RayOptions:
    address: str | None = None  # None: join $RAY_ADDRESS or start Ray here; "auto": running one
    gpus_per_worker: float = 0.0  # > 0: one actor per that fraction of a GPU, on CUDA
    workers: int | None = None  # actors; None: as many as the cluster's CPUs (or GPUs) allow
    # CPUs (and torch threads) of each model actor: more per actor means fewer model copies in
    # memory for the same cores. Synthesize tasks always take one.
    cpus_per_worker: int = 1

    def __post_init__(self) -> None:
        """Checked here, once, for every command that takes these options."""
        if self.gpus_per_worker < 0:
            raise ConfigError(f"--gpus-per-worker {self.gpus_per_worker}: must be >= 0")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--ray-workers {self.workers}: must be at least 1")
        if self.cpus_per_worker < 1:
            raise ConfigError(f"--cpus-per-worker {self.cpus_per_worker}: must be >= 1")

    def actor_device(self, device: str) -> str:
        """The device a model actor runs on: ``auto`` means CUDA when it was given GPUs."""
        return "cuda" if self.gpus_per_worker > 0 and device == "auto" else device


def import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError:
        raise ConfigError(
            "--engine ray needs Ray Data: pip install 'restore-cli[ray]' (or 'ray[data]')"
        ) from None
    return ray


class RestoreWorker:
    """A Ray Data actor: loads the model once, then restores the batches it is given."""

    def __init__(
        self, options: RestoreOptions, model: str, weights: Path | None, threads: int
    ) -> None:
        import torch

        from restore_cli.models.loading import load_model

        torch.set_num_threads(threads)  # the CPUs Ray reserved for this actor
        self.runner = JobRunner(options, load_model(model, weights=weights))

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        jobs = [Job(Path(i), Path(o)) for i, o in zip(batch["input"], batch["output"], strict=True)]
        records: list[FileRecord] = []
        self.runner.execute(jobs, records.append)
        return {"record": [json.dumps(asdict(record)) for record in records]}


class RayRestoreRun(RestoreRun):
    """A `restore` whose model work runs on Ray; planning, CSV and summary stay local."""

    def __init__(
        self,
        options: RestoreOptions,
        model: LoadedModel,
        model_name: str,
        ray_options: RayOptions,
        streams: Streams | None = None,
    ) -> None:
        import_ray()  # a missing extra is a usage error before anything is planned or written
        # Actors load the model themselves: a name, or a file by its absolute path (every node
        # sees the same filesystem), with --weights likewise.
        is_file = Path(model_name).is_file()
        self.model_ref = str(Path(model_name).absolute()) if is_file else model_name
        if options.weights is not None:
            options = replace(options, weights=options.weights.absolute())
        self.ray_options = ray_options
        super().__init__(options, model, streams)

    def make_runner(self) -> None:
        apply_conditions(self.model, self.options)  # usage errors stop us before Ray starts
        return None

    def execute(self, jobs: list[Job]) -> bool:
        planned = [planned_record(job, self.options, self.model.name) for job in jobs]
        work = [job for job, record in zip(jobs, planned, strict=True) if record is None]
        results = self.restore_remotely(work) if work else iter(())
        try:
            for record in planned:
                self.report(record if record is not None else next(results))
        except KeyboardInterrupt:
            return True  # actors are stopped with the driver; their writes are atomic
        return False

    def restore_remotely(self, work: list[Job]) -> Iterator[FileRecord]:
        ray = start_ray(self.ray_options)
        items = [
            {"input": str(job.input.absolute()), "output": str(job.output.absolute())}
            for job in work
        ]
        gpus = self.ray_options.gpus_per_worker
        device = self.ray_options.actor_device(self.options.engine.device)
        options = replace(self.options, engine=replace(self.options.engine, device=device))
        dataset = ray.data.from_items(items).map_batches(
            RestoreWorker,
            fn_constructor_kwargs={
                "options": options,
                "model": self.model_ref,
                "weights": options.weights,
                "threads": self.ray_options.cpus_per_worker,
            },
            batch_size=JOBS_PER_BATCH,
            batch_format="default",
            compute=ray.data.ActorPoolStrategy(size=self.actor_count(ray, len(work))),
            num_cpus=self.ray_options.cpus_per_worker,
            num_gpus=gpus or None,
            udf_modifying_row_count=False,
        )
        for job, row in zip(work, dataset.iter_rows(), strict=True):
            yield as_planned(FileRecord(**json.loads(row["record"])), job)

    def actor_count(self, ray: Any, jobs: int) -> int:
        return worker_count(ray, self.ray_options, jobs, self.ray_options.cpus_per_worker)


def start_ray(ray_options: RayOptions) -> Any:
    """Join (or start) Ray once per process; Ray Data keeps results in input order."""
    ray = import_ray()
    if not ray.is_initialized():
        ray.init(
            address=ray_options.address,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # CSVs are in input order
    context.enable_progress_bars = False  # our own progress line reports files
    return ray


def worker_count(ray: Any, ray_options: RayOptions, jobs: int, cpus: int = 1) -> int:
    """``--ray-workers``, else as many as the cluster's CPUs (``cpus`` each) or GPUs
    (``--gpus-per-worker`` each) allow, at most one per batch."""
    if ray_options.workers is not None:
        return ray_options.workers
    resources = ray.cluster_resources()
    gpus = ray_options.gpus_per_worker
    slots = resources.get("GPU", 0) / gpus if gpus > 0 else resources.get("CPU", 1) / cpus
    return max(1, min(int(slots), -(-jobs // JOBS_PER_BATCH)))


# ----------------------------------------------------------------------------- synthesize


def make_pairs_batch(batch: dict[str, Any], options: SynthesizeOptions) -> dict[str, list[bytes]]:
    """A Ray Data task: make each pair of the batch exactly as a local worker does."""
    import torch

    torch.set_num_threads(1)
    results = [make_pair_reported(pickle.loads(job), options) for job in batch["job"]]
    return {"result": [pickle.dumps(result) for result in results]}


def pairs_on_ray(
    jobs: list[PairJob], options: SynthesizeOptions, ray_options: RayOptions
) -> Iterator[tuple[PairJob, Future]]:
    """`synthesize --engine ray`: the pairs made by Ray tasks, yielded in job order like the
    local :func:`~restore_cli.synthesize.run_pairs` (the same function makes each pair, so
    the bytes are the same). Jobs travel pickled: they are ours, inside our own cluster."""
    if not jobs:
        return
    ray = start_ray(ray_options)
    remote_options = replace(options, output_dir=options.output_dir.absolute(), ray=None)
    items = [{"job": pickle.dumps(replace(job, source=job.source.absolute()))} for job in jobs]
    dataset = ray.data.from_items(items).map_batches(
        make_pairs_batch,
        fn_kwargs={"options": remote_options},
        batch_size=JOBS_PER_BATCH,
        compute=ray.data.TaskPoolStrategy(size=worker_count(ray, ray_options, len(jobs))),
        num_cpus=1,
        udf_modifying_row_count=False,
    )
    renames = {str(job.source.absolute()): str(job.source) for job in jobs}
    renames[str(remote_options.output_dir)] = str(options.output_dir)
    for job, row in zip(jobs, dataset.iter_rows(), strict=True):
        pair_row, message = pickle.loads(row["result"])
        if message is not None:  # name the files as the user gave them, like a local run
            for absolute, given in renames.items():
                message = message.replace(absolute, given)
        future: Future = Future()
        future.set_result((pair_row, message))
        yield job, future


def as_planned(record: FileRecord, job: Job) -> FileRecord:
    """Actors get absolute paths (their working folder may differ); the CSV and the error
    lines name the files as planned, exactly like a local run."""
    error = record.error
    for path in (job.input, job.output):
        error = error.replace(str(path.absolute()), str(path))
    return replace(record, input=str(job.input), output=str(job.output), error=error)


# ----------------------------------------------------------------------------- eval

PAIRS_PER_BATCH = 8  # pairs per scoring call: reading and scoring one is quick


class ScoreWorker:
    """A Ray Data actor: builds the metrics once (pyiqa networks load once per actor), then
    scores the batches of pairs it is given exactly as the local loop does."""

    def __init__(self, options: Any, has_reference: bool, device: str, threads: int) -> None:
        import io

        import torch

        from restore_cli.engine import resolve_device
        from restore_cli.evaluate import build_scorers
        from restore_cli.metrics.psnr_ssim import Convention

        torch.set_num_threads(threads)
        self.options = options
        self.device = resolve_device(device)
        convention = Convention(options.color, options.crop_border)
        quiet = io.StringIO()  # the driver reports unavailable metrics once
        self.scorers, _ = build_scorers(
            options.metrics, convention, self.device, has_reference, quiet
        )

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[bytes]]:
        import io

        from restore_cli.evaluate import FolderScoring
        from restore_cli.progress import BatchProgress

        rows = []
        items = zip(batch["model"], batch["pair"], strict=True)
        for model, group in itertools.groupby(items, key=lambda item: item[0]):
            scoring = FolderScoring(
                model, self.scorers, self.device, self.options, BatchProgress(0, enabled=False),
                io.StringIO(),  # the driver prints each error line, in order
            )  # fmt: skip
            rows += scoring.run([pickle.loads(pair) for _, pair in group])
        return {"row": [pickle.dumps(row) for row in rows]}


def score_on_ray(
    plans: list[tuple[str, list[Any]]], options: Any, has_reference: bool, ray_options: RayOptions
) -> Iterator[dict[str, object]]:
    """`eval --engine ray`: one per_image row per pair, in plan order, scored by actors.

    Pairs travel with absolute paths (pickled: they are ours, inside our own cluster); the
    rows and their error lines come back naming the files as the user gave them.
    """
    pairs = [(model, pair) for model, model_pairs in plans for pair in model_pairs]
    if not pairs:
        return
    ray = start_ray(ray_options)
    renames: dict[str, str] = {}

    def absolute(path: Path | None) -> Path | None:
        if path is None:
            return None
        renames[str(path.absolute())] = str(path)
        return path.absolute()

    items = [
        {
            "model": model,
            "pair": pickle.dumps(replace(pair, pred=absolute(pair.pred), gt=absolute(pair.gt))),
        }
        for model, pair in pairs
    ]
    gpus, cpus = ray_options.gpus_per_worker, ray_options.cpus_per_worker
    device = ray_options.actor_device(options.engine.device)
    dataset = ray.data.from_items(items).map_batches(
        ScoreWorker,
        fn_constructor_kwargs={
            "options": options, "has_reference": has_reference, "device": device,
            "threads": cpus,
        },
        batch_size=PAIRS_PER_BATCH,
        batch_format="default",
        compute=ray.data.ActorPoolStrategy(size=worker_count(ray, ray_options, len(pairs), cpus)),
        num_cpus=cpus,
        num_gpus=gpus or None,
        udf_modifying_row_count=False,
    )  # fmt: skip
    for item in dataset.iter_rows():
        row = pickle.loads(item["row"])
        for column in ("pred", "gt", "error"):
            if row.get(column):
                text = str(row[column])
                for long, given in renames.items():
                    text = text.replace(long, given)
                row[column] = text
        yield row
