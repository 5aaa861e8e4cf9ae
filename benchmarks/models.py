"""Model speed: pure-forward MP/s per backbone, and end-to-end `restore` MP/s on a folder.

    python benchmarks/models.py [--size 1024] [--device cpu|cuda] [--arch nafnet-allinone-s ...]
    python benchmarks/models.py --folder PHOTOS --model nafnet-allinone-s   # end to end

Forward: random weights of each architecture's configuration at ``--size``², after one
warm-up, median of ``--repeats`` runs (bf16 autocast and channels_last on CUDA). End to end:
the real `restore` pipeline (decode, tiles, model, encode, atomic write) over ``--folder``,
so its overhead over the pure forward is visible. Prints Markdown rows.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import torch

from restore_cli.engine import EngineOptions
from restore_cli.models.loading import load_model
from restore_cli.models.registry import get_architecture
from restore_cli.restore import RestoreOptions, RestoreRun, Streams

# name: (architecture, constructor config) of the backbones we ship or load.
CONFIGS = {
    "nafnet-allinone-s": (
        "nafnet",
        {"img_channel": 3, "width": 16, "enc_blk_nums": [1, 1, 1, 2], "middle_blk_num": 1,
         "dec_blk_nums": [1, 1, 1, 1]},
    ),
    "nafnet-sidd-width32": (
        "nafnet",
        {"img_channel": 3, "width": 32, "enc_blk_nums": [2, 2, 4, 8], "middle_blk_num": 12,
         "dec_blk_nums": [2, 2, 2, 2]},
    ),
    "restormer": ("restormer", {}),
    "promptir": ("promptir", {"decoder": True}),
}  # fmt: skip


def forward_mp_per_s(name: str, size: int, device: str, repeats: int) -> float:
    arch_name, config = CONFIGS[name]
    module = get_architecture(arch_name).build(config).eval().to(device)
    image = torch.rand(1, 3, size, size, device=device)
    autocast = contextlib.nullcontext()
    if device.startswith("cuda"):
        module = module.to(memory_format=torch.channels_last)
        image = image.contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    times = []
    with torch.inference_mode(), autocast:
        for index in range(repeats + 1):
            start = time.perf_counter()
            module(image)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if index:  # the first run is the warm-up
                times.append(time.perf_counter() - start)
    return size * size / 1e6 / statistics.median(times)


def end_to_end_mp_per_s(folder: Path, model: str, device: str) -> float:
    with tempfile.TemporaryDirectory() as out:
        options = RestoreOptions(
            inputs=[str(folder)], output_dir=Path(out), engine=EngineOptions(device=device),
            quiet=True,
        )  # fmt: skip
        run = RestoreRun(options, load_model(model), Streams())
        start = time.perf_counter()
        run.run()
        seconds = time.perf_counter() - start
        return run.log.megapixels / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--arch", action="append", choices=sorted(CONFIGS))
    parser.add_argument("--folder", type=Path, help="end-to-end restore over this folder")
    parser.add_argument("--model", default="nafnet-allinone-s")
    args = parser.parse_args()
    print(f"device {args.device}, torch threads {torch.get_num_threads()}")
    if args.folder is not None:
        rate = end_to_end_mp_per_s(args.folder, args.model, args.device)
        print(f"| {args.model} | end-to-end restore of {args.folder} | {rate:.3f} MP/s |")
        return
    print(f"| model | forward at {args.size}×{args.size} |\n|---|---|")
    for name in args.arch or list(CONFIGS):
        rate = forward_mp_per_s(name, args.size, args.device, args.repeats)
        print(f"| {name} | {rate:.4g} MP/s ({1 / rate:.0f} s per MP) |", flush=True)


if __name__ == "__main__":
    main()
