"""Training data made on the fly: random crops of clean photos through the degradation library.

The same chains and seeds as `synthesize`, so a model trains on exactly what `synthesize` would
write. Item ``i`` of epoch ``e`` is drawn from ``pair_seed(seed, "e/i")``: reproducible in any
worker, and a resumed run sees the same data as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from restore_cli.degradations.pipeline import MixtureSpec, pair_seed, sample_chain
from restore_cli.io.image import read_image


def load_uint8(path: Path, max_side: int | None) -> torch.Tensor:
    """A clean photo as uint8 [3,H,W], optionally area-downscaled so its long side ≤ max_side.

    Photos are cached as 8 bits (a 4K float32 copy would take 100 MB each); downscaling also
    averages away the sources' own JPEG artefacts and noise.
    """
    rgb = torch.from_numpy(read_image(path).rgb).permute(2, 0, 1)
    if max_side is not None and max(rgb.shape[1:]) > max_side:
        scale = max_side / max(rgb.shape[1:])
        size = (round(rgb.shape[1] * scale), round(rgb.shape[2] * scale))
        rgb = torch.nn.functional.interpolate(rgb[None], size=size, mode="area")[0]
    return (rgb * 255).round().clamp(0, 255).to(torch.uint8)


class DegradedCropDataset(Dataset):
    """``{"lq", "gt"}`` float32 [3,crop,crop] pairs plus their recipe (``types``, ``chain``)."""

    def __init__(
        self,
        paths: Sequence[Path],
        spec: MixtureSpec,
        *,
        crop: int = 256,
        seed: int = 0,
        length: int | None = None,
        max_side: int | None = None,
        augment: bool = True,
    ) -> None:
        if not paths:
            raise ValueError("DegradedCropDataset needs at least one clean photo")
        self.paths = [Path(p) for p in paths]
        self.spec = spec
        self.crop = crop
        self.seed = seed
        self.length = length or len(self.paths)
        self.max_side = max_side
        self.augment = augment
        self.epoch = 0
        self._cache: dict[int, torch.Tensor] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def photo(self, index: int) -> torch.Tensor:
        if index not in self._cache:
            self._cache[index] = load_uint8(self.paths[index], self.max_side)
        return self._cache[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        seed = pair_seed(self.seed, f"{self.epoch}/{index}")
        rng = np.random.default_rng(seed)
        photo = self.photo(index % len(self.paths))
        _, height, width = photo.shape
        side_h, side_w = min(self.crop, height), min(self.crop, width)
        y = int(rng.integers(0, height - side_h + 1))
        x = int(rng.integers(0, width - side_w + 1))
        gt = photo[:, y : y + side_h, x : x + side_w].float() / 255
        if self.augment:  # the 8 dihedral transforms (half-turns only for non-square crops)
            turns = int(rng.integers(4))
            gt = torch.rot90(gt, turns if side_h == side_w else turns & 2, dims=(1, 2))
            if rng.random() < 0.5:
                gt = gt.flip(2)
        chain = sample_chain(self.spec, rng)
        generator = torch.Generator().manual_seed(seed)
        lq = chain.apply(gt[None].contiguous(), generator)[0]
        return {"lq": lq, "gt": gt.contiguous(), "types": chain.types, "chain": chain.to_json()}
