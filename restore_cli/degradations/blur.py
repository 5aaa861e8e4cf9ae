"""Blur: Gaussian (optics / resampling), defocus (out-of-focus lens) and linear motion (shake).

Each is a convolution with one point-spread function from :mod:`kernels`, the same for the
whole batch; blur itself draws no random numbers (the randomness is in the sampled params).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from restore_cli.degradations.base import Choice, Degradation, Param, register
from restore_cli.degradations.kernels import convolve, disk_kernel, gaussian_kernel, line_kernel

MAX_GAUSSIAN_SIZE = 31


def gaussian_kernel_size(sigma: float, size: int) -> int:
    """The sampled odd ``size``, grown to hold ±3σ (``2·ceil(3σ)+1``), capped at 31."""
    return min(MAX_GAUSSIAN_SIZE, max(int(size), 2 * math.ceil(3 * sigma) + 1))


def gaussian_blur(
    image: torch.Tensor, params: Mapping[str, Any], generator: torch.Generator
) -> torch.Tensor:
    """Convolve with a Gaussian PSF: isotropic (σ, σ) or anisotropic (σ, σ·ratio) at ``angle``.

    Models lens softness and the anti-aliasing of resizing; the rotated anisotropic variant
    covers slight directional blur, as in the Real-ESRGAN / BSRGAN degradation pipelines.
    """
    sigma = float(params["sigma"])
    if params["kind"] == "isotropic":
        sigma_v, angle = sigma, 0.0
    else:
        sigma_v, angle = sigma * float(params["sigma_ratio"]), float(params["angle"])
    size = gaussian_kernel_size(sigma, int(params["size"]))
    return convolve(image, gaussian_kernel(size, sigma, sigma_v, angle))


def defocus_blur(
    image: torch.Tensor, params: Mapping[str, Any], generator: torch.Generator
) -> torch.Tensor:
    """Convolve with an anti-aliased disk of ``radius`` pixels: the PSF of a defocused lens."""
    return convolve(image, disk_kernel(float(params["radius"])))


def motion_blur(
    image: torch.Tensor, params: Mapping[str, Any], generator: torch.Generator
) -> torch.Tensor:
    """Convolve with a straight line of ``length`` pixels at ``angle``: uniform camera motion."""
    return convolve(image, line_kernel(float(params["length"]), float(params["angle"])))


register(
    Degradation(
        name="gaussian_blur",
        family="blur",
        task="deblur",
        params=(
            Choice("kind", ("isotropic", "anisotropic"), (0.5, 0.5)),
            Param("sigma", in_dist=(0.2, 3.0), ood=(3.0, 5.0)),
            Param("sigma_ratio", in_dist=(0.3, 1.0), severity=False),
            Param("angle", in_dist=(0.0, 180.0), severity=False),
            Param("size", in_dist=(7, 21), severity=False, integer=True, odd=True),
        ),
        apply=gaussian_blur,
        summary="isotropic or rotated anisotropic Gaussian PSF (σ in pixels)",
        source=(
            "Real-ESRGAN / BSRGAN second-order pipeline: σ∈[0.2,3], kernel 7–21, iso/aniso 50/50"
        ),
    )
)

register(
    Degradation(
        name="defocus_blur",
        family="blur",
        task="deblur",
        params=(Param("radius", in_dist=(1.0, 4.0), ood=(4.0, 7.0)),),
        apply=defocus_blur,
        summary="out-of-focus blur: anti-aliased disk PSF (radius in pixels)",
        source="disk PSF (Hendrycks & Dietterich 2019 defocus corruption ranges)",
    )
)

register(
    Degradation(
        name="motion_blur",
        family="blur",
        task="deblur",
        params=(
            Param("length", in_dist=(5.0, 25.0), ood=(25.0, 41.0)),
            Param("angle", in_dist=(0.0, 180.0), severity=False),
        ),
        apply=motion_blur,
        summary="linear camera-motion blur: anti-aliased line PSF (length in pixels)",
        source="linear motion PSF; GoPro-like blur extents",
    )
)
