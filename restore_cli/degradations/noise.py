"""Noise: additive white Gaussian noise (the benchmark model) and Poisson–Gaussian sensor noise.

Also holds the sRGB ↔ linear-light conversions and the sensor model that low-light reuses:
photon shot noise and read noise happen to light (linear values), not to gamma-encoded pixels.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from restore_cli.degradations.base import Degradation, Param, randn, register


def srgb_to_linear(image: torch.Tensor) -> torch.Tensor:
    """The sRGB EOTF (IEC 61966-2-1): a linear toe below 0.04045, a 2.4 power above it."""
    x = image.clamp(0, 1)
    return torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(linear: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`srgb_to_linear`; clips to [0,1] first, as a sensor saturates."""
    x = linear.clamp(0, 1)
    return torch.where(x <= 0.0031308, x * 12.92, 1.055 * x ** (1 / 2.4) - 0.055)


def poisson_gaussian(
    linear: torch.Tensor, photons: float, read_sigma: float, generator: torch.Generator
) -> torch.Tensor:
    """Sensor noise on linear light: ``Poisson(linear · photons) / photons + N(0, read_sigma²)``.

    ``photons`` is the expected photon count of a white pixel (full-well scale), so the shot-noise
    variance ``linear / photons`` grows with brightness and fewer photons means a noisier capture
    (Foi et al. 2008). Counts are drawn on the CPU so every device sees the same field.
    """
    rate = (linear.clamp(min=0) * photons).to("cpu", torch.float32)
    counts = torch.poisson(rate, generator=generator).to(linear.device, linear.dtype)
    return counts / photons + read_sigma * randn(tuple(linear.shape), generator, linear)


def add_gaussian_noise(
    image: torch.Tensor, params: Mapping[str, Any], generator: torch.Generator
) -> torch.Tensor:
    """``image + N(0, (sigma/255)²)`` per pixel and channel, independent across the batch.

    The additive white Gaussian noise model of the denoising benchmarks (σ on the 0–255 scale),
    applied directly to the sRGB values exactly as BSD68/CBSD68 test sets are made.
    """
    sigma = float(params["sigma"]) / 255
    return image + sigma * randn(tuple(image.shape), generator, image)


def add_camera_noise(
    image: torch.Tensor, params: Mapping[str, Any], generator: torch.Generator
) -> torch.Tensor:
    """Poisson–Gaussian noise added in linear light, then re-encoded to sRGB.

    Real sensor noise is signal dependent (shot noise) plus a floor (read noise); doing it in
    linear light and re-encoding gives the brightness-dependent, gamma-shaped noise of real
    photos that plain AWGN misses.
    """
    photons, read_sigma = float(params["photons"]), float(params["read_sigma"])
    return linear_to_srgb(poisson_gaussian(srgb_to_linear(image), photons, read_sigma, generator))


register(
    Degradation(
        name="gaussian_noise",
        family="noise",
        task="denoise",
        params=(Param("sigma", in_dist=(5.0, 50.0), ood=(50.0, 75.0)),),
        apply=add_gaussian_noise,
        summary="additive white Gaussian noise on sRGB values (σ on the 0–255 scale)",
        source=(
            "σ∈{15,25,50} benchmarks (BSD68/CBSD68 as in PromptIR/AirNet); Diff-Restorer trains "
            "σ=50; ood beyond 50 as in UniRestorer's out-dist split"
        ),
    )
)

register(
    Degradation(
        name="camera_noise",
        family="noise",
        task="denoise",
        params=(
            Param("photons", in_dist=(1000.0, 30.0), ood=(30.0, 10.0), log=True),
            Param("read_sigma", in_dist=(0.001, 0.02), ood=(0.02, 0.04)),
        ),
        apply=add_camera_noise,
        summary="Poisson–Gaussian sensor noise in linear light (shot noise + read noise)",
        source=(
            "Poisson–Gaussian sensor model (Foi et al. 2008); ranges chosen to span phone-camera "
            "ISO 100–6400"
        ),
    )
)
