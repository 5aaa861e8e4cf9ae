"""Rain: falling streaks (``rain_streaks``) and drops stuck on the glass (``raindrops``).

Sizes are given at a 512 px short side and scaled with the image, so a 256 px training crop and
a 4K photo carry rain of the same apparent size and density. :func:`size_scale` and
:func:`stamp` (sparse random copies of a kernel) are shared with the snow module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from restore_cli.degradations.base import Degradation, Param, rand, register

REFERENCE_SIDE = 512


def size_scale(image: torch.Tensor) -> float:
    """Pixels per reference pixel: sizes "per 512 px" times this are sizes in this image."""
    return min(image.shape[-2:]) / REFERENCE_SIDE


_REFERENCE_STREAK = 25.0  # px per 512: the streak length at which ``density`` is literal

# Stamps are scattered in chunks of at most this many taps, to bound the index memory.
_TAPS_PER_CHUNK = 1 << 22


def stamp(
    shape: tuple[int, int, int, int],
    densities: Sequence[float],
    kernels: Sequence[torch.Tensor],
    generator: torch.Generator,
    like: torch.Tensor,
) -> torch.Tensor:
    """Copies of ``kernels[c]`` at random places in channel ``c``: ``[B,C,H,W]``, ``≥ 0``.

    ``densities[c]`` is the number of copies per pixel; each copy is scaled by a brightness
    uniform in ``[0.3, 1)``. Centres are drawn over the frame grown by the kernel size, so a
    streak can enter from the border instead of every one starting inside. Overlaps add
    (callers choose how they saturate). Only the kernel's non-negligible taps are scattered:
    a few thousand sparse stamps cost far less than a dense convolution of the whole frame.
    """
    batch, _, height, width = shape
    output = like.new_zeros(shape)
    for channel, (density, kernel) in enumerate(zip(densities, kernels, strict=True)):
        kh, kw = kernel.shape
        canvas_h, canvas_w = height + 2 * (kh - 1), width + 2 * (kw - 1)
        count = round(density * (height + kh - 1) * (width + kw - 1))
        draws = rand((batch, count, 3), generator, like)
        if count == 0:
            continue
        # Top-left corners in [-(k-1), H-1] on the frame, i.e. [0, H+k-2] on the canvas.
        top = (draws[..., 0] * (height + kh - 1)).long().clamp_max(height + kh - 2)
        left = (draws[..., 1] * (width + kw - 1)).long().clamp_max(width + kw - 2)
        brightness = 0.3 + 0.7 * draws[..., 2]
        taps = kernel > 1e-3 * kernel.max()
        tap_y, tap_x = (t.to(like.device) for t in torch.nonzero(taps, as_tuple=True))
        tap_value = kernel[taps].to(like.device, like.dtype)
        base = torch.arange(batch, device=like.device).view(-1, 1) * canvas_h * canvas_w
        base = (base + top * canvas_w + left).flatten()
        brightness = brightness.flatten()
        offsets = tap_y * canvas_w + tap_x
        canvas = like.new_zeros(batch * canvas_h * canvas_w)
        step = max(1, _TAPS_PER_CHUNK // len(offsets))
        for start in range(0, len(base), step):
            index = base[start : start + step, None] + offsets
            values = brightness[start : start + step, None] * tap_value
            canvas.index_add_(0, index.flatten(), values.flatten())
        canvas = canvas.view(batch, canvas_h, canvas_w)
        output[:, channel] = canvas[:, kh - 1 : kh - 1 + height, kw - 1 : kw - 1 + width]
    return output


def line_kernel(length: float, angle: float, width: float) -> torch.Tensor:
    """A rain streak: ``[k,k]`` float32, centred, peak 1 for a 1 px wide streak.

    ``angle`` is in degrees from vertical, positive = the streak falls to the right. Across the
    line the profile is Gaussian (σ = width/2, at least half a pixel so thin lines at an angle do
    not break into dots). The peak is ``1/width`` (a wider, out-of-focus drop spreads the same
    light thinner) and ``width`` when below a pixel. Along the line a parabolic taper fades both
    ends, like a drop blurred by the exposure time.
    """
    half = math.ceil(length / 2 + 2 * max(width, 1.0))
    coords = torch.arange(-half, half + 1, dtype=torch.float64)
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    theta = math.radians(angle)
    along = x * math.sin(theta) + y * math.cos(theta)
    across = x * math.cos(theta) - y * math.sin(theta)
    sigma = max(width / 2, 0.5)
    taper = (1 - (2 * along / max(length, 1.0)) ** 2).clamp_min(0)
    peak = min(1.0, width) / max(1.0, width)
    kernel = peak * taper * torch.exp(-0.5 * (across / sigma) ** 2)
    return kernel.to(torch.float32)


def apply_rain_streaks(
    image: torch.Tensor, params: Mapping[str, Any], generator: torch.Generator
) -> torch.Tensor:
    """Streak layer ``R`` screen-blended onto the image: ``1 − (1 − I)(1 − R)``.

    ``R`` is the Rain100L/Rain1400 recipe: sparse noise seeds smeared by a line (motion) kernel
    (computed by :func:`stamp`ing the kernel at each seed, the same sum done sparsely),
    saturating softly where streaks cross (``1 − exp(−2·sum)``) and scaled by ``brightness``;
    thick streaks are dimmer (out-of-focus drops spread their light). Screen blending only
    brightens, as a lit drop in front of the scene adds light.

    ``density`` is the seed fraction at 512 px for streaks of the reference length (25 px):
    longer streaks are proportionally fewer, so the light added (``∝ count × length``), hence
    how heavy the rain looks, is set by ``density`` and not by the nuisance ``length``. It is
    also divided by the area scale, because each streak grows with the image.
    """
    scale = size_scale(image)
    kernel = line_kernel(
        float(params["length"]) * scale, float(params["angle"]), float(params["width"]) * scale
    )
    batch, _, height, width = image.shape
    length_factor = _REFERENCE_STREAK / max(float(params["length"]), 1.0)
    density = float(params["density"]) * length_factor / scale**2
    streaks = stamp((batch, 1, height, width), [density], [kernel], generator, image)
    layer = float(params["brightness"]) * (1 - torch.exp(-2 * streaks))
    return 1 - (1 - image) * (1 - layer)


def _smoothstep(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(0, 1)
    return x * x * (3 - 2 * x)


def _defocus(image: torch.Tensor, factor: int) -> torch.Tensor:
    """Cheap wide blur: area-downsample by ``factor``, bilinear back up (drops are out of focus)."""
    if factor <= 1:
        return image
    height, width = image.shape[-2:]
    small = F.interpolate(
        image, size=(max(1, height // factor), max(1, width // factor)), mode="area"
    )
    return F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)


# Drops are rasterised in chunks of at most this many box pixels, to bound the memory.
_DROP_PIXELS_PER_CHUNK = 1 << 21
_DROP_ASPECT = (0.85, 1.35)  # height / width: drops on glass sag a little
_DROP_SIZE = (0.7, 1.3)  # per-drop radius around the mean


def _drop_maps(
    draws: torch.Tensor, height: int, width: int, mean_radius: float
) -> tuple[torch.Tensor, ...]:
    """Rasterise all drops at once into per-pixel maps, each ``[B,1,H,W]``.

    ``draws`` is ``[B,N,6]`` uniforms: centre x, centre y, size, aspect, lens strength, rim
    darkness. Every drop is evaluated on a square box around its centre, big enough for the
    largest drop's halo, and the boxes are scattered into the frame. Overlapping drops merge:
    their refraction, shading and glint are averaged, weighted by coverage. Returns coverage
    ``alpha`` (clamped sum), refraction source ``x`` and ``y`` in pixels, ``shade``, ``glint``
    and the ``halo`` (1 under a drop, fading to 0 at 1.5 radii).
    """
    batch, count = draws.shape[:2]
    like = draws
    cx, cy = draws[..., 0] * width, draws[..., 1] * height
    radius = mean_radius * (_DROP_SIZE[0] + (_DROP_SIZE[1] - _DROP_SIZE[0]) * draws[..., 2])
    aspect = _DROP_ASPECT[0] + (_DROP_ASPECT[1] - _DROP_ASPECT[0]) * draws[..., 3]
    rx, ry = radius / aspect.sqrt(), radius * aspect.sqrt()
    lens_strength = 0.35 + 0.35 * draws[..., 4]
    rim_darkness = 0.15 + 0.25 * draws[..., 5]
    reach = math.ceil(1.5 * mean_radius * _DROP_SIZE[1] * math.sqrt(_DROP_ASPECT[1])) + 1
    offsets = torch.arange(-reach, reach + 1, device=like.device, dtype=like.dtype)
    box = len(offsets)

    sums = like.new_zeros((5, batch * height * width))  # Σa, Σa·x, Σa·y, Σa·shade, Σa·glint
    halo = like.new_zeros(batch * height * width)
    frame = torch.arange(batch, device=like.device).view(-1, 1, 1, 1) * height * width
    step = max(1, _DROP_PIXELS_PER_CHUNK // (batch * box * box))
    for start in range(0, count, step):
        # [B,n,1,1] per drop, broadcast over its box.
        x0, y0, rx0, ry0, strength, darkness = (
            t[:, start : start + step, None, None]
            for t in (cx, cy, rx, ry, lens_strength, rim_darkness)
        )
        px = x0.floor() + offsets.view(1, 1, 1, -1)
        py = y0.floor() + offsets.view(1, 1, -1, 1)
        dx, dy = (px - x0) / rx0, (py - y0) / ry0
        rho = torch.sqrt(dx * dx + dy * dy)
        lens = strength * (1 + 0.3 * rho * rho)  # slight barrel bulge
        # Exponents capped at 60: beyond, exp() lands in float32 denormals, which x86 runs ~10x
        # slower, for values far too small to matter.
        ring = (((rho - 0.85) / 0.12) ** 2).clamp_max(60)
        spot = (((dx + 0.35) ** 2 + (dy + 0.4) ** 2) / 0.03).clamp_max(60)
        visible = (px >= 0) & (px < width) & (py >= 0) & (py < height)
        a = _smoothstep((1 - rho) / 0.2) * visible
        layers = (
            a,
            a * (x0 + lens * (px - x0)),
            a * (y0 - lens * (py - y0)),  # minus: the lens turns it upside down
            a * (1 - darkness * torch.exp(-ring)),
            a * 0.5 * torch.exp(-spot),
        )
        index = frame + py.clamp(0, height - 1).long() * width + px.clamp(0, width - 1).long()
        index = index.expand(-1, -1, box, box).flatten()
        for total, layer in zip(sums, layers, strict=True):
            total.index_add_(0, index, layer.flatten())
        ring_halo = _smoothstep((1.5 - rho) / 0.5) * visible
        halo.scatter_reduce_(0, index, ring_halo.flatten(), reduce="amax")

    shape = (batch, 1, height, width)
    coverage, total_x, total_y, total_shade, total_glint = (t.view(shape) for t in sums)
    weight = coverage.clamp_min(1e-6)
    ys = torch.arange(height, device=like.device, dtype=like.dtype).view(1, 1, -1, 1)
    xs = torch.arange(width, device=like.device, dtype=like.dtype).view(1, 1, 1, -1)
    alpha = coverage.clamp_max(1)
    source_x = xs + alpha * (total_x / weight - xs)
    source_y = ys + alpha * (total_y / weight - ys)
    return alpha, source_x, source_y, total_shade / weight, total_glint / weight, halo.view(shape)


def apply_raindrops(
    image: torch.Tensor, params: Mapping[str, Any], generator: torch.Generator
) -> torch.Tensor:
    """Drops on the lens or window, each a small thick lens in front of a defocused scene.

    Inside a drop (ellipse, slightly taller than wide, soft edge) the pixel shows the blurred
    scene at ``c + k·(p − c)`` with the vertical offset negated: a convex water lens inverts
    and, for ``k < 1``, magnifies what lies behind it. The rim is darker (light is refracted away
    at grazing angles) and a small glint sits near the top left. A ring around each drop is
    blended toward the blurred scene (the water film and the defocus of the drop). Pixels away
    from drops are returned unchanged. ``count`` is per 512² px (scaled by the aspect ratio),
    ``radius`` per 512 px.
    """
    batch, _, height, width = image.shape
    mean_radius = float(params["radius"]) * size_scale(image)
    count = max(1, round(int(params["count"]) * height * width / min(height, width) ** 2))
    draws = rand((batch, count, 6), generator, image)
    alpha, source_x, source_y, shade, glint, halo = _drop_maps(draws, height, width, mean_radius)
    blurred = _defocus(image, max(1, round(0.35 * mean_radius)))
    grid = torch.cat(
        ((source_x + 0.5) / width * 2 - 1, (source_y + 0.5) / height * 2 - 1), dim=1
    ).permute(0, 2, 3, 1)
    refracted = F.grid_sample(
        blurred, grid, mode="bilinear", padding_mode="reflection", align_corners=False
    )
    around = image + 0.6 * halo * (blurred - image)
    return around + alpha * (refracted * shade + glint - around)


RAIN_STREAKS = register(
    Degradation(
        name="rain_streaks",
        family="rain",
        task="derain",
        params=(
            Param("density", (0.002, 0.02), ood=(0.02, 0.04)),
            Param("length", (10.0, 40.0), severity=False),
            Param("angle", (-30.0, 30.0), severity=False),
            Param("width", (1, 3), severity=False, integer=True),
            Param("brightness", (0.4, 0.8), ood=(0.8, 0.95)),
        ),
        apply=apply_rain_streaks,
        summary="Rain streaks: sparse seeds smeared by a line kernel, screen-blended",
        source=(
            "streak model of Rain100L/Rain1400 style synthesis (noise → motion blur), "
            "UniRestorer suppl. (numbers lost in text); ranges chosen so light ≈ Rain100L, "
            "heavy ≈ Rain100H"
        ),
    )
)

RAINDROPS = register(
    Degradation(
        name="raindrops",
        family="raindrop",
        task="deraindrop",
        params=(
            Param("count", (5, 60), ood=(60, 120), integer=True),
            Param("radius", (4.0, 18.0), ood=(18.0, 28.0)),
        ),
        apply=apply_raindrops,
        summary="Raindrops on the glass: refracting, inverted, defocused lenses with dark rims",
        source="Raindrop dataset (Qian et al. 2018) appearance: refraction + defocused drops",
    )
)
