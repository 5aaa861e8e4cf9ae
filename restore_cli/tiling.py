"""Seamless tiled inference: tile geometry, blend windows and the weighted accumulation.

Pure geometry plus one driver (:func:`run_tiled`) that takes any ``forward`` callable, so it can
be tested without a real model and never touches device state (that lives in ``engine``).

Layout: along each axis, tiles all have the same size (so they batch), the first starts at 0 and
the last ends exactly at the border (edge tiles are shifted inward, never shrunk), and
neighbours overlap by at least ``overlap`` pixels. Each tile's output is weighted by a window
that is 1 in its interior and at image borders, and falls to 0 towards a tile edge that lies
inside the image: the outermost quarter of the overlap gets weight exactly 0 (those pixels lack
context, and a zero weight makes a purely local model's tiled output equal its whole-image
output), the rest of the overlap is a raised-cosine ramp (no visible seam).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Tile:
    """A tile's box in input pixels: rows ``y0:y1``, columns ``x0:x1``."""

    y0: int
    x0: int
    y1: int
    x1: int


def axis_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of equal tiles covering ``[0, length)`` with at least ``overlap`` shared.

    Starts are multiples of ``align`` (the network's total stride): a strided network is only
    shift-equivariant by multiples of its stride, so a tile cut at another offset samples a
    different grid and disagrees with the whole-image result everywhere, not just at its edges.
    Steps are at most ``tile - overlap``: in units of ``align`` the largest step ``m`` fits, and
    ``count - 1 = ceil(span / m)`` floor-divided starts never step further than ``m``.
    """
    if tile >= length:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap {overlap} must be in [0, tile={tile})")
    if (length - tile) % align:
        raise ValueError(f"length - tile ({length} - {tile}) must be a multiple of {align}")
    span = (length - tile) // align
    max_step = max((tile - overlap) // align, 1)
    steps = math.ceil(span / max_step)
    return [(i * span) // steps * align for i in range(steps + 1)]


def balanced_tile(length: int, tile: int, overlap: int, align: int = 1) -> int:
    """The smallest tile (a multiple of ``align``, at most ``tile``) needing as few tiles.

    A 1024 px side with 512 px tiles and 32 px overlap needs 3 tiles either way; at 368 px they
    compute 1.2x the image instead of 2.25x.
    """
    if tile >= length:
        return length
    count = len(axis_starts(length, tile, overlap, align))
    while (
        tile - align > 2 * overlap
        and len(axis_starts(length, tile - align, overlap, align)) == count
    ):
        tile -= align
    return tile


def plan_tiles(
    height: int, width: int, tile: int, overlap: int, align: int = 1, balance: bool = True
) -> list[Tile]:
    """Tiles of at most ``tile`` per side covering the image, row-major.

    Each axis uses :func:`balanced_tile` unless ``balance`` is False (then every tile is exactly
    ``tile`` where the image allows: one shape for a compiled network). With ``align > 1``,
    height, width and tile must be multiples of it (see :func:`run_tiled`).
    """
    if balance:
        tile_h = balanced_tile(height, tile, overlap, align)
        tile_w = balanced_tile(width, tile, overlap, align)
    else:
        tile_h, tile_w = min(tile, height), min(tile, width)
    return [
        Tile(y, x, y + tile_h, x + tile_w)
        for y in axis_starts(height, tile_h, overlap, align)
        for x in axis_starts(width, tile_w, overlap, align)
    ]


def ramp(length: int) -> torch.Tensor:
    """Weights for the ``length`` pixels next to an interior tile edge, edge pixel first.

    The first quarter is exactly 0, then a raised cosine rises to (almost) 1.
    """
    dead = length // 4
    rising = length - dead
    t = (torch.arange(rising, dtype=torch.float64) + 0.5) / rising
    return torch.cat([torch.zeros(dead, dtype=torch.float64), 0.5 - 0.5 * torch.cos(math.pi * t)])


def axis_window(size: int, ramp_start: bool, ramp_end: bool, ramp_length: int) -> torch.Tensor:
    """1-D window of one tile: 1 inside, ramps at the ends that lie inside the image."""
    window = torch.ones(size, dtype=torch.float64)
    length = min(ramp_length, size // 2)
    if length > 0:
        if ramp_start:
            window[:length] = ramp(length)
        if ramp_end:
            window[size - length :] = ramp(length).flip(0)
    return window


def tile_window(tile: Tile, height: int, width: int, overlap: int, scale: int = 1) -> torch.Tensor:
    """2-D blend window of ``tile`` in output pixels (``scale`` times the input box)."""
    rows = axis_window((tile.y1 - tile.y0) * scale, tile.y0 > 0, tile.y1 < height, overlap * scale)
    cols = axis_window((tile.x1 - tile.x0) * scale, tile.x0 > 0, tile.x1 < width, overlap * scale)
    return rows[:, None] * cols[None, :]


def padded_size(height: int, width: int, multiple: int, min_size: int = 0, square: bool = False):
    """Smallest (H, W) >= (height, width) the network accepts."""
    height, width = max(height, min_size), max(width, min_size)
    if square:
        height = width = max(height, width)
    return -(-height // multiple) * multiple, -(-width // multiple) * multiple


def pad_to_multiple(
    x: torch.Tensor, multiple: int, min_size: int = 0, square: bool = False
) -> torch.Tensor:
    """Pad the bottom/right of ``x`` [B,C,H,W] to a size the network accepts.

    Reflect padding continues the image naturally; it needs the pad to be smaller than the
    side, so tiny images (1xN) fall back to replicate.
    """
    height, width = x.shape[-2:]
    target_h, target_w = padded_size(height, width, multiple, min_size, square)
    pad_h, pad_w = target_h - height, target_w - width
    if pad_h == 0 and pad_w == 0:
        return x
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


def forward_padded(
    forward: Forward,
    x: torch.Tensor,
    multiple: int,
    scale: int,
    min_size: int = 0,
    square: bool = False,
) -> torch.Tensor:
    """Run ``forward`` on ``x`` padded to what the network accepts and crop the output back."""
    height, width = x.shape[-2:]
    padded = pad_to_multiple(x, multiple, min_size, square)
    return forward(padded)[..., : height * scale, : width * scale]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def batched(items: list[Tile], size: int) -> Iterator[list[Tile]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def fit_tile(tile: int, overlap: int, size_multiple: int, min_size: int) -> tuple[int, int]:
    """The tile side and overlap :func:`run_tiled` really uses for a requested pair."""
    tile = max(tile // size_multiple * size_multiple, size_multiple, min_size)
    tile = _round_up(tile, size_multiple)  # min_size need not be a multiple
    overlap = max(min(overlap, tile // 2 - 1), 0)
    if tile - overlap < size_multiple:
        # Starts are multiples of the alignment, so a step is at least one multiple: a smaller
        # tile could not keep the overlap, and its blend ramps would meet a seam with no
        # neighbour behind it (weights summing to 0 there). Found by tests/test_fuzz.py.
        tile = _round_up(overlap + size_multiple, size_multiple)
    return tile, overlap


def forward_size(
    height: int,
    width: int,
    *,
    tile: int,
    overlap: int,
    size_multiple: int = 1,
    min_size: int = 0,
    square: bool = False,
    balance: bool = True,
) -> tuple[int, int]:
    """The (h, w) of the network inputs :func:`run_tiled` makes for an image of this size (its
    first tile; same arguments): what a benchmark of the pure forward should time."""
    if tile <= 0 or (height <= tile and width <= tile):
        return padded_size(height, width, size_multiple, min_size, square)
    padded_h, padded_w = padded_size(height, width, size_multiple, min_size)
    tile, overlap = fit_tile(tile, overlap, size_multiple, min_size)
    first = plan_tiles(padded_h, padded_w, tile, overlap, size_multiple, balance)[0]
    return padded_size(first.y1 - first.y0, first.x1 - first.x0, size_multiple, min_size, square)


def run_tiled(
    forward: Forward,
    image: torch.Tensor,
    *,
    tile: int,
    overlap: int,
    scale: int = 1,
    size_multiple: int = 1,
    batch_size: int = 1,
    min_size: int = 0,
    square: bool = False,
    balance: bool = True,
) -> torch.Tensor:
    """Restore ``image`` [1,C,H,W] tile by tile and blend; ``tile=0`` runs the whole image.

    ``forward`` maps [B,C,h,w] to [B,C',h*scale,w*scale]. Accumulation is in float32 on the
    output's device, so a GPU run never round-trips tiles through the host. ``balance`` as in
    :func:`plan_tiles`.
    """
    if image.shape[0] != 1:
        raise ValueError("run_tiled takes one image at a time")
    height, width = image.shape[-2:]
    if tile <= 0 or (height <= tile and width <= tile):
        return forward_padded(forward, image, size_multiple, scale, min_size, square).float()
    # Pad once, before tiling, so border tiles see exactly what a whole-image run sees.
    padded = pad_to_multiple(image, size_multiple, min_size)
    padded_h, padded_w = padded.shape[-2:]
    tile, overlap = fit_tile(tile, overlap, size_multiple, min_size)
    tiles = plan_tiles(padded_h, padded_w, tile, overlap, size_multiple, balance)
    output: torch.Tensor | None = None
    weight_sum: torch.Tensor | None = None
    for group in batched(tiles, batch_size):
        crops = torch.cat([padded[..., t.y0 : t.y1, t.x0 : t.x1] for t in group])
        restored = forward_padded(forward, crops, size_multiple, scale, min_size, square).float()
        if output is None:
            shape = (1, restored.shape[1], padded_h * scale, padded_w * scale)
            output = restored.new_zeros(shape)
            weight_sum = restored.new_zeros((1, 1, *shape[2:]))
        for t, tile_out in zip(group, restored, strict=True):
            window = tile_window(t, padded_h, padded_w, overlap, scale).to(tile_out)
            rows = slice(t.y0 * scale, t.y1 * scale)
            cols = slice(t.x0 * scale, t.x1 * scale)
            output[0, :, rows, cols] += tile_out * window
            weight_sum[0, 0, rows, cols] += window
    assert output is not None and weight_sum is not None
    return (output / weight_sum)[..., : height * scale, : width * scale]
