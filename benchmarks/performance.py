"""Speed of each model, pure forward against end-to-end `restore`; writes docs/performance.md.

    python -m benchmarks.performance --photos /tmp/photos/val [--device cpu|cuda]
        [--model NAME ...] [--size 3840x2160 ...] [--images 3] [--compile] [--contiguous]
        [--write]

Per model and image size, each in a fresh process (so its peak memory is its own):

- **pure forward**: ``Engine.forward`` on one batch of the tiles `restore` cuts for that image
  size (same device, precision, channels_last, compiled or not), after a warm-up; the median
  of ``--repeats``. MP/s counts tile pixels.
- **end to end**: a ``JobRunner`` (the `restore` pipeline: reader threads, routing, tiling,
  the engine, writer threads, atomic writes) over ``--images`` JPEGs of that size cut from
  ``--photos``, after one warm-up image. MP/s counts image pixels, so tile overlap and routing
  count against it, as they do for a user.
- **peak memory**: CUDA max allocated (GPU) or the process's peak RSS (CPU).

End-to-end runs the forward predicts to take longer than ``--max-seconds`` are skipped (and say
so). ``--write`` replaces this device's section of docs/performance.md and keeps the others.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from restore_cli.engine import EngineOptions
from restore_cli.io.discover import expand_inputs, plan_jobs
from restore_cli.models.loading import load_model
from restore_cli.restore import JobRunner, RestoreOptions

DOC = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
SHIPPED = ["unirestorer", "nafnet-allinone-s", "diffuir-t"]


def measure(args: argparse.Namespace) -> dict:
    """One model at one size (runs in its own process)."""
    width, height = args.width, args.height
    loaded = load_model(args.model)
    with tempfile.TemporaryDirectory() as out:
        options = RestoreOptions(
            inputs=[args.folder],
            output_dir=Path(out),
            engine=EngineOptions(
                device=args.device,
                compile=args.compile,
                channels_last=False if args.contiguous else None,
            ),
            overwrite=True,
            quiet=True,
        )
        runner = JobRunner(options, loaded)
        engine = runner.engine
        cuda = engine.device.type == "cuda"

        def sync() -> None:
            if cuda:
                torch.cuda.synchronize(engine.device)

        # Pure forward on the tile shape `restore` uses for this image size.
        image = torch.rand(1, 3, height, width, device=engine.device)
        started = time.perf_counter()
        engine.restore_tensor(image)  # warm-up (and compile); sets this image's route
        sync()
        first_image = time.perf_counter() - started
        tile_h, tile_w = engine.forward_size(height, width)
        batch = torch.rand(engine.batch_size, 3, tile_h, tile_w, device=engine.device)
        engine.forward(batch)
        sync()
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            engine.forward(batch)
            sync()
            times.append(time.perf_counter() - started)
        forward = batch.shape[0] * tile_h * tile_w / 1e6 / statistics.median(times)
        result = {
            "model": args.model,
            "device": str(engine.device),
            "size": f"{width}x{height}",
            "tile": f"{tile_w}x{tile_h}" + (f" ×{batch.shape[0]}" if batch.shape[0] > 1 else ""),
            "precision": engine.precision,
            "compile": args.compile,
            "contiguous": args.contiguous,
            "forward_mp_s": forward,
            "first_image_s": first_image,
        }
        # End to end over the folder, after one warm-up image.
        sources = expand_inputs([args.folder], recursive=False, stdin=None)
        jobs = plan_jobs(sources, Path(out), overwrite=True)
        estimate = len(jobs) * width * height / 1e6 / forward
        if estimate > args.max_seconds:
            result["end_to_end_mp_s"] = None
            result["note"] = f"end to end skipped: about {estimate:.0f} s > --max-seconds"
        else:
            records = []
            runner.execute(jobs[:1], records.append)
            started = time.perf_counter()
            runner.execute(jobs, records.append)
            seconds = time.perf_counter() - started
            failed = [r.error for r in records if r.status != "ok"]
            if failed:
                raise SystemExit(f"restore failed: {failed[0]}")
            result["end_to_end_mp_s"] = len(jobs) * width * height / 1e6 / seconds
    if cuda:
        result["peak_mib"] = torch.cuda.max_memory_allocated(engine.device) / 2**20
    else:
        result["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def make_photos(source: Path, width: int, height: int, count: int, folder: Path) -> None:
    """``count`` JPEGs of exactly width×height: the photos scaled to cover, centre-cropped."""
    photos = sorted(p for p in source.iterdir() if p.suffix.lower() in (".jpg", ".png"))
    if len(photos) < count:
        raise SystemExit(f"{source}: need {count} photos, found {len(photos)}")
    folder.mkdir(parents=True, exist_ok=True)
    for index, path in enumerate(photos[:count]):
        with Image.open(path) as opened:
            photo = opened.convert("RGB")
        scale = max(width / photo.width, height / photo.height)
        size = (max(width, round(photo.width * scale)), max(height, round(photo.height * scale)))
        photo = photo.resize(size, Image.Resampling.LANCZOS)
        left, top = (photo.width - width) // 2, (photo.height - height) // 2
        photo = photo.crop((left, top, left + width, top + height))
        photo.save(folder / f"photo{index}.jpg", quality=95)


def machine(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
    text += f"{torch.get_num_threads()} torch threads"
    if device.startswith("cuda") and torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name()}"
    return text


def table(results: list[dict]) -> str:
    lines = [
        "| model | size | tile | precision | pure forward MP/s | end-to-end MP/s | "
        "end-to-end / forward | first image s | peak memory MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        e2e = r["end_to_end_mp_s"]
        ratio = f"{e2e / r['forward_mp_s']:.0%}" if e2e else "—"
        e2e_text = f"{e2e:.3f}" if e2e else f"— ({r['note']})"
        model = r["model"] + (" (compiled)" if r["compile"] else "")
        model += " (contiguous)" if r["contiguous"] else ""
        lines.append(
            f"| {model} | {r['size']} | {r['tile']} | {r['precision']} | "
            f"{r['forward_mp_s']:.3f} | {e2e_text} | {ratio} | {r['first_image_s']:.1f} | "
            f"{r['peak_mib']:.0f} |"
        )
    return "\n".join(lines)


def write_section(device: str, body: str) -> None:
    """Replace this device's ``## `` section of docs/performance.md, keep the others."""
    title = "## GPU" if device.startswith("cuda") else "## CPU"
    head = (
        "# Performance\n\nWritten by `benchmarks/performance.py` (see its docstring for what each "
        "column measures). Re-run it whenever a model or the engine changes.\n"
    )
    text = DOC.read_text() if DOC.is_file() else head
    parts = text.split("\n## ")
    sections = [parts[0].rstrip("\n") + "\n"] + ["## " + part for part in parts[1:]]
    new = f"{title}\n\n{body}\n"
    for index, section in enumerate(sections):
        if section.startswith(title):
            sections[index] = new
            break
    else:
        sections.append(new)
    DOC.write_text("\n".join(section.rstrip("\n") + "\n" for section in sections))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, help="folder of photos to cut test images from")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", action="append", help=f"default: {', '.join(SHIPPED)}")
    parser.add_argument("--size", action="append", help="WxH (default: 1024x1024, 3840x2160)")
    parser.add_argument("--images", type=int, default=3, help="photos per size, end to end")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--contiguous", action="store_true", help="not channels_last (to compare)")
    parser.add_argument("--max-seconds", type=float, default=300.0)
    parser.add_argument("--write", action="store_true", help="update docs/performance.md")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one measurement, as JSON
    args = parser.parse_args()
    if args.one:
        one = argparse.Namespace(**json.loads(args.one))
        print(json.dumps(measure(one)))
        return
    if args.photos is None:
        parser.error("--photos is required")
    sizes = [tuple(int(v) for v in size.lower().split("x")) for size in args.size or []]
    sizes = sizes or [(1024, 1024), (3840, 2160)]
    results = []
    print(machine(args.device), flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        for width, height in sizes:
            folder = Path(scratch) / f"{width}x{height}"
            make_photos(args.photos, width, height, args.images, folder)
            for model in args.model or SHIPPED:
                one = {
                    "model": model, "device": args.device, "width": width, "height": height,
                    "folder": str(folder), "compile": args.compile, "repeats": args.repeats,
                    "max_seconds": args.max_seconds, "contiguous": args.contiguous,
                }  # fmt: skip
                command = [sys.executable, "-m", "benchmarks.performance", "--one", json.dumps(one)]
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode:
                    print(done.stderr, file=sys.stderr)
                    raise SystemExit(f"{model} at {width}x{height} failed")
                results.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(table(results[-1:]).splitlines()[-1], flush=True)
    argv = " ".join(["python -m benchmarks.performance", *sys.argv[1:]])
    today = datetime.date.today().isoformat()
    body = f"Measured {today} on {machine(args.device)}:\n\n```\n{argv}\n```\n\n{table(results)}"
    print(body)
    if args.write:
        write_section(args.device, body)


if __name__ == "__main__":
    main()
