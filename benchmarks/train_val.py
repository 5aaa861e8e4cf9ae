"""Score weight files on a training run's own validation set (as `train` builds it).

    python -m benchmarks.train_val runs/diffuir-t \
        runs/diffuir-t/checkpoints/step_0001000.safetensors \
        runs/diffuir-t/checkpoints/step_0001000_ema.safetensors

The run's resolved config.yaml fixes the set (val photos, crop, count, seed); each file is
restored through the engine with its defaults (3 steps for DiffUIR) and scored with the run's
PSNR convention. Used to choose between a run's raw and EMA weights (docs/models.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from restore_cli.engine import Engine, EngineOptions
from restore_cli.metrics import Convention, psnr
from restore_cli.models.loading import load_model
from restore_cli.train import load_config
from restore_cli.train.data import load_val_set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="A run folder (holds config.yaml).")
    parser.add_argument("weights", type=Path, nargs="+")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.run / "config.yaml")
    images = load_val_set(config)
    convention = Convention(config.val.color, config.val.crop_border)
    inputs = [float(psnr(image.lq, image.gt, convention)[0]) for image in images]
    print(f"{len(images)} val images; degraded input: PSNR {np.mean(inputs):.2f} dB")
    for path in args.weights:
        engine = Engine(load_model(str(path)), EngineOptions(device="cpu"))
        scores = [float(psnr(engine.restore_tensor(i.lq)[0], i.gt, convention)[0]) for i in images]
        print(f"{path}: PSNR {np.mean(scores):.2f} dB", flush=True)


if __name__ == "__main__":
    main()
