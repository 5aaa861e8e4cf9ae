"""Rebuild the sample folder from fetch-photos' validation photos (run from the repo root).

    ../shared/data/fetch-photos /tmp/photos
    python examples/make_examples.py /tmp/photos [CLEAN_DIR]

With CLEAN_DIR it writes only each example's clean crop, there (PNG, same stem): the ground
truth for ``restore-cli eval``.

Each photo is downscaled (which also removes the source's own JPEG artefacts), centre-cropped
to 512x384 and degraded once with a fixed seed. These are simple stand-ins made with numpy and
Pillow; `restore-cli synthesize` is the full degradation library.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

SIZE = (512, 384)
# output name, source photo (val split), degradation
EXAMPLES = [
    ("noisy-spruce.png", "val/enlightenment-data-Spruce-Needles.png", "noise"),
    ("jpeg-sunset.jpg", "val/enlightenment-data-Sunset-Clouds.png", "jpeg"),
    ("blurry-picos.png", "val/lomiri-wallpapers-16.04-picosdeeuropa.png", "blur"),
    ("dark-appleflower.png", "val/lxqt-themes-appleflower.png", "lowlight"),
]


def load_clean(path: Path) -> Image.Image:
    image = Image.open(path).convert("RGB")
    scale = max(SIZE[0] / image.width, SIZE[1] / image.height)
    size = (round(image.width * scale), round(image.height * scale))
    image = image.resize(size, Image.Resampling.LANCZOS)
    left, top = (size[0] - SIZE[0]) // 2, (size[1] - SIZE[1]) // 2
    return image.crop((left, top, left + SIZE[0], top + SIZE[1]))


def degrade(image: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    if kind == "blur":
        image = image.filter(ImageFilter.GaussianBlur(2.0))
    pixels = np.asarray(image, np.float32) / 255
    if kind == "noise":
        pixels = pixels + rng.normal(0, 25 / 255, pixels.shape)
    if kind == "blur":
        pixels = pixels + rng.normal(0, 5 / 255, pixels.shape)
    if kind == "lowlight":
        linear = pixels**2.2 * 0.12
        linear = rng.poisson(linear * 800) / 800 + rng.normal(0, 0.004, pixels.shape)
        pixels = np.clip(linear, 0, 1) ** (1 / 2.2)
    return Image.fromarray(np.uint8(np.clip(np.rint(pixels * 255), 0, 255)))


def main(photos: Path, clean_dir: Path | None = None) -> None:
    out = Path(__file__).parent
    if clean_dir is not None:
        clean_dir.mkdir(parents=True, exist_ok=True)
    for index, (name, source, kind) in enumerate(EXAMPLES):
        rng = np.random.default_rng(1000 + index)
        clean = load_clean(photos / source)
        if clean_dir is not None:
            target = clean_dir / f"{Path(name).stem}.png"
            clean.save(target)
            print(target)
            continue
        degraded = degrade(clean, kind, rng)
        options = {"quality": 15} if name.endswith(".jpg") else {"optimize": True}
        degraded.save(out / name, **options)
        print(out / name)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None)
