"""The `synthesize` feature: degraded/clean pairs from clean photos, reproducible by seed.

Each pair is keyed by the clean image's relative path and its index; its seed is
``pair_seed(seed, key)``, which draws the crop, the chain and every random field. So the same
seed gives the same bytes with any number of workers, in any order, and a rerun only makes the
pairs that are missing (``metadata.csv`` is rebuilt whole at the end, atomically).

Killing a run at any moment is safe: each image is written atomically, a pair counts as made
only when both of its files exist, temp files of a killed run are removed at the next start,
and an interrupted run leaves the previous ``metadata.csv`` untouched (it is only rewritten by
a run that got through every pair). Workers ignore SIGINT so that Ctrl-C reaches the parent
alone, which stops submitting, lets running pairs finish and prints the summary.
"""

from __future__ import annotations

import csv
import functools
import io
import signal
import sys
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import numpy as np
import torch
from PIL import Image, ImageDraw

from restore_cli.degradations import (
    LEVELS,
    Component,
    MixtureSpec,
    families,
    pair_seed,
    sample_chain,
)
from restore_cli.degradations.pipeline import (
    Chain,
    check_pinned,
    single_step_chain,
    validate_levels,
    validate_types,
)
from restore_cli.engine import resolve_device
from restore_cli.errors import (
    ConfigError,
    ImageWriteError,
    one_line,
    warnings_as_lines,
    with_file,
)
from restore_cli.io.atomic import atomic_write_bytes, remove_stale_temp_files
from restore_cli.io.discover import expand_inputs
from restore_cli.io.image import MAX_PIXELS_DEFAULT, ImageExtras, read_image, write_image
from restore_cli.io.shard import Shard
from restore_cli.io.signals import terminate_as_interrupt
from restore_cli.progress import BatchProgress

if TYPE_CHECKING:  # distributed imports the restore engine; only `--engine ray` needs it
    from restore_cli.distributed import RayOptions

METADATA_NAME = "metadata.csv"
PREVIEW_NAME = "preview.png"
METADATA_COLUMNS = [
    "lq", "gt", "source", "index", "seed", "types", "degradations", "levels", "ood",
    "crop_x", "crop_y", "crop_w", "crop_h", "chain",
]  # fmt: skip
EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130


@dataclass
class SynthesizeOptions:
    inputs: list[str]
    output_dir: Path
    spec: MixtureSpec
    per_image: int = 1
    crop: int | None = None
    seed: int = 0
    workers: int = 1
    device: str = "cpu"
    preview: bool = False
    recursive: bool = True
    quiet: bool = False
    max_pixels: int = MAX_PIXELS_DEFAULT
    shard: Shard | None = None  # only this shard's clean images (job arrays); None = all
    ray: RayOptions | None = None  # make the pairs on a Ray cluster (--engine ray)


@dataclass(frozen=True)
class PairJob:
    source: Path
    key: str  # relative path of the clean image
    index: int
    seed: int
    lq: Path  # relative to the output folder
    gt: Path


@dataclass(frozen=True)
class Crop:
    x: int
    y: int
    width: int
    height: int


def make_spec(
    types: list[str],
    levels: list[str],
    *,
    mixed: tuple[int, int] | None = None,
    gated: bool = False,
    probability: float = 0.5,
    ood: float = 0.0,
    fixed: list[str] | None = None,
    clean: float = 0.0,
    type_probability: Mapping[str, float] | None = None,
) -> MixtureSpec:
    """The mixture spec behind the CLI options (the same levels for every type).

    ``fixed`` holds ``NAME.PARAM=VALUE`` strings that pin a parameter (``gaussian_noise.sigma=25``).
    ``type_probability`` overrides ``probability`` for the types it names: their gate when
    ``gated``, their selection weight otherwise (where the others weigh 1).
    """
    validate_levels(levels)
    validate_types(types)
    overrides = dict(type_probability or {})
    unknown = sorted(set(overrides) - set(types))
    if unknown:
        raise ConfigError(
            f"type_probability names {', '.join(unknown)}, which are not among the types "
            f"({', '.join(types)})"
        )
    gate = probability if gated else 1.0
    components = {
        name: Component(probability=overrides.get(name, gate), levels=tuple(levels))
        for name in types
    }
    pinned = parse_fixed(fixed or [])
    return MixtureSpec(
        tuple(types),
        components,
        mixed=mixed,
        gated=gated,
        ood_probability=ood,
        fixed=pinned,
        clean_probability=clean,
    )


def parse_fixed(items: list[str]) -> dict[str, dict[str, float | int | str]]:
    pinned: dict[str, dict[str, float | int | str]] = {}
    for item in items:
        target, _, text = item.partition("=")
        name, _, key = target.partition(".")
        if not (name and key and text):
            raise ConfigError(
                f"--param {item!r}: expected NAME.PARAM=VALUE, e.g. gaussian_noise.sigma=25"
            )
        value: float | int | str = text
        for kind in (int, float):
            try:
                value = kind(text)
                break
            except ValueError:
                continue
        pinned.setdefault(name, {})[key] = check_pinned(name, key, value)
    return pinned


def plan_pairs(options: SynthesizeOptions) -> tuple[list[PairJob], list[str]]:
    """All pairs to make, in a stable order, plus one error line per unusable input."""
    if options.per_image < 1:
        raise ConfigError("--per-image must be at least 1")
    if options.crop is not None and options.crop < 1:
        raise ConfigError(f"--crop {options.crop}: must be at least 1 pixel")
    if options.workers < 1:
        raise ConfigError(f"--workers {options.workers}: must be at least 1")
    if options.max_pixels < 1:
        raise ConfigError(f"--max-pixels {options.max_pixels}: must be at least 1")
    sources = expand_inputs(
        options.inputs, recursive=options.recursive, stdin=None, exclude=options.output_dir
    )
    jobs, errors = [], []
    for source in sources:
        if options.shard is not None and not options.shard.owns(source.relative):
            continue  # all pairs of one clean image (and its errors) belong to one shard
        if source.error:
            errors.append(f"{source.path}: {source.error}")
            continue
        key = source.relative.as_posix()
        stem = source.relative.with_suffix("")
        for index in range(options.per_image):
            name = f"{stem.as_posix()}_{index:03d}.png"
            seed = pair_seed(options.seed, f"{key}#{index}")
            jobs.append(PairJob(source.path, key, index, seed, Path("lq", name), Path("gt", name)))
    return jobs, errors


def oriented_size(path: Path) -> tuple[int, int]:
    """(width, height) after EXIF orientation, read from the header only."""
    with Image.open(path) as image:
        width, height = image.size
        orientation = image.getexif().get(274, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def draw_crop(width: int, height: int, crop: int | None, rng: np.random.Generator) -> Crop:
    """A random crop (the whole image where it is smaller than ``crop``)."""
    crop_w, crop_h = (width, height) if crop is None else (min(crop, width), min(crop, height))
    x = int(rng.integers(0, width - crop_w + 1))
    y = int(rng.integers(0, height - crop_h + 1))
    return Crop(x, y, crop_w, crop_h)


def recipe(job: PairJob, spec: MixtureSpec, crop: int | None, size: tuple[int, int]):
    """Everything random about a pair, drawn in a fixed order from its seed."""
    rng = np.random.default_rng(job.seed)
    window = draw_crop(*size, crop, rng)
    return window, sample_chain(spec, rng)


def metadata_row(job: PairJob, window: Crop, chain: Chain) -> dict[str, object]:
    return {
        "lq": job.lq.as_posix(), "gt": job.gt.as_posix(), "source": job.key,
        "index": job.index, "seed": job.seed, "types": chain.types,
        "degradations": chain.names, "levels": chain.levels, "ood": int(chain.ood),
        "crop_x": window.x, "crop_y": window.y, "crop_w": window.width, "crop_h": window.height,
        "chain": chain.to_json(),
    }  # fmt: skip


def degrade(clean: torch.Tensor, chain: Chain, seed: int, device: str) -> torch.Tensor:
    """Apply ``chain`` to [1,3,H,W] with the pair's torch generator (random fields on CPU)."""
    generator = torch.Generator().manual_seed(seed)
    return chain.apply(clean.to(device), generator).cpu()


def png_extras(bit_depth: int) -> ImageExtras:
    return ImageExtras("PNG", "RGB", bit_depth, False, None, None, None)


PairResult = tuple[dict[str, object] | None, str | None]  # (metadata row, or one error line)


def make_pair_reported(job: PairJob, options: SynthesizeOptions) -> PairResult:
    """:func:`make_pair` with its failure as the one line the user sees (any engine)."""
    try:
        return make_pair(job, options), None
    except ImageWriteError as error:  # names the output it could not write
        return None, one_line(error)
    except Exception as error:
        return None, with_file(job.source, one_line(error))


def make_pair(job: PairJob, options: SynthesizeOptions) -> dict[str, object]:
    """Read, crop, degrade and write one pair (skipping it if both files exist)."""
    out = options.output_dir
    lq_path, gt_path = out / job.lq, out / job.gt
    if lq_path.exists() and gt_path.exists():
        window, chain = recipe(job, options.spec, options.crop, oriented_size(job.source))
        return metadata_row(job, window, chain) | {"_status": "skipped"}
    decoded = read_image(job.source, max_pixels=options.max_pixels)
    window, chain = recipe(job, options.spec, options.crop, (decoded.width, decoded.height))
    pixels = decoded.rgb[window.y : window.y + window.height, window.x : window.x + window.width]
    clean = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None]
    degraded = degrade(clean, chain, job.seed, options.device)
    extras = png_extras(16 if decoded.extras.bit_depth == 16 else 8)
    for path, image in ((gt_path, clean), (lq_path, degraded)):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_image(path, image[0].permute(1, 2, 0).numpy(), extras)
    return metadata_row(job, window, chain) | {"_status": "ok"}


def regenerate_pair(row: dict[str, str], clean_root: Path, device: str = "cpu"):
    """Rebuild (lq, gt) tensors of one metadata row from its clean image: the round trip."""
    decoded = read_image(clean_root / row["source"])
    x, y, w, h = (int(row[k]) for k in ("crop_x", "crop_y", "crop_w", "crop_h"))
    clean = torch.from_numpy(np.ascontiguousarray(decoded.rgb[y : y + h, x : x + w]))
    clean = clean.permute(2, 0, 1)[None]
    return degrade(clean, Chain.from_json(row["chain"]), int(row["seed"]), device), clean


def _init_worker() -> None:
    torch.set_num_threads(1)  # the pool supplies the parallelism
    # Ctrl-C in a terminal signals the whole process group; the parent alone decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_pairs(jobs: list[PairJob], options: SynthesizeOptions) -> Iterator[tuple[PairJob, Future]]:
    """Submit pairs to a process pool (or run inline for one worker), yield in job order."""
    if options.workers <= 1:
        for job in jobs:
            future: Future = Future()
            future.set_result(make_pair_reported(job, options))
            yield job, future
        return
    context = get_context("spawn")  # fork after torch has started threads can deadlock
    pool = ProcessPoolExecutor(options.workers, mp_context=context, initializer=_init_worker)
    try:
        yield from [(job, pool.submit(make_pair_reported, job, options)) for job in jobs]
    finally:  # on Ctrl-C: queued pairs are dropped, running ones finish (writes are atomic)
        pool.shutdown(wait=True, cancel_futures=True)


def write_metadata(path: Path, rows: list[dict[str, object]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METADATA_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buffer.getvalue().encode("utf-8"))


def metadata_path(options: SynthesizeOptions) -> Path:
    """``OUT/metadata.csv``; a shard writes its own rows to ``metadata.shard-I-of-N.csv`` (a
    final run without ``--shard`` finds every pair made and writes the whole table quickly)."""
    path = options.output_dir / METADATA_NAME
    return path if options.shard is None else options.shard.tag(path)


def synthesize(options: SynthesizeOptions, stderr: TextIO | None = None) -> int:
    """Make every missing pair, then metadata.csv (and preview.png); returns the exit code."""
    stderr = stderr or sys.stderr  # looked up per call: a test runner swaps it
    started = time.perf_counter()
    resolve_device(options.device)  # a clear error now rather than one per pair
    pairs = run_pairs
    if options.ray is not None:
        from restore_cli.distributed import pairs_on_ray

        pairs = functools.partial(pairs_on_ray, ray_options=options.ray)
    jobs, errors = plan_pairs(options)
    for line in errors:
        print(f"error: {line}", file=stderr)
    remove_leftovers(options, jobs, stderr)
    rows: list[dict[str, object]] = []
    failed = len(errors)
    interrupted = False
    progress = BatchProgress.for_stream(len(jobs), options.quiet, stderr)
    try:
        with terminate_as_interrupt(), warnings_as_lines(stderr):
            if options.preview and jobs and (options.shard is None or options.shard.index == 0):
                write_preview(options, jobs[0].source)
            with progress:
                for job, future in pairs(jobs, options):
                    try:
                        row, message = future.result()
                    except Exception as error:  # the worker process itself died
                        row, message = None, with_file(job.source, one_line(error))
                    if row is not None:
                        rows.append(row)
                    else:
                        failed += 1
                        progress.print_error(message or "failed", stderr)
                    progress.advance()
    except KeyboardInterrupt:
        interrupted = True
    if not interrupted:
        write_metadata(metadata_path(options), rows)
    made = sum(row["_status"] == "ok" for row in rows)
    if not options.quiet:
        seconds = time.perf_counter() - started
        head = "interrupted: " if interrupted else ""
        print(
            f"{head}made {made}, skipped {len(rows) - made}, failed {failed} pairs in "
            f"{seconds:.1f} s → {options.output_dir}",
            file=stderr,
        )
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FAILED if failed else EXIT_OK


def remove_leftovers(options: SynthesizeOptions, jobs: list[PairJob], stderr: TextIO) -> None:
    """Delete temp files a killed run left in the output folders (never a live run's)."""
    out = options.output_dir
    folders = {(out / path).parent for job in jobs for path in (job.lq, job.gt)} | {out}
    removed = remove_stale_temp_files(sorted(f for f in folders if f.is_dir()))
    if removed and not options.quiet:
        count = len(removed)
        print(f"note: removed {count} temporary file(s) left by an interrupted run", file=stderr)


def write_preview(options: SynthesizeOptions, source: Path, side: int = 192) -> Path:
    """Contact sheet: one row per degradation of the chosen types, columns light → heavy."""
    decoded = read_image(source, max_pixels=options.max_pixels)
    rng = np.random.default_rng(options.seed)
    window = draw_crop(decoded.width, decoded.height, options.crop or 512, rng)
    pixels = decoded.rgb[window.y : window.y + window.height, window.x : window.x + window.width]
    clean = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None]
    clean = torch.nn.functional.interpolate(clean, size=(side, side), mode="area")
    names = [n for t in options.spec.types for n in families().get(t, [t])]
    label_width, header = 130, 18
    sheet = Image.new("RGB", (label_width + side * (len(LEVELS) + 1), header + side * len(names)))
    draw = ImageDraw.Draw(sheet)
    for column, title in enumerate(("clean", *LEVELS)):
        draw.text((label_width + column * side + 4, 3), title, fill="white")
    for row, name in enumerate(names):
        top = header + row * side
        draw.text((4, top + side // 2), name, fill="white")
        tiles = [clean] + [
            degrade(clean, single_step_chain(name, level, options.seed), options.seed, "cpu")
            for level in LEVELS
        ]
        for column, tile in enumerate(tiles):
            array = (tile[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            sheet.paste(Image.fromarray(array), (label_width + column * side, top))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    path = options.output_dir / PREVIEW_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
    return path
