"""Snow: layers of falling flakes over a faint veil, in the manner of Snow100K.

Snow100K composites real flake masks at several sizes; those masks are not downloadable here,
so the flakes are synthesised: soft disks, smeared a little along the fall direction, scattered
over five depth layers (far: small and many; near: large, few and defocused).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from restore_cli.degradations.base import Degradation, Param, rand, register
from restore_cli.degradations.rain import size_scale, stamp

# (radius × flake_size, seed fraction × density, edge softness, opacity), far to near.
_LAYERS = (
    (0.4, 1.0, 0.6, 0.6),
    (0.7, 0.5, 0.6, 0.75),
    (1.0, 0.25, 0.7, 0.85),
    (1.5, 0.1, 0.8, 0.9),
    (2.4, 0.03, 1.0, 0.8),
)
_SNOW_TINT = (0.97, 0.985, 1.0)  # snow lit by an overcast sky is a very slightly cool white


def flake_kernel(radius: float, streak: float, angle: float, softness: float) -> torch.Tensor:
    """One flake, a soft disk swept along a short segment (a capsule): ``[k,k]``, peak ≤ 1.

    The value depends on the distance ``d`` to a segment of length ``streak`` at ``angle``
    (degrees from vertical): ``smoothstep((1 − d/r)/softness)``, flat in the middle and fading at
    the rim (softness 1 ≈ a defocused flake). A flake smaller than ~¾ px is drawn at ¾ px and
    dimmed by its area, and a streaked one is dimmed by its length, as it spends the exposure
    spread over more pixels.
    """
    half = math.ceil(max(radius, 0.75) + streak / 2)
    coords = torch.arange(-half, half + 1, dtype=torch.float64)
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    theta = math.radians(angle)
    ux, uy = math.sin(theta), math.cos(theta)
    t = (x * ux + y * uy).clamp(-streak / 2, streak / 2)
    distance = torch.hypot(x - t * ux, y - t * uy)
    drawn = max(radius, 0.75)
    edge = ((1 - distance / drawn) / softness).clamp(0, 1)
    amplitude = min(1.0, (radius / drawn) ** 2) * 2 * drawn / (2 * drawn + streak)
    return (amplitude * edge * edge * (3 - 2 * edge)).to(torch.float32)


def apply_snow(
    image: torch.Tensor, params: Mapping[str, Any], generator: torch.Generator
) -> torch.Tensor:
    """Veil, then flake layers far to near, each composited ``I·(1 − m) + c·m``.

    ``m`` is a layer's flake mask times its opacity and ``c`` a near-white snow colour: flakes
    occlude the scene rather than add light to it (unlike rain streaks). The veil
    (``I·(1 − v) + c·v``, ``v = min(0.2, 8·density)``) stands for the snow too small and far to
    resolve. ``density`` is the far layer's seed fraction at 512 px, ``flake_size`` the middle
    layer's radius per 512 px; ``streak`` (in flake diameters) is the motion smear along
    ``angle`` (degrees from vertical).
    """
    batch, _, height, width = image.shape
    scale = size_scale(image)
    density = float(params["density"])
    size = float(params["flake_size"]) * scale
    streak = float(params["streak"])
    colour = 0.9 + 0.1 * rand((1 + len(_LAYERS),), generator, torch.empty(0))
    tint = image.new_tensor(_SNOW_TINT).view(1, 3, 1, 1)

    veil = min(0.2, 8 * density)
    output = image + veil * (float(colour[0]) * tint - image)

    angle = float(params["angle"])
    kernels, densities = [], []
    for relative_size, relative_density, softness, _ in _LAYERS:
        radius = size * relative_size
        kernels.append(flake_kernel(radius, 2 * radius * streak, angle, softness))
        densities.append(density * relative_density / scale**2)
    stamped = stamp((batch, len(_LAYERS), height, width), densities, kernels, generator, image)
    masks = stamped.clamp_max(1)  # overlapping flakes are just snow
    for index, layer in enumerate(_LAYERS):
        mask = layer[3] * masks[:, index : index + 1]
        output = output + mask * (float(colour[index + 1]) * tint - output)
    return output


SNOW = register(
    Degradation(
        name="snow",
        family="snow",
        task="desnow",
        params=(
            Param("density", (0.001, 0.01), ood=(0.01, 0.02)),
            Param("flake_size", (1.0, 4.0), ood=(4.0, 6.0)),
            Param("angle", (-20.0, 20.0), severity=False),
            Param("streak", (0.0, 0.8), severity=False),
        ),
        apply=apply_snow,
        summary="Falling snow: five layers of soft, slightly streaked flakes over a faint veil",
        source=(
            "Snow100K-style layered flakes (Liu et al. 2018); Snow100K masks are not "
            "downloadable here, so flakes are synthesised"
        ),
    )
)
