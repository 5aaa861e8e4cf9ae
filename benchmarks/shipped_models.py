"""Shipped models side by side on the UniRestorer validation sets (PSNR/SSIM per set).

    python -m benchmarks.shipped_models --photos /tmp/photos/val --out /tmp/ubench \
        --model nafnet-allinone-s --model unirestorer --model diffuir-t --every 2

Uses (and builds once, if missing) exactly the sets of benchmarks/unirestorer.py: every single
type at light/medium/heavy and three medium mixtures, 256 px crops of the fetch-photos val
photos at fixed seeds. Every model restores every scored crop through the restore engine with
its defaults (routed models in auto mode; diffusion models with their default steps and seed,
or ``--steps``/``--seed``); PSNR/SSIM on RGB, uint8, no border crop. Writes
``OUT/shipped_models.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.unirestorer import build_sets, load_pairs, print_set_table, scores
from restore_cli.engine import Engine, EngineOptions
from restore_cli.models.loading import load_model
from restore_cli.models.registry import apply_sampling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", action="append", required=True, help="Repeatable.")
    parser.add_argument("--per-image", type=int, default=2)
    parser.add_argument("--every", type=int, default=1, help="Score every N-th pair of a set.")
    parser.add_argument("--steps", type=int, help="Sampling steps of diffusion models.")
    parser.add_argument("--seed", type=int, help="Noise seed of diffusion models.")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sets = build_sets(args.photos, args.out / "sets", args.per_image)

    engines = {}
    for name in args.model:
        model = load_model(name)
        if model.spec.sampled:
            apply_sampling(model, args.steps, args.seed)
        engines[name] = Engine(model, EngineOptions(device="cpu"))
    columns = ["input", *args.model]
    results: dict[str, dict[str, float]] = {}
    seconds = dict.fromkeys(args.model, 0.0)
    for set_name, (folder, _, _) in sets.items():
        table: dict[str, list[tuple[float, float]]] = {column: [] for column in columns}
        for lq, gt in load_pairs(folder)[:: args.every]:
            table["input"].append(scores(lq, gt))
            for name, engine in engines.items():
                start = time.perf_counter()
                restored = engine.restore_tensor(lq)[0]
                seconds[name] += time.perf_counter() - start
                table[name].append(scores(restored, gt))
        results[set_name] = {}
        for column, values in table.items():
            results[set_name][f"{column}_psnr"] = float(np.mean([v[0] for v in values]))
            results[set_name][f"{column}_ssim"] = float(np.mean([v[1] for v in values]))
        shown = " ".join(f"{c} {results[set_name][c + '_psnr']:.2f}" for c in columns)
        print(set_name, shown, flush=True)
    arguments = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    summary = {"sets": results, "seconds": seconds, "args": arguments}
    (args.out / "shipped_models.json").write_text(json.dumps(summary, indent=1))
    print_set_table(results, columns)
    print("\nrestore seconds per model:", {k: round(v, 1) for k, v in seconds.items()})


if __name__ == "__main__":
    main()
