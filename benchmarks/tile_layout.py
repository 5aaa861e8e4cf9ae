"""How much a model's output depends on the tile layout (tile size, whole image, --compile).

    python -m benchmarks.tile_layout PHOTO [--model unirestorer] [--crop 1024x768]

Restores one centre crop of PHOTO with the default 512 px tiles, then with other layouts, and
prints the mean and max absolute difference to the default in 8-bit levels. A purely local
network gives zeros; the NAFNet family pools its channel attention over each tile, so its
output moves with the layout. Used for the --compile note in the README.
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image

from restore_cli.engine import Engine, EngineOptions
from restore_cli.models.loading import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photo")
    parser.add_argument("--model", default="unirestorer")
    parser.add_argument("--crop", default="1024x768")
    args = parser.parse_args()
    width, height = (int(v) for v in args.crop.split("x"))
    with Image.open(args.photo) as opened:
        photo = np.asarray(opened.convert("RGB"))
    top, left = (photo.shape[0] - height) // 2, (photo.shape[1] - width) // 2
    image = photo[top : top + height, left : left + width].astype(np.float32) / 255
    model = load_model(args.model)

    def restore(**options) -> np.ndarray:
        return Engine(model, EngineOptions(device="cpu", **options)).restore(image)[0]

    default = restore(tile=512)
    layouts = {"tile 640": {"tile": 640}, "whole image": {"tile": 0},
               "--compile (tile 512, unbalanced)": {"tile": 512, "compile": True}}  # fmt: skip
    for name, options in layouts.items():
        difference = np.abs(restore(**options) - default) * 255
        mean, peak = difference.mean(), difference.max()
        print(f"{name}: mean {mean:.2f}, max {peak:.1f} levels", flush=True)


if __name__ == "__main__":
    main()
