"""What a degradation is: sampled parameters with severity levels, and a seeded tensor function.

Every degradation is a :class:`Degradation`: a table of :class:`Param` / :class:`Choice`
(how each parameter is drawn for a level, in- or out-of-distribution) and an ``apply`` function
``apply(image [B,3,H,W] in [0,1], params, generator) -> [B,3,H,W] in [0,1]``.

Reproducibility contract: ``apply`` draws every random number from ``generator`` (a CPU
``torch.Generator``) on the CPU and only then moves it to ``image.device``, so the same params
and seed give the same random field on any device and with any number of workers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from restore_cli.errors import ConfigError

LEVELS = ("light", "medium", "heavy")
ParamValue = float | int | str
Params = dict[str, ParamValue]
ApplyFunction = Callable[[torch.Tensor, Mapping[str, Any], torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class Param:
    """A numeric parameter.

    ``in_dist`` runs from the lightest to the heaviest value (it may decrease, e.g. JPEG
    quality); the levels take its thirds (light, medium, heavy). ``ood`` continues past heavy
    (``ood[0]`` is usually ``in_dist[1]``) and is split in thirds the same way. A nuisance
    parameter (``severity=False``, e.g. a rain angle) is drawn from ``in_dist`` at every level.
    ``log`` draws uniformly in log space (for scale-like values).
    """

    name: str
    in_dist: tuple[float, float]
    ood: tuple[float, float] | None = None
    severity: bool = True
    integer: bool = False
    log: bool = False
    odd: bool = False  # integers only: round to the nearest odd value (kernel sizes)

    def interval(self, level: str, ood: bool) -> tuple[float, float]:
        if not self.severity:
            return self.in_dist
        span = self.ood if ood and self.ood is not None else self.in_dist
        third = LEVELS.index(level)
        start, end = span
        return start + (end - start) * third / 3, start + (end - start) * (third + 1) / 3

    def sample(self, level: str, ood: bool, rng: np.random.Generator) -> float | int:
        low, high = sorted(self.interval(level, ood))
        if self.log:
            value = math.exp(rng.uniform(math.log(low), math.log(high)))
        else:
            value = rng.uniform(low, high)
        if not self.integer:
            return float(value)
        value = round(value)
        if self.odd and value % 2 == 0:
            value += 1 if value < high else -1
        return int(value)


@dataclass(frozen=True)
class Choice:
    """A categorical nuisance parameter, drawn with the given weights at every level."""

    name: str
    options: tuple[str, ...]
    weights: tuple[float, ...] | None = None

    def sample(self, level: str, ood: bool, rng: np.random.Generator) -> str:
        weights = None
        if self.weights is not None:
            weights = np.asarray(self.weights, float) / sum(self.weights)
        return str(self.options[rng.choice(len(self.options), p=weights)])


@dataclass(frozen=True)
class Degradation:
    """One degradation type.

    ``family`` groups alternatives of one physical cause (gaussian/defocus/motion are all
    ``blur``); the mixture order and ``--types`` use families. ``task`` is the restoration task
    that undoes it (for instruction mode and routing). ``source`` says where the ranges come from.
    """

    name: str
    family: str
    task: str
    params: tuple[Param | Choice, ...]
    apply: ApplyFunction
    summary: str
    source: str

    def sample_params(self, level: str, rng: np.random.Generator, ood: bool = False) -> Params:
        if level not in LEVELS:
            raise ConfigError(f"level {level!r}: expected one of {', '.join(LEVELS)}")
        return {p.name: p.sample(level, ood, rng) for p in self.params}

    def typical_params(self, level: str, ood: bool = False) -> Params:
        """Deterministic mid-interval parameters (geometric mid for log ones; first choice).

        For tests and previews that need a representative setting rather than a random one.
        """
        params: Params = {}
        for p in self.params:
            if isinstance(p, Choice):
                params[p.name] = p.options[0]
                continue
            low, high = p.interval(level, ood)
            value = math.sqrt(low * high) if p.log else (low + high) / 2
            if p.integer:
                value = round(value) | 1 if p.odd else round(value)
            params[p.name] = value
        return params

    def __call__(
        self, image: torch.Tensor, params: Mapping[str, Any], generator: torch.Generator
    ) -> torch.Tensor:
        return self.apply(image, params, generator).clamp(0, 1)


DEGRADATIONS: dict[str, Degradation] = {}


def register(degradation: Degradation) -> Degradation:
    if degradation.name in DEGRADATIONS:
        raise ValueError(f"degradation {degradation.name!r} registered twice")
    DEGRADATIONS[degradation.name] = degradation
    return degradation


def rand(shape: tuple[int, ...], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Uniform [0,1) noise drawn on the CPU from ``generator``, then moved next to ``like``."""
    return torch.rand(shape, generator=generator).to(like.device, like.dtype)


def randn(shape: tuple[int, ...], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise drawn on the CPU from ``generator``, then moved next to ``like``."""
    return torch.randn(shape, generator=generator).to(like.device, like.dtype)
