"""The degradation library: seeded torch functions, levels, mixtures and their records.

Importing this package registers every degradation (one module per family).
"""

from restore_cli.degradations import (  # noqa: F401  (imported to register)
    blur,
    haze,
    inpaint,
    jpeg,
    lowlight,
    noise,
    rain,
    shadow,
    snow,
)
from restore_cli.degradations.base import DEGRADATIONS, LEVELS, Degradation
from restore_cli.degradations.pipeline import (
    MIXTURE_ORDER,
    Chain,
    Component,
    MixtureSpec,
    Step,
    families,
    known_types,
    pair_seed,
    sample_chain,
)

__all__ = [
    "DEGRADATIONS",
    "LEVELS",
    "MIXTURE_ORDER",
    "Chain",
    "Component",
    "Degradation",
    "MixtureSpec",
    "Step",
    "families",
    "known_types",
    "pair_seed",
    "sample_chain",
]
