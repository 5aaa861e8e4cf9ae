"""Command-line interface: parse options, build the options dataclasses, call the features.

Nothing below this module knows about Typer. Errors the user can fix (``RestoreCliError``)
are printed as one line with exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from restore_cli import __version__
from restore_cli.errors import ConfigError, RestoreCliError
from restore_cli.io.shard import parse_shard

EXIT_USAGE = 2
T = TypeVar("T")

app = typer.Typer(
    name="restore-cli",
    help="All-in-one image restoration: restore folders of photos with learned models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class Mode(str, Enum):
    auto = "auto"
    instruction = "instruction"


class Granularity(str, Enum):
    all = "all"
    type = "type"
    degree = "degree"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Engine(str, Enum):
    local = "local"
    ray = "ray"


class OutputExt(str, Enum):
    same = "same"
    png = "png"
    jpg = "jpg"
    webp = "webp"
    tif = "tif"


# Options shared by several commands, declared once.
EngineOption = Annotated[
    Engine, typer.Option(help="local: this process; ray: the workers of a Ray cluster.")
]
RayAddressOption = Annotated[
    str | None, typer.Option(help="--engine ray: auto (the running cluster) or HOST:PORT.")
]
RayWorkersOption = Annotated[
    int | None, typer.Option(min=1, help="--engine ray: parallel workers [default: all CPUs].")
]
GpusPerWorkerOption = Annotated[
    float, typer.Option(min=0, help="--engine ray: GPUs per worker (0 = CPU workers).")
]
CpusPerWorkerOption = Annotated[
    int, typer.Option(min=1, help="--engine ray: CPUs (torch threads) per model copy.")
]
WeightsOption = Annotated[
    Path | None, typer.Option("--weights", help="Use this file for the named model.")
]
ModeOption = Annotated[Mode, typer.Option(help="auto: the model decides; instruction: --task.")]
TaskOption = Annotated[
    list[str], typer.Option("--task", help="Task(s) for --mode instruction, comma-separated.")
]
GranularityOption = Annotated[
    Granularity | None,
    typer.Option(help="Mixture-of-experts models: force the experts of one granularity."),
]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
PrecisionOption = Annotated[Precision, typer.Option(help="auto = bf16/fp16 on CUDA.")]
CompileOption = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="torch.compile the model (slow first image; then one fixed tile shape, no "
        "recompiles).",
    ),
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary.")]
DebugOption = Annotated[bool, typer.Option(help="Show tracebacks.")]
ShardOption = Annotated[
    str | None,
    typer.Option(
        metavar="I/N",
        help="Only shard I of N (0-based) of the files, split stably by path: for job arrays.",
    ),
]


def run_guarded(debug: bool, feature: Callable[[], T]) -> T:
    """Run a feature; a user-fixable error becomes one line on stderr and exit code 2."""
    try:
        return feature()
    except RestoreCliError as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE) from None


def parse_tile(value: str) -> int | None:
    if value == "auto":
        return None
    try:
        tile = int(value)
    except ValueError:
        raise ConfigError(f"--tile {value!r}: expected auto, 0 (whole image) or a size") from None
    if tile < 0:
        raise ConfigError(f"--tile {value}: must be >= 0")
    return tile


def split_tasks(values: list[str]) -> list[str]:
    return [task.strip() for value in values for task in value.split(",") if task.strip()]


def version_callback(value: bool) -> None:
    if value:
        print(f"restore-cli {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True)
    ] = False,
) -> None:
    """All-in-one image restoration."""


@app.command()
def restore(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Files, folders, globs, or - to read paths from stdin.", metavar="INPUT..."
        ),
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder.")] = Path(
        "restored"
    ),
    model: Annotated[
        str | None, typer.Option("--model", help="Model name (see `models`) or a weights file.")
    ] = None,
    weights: WeightsOption = None,
    mode: ModeOption = Mode.auto,
    task: TaskOption = [],  # noqa: B006 - Typer reads the default, it is never mutated
    granularity: GranularityOption = None,
    steps: Annotated[
        int | None, typer.Option(help="Diffusion models: sampling steps (fewer = faster).")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Diffusion models: noise seed (same seed, same output).")
    ] = None,
    tile: Annotated[str, typer.Option(help="Tile side in pixels, 0 = whole image, or auto.")] = (
        "auto"
    ),
    tile_overlap: Annotated[int, typer.Option(help="Overlap between tiles in pixels.")] = 32,
    device: DeviceOption = "auto",
    precision: PrecisionOption = Precision.auto,
    batch_size: Annotated[int, typer.Option(min=0, help="Tiles per forward pass; 0 = auto.")] = 0,
    compile_model: CompileOption = False,
    recursive: Annotated[
        bool, typer.Option("--recursive", "-r", help="Descend into sub-folders.")
    ] = False,
    ext: Annotated[OutputExt, typer.Option(help="Output format; same = as the input.")] = (
        OutputExt.same
    ),
    suffix: Annotated[str, typer.Option(help="Text appended to output file stems.")] = "",
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite/--skip-existing", help="Redo outputs that already exist."),
    ] = False,
    csv: Annotated[
        Path | None, typer.Option("--csv", help="Run CSV path [default: OUTPUT/restore_run.csv].")
    ] = None,
    json_lines: Annotated[
        bool, typer.Option("--json", help="Print one JSON object per file on stdout.")
    ] = False,
    quiet: QuietOption = False,
    max_pixels: Annotated[
        int, typer.Option(min=1, help="Refuse images with more pixels (decompression bombs).")
    ] = 200_000_000,
    jpeg_quality: Annotated[int, typer.Option(min=1, max=100, help="JPEG/WebP quality.")] = 95,
    shard: ShardOption = None,
    engine: EngineOption = Engine.local,
    ray_address: RayAddressOption = None,
    gpus_per_worker: GpusPerWorkerOption = 0.0,
    cpus_per_worker: CpusPerWorkerOption = 1,
    ray_workers: RayWorkersOption = None,
    debug: DebugOption = False,
) -> None:
    """Restore images and write them to the output folder, with a CSV of what was done."""
    from restore_cli.engine import EngineOptions
    from restore_cli.models.loading import load_model
    from restore_cli.restore import RestoreOptions, RestoreRun, Streams

    def feature() -> int:
        options = RestoreOptions(
            inputs=inputs,
            output_dir=output,
            model=model,
            weights=weights,
            mode=mode.value,
            tasks=split_tasks(task),
            granularity=granularity.value if granularity else None,
            steps=steps,
            seed=seed,
            engine=EngineOptions(
                device=device,
                precision=precision.value,
                tile=parse_tile(tile),
                tile_overlap=tile_overlap,
                batch_size=batch_size,
                compile=compile_model,
            ),
            recursive=recursive,
            ext=ext.value,
            suffix=suffix,
            overwrite=overwrite,
            csv_path=csv,
            json=json_lines,
            quiet=quiet,
            max_pixels=max_pixels,
            jpeg_quality=jpeg_quality,
            shard=parse_shard(shard),
        )
        name = requested_model_name(model)
        loaded = load_model(name, weights=weights)
        streams = Streams(stdin=sys.stdin if "-" in inputs else None)
        if engine is Engine.local:
            return RestoreRun(options, loaded, streams).run()
        from restore_cli.distributed import RayOptions, RayRestoreRun

        ray_options = RayOptions(ray_address, gpus_per_worker, ray_workers, cpus_per_worker)
        return RayRestoreRun(options, loaded, name, ray_options, streams).run()

    raise typer.Exit(run_interruptible(debug, feature))


def run_interruptible(debug: bool, feature: Callable[[], int]) -> int:
    """run_guarded, plus Ctrl-C outside the batch loop (loading the model, a second Ctrl-C
    while finishing): one line and exit code 130 rather than click's "Aborted!" and 1."""
    try:
        return run_guarded(debug, feature)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130


def requested_model_name(name: str | None) -> str:
    """``--model`` as given, or the default entry of weights.yaml."""
    from restore_cli.weights import default_entry

    if name is not None:
        return name
    entry = default_entry()
    if entry is None:
        raise RestoreCliError(
            "no default model is shipped in this version yet; pass --model NAME or "
            "--model PATH (see `restore-cli models`)"
        )
    return entry.name


def load_requested_model(name: str | None, weights: Path | None):
    from restore_cli.models.loading import load_model

    return load_model(requested_model_name(name), weights=weights)


@app.command()
def route(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Files, folders, globs, or - to read paths from stdin.", metavar="INPUT..."
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "-o", "--output", help="Routes CSV; - writes it to stdout. [default: routes.csv]"
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", help="A mixture-of-experts model [default: the default model]."),
    ] = None,
    weights: WeightsOption = None,
    mode: ModeOption = Mode.auto,
    task: TaskOption = [],  # noqa: B006 - Typer reads the default, it is never mutated
    granularity: GranularityOption = None,
    device: DeviceOption = "auto",
    recursive: Annotated[
        bool, typer.Option("--recursive", "-r", help="Descend into sub-folders.")
    ] = False,
    quiet: QuietOption = False,
    shard: ShardOption = None,
    debug: DebugOption = False,
) -> None:
    """Estimate each image's degradations and the experts the model would use, as CSV."""
    from restore_cli.routing import RouteOptions, run_route

    def feature() -> int:
        shards = parse_shard(shard)
        csv_path = output
        if output is None:  # the default name, per shard when sharded
            csv_path = Path("routes.csv") if shards is None else shards.tag(Path("routes.csv"))
        options = RouteOptions(
            inputs=inputs,
            csv_path=None if str(csv_path) == "-" else csv_path,
            shard=shards,
            mode=mode.value,
            tasks=split_tasks(task),
            granularity=granularity.value if granularity else None,
            device=device,
            recursive=recursive,
            quiet=quiet,
        )
        loaded = load_requested_model(model, weights)
        stdin = sys.stdin if "-" in inputs else None
        return run_route(options, loaded, stdin, sys.stdout, sys.stderr)

    raise typer.Exit(run_guarded(debug, feature))


@app.command("models")
def list_models_command(
    json_lines: Annotated[bool, typer.Option("--json", help="One JSON object per model.")] = False,
    debug: DebugOption = False,
) -> None:
    """List known models with their status (shipped / cached / downloadable / missing)."""
    from restore_cli.models.loading import list_models

    rows = run_guarded(debug, list_models)
    if json_lines:
        for row in rows:
            print(json.dumps(row))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "arch", "status", "licence", "description")
    for row in rows:
        name = f"{row['name']} (default)" if row.get("default") else row["name"]
        table.add_row(name, row["arch"], row["status"], row["licence"], row["description"])
    Console().print(table)
    if not rows:
        print("no models registered in weights.yaml yet; --model PATH loads a weights file")


def parse_mixed(value: str | None) -> tuple[int, int] | None:
    """``K`` or ``K1-K2`` (number of degradation types per image)."""
    if value is None:
        return None
    low, _, high = value.partition("-")
    try:
        bounds = (int(low), int(high or low))
    except ValueError:
        raise ConfigError(f"--mixed {value!r}: expected K or K1-K2, e.g. 2 or 2-3") from None
    return bounds


@app.command()
def synthesize(
    inputs: Annotated[
        list[str], typer.Argument(help="Clean photos: files, folders or globs.", metavar="CLEAN...")
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder.")],
    types: Annotated[
        str, typer.Option(help="Comma-separated degradation families or names (see --help).")
    ],
    levels: Annotated[str, typer.Option(help="Levels to draw from.")] = "light,medium,heavy",
    mixed: Annotated[
        str | None, typer.Option(help="K or K1-K2 types per image, in physical order.")
    ] = None,
    gated: Annotated[
        bool, typer.Option(help="Keep each type with probability --probability (UniRestorer).")
    ] = False,
    probability: Annotated[
        float, typer.Option(help="Gate probability per type with --gated.")
    ] = 0.5,
    ood: Annotated[
        float, typer.Option(help="Chance that a step samples its out-of-distribution range.")
    ] = 0.0,
    clean: Annotated[
        float, typer.Option(help="Share of pairs left undegraded (lq = gt), for identity training.")
    ] = 0.0,
    param: Annotated[
        list[str],
        typer.Option("--param", help="Pin a parameter: NAME.PARAM=VALUE (repeatable)."),
    ] = [],  # noqa: B006 - Typer reads the default, it is never mutated
    per_image: Annotated[int, typer.Option(help="Pairs made from each clean photo.")] = 1,
    crop: Annotated[
        int | None, typer.Option(help="Random crop side in pixels (default: whole image).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Run seed: same seed, same bytes.")] = 0,
    workers: Annotated[int, typer.Option(help="Worker processes.")] = 1,
    device: Annotated[str, typer.Option(help="cpu or cuda[:N] for applying degradations.")] = (
        "cpu"
    ),
    preview: Annotated[
        bool, typer.Option(help="Also write OUT/preview.png: one row per type, light → heavy.")
    ] = False,
    recursive: Annotated[bool, typer.Option(help="Descend into sub-folders.")] = True,
    quiet: QuietOption = False,
    shard: ShardOption = None,
    engine: EngineOption = Engine.local,
    ray_address: RayAddressOption = None,
    ray_workers: RayWorkersOption = None,
    debug: DebugOption = False,
) -> None:
    """Make degraded/clean pairs (OUT/lq, OUT/gt, OUT/metadata.csv) from clean photos."""
    from restore_cli.synthesize import SynthesizeOptions, make_spec
    from restore_cli.synthesize import synthesize as run

    def feature() -> int:
        spec = make_spec(
            [t.strip() for t in types.split(",") if t.strip()],
            [level.strip() for level in levels.split(",") if level.strip()],
            mixed=parse_mixed(mixed),
            gated=gated,
            probability=probability,
            ood=ood,
            fixed=param,
            clean=clean,
        )
        options = SynthesizeOptions(
            inputs=inputs,
            output_dir=output,
            spec=spec,
            per_image=per_image,
            crop=crop,
            seed=seed,
            workers=workers,
            device=device,
            preview=preview,
            recursive=recursive,
            quiet=quiet,
            shard=parse_shard(shard),
        )
        if engine is Engine.ray:
            from restore_cli.distributed import RayOptions, import_ray

            import_ray()  # a missing extra is a usage error before anything is written
            options.ray = RayOptions(ray_address, workers=ray_workers)
        return run(options)

    raise typer.Exit(run_interruptible(debug, feature))


@app.command()
def train(
    config: Annotated[
        Path, typer.Argument(help="Training config (YAML); see docs/training.md.", metavar="CONFIG")
    ],
    resume: Annotated[
        str | None,
        typer.Option(
            help="auto (latest checkpoint in the run folder, else start fresh), a checkpoint "
            "file, or a run folder."
        ),
    ] = None,
    set_values: Annotated[
        list[str],
        typer.Option(
            "--set",
            help="Override a config value: KEY=VALUE (dotted key, YAML value).",
            metavar="KEY=VALUE",
        ),
    ] = [],  # noqa: B006 - Typer reads the default, it is never mutated
    out: Annotated[
        Path | None, typer.Option("--out", help="Run folder [default: runs/<config name>].")
    ] = None,
    max_minutes: Annotated[
        float | None,
        typer.Option(help="Stop with a checkpoint after this many minutes (exit code 75)."),
    ] = None,
    stop_at: Annotated[
        int | None, typer.Option(help="Stop with a checkpoint after this iteration.")
    ] = None,
    quiet: QuietOption = False,
    debug: DebugOption = False,
) -> None:
    """Train a restoration model from a YAML config (resumable; runs under torchrun)."""
    from restore_cli.train import TrainOptions
    from restore_cli.train import train as run

    def feature() -> int:
        options = TrainOptions(
            config=config,
            overrides=set_values,
            resume=resume,
            run_dir=out,
            max_minutes=max_minutes,
            stop_at=stop_at,
            quiet=quiet,
        )
        return run(options)

    raise typer.Exit(run_guarded(debug, feature))


class ColorSpace(str, Enum):
    rgb = "rgb"
    y = "y"


@app.command("eval")
def eval_command(
    paths: Annotated[
        list[Path] | None,
        typer.Argument(
            help="PRED [GT], or with --compare DIR1 DIR2 ... [GT]. GT is the last path when a "
            "metric needs it (unless --gt).",
            metavar="PATH...",
        ),
    ] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder.")] = Path("eval"),
    metrics: Annotated[
        str, typer.Option(help="Comma-separated: psnr, ssim, or any pyiqa metric name.")
    ] = "psnr,ssim",
    color: Annotated[
        ColorSpace, typer.Option(help="PSNR/SSIM on rgb or on BT.601 luma (y).")
    ] = ColorSpace.rgb,
    crop_border: Annotated[
        int, typer.Option(min=0, help="Pixels cut from each side before PSNR/SSIM.")
    ] = 0,
    metadata: Annotated[
        Path | None, typer.Option(help="metadata.csv to join (default: DATA/metadata.csv).")
    ] = None,
    compare: Annotated[
        bool, typer.Option("--compare", help="Score several prediction folders side by side.")
    ] = False,
    gt: Annotated[Path | None, typer.Option("--gt", help="Ground-truth folder.")] = None,
    model: Annotated[
        list[str],
        typer.Option("--model", help="Restore DATA/lq with this model first (repeatable)."),
    ] = [],  # noqa: B006 - Typer reads the default, it is never mutated
    weights: WeightsOption = None,
    data: Annotated[
        Path | None, typer.Option("--data", help="A synthesize output: DATA/lq, DATA/gt.")
    ] = None,
    mode: ModeOption = Mode.auto,
    task: TaskOption = [],  # noqa: B006 - Typer reads the default, it is never mutated
    granularity: GranularityOption = None,
    tile: Annotated[str, typer.Option(help="Tile side for --model, 0 = whole image, or auto.")] = (
        "auto"
    ),
    device: DeviceOption = "auto",
    precision: PrecisionOption = Precision.auto,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per metric batch on CUDA.")] = 8,
    compile_model: CompileOption = False,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite/--skip-existing", help="Redo --model predictions that exist."),
    ] = False,
    shard: ShardOption = None,
    merge_shards: Annotated[
        bool,
        typer.Option(
            "--merge-shards",
            help="Combine the tables that every --shard I/N wrote to -o into one eval.",
        ),
    ] = False,
    engine: EngineOption = Engine.local,
    ray_address: RayAddressOption = None,
    gpus_per_worker: GpusPerWorkerOption = 0.0,
    cpus_per_worker: CpusPerWorkerOption = 1,
    ray_workers: RayWorkersOption = None,
    quiet: QuietOption = False,
    debug: DebugOption = False,
) -> None:
    """Score predictions against ground truth (or without it): per-image and summary CSVs,
    a table on stderr, summary.png."""
    from restore_cli.engine import EngineOptions
    from restore_cli.evaluate import EvalOptions, evaluate, parse_metrics, split_paths

    def feature() -> int:
        if merge_shards:
            from restore_cli.evaluate import merge_shards as merge

            if paths or model or data or shard:
                raise ConfigError("--merge-shards takes only -o (where the shards wrote)")
            return merge(output, quiet=quiet)
        names = parse_metrics(metrics)
        predictions, gt_folder = [], gt
        if paths:
            predictions, gt_folder = split_paths(
                paths, compare=compare, gt=gt, metrics=names, data=data
            )
        options = EvalOptions(
            predictions=predictions,
            gt=gt_folder,
            output_dir=output,
            metrics=names,
            color=color.value,
            crop_border=crop_border,
            metadata=metadata,
            models=model,
            weights=weights,
            data=data,
            mode=mode.value,
            tasks=split_tasks(task),
            granularity=granularity.value if granularity else None,
            engine=EngineOptions(
                device=device,
                precision=precision.value,
                tile=parse_tile(tile),
                compile=compile_model,
            ),
            overwrite=overwrite,
            batch_size=batch_size,
            quiet=quiet,
            shard=parse_shard(shard),
        )
        if engine is Engine.ray:
            from restore_cli.distributed import RayOptions, import_ray

            import_ray()  # a missing extra is a usage error before anything is written
            options.ray = RayOptions(ray_address, gpus_per_worker, ray_workers, cpus_per_worker)
        return evaluate(options)

    raise typer.Exit(run_guarded(debug, feature))


def main() -> None:
    app()
