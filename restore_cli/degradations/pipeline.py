"""Composing degradations: which ones, in which order, at which level, and the record of it.

A :class:`Chain` is the exact recipe of one degraded image (degradation names, levels, every
sampled parameter); with the pair's seed it regenerates the image bit for bit. Chains are
sampled from a :class:`MixtureSpec` with a ``numpy`` generator and applied with a CPU
``torch.Generator``, both seeded from :func:`pair_seed`, so results never depend on worker
count or processing order.

Order follows UniRestorer's synthesis pipeline (low-light → blur → noise → rain → snow → haze,
JPEG last), with the types it does not use placed where their physics puts them: cast shadows
belong to the scene (first), raindrops sit on the glass (after the atmosphere), and inpainting
holes are cut from the final file (last).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from restore_cli.degradations.base import DEGRADATIONS, LEVELS, Choice, Degradation, Params
from restore_cli.errors import ConfigError

MIXTURE_ORDER = (
    "shadow", "lowlight", "blur", "noise", "rain", "snow", "haze", "raindrop", "jpeg", "inpaint",
)  # fmt: skip


@dataclass(frozen=True)
class Step:
    """One applied degradation: its name, level, in/out-of-distribution flag and parameters."""

    name: str
    level: str
    ood: bool
    params: Params

    @property
    def degradation(self) -> Degradation:
        return DEGRADATIONS[self.name]


@dataclass(frozen=True)
class Chain:
    steps: tuple[Step, ...]

    @property
    def types(self) -> str:
        """Families in application order, e.g. ``lowlight+noise+haze``."""
        return "+".join(step.degradation.family for step in self.steps)

    @property
    def names(self) -> str:
        return "+".join(step.name for step in self.steps)

    @property
    def levels(self) -> str:
        return "+".join(step.level for step in self.steps)

    @property
    def ood(self) -> bool:
        return any(step.ood for step in self.steps)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(step.degradation.task for step in self.steps)

    def to_json(self) -> str:
        return json.dumps([asdict(step) for step in self.steps], separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Chain:
        steps = json.loads(text)
        for step in steps:
            if step["name"] not in DEGRADATIONS:
                raise ConfigError(f"unknown degradation {step['name']!r} in a recorded chain")
        return cls(tuple(Step(**step) for step in steps))

    def apply(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for step in self.steps:
            image = step.degradation(image, step.params, generator)
        return image


@dataclass(frozen=True)
class Component:
    """How one type takes part in a mixture: selection weight / gate probability, levels."""

    probability: float = 1.0
    levels: tuple[str, ...] = LEVELS


@dataclass(frozen=True)
class MixtureSpec:
    """What to synthesise.

    ``types`` are families (``blur`` picks gaussian/defocus/motion at random) or single
    degradation names. ``mixed=None`` gives one degradation per image; ``(k1, k2)`` draws k in
    [k1, k2] distinct types (weighted by their probability) and applies them in
    ``MIXTURE_ORDER``; ``gated=True`` instead keeps each type with its own probability
    (UniRestorer's gates), at least one. ``ood_probability`` is the chance that a step samples
    its out-of-distribution range. ``clean_probability`` is the chance that an item is left
    undegraded (an empty chain): a restorer that never sees a clean input learns to change
    every image, and damages the photos of a folder that needed nothing.
    """

    types: tuple[str, ...]
    components: Mapping[str, Component] = field(default_factory=dict)
    mixed: tuple[int, int] | None = None
    gated: bool = False
    ood_probability: float = 0.0
    # Pinned parameter values by degradation name, e.g. {"gaussian_noise": {"sigma": 25.0}}:
    # benchmark sets with one exact setting (σ = 25) instead of a sampled range.
    fixed: Mapping[str, Mapping[str, float | int | str]] = field(default_factory=dict)
    clean_probability: float = 0.0

    def __post_init__(self) -> None:
        validate_types(self.types)
        for name, values in self.fixed.items():
            if name not in DEGRADATIONS:
                raise ConfigError(
                    f"--param {name}: unknown degradation (valid: {', '.join(DEGRADATIONS)})"
                )
            known = {p.name for p in DEGRADATIONS[name].params}
            for key, value in values.items():
                if key not in known:
                    valid = ", ".join(sorted(known))
                    raise ConfigError(f"--param {name}.{key}: unknown parameter (valid: {valid})")
                check_pinned(name, key, value)
        for name, component in self.components.items():
            if name not in self.types:
                raise ConfigError(f"component {name!r} is not among the types {self.types}")
            validate_levels(component.levels)
            if not 0 <= component.probability <= 1:
                raise ConfigError(f"component {name!r}: probability must be in [0, 1]")
        if self.mixed is not None:
            low, high = self.mixed
            if not 1 <= low <= high <= len(self.types):
                raise ConfigError(
                    f"--mixed {low}-{high}: needs 1 <= K1 <= K2 <= number of types "
                    f"({len(self.types)})"
                )
        if not 0 <= self.ood_probability <= 1:
            raise ConfigError("ood probability must be in [0, 1]")
        if not 0 <= self.clean_probability <= 1:
            raise ConfigError("clean probability must be in [0, 1]")

    def component(self, name: str) -> Component:
        return self.components.get(name, Component())


def check_pinned(name: str, key: str, value: float | int | str) -> float | int | str:
    """A pinned value must be one the degradation was built for: a listed choice, or a finite
    number inside its in- and out-of-distribution ranges. Outside them the result is not a
    physical degradation any more, and some values would never finish (a motion-blur kernel a
    million pixels long). Unknown names and keys are left to MixtureSpec's own message."""
    degradation = DEGRADATIONS.get(name)
    param = next((p for p in degradation.params if p.name == key), None) if degradation else None
    if param is None:
        return value
    label = f"--param {name}.{key}={value}"
    if isinstance(param, Choice):
        if str(value) not in param.options:
            raise ConfigError(f"{label}: expected one of {', '.join(param.options)}")
        return str(value)
    if isinstance(value, str) or not math.isfinite(value):
        raise ConfigError(f"{label}: expected a finite number")
    bounds = [*param.in_dist, *(param.ood or ())]
    low, high = min(bounds), max(bounds)
    if not low <= value <= high:
        raise ConfigError(
            f"{label}: must be between {low:g} and {high:g} (its in- and out-of-distribution range)"
        )
    if param.integer:
        if value != int(value) or (param.odd and int(value) % 2 == 0):
            kind = "an odd whole number" if param.odd else "a whole number"
            raise ConfigError(f"{label}: must be {kind}")
        return int(value)
    return value


def families() -> dict[str, list[str]]:
    """Family name → degradation names, in registration order."""
    grouped: dict[str, list[str]] = {}
    for degradation in DEGRADATIONS.values():
        grouped.setdefault(degradation.family, []).append(degradation.name)
    return grouped


def known_types() -> list[str]:
    return sorted(set(families()) | set(DEGRADATIONS))


def validate_types(types: Iterable[str]) -> None:
    types = list(types)
    if not types:
        raise ConfigError("no degradation types given (--types)")
    unknown = [t for t in types if t not in families() and t not in DEGRADATIONS]
    if unknown:
        raise ConfigError(
            f"unknown degradation type {unknown[0]!r} (valid: {', '.join(known_types())})"
        )
    if len(set(types)) != len(types):
        raise ConfigError(f"degradation types listed twice: {', '.join(types)}")


def validate_levels(levels: Iterable[str]) -> None:
    levels = list(levels)
    bad = [level for level in levels if level not in LEVELS]
    if bad or not levels:
        raise ConfigError(f"level {bad[0] if bad else ''!r}: expected some of {', '.join(LEVELS)}")


def family_of(type_name: str) -> str:
    return type_name if type_name in families() else DEGRADATIONS[type_name].family


def order_key(type_name: str) -> int:
    family = family_of(type_name)
    return MIXTURE_ORDER.index(family) if family in MIXTURE_ORDER else len(MIXTURE_ORDER)


def pair_seed(seed: int, key: str) -> int:
    """A 63-bit seed for one pair from the run seed and a stable key (relative path + index)."""
    digest = hashlib.sha256(f"restore-cli/{seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def choose_types(spec: MixtureSpec, rng: np.random.Generator) -> list[str]:
    types = list(spec.types)
    weights = np.array([spec.component(t).probability for t in types], float)
    if spec.gated:
        kept = [t for t, p in zip(types, weights, strict=True) if rng.random() < p]
        return kept or [types[rng.choice(len(types), p=normalised(weights))]]
    count = 1 if spec.mixed is None else int(rng.integers(spec.mixed[0], spec.mixed[1] + 1))
    if np.count_nonzero(weights) < count:
        raise ConfigError(f"cannot draw {count} types: fewer have a non-zero probability")
    picks = rng.choice(len(types), size=count, replace=False, p=normalised(weights))
    return [types[i] for i in picks]


def normalised(weights: np.ndarray) -> np.ndarray:
    if weights.sum() <= 0:
        raise ConfigError("all degradation probabilities are zero")
    return weights / weights.sum()


def sample_chain(spec: MixtureSpec, rng: np.random.Generator) -> Chain:
    # The clean draw only happens when asked for, so existing seeds keep their chains.
    if spec.clean_probability > 0 and rng.random() < spec.clean_probability:
        return Chain(())
    steps = []
    for type_name in sorted(choose_types(spec, rng), key=order_key):
        members = families().get(type_name, [type_name])
        name = members[int(rng.integers(len(members)))]
        levels = spec.component(type_name).levels
        level = levels[int(rng.integers(len(levels)))]
        ood = bool(rng.random() < spec.ood_probability)
        params = DEGRADATIONS[name].sample_params(level, rng, ood) | dict(spec.fixed.get(name, {}))
        steps.append(Step(name, level, ood, params))
    return Chain(tuple(steps))


def single_step_chain(name: str, level: str, seed: int, ood: bool = False) -> Chain:
    """The chain of one named degradation at one level (for previews and benchmarks)."""
    params = DEGRADATIONS[name].sample_params(level, np.random.default_rng(seed), ood)
    return Chain((Step(name, level, ood, params),))
