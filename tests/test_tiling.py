"""Tiling geometry (property-based) and tiled vs whole-image equivalence."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from restore_cli.tiling import axis_starts, balanced_tile, plan_tiles, run_tiled, tile_window


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


class LocalConvNet(nn.Module):
    """Purely local: receptive-field radius 3 (three 3x3 convs), residual output."""

    def __init__(self, scale: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(8, 3 * scale * scale, 3, padding=1),
        )
        self.shuffle = nn.PixelShuffle(scale)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = nn.functional.interpolate(x, scale_factor=self.scale, mode="nearest")
        return up + self.shuffle(self.body(x))


@given(
    length=st.integers(1, 600),
    tile=st.integers(8, 256),
    overlap=st.integers(0, 60),
    align=st.sampled_from([1, 2, 8, 16]),
)
@settings(max_examples=300, deadline=None)
def test_axis_starts_cover_with_equal_tiles_and_enough_overlap(length, tile, overlap, align):
    length = -(-length // align) * align  # run_tiled pads the image to the alignment first
    tile = max(tile // align * align, align)
    overlap = min(overlap, tile // 2 - 1) if tile >= 2 * align else 0
    size = min(tile, length)
    starts = axis_starts(length, size, overlap, align)
    assert all(start % align == 0 for start in starts)
    assert starts[0] == 0
    assert starts[-1] + size == length
    assert starts == sorted(set(starts))
    for a, b in itertools.pairwise(starts):
        assert a + size - b >= overlap  # neighbours share at least `overlap` pixels


@given(length=st.integers(1, 200), tile=st.integers(4, 64), overlap=st.integers(0, 16))
@settings(max_examples=200, deadline=None)
def test_balanced_tile_needs_no_more_tiles_and_wastes_less(length, tile, overlap):
    length, tile = length * 4, tile * 4  # aligned to 4, as run_tiled guarantees
    overlap = min(overlap * 4, tile // 2 - 1)
    balanced = balanced_tile(length, tile, overlap, align=4)
    assert balanced % 4 == 0 and balanced <= max(tile, 4)
    if tile < length:
        assert len(axis_starts(length, balanced, overlap, 4)) == len(
            axis_starts(length, tile, overlap, 4)
        )


def test_balanced_tile_example():
    assert balanced_tile(1024, 512, 32, align=16) == 368


@given(
    height=st.integers(1, 160),
    width=st.integers(1, 160),
    tile=st.integers(8, 96),
    overlap=st.integers(0, 24),
    scale=st.sampled_from([1, 2]),
)
@settings(max_examples=150, deadline=None)
def test_blend_weights_cover_every_pixel_and_normalise_to_one(height, width, tile, overlap, scale):
    overlap = min(overlap, tile // 2 - 1)
    total = torch.zeros(height * scale, width * scale, dtype=torch.float64)
    tiles = plan_tiles(height, width, tile, max(overlap, 0))
    windows = []
    for t in tiles:
        window = tile_window(t, height, width, max(overlap, 0), scale)
        assert window.shape == ((t.y1 - t.y0) * scale, (t.x1 - t.x0) * scale)
        assert (window >= 0).all() and (window <= 1).all()
        total[t.y0 * scale : t.y1 * scale, t.x0 * scale : t.x1 * scale] += window
        windows.append(window)
    assert (total > 0.05).all(), "some pixel gets (almost) no weight"
    normalised = torch.zeros_like(total)
    for t, window in zip(tiles, windows, strict=True):
        rows = slice(t.y0 * scale, t.y1 * scale)
        cols = slice(t.x0 * scale, t.x1 * scale)
        normalised[rows, cols] += window / total[rows, cols]
    assert torch.allclose(normalised, torch.ones_like(normalised))


@pytest.mark.parametrize("scale", [1, 2])
@pytest.mark.parametrize(
    ("height", "width", "tile", "overlap", "multiple"),
    [(200, 300, 64, 16, 1), (131, 97, 48, 16, 8), (64, 400, 64, 24, 16), (257, 65, 96, 32, 4)],
)
def test_local_model_tiled_equals_whole_image(height, width, tile, overlap, multiple, scale):
    torch.manual_seed(0)
    net = LocalConvNet(scale).eval()
    image = torch.rand(1, 3, height, width)
    with torch.no_grad():
        whole = run_tiled(net, image, tile=0, overlap=0, scale=scale, size_multiple=multiple)
        tiled = run_tiled(
            net,
            image,
            tile=tile,
            overlap=overlap,
            scale=scale,
            size_multiple=multiple,
            batch_size=3,
        )
    assert tiled.shape == whole.shape == (1, 3, height * scale, width * scale)
    assert psnr(tiled, whole) >= 60.0


def test_global_context_model_tiled_is_close():
    """NAFNet's channel attention pools over the whole input, so tiles cannot be exact.

    The attention weights are amplified x30 so the global statistics visibly move the output
    (a tile's interior then differs from the whole-image result by ~6e-4 on average). The
    figure is printed (``pytest -s``) and must reach 45 dB at the default overlap; without
    overlap the seams show (much lower PSNR), which proves the blend is doing the work.
    """
    from spandrel.architectures.NAFNet import NAFNet

    torch.manual_seed(0)
    net = NAFNet(
        img_channel=3, width=16, middle_blk_num=1, enc_blk_nums=[1, 1], dec_blk_nums=[1, 1]
    )
    for name, parameter in net.named_parameters():  # perturb so no branch is identity/zero
        parameter.data += 0.02 * torch.randn_like(parameter)
        if "sca" in name and name.endswith("weight"):
            parameter.data *= 30
    net.eval()
    y, x = torch.meshgrid(torch.linspace(0, 1, 320), torch.linspace(0, 1, 384), indexing="ij")
    smooth = torch.stack(
        [0.5 + 0.3 * torch.sin(6 * x + 3 * y), 0.5 + 0.3 * torch.cos(5 * y), x * y]
    )
    image = (smooth[None] + 0.05 * torch.randn(1, 3, 320, 384)).clamp(0, 1)
    with torch.no_grad():
        whole = run_tiled(net, image, tile=0, overlap=0, size_multiple=4)
        tiled = run_tiled(net, image, tile=128, overlap=32, size_multiple=4, batch_size=4)
        seams = run_tiled(net, image, tile=128, overlap=0, size_multiple=4, batch_size=4)
    figure = psnr(tiled, whole)
    print(
        f"NAFNet (random, SCA x30) tiled vs whole, tile 128 / overlap 32: {figure:.1f} dB "
        f"(overlap 0: {psnr(seams, whole):.1f} dB)"
    )
    assert figure >= 45.0
    assert psnr(seams, whole) < figure - 10


@pytest.mark.parametrize(("height", "width"), [(1, 1), (1, 9), (7, 1), (3, 5)])
def test_tiny_images_pad_without_error(height, width):
    net = LocalConvNet().eval()
    image = torch.rand(1, 3, height, width)
    with torch.no_grad():
        out = run_tiled(net, image, tile=64, overlap=16, size_multiple=16)
    assert out.shape == image.shape


@pytest.mark.parametrize("square", [False, True])
def test_min_size_and_square_requirements_are_met_by_padding(square):
    seen = []

    def forward(x):
        seen.append(tuple(x.shape[-2:]))
        return x

    image = torch.rand(1, 3, 70, 150)
    out = run_tiled(forward, image, tile=64, overlap=8, size_multiple=8, min_size=40, square=square)
    assert torch.allclose(out, image, atol=1e-6)
    assert all(h >= 40 and w >= 40 and h % 8 == 0 and w % 8 == 0 for h, w in seen)
    assert all(h == w for h, w in seen) or not square
