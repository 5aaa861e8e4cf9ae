"""Haze: the atmospheric scattering model with a depth proxy computed from the image itself.

Light from the scene is attenuated on its way to the camera and replaced by scattered
airlight, ``I = J·t + A·(1 − t)`` with transmission ``t = exp(−β·d)`` (Koschmieder's law, the
model behind RESIDE). ``β`` is the scattering coefficient (how thick the haze is), ``A`` the
airlight colour and ``d`` the scene depth. No depth network ships with the CLI, so ``d`` comes
from :func:`haze_depth_proxy`, a cheap guess that is right in the common case (sky and far
things at the top and bright/grey, ground near and at the bottom).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from restore_cli.degradations.base import Degradation, Param, randn, register

# Depth proxy resolution: coarse depth is all the model needs (haze varies slowly), and working
# on ~64 px makes the heavy blur cheap and identical in look for a crop and a 4K photo.
_PROXY_SHORT_SIDE = 64
_RAMP_WEIGHT = 0.6  # vertical ramp vs. image term in the depth proxy
_NEAREST_DEPTH = 0.1  # even the nearest pixel sits behind a little haze


def _box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over a ``(2r+1)²`` window, edges replicated; cumulative sums make it O(1) in r."""
    size = 2 * radius + 1
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    for dim in (-1, -2):
        total = F.pad(torch.cumsum(x, dim), (1, 0) if dim == -1 else (0, 0, 1, 0))
        length = total.shape[dim] - size
        x = (total.narrow(dim, size, length) - total.narrow(dim, 0, length)) / size
    return x


def _guided_filter(
    guide: torch.Tensor, source: torch.Tensor, radius: int, eps: float
) -> torch.Tensor:
    """He et al.'s guided filter: smooths ``source`` but lets its edges follow ``guide``'s.

    Locally ``q = a·guide + b`` (a linear model fitted per window), so depth edges snap to the
    image's object edges instead of haloing across them.
    """
    mean_g = _box_mean(guide, radius)
    mean_s = _box_mean(source, radius)
    cov = _box_mean(guide * source, radius) - mean_g * mean_s
    var = _box_mean(guide * guide, radius) - mean_g * mean_g
    a = cov / (var + eps)
    b = mean_s - a * mean_g
    return _box_mean(a, radius) * guide + _box_mean(b, radius)


def haze_depth_proxy(
    image: torch.Tensor, horizon: float, generator: torch.Generator
) -> torch.Tensor:
    """A relative depth map ``[B,1,H,W]`` in ``[0,1]`` (1 = far) guessed from ``image`` alone.

    A proxy, not a measurement: ``0.6·ramp + 0.4·brightness`` plus a faint random low-frequency
    field (haze is never perfectly homogeneous). The ramp says "higher in the frame is farther"
    and saturates at 1 above the row ``horizon`` (fraction of the height from the top). The
    image term is a heavily blurred mix of luminance and the darkest channel: bright, grey
    regions (sky, distant haze) are far, dark or saturated ones (foliage, shadows) are near.
    The blend is computed at ~64 px, upsampled and refined with a guided filter.
    """
    batch, _, height, width = image.shape
    scale = _PROXY_SHORT_SIDE / min(height, width)
    size = (max(4, round(height * scale)), max(4, round(width * scale)))
    small = F.interpolate(image, size=size, mode="area")

    weights = image.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    brightness = 0.5 * (small * weights).sum(1, keepdim=True) + 0.5 * small.amin(1, keepdim=True)
    # Imported here: torchvision costs ~2 s of start-up to every command that lists the
    # degradation families (restore with a routed model) without synthesizing anything.
    from torchvision.transforms.v2.functional import gaussian_blur

    brightness = gaussian_blur(brightness, [13, 13], [3.0, 3.0])
    low = brightness.amin((2, 3), keepdim=True)
    high = brightness.amax((2, 3), keepdim=True)
    brightness = (brightness - low) / (high - low).clamp_min(1e-3)

    rows = (torch.arange(size[0], device=image.device, dtype=image.dtype) + 0.5) / size[0]
    ramp = ((1 - rows) / (1 - horizon)).clamp(0, 1)
    ramp = (ramp * ramp * (3 - 2 * ramp)).view(1, 1, -1, 1)  # smoothstep: no kink at horizon

    wobble = randn((batch, 1, 4, 4), generator, image)
    wobble = F.interpolate(wobble, size=size, mode="bicubic", align_corners=False)
    depth = _RAMP_WEIGHT * ramp + (1 - _RAMP_WEIGHT) * brightness + 0.08 * wobble

    depth = F.interpolate(depth, size=(height, width), mode="bilinear", align_corners=False)
    guide = (image * weights).sum(1, keepdim=True)
    radius = max(2, round(min(height, width) / 64))
    return _guided_filter(guide, depth, radius, eps=1e-2).clamp(0, 1)


def apply_haze(
    image: torch.Tensor, params: Mapping[str, Any], generator: torch.Generator
) -> torch.Tensor:
    """``I = J·t + A·(1 − t)``, ``t = exp(−β·d)``, with ``d`` from :func:`haze_depth_proxy`.

    ``d`` is mapped to ``[0.1, 1]`` so the foreground gets a trace of haze too. The airlight is
    grey with an optional slight blue cast (``tint``), as scattered skylight is bluish.
    """
    depth = haze_depth_proxy(image, float(params["horizon"]), generator)
    depth = _NEAREST_DEPTH + (1 - _NEAREST_DEPTH) * depth
    transmission = torch.exp(-float(params["beta"]) * depth)
    tint = float(params["tint"])
    airlight = float(params["airlight"]) * image.new_tensor([1 - tint, 1 - tint / 2, 1.0])
    return image * transmission + airlight.view(1, 3, 1, 1) * (1 - transmission)


HAZE = register(
    Degradation(
        name="haze",
        family="haze",
        task="dehaze",
        params=(
            Param("beta", (0.5, 2.0), ood=(2.0, 3.0)),
            Param("airlight", (0.7, 1.0), severity=False),
            Param("horizon", (0.3, 0.7), severity=False),
            Param("tint", (0.0, 0.08), severity=False),
        ),
        apply=apply_haze,
        summary="Atmospheric scattering haze, I = J·t + A(1−t), over an image-based depth proxy",
        source=(
            "RESIDE/OTS atmospheric scattering model (β 0.6–1.8 range widened; A 0.7–1.0); "
            "depth from an image-based proxy instead of MegaDepth"
        ),
    )
)
