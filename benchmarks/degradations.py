"""Degradation speed: pairs/s per type on 512x512 crops, CPU (and CUDA when present).

    python benchmarks/degradations.py [PHOTO] [--device cpu|cuda] [--seconds 3] [--threads N]

Each type is applied at medium level with fresh parameters and seeds for ``--seconds`` after a
warm-up; the figure counts the degradation alone (no decode/encode). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

from restore_cli.degradations import DEGRADATIONS
from restore_cli.degradations.pipeline import single_step_chain
from restore_cli.io.image import read_image


def crop_512(photo: Path | None) -> torch.Tensor:
    if photo is None:
        rng = np.random.default_rng(0)
        y, x = np.mgrid[0:512, 0:512] / 512
        base = np.stack([0.5 + 0.4 * np.sin(9 * x), 0.3 + 0.5 * y, 0.4 + 0.2 * (x > y)], -1)
        rgb = np.clip(base + 0.02 * rng.standard_normal(base.shape), 0, 1).astype(np.float32)
    else:
        full = read_image(photo).rgb
        top, left = (full.shape[0] - 512) // 2, (full.shape[1] - 512) // 2
        rgb = full[top : top + 512, left : left + 512]
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]


def pairs_per_second(name: str, image: torch.Tensor, seconds: float) -> float:
    def once(seed: int) -> None:
        chain = single_step_chain(name, "medium", seed)
        chain.apply(image, torch.Generator().manual_seed(seed))
        if image.is_cuda:
            torch.cuda.synchronize()

    once(0)  # warm-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        count += 1
        once(count)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photo", nargs="?", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    image = crop_512(args.photo).to(args.device)
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, {platform.processor()}")
    print("| degradation | family | pairs/s (512×512) |\n|---|---|---|")
    rates = []
    for name, degradation in DEGRADATIONS.items():
        rate = pairs_per_second(name, image, args.seconds)
        rates.append(rate)
        print(f"| {name} | {degradation.family} | {rate:.1f} |", flush=True)
    print(f"| **mean** | | **{np.mean(rates):.1f}** |")


if __name__ == "__main__":
    main()
