"""DiffUIR speed: restore MP/s per released size (T/S/B/L) and sampling step count.

    python benchmarks/diffuir.py [--size 1024] [--device cpu|cuda] [--steps 1 3 5]
        [--sizes DiffUIR-T DiffUIR-S ...] [--repeats 1]

Each size is built at its released configuration with random weights (speed does not depend on
the values) and run through the real restore engine (`Engine.restore_tensor`: automatic tiles,
reflect padding, blending; fp32 as the model's spec requires) on one ``--size``² image, after a
one-step warm-up; the median of ``--repeats`` timings per step count. The sampler calls the
network once per step, so time grows linearly with ``--steps``. Prints Markdown rows with the
tile the engine chose and, on CUDA, the peak memory.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from restore_cli.engine import Engine, EngineOptions
from restore_cli.models.diffuir import RELEASED_CONFIGS, build_diffuir, diffuir_spec
from restore_cli.models.registry import LoadedModel, apply_sampling


def released_model(name: str) -> LoadedModel:
    dim, mults = RELEASED_CONFIGS[name]
    config = {"dim": dim, "dim_mults": list(mults)}
    return LoadedModel(name=name, module=build_diffuir(config), spec=diffuir_spec(config))


def restore_seconds(engine: Engine, image: torch.Tensor, repeats: int) -> tuple[float, int]:
    times, tile = [], 0
    for _ in range(repeats):
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        _, info = engine.restore_tensor(image)
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        tile = info.tile
    return statistics.median(times), tile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--sizes", nargs="+", choices=sorted(RELEASED_CONFIGS),
                        default=list(RELEASED_CONFIGS))  # fmt: skip
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    image = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    megapixels = args.size * args.size / 1e6
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, "
          f"{args.size}×{args.size}, fp32")  # fmt: skip
    print("| size | parameters | steps | tile | seconds | MP/s | peak GPU memory |")
    print("|---|---|---|---|---|---|---|")
    for name in args.sizes:
        model = released_model(name)
        parameters = sum(p.numel() for p in model.module.parameters()) / 1e6
        engine = Engine(model, EngineOptions(device=args.device))
        apply_sampling(model, 1, None)
        restore_seconds(engine, image, 1)  # warm-up (allocator, kernels, cuDNN autotune)
        for steps in args.steps:
            apply_sampling(model, steps, None)
            if engine.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            seconds, tile = restore_seconds(engine, image, args.repeats)
            memory = "-"
            if engine.device.type == "cuda":
                memory = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
            rate = megapixels / seconds
            row = f"| {name} | {parameters:.2f} M | {steps} | {tile or 'whole'} | {seconds:.1f} |"
            print(f"{row} {rate:.4f} | {memory} |", flush=True)


if __name__ == "__main__":
    main()
