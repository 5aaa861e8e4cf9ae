"""Low light: an under-exposed, noisy capture synthesised in linear light (LOL-like pairs)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from restore_cli.degradations.base import Degradation, Param, register
from restore_cli.degradations.noise import linear_to_srgb, poisson_gaussian, srgb_to_linear


def darken(
    image: torch.Tensor, params: Mapping[str, Any], generator: torch.Generator
) -> torch.Tensor:
    """``sRGB(PoissonGaussian(exposure · linear^gamma))``: less light, then a noisier sensor.

    ``exposure`` scales the light reaching the sensor. ``gamma`` (around 1) adds a tone change on
    top, because real dark/normal pairs are not one gain apart: the camera's tone curve and auto
    exposure reshape contrast, so a restorer must fix tone, not just multiply by 1/exposure.
    ``photons`` counts a white pixel at normal exposure; the dark frame collects only
    ``exposure`` of it, so shot noise grows relative to the signal as the image darkens, and the
    read-noise floor (``read_sigma``) matters more the darker it is.
    """
    linear = srgb_to_linear(image) ** float(params["gamma"])
    dark = float(params["exposure"]) * linear
    noisy = poisson_gaussian(dark, float(params["photons"]), float(params["read_sigma"]), generator)
    return linear_to_srgb(noisy)


register(
    Degradation(
        name="lowlight",
        family="lowlight",
        task="lowlight",
        params=(
            Param("exposure", in_dist=(0.5, 0.05), ood=(0.05, 0.02), log=True),
            Param("gamma", in_dist=(0.8, 1.2), severity=False),
            Param("photons", in_dist=(2000.0, 200.0), ood=(200.0, 80.0), log=True),
            Param("read_sigma", in_dist=(0.0005, 0.005), severity=False),
        ),
        apply=darken,
        summary="under-exposure in linear light (gain + tone change) with Poisson–Gaussian noise",
        source=(
            "LOL-like synthesis in linear light (Lore et al. 2017 / Retinexformer-style darkening "
            "+ Poisson–Gaussian noise)"
        ),
    )
)
