"""Training and validation data, with an order that is a pure function of (seed, step).

Training pairs come either from clean photos degraded on the fly
(:class:`~restore_cli.degradations.dataset.DegradedCropDataset`, the same chains as
`synthesize`) or from a `synthesize` output folder (random crops of its lq/gt pairs).

Exact resume needs the data of step ``s`` to depend on nothing but the seed and ``s``: the
:class:`StepBatchSampler` maps a step to (epoch, position in a seeded per-epoch permutation)
and yields ``(epoch, index)`` keys, and each item is drawn from ``pair_seed(seed, "epoch/index")``.
So a resumed run starts mid-epoch at the right batch without replaying the earlier ones, any
number of loader workers gives the same batches, and the workers can stay alive across epochs
(they keep their decoded photos cached).

Under DistributedDataParallel every rank walks the same global batch sequence and takes its own
slice of each global batch, so the global batch at step ``s`` does not depend on the rank.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from restore_cli.degradations.dataset import DegradedCropDataset
from restore_cli.degradations.pipeline import pair_seed
from restore_cli.errors import ConfigError
from restore_cli.io.discover import walk_images
from restore_cli.io.image import read_image
from restore_cli.synthesize import oriented_size
from restore_cli.train.config import TrainConfig

METADATA_NAME = "metadata.csv"


@dataclass(frozen=True)
class PairFiles:
    lq: Path
    gt: Path
    name: str  # path relative to the folder's lq/, for logs
    types: str = ""  # degradation families from metadata.csv, when known


@dataclass(frozen=True)
class ValImage:
    """One validation pair, whole image, [1,3,H,W] float32 in [0, 1]."""

    name: str
    types: str
    lq: torch.Tensor
    gt: torch.Tensor


# ----------------------------------------------------------------------------- file lists


def list_photos(folders: Sequence[str], key: str) -> list[Path]:
    """Every image under the folders (recursive, sorted); a missing or empty one is an error."""
    photos: list[Path] = []
    for folder in folders:
        root = Path(folder).expanduser()
        if not root.is_dir():
            raise ConfigError(f"config key {key!r}: folder not found: {root}")
        found = list(walk_images(root, recursive=True, exclude=None))
        if not found:
            raise ConfigError(f"config key {key!r}: no images in {root}")
        photos.extend(found)
    return photos


def list_pairs(folder: str, key: str) -> list[PairFiles]:
    """The pairs of a `synthesize` folder: from metadata.csv, else lq/X matched with gt/X."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ConfigError(f"config key {key!r}: folder not found: {root}")
    metadata = root / METADATA_NAME
    if metadata.is_file():
        with metadata.open(newline="", encoding="utf-8") as handle:
            pairs = [
                PairFiles(root / row["lq"], root / row["gt"], row["lq"], row.get("types") or "")
                for row in csv.DictReader(handle)
            ]
    else:
        lq_root = root / "lq"
        found = list(walk_images(lq_root, recursive=True, exclude=None)) if lq_root.is_dir() else []
        relatives = [path.relative_to(lq_root) for path in found]
        pairs = [
            PairFiles(lq_root / relative, root / "gt" / relative, relative.as_posix())
            for relative in relatives
        ]
    if not pairs:
        raise ConfigError(f"config key {key!r}: no pairs in {root} (expected lq/ and gt/)")
    for pair in pairs:
        for path in (pair.lq, pair.gt):
            if not path.is_file():
                raise ConfigError(f"config key {key!r}: missing file {path}")
    return pairs


def check_crop_fits(paths: Sequence[Path], crop: int, max_side: int | None, key: str) -> None:
    """Every training image must hold a full crop, or batches would not stack."""
    for path in paths:
        width, height = oriented_size(path)
        if max_side is not None and max(width, height) > max_side:
            scale = max_side / max(width, height)
            width, height = round(width * scale), round(height * scale)
        if min(width, height) < crop:
            raise ConfigError(
                f"config key {key!r}: {path} is {width}x{height}"
                f"{' after max_side' if max_side else ''}, smaller than crop {crop}"
            )


# ----------------------------------------------------------------------------- datasets


def dihedral(images: Sequence[torch.Tensor], rng: np.random.Generator) -> list[torch.Tensor]:
    """The same random one of the 8 flips/rotations for every image (half-turns if not square)."""
    turns = int(rng.integers(4))
    flip = rng.random() < 0.5
    square = images[0].shape[-1] == images[0].shape[-2]
    out = []
    for image in images:
        image = torch.rot90(image, turns if square else turns & 2, dims=(-2, -1))
        out.append((image.flip(-1) if flip else image).contiguous())
    return out


class PairedCropDataset(Dataset):
    """Random aligned crops of `synthesize` pairs; item ``i`` of epoch ``e`` is seeded like
    DegradedCropDataset's (``pair_seed(seed, "e/i")``), pair ``i mod n``."""

    def __init__(
        self,
        pairs: Sequence[PairFiles],
        *,
        crop: int,
        seed: int,
        length: int | None = None,
        augment: bool = True,
    ) -> None:
        self.pairs = list(pairs)
        self.crop = crop
        self.seed = seed
        self.length = length or len(self.pairs)
        self.augment = augment
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        pair = self.pairs[index % len(self.pairs)]
        rng = np.random.default_rng(pair_seed(self.seed, f"{self.epoch}/{index}"))
        lq, gt = read_tensor(pair.lq), read_tensor(pair.gt)
        if lq.shape != gt.shape:
            raise ConfigError(f"{pair.lq}: size {tuple(lq.shape)} differs from its gt")
        _, height, width = gt.shape
        side_h, side_w = min(self.crop, height), min(self.crop, width)
        y = int(rng.integers(0, height - side_h + 1))
        x = int(rng.integers(0, width - side_w + 1))
        lq, gt = (image[:, y : y + side_h, x : x + side_w] for image in (lq, gt))
        if self.augment:
            lq, gt = dihedral((lq, gt), rng)
        return {"lq": lq.contiguous(), "gt": gt.contiguous(), "types": pair.types}


def read_tensor(path: Path) -> torch.Tensor:
    return torch.from_numpy(read_image(path).rgb).permute(2, 0, 1)


class EpochIndexedDataset(Dataset):
    """Items addressed by ``(epoch, index)``: the epoch travels with the key, so persistent
    loader workers need no notification when an epoch starts."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        self.dataset.set_epoch(epoch)
        return self.dataset[index]


class StepBatchSampler(Sampler):
    """Endless batches of ``(epoch, index)`` keys for one rank, starting at ``start_step``.

    Epoch ``e`` is a permutation of the dataset seeded by ``(seed, e)``; global batch ``s`` of
    an epoch is its slice ``[s·B·W, (s+1)·B·W)`` and rank ``r`` takes ``B`` keys of it. The last
    incomplete global batch of an epoch is dropped, so every step has the same batch size.
    """

    def __init__(
        self, length: int, batch: int, *, seed: int, rank: int = 0, world: int = 1, start_step=0
    ) -> None:
        self.length = length
        self.batch = batch
        self.seed = seed
        self.rank = rank
        self.world = world
        self.start_step = start_step
        self.steps_per_epoch = length // (batch * world)
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"an epoch of {length} items is smaller than one global batch ({batch} x {world})"
            )

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of the step that follows ``step`` completed ones."""
        return divmod(step, self.steps_per_epoch)

    def permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(pair_seed(self.seed, f"order/{epoch}"))
        return torch.randperm(self.length, generator=generator).tolist()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, first = self.position(self.start_step)
        while True:
            order = self.permutation(epoch)
            for step in range(first, self.steps_per_epoch):
                start = (step * self.world + self.rank) * self.batch
                yield [(epoch, index) for index in order[start : start + self.batch]]
            epoch, first = epoch + 1, 0


def build_train_dataset(config: TrainConfig, world: int = 1) -> Dataset:
    """The training dataset with ``set_epoch``; its length is one epoch."""
    data = config.data
    minimum = config.batch * world
    if data.pairs is not None:
        pairs = list_pairs(data.pairs, "data.pairs")
        check_crop_fits([p.gt for p in pairs], config.crop, None, "data.pairs")
        length = max(data.epoch_length or len(pairs), minimum)
        return PairedCropDataset(pairs, crop=config.crop, seed=config.seed, length=length)
    photos = list_photos(data.clean, "data.clean")
    check_crop_fits(photos, config.crop, data.max_side, "data.clean")
    return DegradedCropDataset(
        photos,
        data.degradations.mixture(),
        crop=config.crop,
        seed=config.seed,
        length=max(data.epoch_length or len(photos), minimum),
        max_side=data.max_side,
        augment=True,
    )


def _init_worker(_: int) -> None:
    torch.set_num_threads(1)  # the workers' parallelism is the number of workers


def build_train_loader(
    dataset: Dataset,
    config: TrainConfig,
    *,
    start_step: int,
    rank: int = 0,
    world: int = 1,
    pin_memory: bool = False,
) -> DataLoader:
    sampler = StepBatchSampler(
        len(dataset), config.batch, seed=config.seed, rank=rank, world=world, start_step=start_step
    )
    workers = config.workers
    return DataLoader(
        EpochIndexedDataset(dataset),
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=_init_worker if workers > 0 else None,
        # The loader draws worker seeds from this generator, not from the global one.
        generator=torch.Generator().manual_seed(config.seed),
    )


# ----------------------------------------------------------------------------- validation


def load_val_set(config: TrainConfig) -> list[ValImage]:
    """Whole `synthesize` pairs (``val_pairs``), or ``val_count`` fixed-seed degraded crops of
    the ``val_clean`` photos (the same every run and every validation), or nothing."""
    data = config.data
    if data.val_pairs is not None:
        return [
            ValImage(pair.name, pair.types, read_tensor(pair.lq)[None], read_tensor(pair.gt)[None])
            for pair in list_pairs(data.val_pairs, "data.val_pairs")
        ]
    if not data.val_clean:
        return []
    photos = list_photos(data.val_clean, "data.val_clean")
    dataset = DegradedCropDataset(
        photos,
        data.degradations.mixture(),
        crop=data.val_crop,
        seed=data.val_seed,
        length=data.val_count,
        max_side=data.max_side,
        augment=False,
    )
    images = []
    for index in range(data.val_count):
        item = dataset[index]
        name = f"{photos[index % len(photos)].stem}#{index}"
        images.append(ValImage(name, item["types"], item["lq"][None], item["gt"][None]))
    return images
