"""The `eval` feature: score prediction folders against ground truth (or without it).

Files are paired by their path relative to each folder, without the extension (``pred/a.png``
↔ ``gt/a.jpg``, ``pred/sub/b.png`` ↔ ``gt/sub/b.png``), never by position in a sorted list,
so one missing file cannot shift every later pair. Whatever cannot be scored (prediction
without ground truth, ground truth without prediction, two files claiming one name, different
sizes, unreadable files) gets one ``error:`` line on stderr, a row in per_image.csv with its
status, and a count in summary.csv; the exit code is then 1.

``--model NAME --data DIR`` first restores ``DIR/lq`` through the normal restore pipeline into
``OUT/pred/NAME`` (existing outputs are kept), then scores that folder against ``DIR/gt`` with
``DIR/metadata.csv`` joined, so per-degradation summaries come for free.

Images are read on threads, stacked in batches of equal size and scored on the device
(CUDA when available). stdout stays empty: tables and messages go to stderr.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np
import torch

from restore_cli.engine import EngineOptions, resolve_device
from restore_cli.errors import ConfigError, one_line
from restore_cli.io.atomic import atomic_write_bytes
from restore_cli.io.discover import walk_images
from restore_cli.io.image import MAX_PIXELS_DEFAULT, read_image
from restore_cli.io.shard import Shard
from restore_cli.metrics.iqa import (
    IqaMetric,
    MetricUnavailable,
    load_iqa_metric,
    metric_mode,
    pyiqa_metric_modes,
)
from restore_cli.metrics.psnr_ssim import PIXEL_MAX, Convention, quantize, score
from restore_cli.metrics.report import (
    METADATA_COLUMNS,
    PER_IMAGE_TAIL,
    STATUS_FAILED,
    STATUS_MISSING_GT,
    STATUS_MISSING_PRED,
    STATUS_OK,
    STATUS_SIZE_MISMATCH,
    Row,
    plot_summary,
    print_table,
    summarize,
    write_per_image,
    write_summary,
)
from restore_cli.progress import BatchProgress
from restore_cli.restore import prefetch

if TYPE_CHECKING:  # distributed imports the restore engine; only `--engine ray` needs it
    from restore_cli.distributed import RayOptions
    from restore_cli.models.registry import LoadedModel

DEFAULT_OUTPUT_DIR = Path("eval")
DEFAULT_METRICS = ("psnr", "ssim")
OWN_METRICS = ("psnr", "ssim")
PER_IMAGE_NAME, SUMMARY_NAME, PLOT_NAME = "per_image.csv", "summary.csv", "summary.png"
METADATA_NAME = "metadata.csv"
EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130


@dataclass
class EvalOptions:
    """What to score. Prediction folders come from ``predictions`` (model name = folder name)
    and/or ``models`` (restored from ``data/lq`` first); ``gt`` defaults to ``data/gt``."""

    predictions: list[Path] = field(default_factory=list)
    gt: Path | None = None
    output_dir: Path = DEFAULT_OUTPUT_DIR
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    color: str = "rgb"
    crop_border: int = 0
    metadata: Path | None = None  # default: data/metadata.csv when --data is given
    models: list[str] = field(default_factory=list)
    weights: Path | None = None
    data: Path | None = None
    mode: str = "auto"
    tasks: list[str] = field(default_factory=list)
    granularity: str | None = None  # routed models: force all / type / degree experts
    engine: EngineOptions = field(default_factory=EngineOptions)  # device: metrics too
    overwrite: bool = False  # redo existing predictions of --model
    batch_size: int = 8  # images per batch on CUDA; the CPU scores one image at a time
    readers: int = 2
    quiet: bool = False
    max_pixels: int = MAX_PIXELS_DEFAULT
    shard: Shard | None = None  # only this shard's files (job arrays; see merge_shards)
    ray: RayOptions | None = None  # restore and score on a Ray cluster (--engine ray)


@dataclass(frozen=True)
class Pair:
    """One key (relative path without extension) and the files found for it."""

    key: str
    pred: Path | None
    gt: Path | None
    status: str = STATUS_OK  # not OK: why it cannot be scored
    error: str = ""


Compute = Callable[[torch.Tensor, torch.Tensor | None], dict[str, torch.Tensor]]


@dataclass
class Scorer:
    """CSV columns and how to compute them on a batch ([B,3,H,W] in [0,1] on the device):
    ``compute`` returns one [B] tensor per column."""

    columns: tuple[str, ...]
    compute: Compute | None  # None: the metric is unavailable here (columns left empty)


# ----------------------------------------------------------------------------- folders


def split_paths(
    paths: Sequence[Path],
    *,
    compare: bool,
    gt: Path | None,
    metrics: Sequence[str],
    data: Path | None = None,
) -> tuple[list[Path], Path | None]:
    """CLI positional paths → (prediction folders, ground-truth folder).

    ``PRED GT``, ``PRED`` (no-reference metrics only), ``--compare DIR1 DIR2 ... GT``. With
    ``--gt`` or ``--data`` (GT = DATA/gt) every path is a prediction folder. Otherwise the last
    path is taken as GT only when a metric needs one, so ``--compare A B --metrics niqe``
    scores A and B without reference.
    """
    paths = list(paths)
    if gt is not None or data is not None or not needs_reference(metrics):
        if not compare and len(paths) > 1:
            raise ConfigError("give one PRED folder (or --compare for several)")
        return paths, gt
    if len(paths) < 2:
        raise ConfigError(
            f"metric {first_reference_metric(metrics)} needs ground truth: eval PRED GT "
            "(or use only no-reference metrics such as niqe, musiq)"
        )
    if not compare and len(paths) > 2:
        raise ConfigError("eval takes PRED GT; use --compare DIR1 DIR2 ... GT for several")
    return paths[:-1], paths[-1]


def needs_reference(metrics: Sequence[str]) -> bool:
    return first_reference_metric(metrics) is not None


def first_reference_metric(metrics: Sequence[str]) -> str | None:
    """The first metric that needs ground truth; checks every name (ConfigError if unknown)."""
    pyiqa_names = [name for name in metrics if name not in OWN_METRICS]
    modes = pyiqa_metric_modes() if pyiqa_names else {}
    first = None
    for name in metrics:
        mode = "FR" if name in OWN_METRICS else metric_mode(name, modes)
        if mode == "FR" and first is None:
            first = name
    return first


def parse_metrics(text: str) -> list[str]:
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    if not names:
        raise ConfigError("--metrics: give at least one metric, e.g. psnr,ssim")
    duplicates = [name for name, count in Counter(names).items() if count > 1]
    if duplicates:
        raise ConfigError(f"--metrics: {duplicates[0]} is listed twice")
    return names


def file_key(relative: Path) -> str:
    """Pairing key: the relative path without its extension, with / separators."""
    return relative.with_suffix("").as_posix()


def index_folder(
    root: Path, exclude: Path | None = None
) -> tuple[dict[str, Path], dict[str, list[Path]]]:
    """Key → image file under ``root`` (recursive), plus keys claimed by several files.
    ``exclude`` (eval's output folder, if it lies inside) is not descended into."""
    if not root.is_dir():
        raise ConfigError(f"{root}: not a folder")
    found: dict[str, list[Path]] = {}
    for path in walk_images(root, recursive=True, exclude=exclude):
        found.setdefault(file_key(path.relative_to(root)), []).append(path)
    unique = {key: paths[0] for key, paths in found.items() if len(paths) == 1}
    clashes = {key: paths for key, paths in found.items() if len(paths) > 1}
    return unique, clashes


def pair_folders(pred_root: Path, gt_root: Path | None, exclude: Path | None = None) -> list[Pair]:
    """Every key of either folder, sorted, with what was found for it."""
    preds, pred_clashes = index_folder(pred_root, exclude)
    gts, gt_clashes = index_folder(gt_root, exclude) if gt_root is not None else ({}, {})
    keys = set(preds) | set(pred_clashes) | set(gts) | set(gt_clashes)
    pairs = []
    for key in sorted(keys):
        pred, gt = preds.get(key), gts.get(key)
        clash = pred_clashes.get(key) or gt_clashes.get(key)
        if clash:
            names = ", ".join(str(path) for path in clash)
            error = f"several files share the name {key!r}: {names}"
            pairs.append(Pair(key, pred, gt, STATUS_FAILED, error))
        elif pred is None:
            error = f"{gt}: no prediction with the same relative path in {pred_root}"
            pairs.append(Pair(key, None, gt, STATUS_MISSING_PRED, error))
        elif gt is None and gt_root is not None:
            error = f"{pred}: no ground truth with the same relative path in {gt_root}"
            pairs.append(Pair(key, pred, None, STATUS_MISSING_GT, error))
        else:
            pairs.append(Pair(key, pred, gt))
    return pairs


def model_names(folders: Sequence[Path]) -> list[str]:
    """Folder names as model names; clashing names get their parent folder prefixed."""
    names = [folder.resolve().name or str(folder) for folder in folders]
    counts = Counter(names)
    return [
        f"{folder.resolve().parent.name}/{name}" if counts[name] > 1 else name
        for folder, name in zip(folders, names, strict=True)
    ]


# ----------------------------------------------------------------------------- metadata


def read_metadata(path: Path) -> dict[str, dict[str, str]]:
    """metadata.csv rows by pairing key: the ``gt`` and ``lq`` paths without their first
    folder (``gt/sub/a_000.png`` → ``sub/a_000``) and without extension; also the full path."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as error:
        raise ConfigError(f"{path}: cannot read metadata ({one_line(error)})") from None
    by_key: dict[str, dict[str, str]] = {}
    for row in rows:
        for column in ("gt", "lq"):
            value = (row.get(column) or "").strip()
            if not value:
                continue
            relative = Path(value)
            keys = [file_key(relative)]
            if len(relative.parts) > 1:
                keys.insert(0, file_key(Path(*relative.parts[1:])))
            for key in keys:
                by_key.setdefault(key, row)
    if rows and not by_key:
        raise ConfigError(f"{path}: no gt/lq columns to join on")
    return by_key


# ----------------------------------------------------------------------------- metrics


def build_scorers(
    metrics: Sequence[str],
    convention: Convention,
    device: torch.device,
    has_reference: bool,
    stderr: TextIO,
) -> tuple[list[Scorer], list[str]]:
    """Scorers for the requested metrics (PSNR and SSIM share one, which prepares each image
    once), plus one error line per metric that cannot be built; an unavailable metric keeps a
    scorer without ``compute`` so the CSV columns never depend on the machine."""
    scorers, errors = [], []
    own = tuple(name for name in metrics if name in OWN_METRICS)
    for name in metrics:
        if name in OWN_METRICS:
            if name == own[0]:
                columns = tuple(convention.column(metric) for metric in own)
                scorers.append(Scorer(columns, _own(own, convention)))
            continue
        try:
            metric = load_iqa_metric(name, device)
        except MetricUnavailable as error:
            errors.append(str(error))
            scorers.append(Scorer((name,), None))
            continue
        if metric.full_reference and not has_reference:
            errors.append(f"{name}: a full-reference metric, but no ground truth was given")
            scorers.append(Scorer((name,), None))
            continue
        scorers.append(Scorer((name,), _iqa(metric)))
    for line in errors:
        print(f"error: {line}", file=stderr, flush=True)
    return scorers, errors


def _own(metrics: tuple[str, ...], convention: Convention) -> Compute:
    def compute(pred: torch.Tensor, gt: torch.Tensor | None) -> dict[str, torch.Tensor]:
        assert gt is not None
        values = score(pred, gt, convention, metrics)
        return {convention.column(name): values[name] for name in metrics}

    return compute


def _iqa(metric: IqaMetric) -> Compute:
    """pyiqa gets the same 8-bit-rounded pixels as PSNR/SSIM (matters for 16-bit files only)."""

    def compute(pred: torch.Tensor, gt: torch.Tensor | None) -> dict[str, torch.Tensor]:
        pred = (quantize(pred) / PIXEL_MAX).float()
        gt = None if gt is None else (quantize(gt) / PIXEL_MAX).float()
        return {metric.name: metric(pred, gt)}

    return compute


# ----------------------------------------------------------------------------- scoring


@dataclass
class Loaded:
    """A pair read from disk: CHW float32 tensors (gt None without reference)."""

    pred: torch.Tensor
    gt: torch.Tensor | None


def read_pair(pair: Pair, max_pixels: int) -> Loaded:
    assert pair.pred is not None
    pred = _tensor(read_image(pair.pred, max_pixels=max_pixels).rgb)
    gt = None if pair.gt is None else _tensor(read_image(pair.gt, max_pixels=max_pixels).rgb)
    return Loaded(pred, gt)


def _tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)


class FolderScoring:
    """Scores the pairs of one prediction folder; collects one row per pair."""

    def __init__(
        self,
        model: str,
        scorers: list[Scorer],
        device: torch.device,
        options: EvalOptions,
        progress: BatchProgress,
        stderr: TextIO,
    ) -> None:
        self.model = model
        self.scorers = scorers
        self.device = device
        self.options = options
        self.progress = progress
        self.stderr = stderr
        self.rows: list[Row] = []
        self._batch: list[tuple[Row, Loaded]] = []
        # Stacking only pays on CUDA (one transfer, one launch per metric); on the CPU it is
        # a copy, and PSNR/SSIM go image by image there anyway.
        self.batch_size = options.batch_size if device.type == "cuda" else 1

    def run(self, pairs: list[Pair]) -> list[Row]:
        with ThreadPoolExecutor(self.options.readers, thread_name_prefix="eval-read") as pool:
            reading = prefetch(
                pool,
                lambda p: read_pair(p, self.options.max_pixels),
                pairs,
                2 * max(self.batch_size, self.options.readers),
                wanted=lambda p: p.status == STATUS_OK,
            )
            for pair, future in reading:
                row: Row = {
                    "file": pair.key,
                    "model": self.model,
                    "status": pair.status,
                    "pred": "" if pair.pred is None else str(pair.pred),
                    "gt": "" if pair.gt is None else str(pair.gt),
                }
                self.rows.append(row)
                if future is None:
                    self.fail(row, pair.status, pair.error)
                    continue
                try:
                    loaded = future.result()
                except Exception as error:
                    self.fail(row, STATUS_FAILED, one_line(error))
                    continue
                self.add(row, pair, loaded)
            self.flush()
        return self.rows

    def add(self, row: Row, pair: Pair, loaded: Loaded) -> None:
        height, width = loaded.pred.shape[-2:]
        row |= {"height": height, "width": width}
        if loaded.gt is not None and loaded.gt.shape != loaded.pred.shape:
            gt_h, gt_w = loaded.gt.shape[-2:]
            message = f"{pair.pred}: size {width}x{height} but ground truth is {gt_w}x{gt_h}"
            self.fail(row, STATUS_SIZE_MISMATCH, message)
            return
        if self._batch and (
            self._batch[0][1].pred.shape != loaded.pred.shape or len(self._batch) >= self.batch_size
        ):
            self.flush()
        self._batch.append((row, loaded))

    def flush(self) -> None:
        """Score the waiting batch; a metric that fails on it is retried image by image, so
        one bad image costs only its own values."""
        if not self._batch:
            return
        rows = [row for row, _ in self._batch]
        preds = _stack([loaded.pred for _, loaded in self._batch]).to(self.device)
        gts = None
        if self._batch[0][1].gt is not None:
            gts = _stack([loaded.gt for _, loaded in self._batch if loaded.gt is not None])
            gts = gts.to(self.device)
        for scorer in self.scorers:
            if scorer.compute is None:
                continue
            try:
                for column, values in scorer.compute(preds, gts).items():
                    for row, value in zip(rows, values.tolist(), strict=True):
                        row[column] = float(value)
            except Exception:
                for index, row in enumerate(rows):
                    self.score_one(scorer, row, preds[index : index + 1], gts, index)
        for row in rows:
            if row["status"] != STATUS_OK:
                self.progress.print_error(str(row["error"]), self.stderr)
            self.progress.advance(int(row["height"]) * int(row["width"]) / 1e6)
        self._batch = []

    def score_one(
        self, scorer: Scorer, row: Row, pred: torch.Tensor, gts: torch.Tensor | None, index: int
    ) -> None:
        gt = None if gts is None else gts[index : index + 1]
        assert scorer.compute is not None
        try:
            for column, values in scorer.compute(pred, gt).items():
                row[column] = float(values[0])
        except Exception as error:
            message = f"{self.model}: {row['file']}: {'/'.join(scorer.columns)}: {one_line(error)}"
            row["status"] = STATUS_FAILED
            row["error"] = "; ".join(filter(None, [str(row.get("error") or ""), message]))

    def fail(self, row: Row, status: str, message: str) -> None:
        row["status"] = status
        row["error"] = f"{self.model}: {message}"
        self.progress.print_error(str(row["error"]), self.stderr)
        self.progress.advance()


def _stack(images: list[torch.Tensor]) -> torch.Tensor:
    """A batch without copying when it holds one image (the usual case on the CPU)."""
    return images[0][None] if len(images) == 1 else torch.stack(images)


def join_metadata(rows: list[Row], metadata: dict[str, dict[str, str]], stderr: TextIO) -> None:
    unmatched = 0
    for row in rows:
        found = metadata.get(str(row["file"]))
        if found is None:
            unmatched += 1
            continue
        for column in METADATA_COLUMNS:
            row[column] = found.get(column, "")
    if unmatched:
        print(f"warning: {unmatched} of {len(rows)} rows have no metadata row", file=stderr)


# ----------------------------------------------------------------------------- --model


def restore_predictions(options: EvalOptions, stderr: TextIO) -> list[tuple[str, Path]] | None:
    """Run each ``--model`` on ``data/lq`` into ``OUT/pred/<model>``; (name, folder) each, or
    None when the user interrupted a restoration (finished files are kept)."""
    from restore_cli.models.loading import resolve_model
    from restore_cli.restore import EXIT_INTERRUPTED as RESTORE_INTERRUPTED
    from restore_cli.restore import RestoreOptions, RestoreRun, Streams

    assert options.data is not None  # checked by resolve_inputs()
    lq = options.data / "lq"
    if not lq.is_dir():
        raise ConfigError(f"{options.data}: no lq/ folder (expected a synthesize output)")
    requests = [(name, resolve_model(name, weights=options.weights)) for name in options.models]
    made_by: dict[str, str] = {}
    for name, request in requests:  # before any model runs
        if request.name in made_by:
            raise ConfigError(
                f"--model {made_by[request.name]} and --model {name} are both named "
                f"{request.name!r}, so their predictions would share "
                f"{options.output_dir}/pred/{request.name}; give one weights file another name"
            )
        made_by[request.name] = name
    folders = []
    for name, request in requests:
        loaded = request.load()
        folder = options.output_dir / "pred" / loaded.name
        claim_prediction_folder(folder, prediction_fingerprint(loaded, options), options)
        restore_options = RestoreOptions(
            inputs=[str(lq)],
            output_dir=folder,
            model=name,
            weights=options.weights,
            mode=options.mode,
            tasks=list(options.tasks),
            granularity=options.granularity,
            engine=options.engine,
            recursive=True,
            overwrite=options.overwrite,
            quiet=options.quiet,
            max_pixels=options.max_pixels,
            shard=options.shard,  # restore keys its shards like eval pairs: same files
        )
        # Output paths RestoreRun prints for pipelines are not eval's output: swallow them.
        streams = Streams(stdin=None, stdout=io.StringIO(), stderr=stderr)
        if options.ray is None:
            run = RestoreRun(restore_options, loaded, streams)
        else:
            from restore_cli.distributed import RayRestoreRun

            run = RayRestoreRun(restore_options, loaded, name, options.ray, streams)
        if run.run() == RESTORE_INTERRUPTED:
            return None
        folders.append((loaded.name, folder))
        del loaded
    return folders


FINGERPRINT_FILE = ".restore-cli-model.json"


def prediction_fingerprint(loaded: LoadedModel, options: EvalOptions) -> dict[str, Any]:
    """What makes a model's predictions what they are: its weights (a digest of every tensor,
    so two files with the same stem differ, and one file named two ways does not) and the
    options that change outputs."""
    digest = hashlib.sha256()
    for key, tensor in loaded.module.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return {
        "weights_sha256": digest.hexdigest(),
        "mode": options.mode,
        "tasks": sorted(options.tasks),
        "granularity": options.granularity,
        "conditions": {k: repr(v) for k, v in sorted(loaded.conditions.items())},
    }


def claim_prediction_folder(
    folder: Path, fingerprint: dict[str, Any], options: EvalOptions
) -> None:
    """Reruns reuse ``pred/<model>`` only when the same model and options made it: kept
    predictions of other weights under the same name would be scored silently otherwise."""
    marker = folder / FINGERPRINT_FILE
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        recorded = None
    if recorded is not None and recorded != fingerprint and not options.overwrite:
        changed = sorted(k for k in fingerprint if recorded.get(k) != fingerprint[k])
        raise ConfigError(
            f"{folder} holds predictions of another model or options ({', '.join(changed)} "
            "differ); use --overwrite to redo them, or another -o"
        )
    if recorded is None and not options.overwrite and _has_images(folder):
        raise ConfigError(
            f"{folder} holds predictions that no recorded model made (from an older "
            "restore-cli or another tool); use --overwrite to redo them, or another -o"
        )
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(marker, json.dumps(fingerprint, indent=1).encode())


def _has_images(folder: Path) -> bool:
    return folder.is_dir() and next(walk_images(folder, True, None), None) is not None


# ----------------------------------------------------------------------------- driver


@dataclass
class Inputs:
    """Everything checked before any work starts (all usage errors surface here)."""

    metrics: list[str]
    convention: Convention
    device: torch.device
    gt_root: Path | None
    metadata: dict[str, dict[str, str]] | None


def resolve_inputs(options: EvalOptions) -> Inputs:
    if options.batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    if not options.predictions and not options.models:
        raise ConfigError("nothing to score: give PRED, --compare folders, or --model with --data")
    if options.models and options.data is None:
        raise ConfigError("--model needs --data DIR (a synthesize output with lq/ and gt/)")
    metrics = list(options.metrics)
    reference_metric = first_reference_metric(metrics)  # also rejects unknown names
    for folder in options.predictions:
        if not folder.is_dir():
            raise ConfigError(f"{folder}: prediction folder not found")
    gt_root = options.gt
    if gt_root is None and options.data is not None:
        gt_root = options.data / "gt"
    if gt_root is None and reference_metric is not None:
        raise ConfigError(f"metric {reference_metric} needs ground truth (GT or --data)")
    if gt_root is not None and not gt_root.is_dir():
        raise ConfigError(f"{gt_root}: ground-truth folder not found")
    metadata_path = options.metadata
    if metadata_path is None and options.data is not None:
        candidate = options.data / METADATA_NAME
        metadata_path = candidate if candidate.is_file() else None
    return Inputs(
        metrics=metrics,
        convention=Convention(options.color, options.crop_border),
        device=resolve_device(options.engine.device),
        gt_root=gt_root,
        metadata=read_metadata(metadata_path) if metadata_path is not None else None,
    )


def evaluate(options: EvalOptions, stderr: TextIO | None = None) -> int:
    """Score, write per_image.csv / summary.csv / summary.png, print the table; exit code.

    Usage errors raise :class:`ConfigError` (the CLI prints them, exit 2) before any work;
    per-file and per-metric problems are reported and make the exit code 1.
    """
    stderr = stderr or sys.stderr  # looked up per call: a test runner swaps it
    started = time.perf_counter()
    inputs = resolve_inputs(options)
    sources = list(zip(model_names(options.predictions), options.predictions, strict=True))
    if options.models:
        restored = restore_predictions(options, stderr)
        if restored is None:
            return EXIT_INTERRUPTED
        sources = restored + sources
    scorers, metric_errors = build_scorers(
        inputs.metrics, inputs.convention, inputs.device, inputs.gt_root is not None, stderr
    )
    plans = [
        (name, pair_folders(folder, inputs.gt_root, exclude=options.output_dir))
        for name, folder in sources
    ]
    if options.shard is not None:
        shard = options.shard
        plans = [(name, [p for p in pairs if shard.owns(p.key)]) for name, pairs in plans]
    total = sum(len(pairs) for _, pairs in plans)
    progress = BatchProgress(
        total, enabled=not options.quiet and stderr.isatty(), description="scoring"
    )
    rows: list[Row] = []
    interrupted = False
    try:
        with progress:
            if options.ray is None:
                for name, pairs in plans:
                    scoring = FolderScoring(name, scorers, inputs.device, options, progress, stderr)
                    rows += scoring.run(pairs)
            else:
                from restore_cli.distributed import score_on_ray

                has_reference = inputs.gt_root is not None
                for row in score_on_ray(plans, options, has_reference, options.ray):
                    rows.append(row)
                    if row["status"] != STATUS_OK:
                        progress.print_error(str(row["error"]), stderr)
                    pixels = int(str(row.get("height", 0))) * int(str(row.get("width", 0)))
                    progress.advance(pixels / 1e6)
    except KeyboardInterrupt:  # what was scored so far is still written
        interrupted = True
    if inputs.metadata is not None:
        join_metadata(rows, inputs.metadata, stderr)
    columns = [column for scorer in scorers for column in scorer.columns]
    with_metadata = inputs.metadata is not None
    write_outputs(
        options.output_dir, rows, columns, with_metadata, stderr, options.quiet, options.shard
    )
    failed = sum(row["status"] != STATUS_OK for row in rows)
    if not options.quiet:
        seconds = time.perf_counter() - started
        print(
            f"scored {len(rows) - failed} of {len(rows)} files ({failed} not scored, "
            f"{len(metric_errors)} metric(s) unavailable) in {seconds:.1f} s → "
            f"{options.output_dir}",
            file=stderr,
        )
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FAILED if failed or metric_errors else EXIT_OK


def write_outputs(
    output_dir: Path,
    rows: list[Row],
    columns: list[str],
    with_metadata: bool,
    stderr: TextIO,
    quiet: bool,
    shard: Shard | None = None,
) -> None:
    """per_image.csv, summary.csv, summary.png (``*.shard-I-of-N.*`` for a shard) and the
    table."""
    output_dir.mkdir(parents=True, exist_ok=True)

    def named(name: str) -> Path:
        return output_dir / name if shard is None else shard.tag(output_dir / name)

    summary = summarize(rows, columns)
    write_per_image(named(PER_IMAGE_NAME), rows, columns, with_metadata)
    write_summary(named(SUMMARY_NAME), summary, columns)
    plot_summary(named(PLOT_NAME), summary, columns)
    if not quiet and summary:
        print_table(summary, columns, stderr)


# ----------------------------------------------------------------------------- --merge-shards

_SHARD_TABLE = re.compile(r"per_image\.shard-(\d+)-of-(\d+)\.csv")


def merge_shards(output_dir: Path, stderr: TextIO | None = None, quiet: bool = False) -> int:
    """Combine the per_image tables of an ``eval --shard I/N`` job array in ``output_dir``
    into the unsharded per_image.csv, summary.csv and summary.png; exit code 1 if a row is
    not ``ok``.

    Rows come back in the unsharded order (model, then file). The summary is computed from the
    per-image values as written (6 decimals), so its means can differ from an unsharded run's
    in the 7th decimal.
    """
    stderr = stderr or sys.stderr
    if not output_dir.is_dir():
        raise ConfigError(f"{output_dir}: not a folder")
    tables: dict[int, dict[int, Path]] = {}
    for path in output_dir.iterdir():
        if match := _SHARD_TABLE.fullmatch(path.name):
            tables.setdefault(int(match[2]), {})[int(match[1])] = path
    if not tables:
        raise ConfigError(f"{output_dir}: no per_image.shard-I-of-N.csv (from eval --shard I/N)")
    if len(tables) > 1:
        counts = ", ".join(str(count) for count in sorted(tables))
        raise ConfigError(f"{output_dir}: shard tables of different N ({counts}); keep one run")
    count, paths = tables.popitem()
    missing = [str(index) for index in range(count) if index not in paths]
    if missing:
        raise ConfigError(
            f"{output_dir}: shard(s) {', '.join(missing)} of {count} have no table yet; "
            f"run eval --shard I/{count} for them first"
        )
    header: list[str] | None = None
    rows: list[Row] = []
    for index in range(count):
        shard_header, shard_rows = read_per_image(paths[index])
        if header is not None and shard_header != header:
            raise ConfigError(f"{paths[index]}: other columns than {paths[0].name}")
        header = shard_header
        rows += shard_rows
    assert header is not None
    with_metadata = METADATA_COLUMNS[0] in header
    first_extra = next(i for i, c in enumerate(header) if c in (*METADATA_COLUMNS, *PER_IMAGE_TAIL))
    columns = header[3:first_extra]  # after file, model, status
    models = list(dict.fromkeys(str(row["model"]) for row in rows))
    rows.sort(key=lambda row: (models.index(str(row["model"])), str(row["file"])))
    write_outputs(output_dir, rows, columns, with_metadata, stderr, quiet)
    failed = sum(row["status"] != STATUS_OK for row in rows)
    if not quiet:
        print(
            f"merged {count} shards: {len(rows)} rows ({failed} not scored) → {output_dir}",
            file=stderr,
        )
    return EXIT_FAILED if failed else EXIT_OK


def read_per_image(path: Path) -> tuple[list[str], list[Row]]:
    """A per_image CSV back as rows: metric values as floats (``inf``/``nan`` included), blank
    cells left out, so :func:`summarize` sees what it saw when the table was written."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            header = list(reader.fieldnames or [])
            raw = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise ConfigError(f"{path}: cannot read ({one_line(error)})") from None
    if header[:3] != ["file", "model", "status"]:
        raise ConfigError(f"{path}: not a per_image table of eval")
    text_columns = {"file", "model", "status", *METADATA_COLUMNS, *PER_IMAGE_TAIL}
    rows: list[Row] = []
    for values in raw:
        row: Row = {}
        for column, value in values.items():
            if value in ("", None):
                continue
            if column in text_columns:
                row[column] = value
                continue
            try:
                row[column] = float(value)
            except ValueError:
                raise ConfigError(f"{path}: {column} = {value!r} is not a number") from None
        rows.append(row)
    return header, rows
