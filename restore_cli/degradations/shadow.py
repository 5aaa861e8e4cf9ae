"""Cast shadows: soft-edged regions where direct sunlight is blocked.

Inside a shadow only skylight remains, so the image is multiplied by an attenuation below 1
that removes more red than blue (the sky that still lights the region is blue). The shadow's
outline is a random polygon (buildings, poles, people) or a smooth blob (foliage, clouds),
and its edge is blurred by ``softness`` (the penumbra of the sun's finite disk).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from restore_cli.degradations.base import Choice, Degradation, Param, rand, randn, register

_REFERENCE_SIDE = 512
_MAX_POLYGONS = 8
_MAX_VERTICES = 7
_DRAWS_PER_POLYGON = 6 + 2 * _MAX_VERTICES


def _polygon_mask(height: int, width: int, coverage: float, draws: np.ndarray) -> np.ndarray:
    """Random convex, often elongated polygons filled until about ``coverage`` is covered.

    Convex and stretched (up to 3:1, any orientation) like the shadows of poles, walls, people
    and roofs. ``draws`` holds uniforms ``[_MAX_POLYGONS, _DRAWS_PER_POLYGON]``: centre, vertex
    count, elongation, rotation, number of shares (first row only), then an angle step and a
    radius jitter per vertex. Each polygon aims at one share of the target area (1–3 shares):
    a few large shapes, not confetti; shapes cut by the border are topped up by the next ones.
    """
    mask = np.zeros((height, width), np.uint8)
    shares = 1 + int(draws[0, 5] * 3)
    target_area = coverage * height * width
    for row in draws:
        if np.count_nonzero(mask) >= 0.9 * target_area:
            break
        vertices = 3 + int(row[2] * (_MAX_VERTICES - 2))
        radius = math.sqrt(2 * target_area / shares / (vertices * math.sin(2 * math.pi / vertices)))
        stretch = math.sqrt(1 + 2 * row[3])
        rotation = math.pi * row[4]
        steps = 0.5 + row[6 : 6 + vertices]  # uneven angular steps between vertices
        angles = 2 * np.pi * np.cumsum(steps) / steps.sum()
        radii = radius * (0.8 + 0.4 * row[6 + _MAX_VERTICES : 6 + _MAX_VERTICES + vertices])
        u, v = radii * np.cos(angles) * stretch, radii * np.sin(angles) / stretch
        x = row[0] * width + u * math.cos(rotation) - v * math.sin(rotation)
        y = row[1] * height + u * math.sin(rotation) + v * math.cos(rotation)
        hull = cv2.convexHull(np.round(np.stack((x, y), axis=1)).astype(np.int32))
        cv2.fillConvexPoly(mask, hull, 1)
    return mask.astype(np.float32)


def _blob_mask(coverage: float, field: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """A smooth random field thresholded at its ``1 − coverage`` quantile: exact coverage."""
    smooth = F.interpolate(field[None], size=size, mode="bicubic", align_corners=False)[0, 0]
    threshold = torch.quantile(smooth.flatten(), 1 - coverage)
    return (smooth > threshold).numpy().astype(np.float32)


def shadow_mask(
    shape: tuple[int, ...], params: Mapping[str, Any], generator: torch.Generator
) -> torch.Tensor:
    """Soft shadow masks ``[B,1,H,W]`` in ``[0,1]`` on the CPU (1 = fully in shadow).

    Drawn at a reduced resolution where the penumbra (``softness`` per 512 px) is at least
    ~2 px wide, blurred there and bilinearly upsampled: the edge is as smooth as asked at any
    image size for the cost of a small canvas. Pixels far from every shape are exactly 0.
    """
    batch, height, width = shape[0], shape[-2], shape[-1]
    sigma = float(params["softness"]) * min(height, width) / _REFERENCE_SIDE
    factor = max(1, int(sigma / 2))
    small = (max(8, math.ceil(height / factor)), max(8, math.ceil(width / factor)))
    coverage = float(params["coverage"])
    cpu = torch.empty(0)
    masks = []
    for _ in range(batch):
        if params["shape"] == "blob":
            mask = _blob_mask(coverage, randn((1, 5, 5), generator, cpu), small)
        else:
            draws = rand((_MAX_POLYGONS, _DRAWS_PER_POLYGON), generator, cpu).numpy()
            mask = _polygon_mask(*small, coverage, draws)
        masks.append(torch.from_numpy(cv2.GaussianBlur(mask, (0, 0), max(sigma / factor, 0.5))))
    soft = torch.stack(masks)[:, None]
    return F.interpolate(soft, size=(height, width), mode="bilinear", align_corners=False)


def apply_shadow(
    image: torch.Tensor, params: Mapping[str, Any], generator: torch.Generator
) -> torch.Tensor:
    """``I · (1 − m·s·w)``: mask ``m``, ``strength`` ``s`` and channel weights ``w``.

    ``w = (1 + blue, 1, 1 − blue)`` dims red most and blue least, the colour shift of a region
    lit only by the sky. Outside the mask the image is returned unchanged.
    """
    mask = shadow_mask(tuple(image.shape), params, generator).to(image.device, image.dtype)
    blue = float(params["blue"])
    weights = image.new_tensor([1 + blue, 1.0, 1 - blue]).view(1, 3, 1, 1)
    return image * (1 - mask * float(params["strength"]) * weights).clamp(0, 1)


SHADOW = register(
    Degradation(
        name="shadow",
        family="shadow",
        task="deshadow",
        params=(
            Param("strength", (0.2, 0.6), ood=(0.6, 0.8)),
            Param("coverage", (0.1, 0.4), severity=False),
            Param("softness", (2.0, 20.0), severity=False),
            Param("blue", (0.0, 0.15), severity=False),
            Choice("shape", ("polygon", "blob"), weights=(0.6, 0.4)),
        ),
        apply=apply_shadow,
        summary="Cast shadow: a soft-edged polygon or blob, darkened with a slight blue cast",
        source="ISTD/SRD-like cast shadows (DA-CLIP's shadow-removal task)",
    )
)
