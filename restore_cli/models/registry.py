"""One descriptor type for every model, and the architecture registry.

The engine, tiling and I/O only ever see a :class:`LoadedModel`: a plain ``nn.Module`` plus a
:class:`ModelSpec` that says everything they need to know (scale, size multiple, precision
safety, tasks, memory use). Nothing outside ``restore_cli.models`` does ``isinstance`` checks on
networks. This mirrors spandrel's ``ImageModelDescriptor`` so that community checkpoints loaded
through spandrel and our own architectures look the same.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from restore_cli.errors import ModelError

StateDict = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class ModelSpec:
    """What the engine needs to know about a network, so it never has to inspect the module."""

    arch: str
    scale: int = 1
    size_multiple: int = 1
    supports_half: bool = True
    supports_bf16: bool = True
    input_channels: int = 3
    output_channels: int = 3
    tasks: tuple[str, ...] = ()  # what the weights were trained for
    # True only for networks whose forward takes ``tasks=`` (instruction mode, e.g. UniRestorer's
    # task masks); blind all-in-one models such as PromptIR decide for themselves.
    instructable: bool = False
    # Peak CUDA memory per megapixel of input at fp32, in MiB; None = measure on first use.
    memory_mib_per_mp: float | None = None
    # Smallest height/width the network accepts (pad up to it) and whether it needs square input;
    # spandrel reports both for some community architectures (e.g. SCUNet: 40, Uformer: square).
    min_size: int = 0
    square: bool = False
    # True for networks that pick their experts per image (UniRestorer): the engine calls
    # ``module.route(image, **conditions)`` once on the whole image and passes ``route=`` to the
    # forward of every tile, so all tiles of one image use the same experts.
    routed: bool = False
    # True for diffusion models whose forward takes ``steps=`` and ``seed=`` (DiffUIR).
    sampled: bool = False
    # Run in channels_last memory format: convolution-heavy networks are faster that way on
    # oneDNN (CPU) and on tensor cores (CUDA); set False where a network's reshapes make it slower.
    channels_last: bool = True


@dataclass
class LoadedModel:
    """A network ready to run: ``module(x, **conditions)``, [B,C,h,w] in [0,1] → [B,C,h*s,w*s]."""

    name: str
    module: nn.Module
    spec: ModelSpec
    source: str = ""
    licence: str = ""
    conditions: dict[str, Any] = field(default_factory=dict)

    def __call__(self, x: torch.Tensor, **extra: Any) -> torch.Tensor:
        return self.module(x, **self.conditions, **extra)

    def route(self, image: torch.Tensor) -> Any:
        """The per-image routing of a ``routed`` model (None for every other model)."""
        if not self.spec.routed:
            return None
        return self.module.route(image, **self.conditions)


@dataclass(frozen=True)
class Architecture:
    """How to build, recognise and describe one architecture family.

    ``detect`` returns the constructor config inferred from a state dict whose keys belong to this
    architecture, or None; ``build`` makes the module from that config; ``spec`` describes it.
    """

    name: str
    build: Callable[[dict[str, Any]], nn.Module]
    detect: Callable[[StateDict], dict[str, Any] | None]
    spec: Callable[[dict[str, Any]], ModelSpec]
    licence: str = ""
    source: str = ""


ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(arch: Architecture) -> Architecture:
    if arch.name in ARCHITECTURES:
        raise ValueError(f"architecture {arch.name!r} registered twice")
    ARCHITECTURES[arch.name] = arch
    return arch


def get_architecture(name: str) -> Architecture:
    _import_builtin_architectures()
    try:
        return ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES)) or "none"
        raise ModelError(f"unknown architecture {name!r} (known: {known})") from None


def detect_architecture(state_dict: StateDict) -> tuple[Architecture, dict[str, Any]] | None:
    """Find which of our architectures a state dict belongs to, with its config."""
    _import_builtin_architectures()
    for arch in ARCHITECTURES.values():
        config = arch.detect(state_dict)
        if config is not None:
            return arch, config
    return None


def sequence_length(state_dict: StateDict, prefix: str) -> int:
    """Number of entries of an ``nn.Sequential``/``ModuleList`` named ``prefix`` (max index + 1):
    how every architecture's ``detect`` reads block counts back from a state dict."""
    start = prefix + "."
    indices = [
        int(head)
        for key in state_dict
        if key.startswith(start) and (head := key[len(start) :].split(".", 1)[0]).isdigit()
    ]
    return max(indices) + 1 if indices else 0


def architecture_names() -> list[str]:
    _import_builtin_architectures()
    return sorted(ARCHITECTURES)


def _import_builtin_architectures() -> None:
    # Importing a module registers its architecture; kept lazy so `--help` stays fast.
    from restore_cli.models import (  # noqa: F401
        diffuir,
        nafnet,
        promptir,
        restormer,
        unirestorer,
        unirestorer_release,
    )


MODES = ("auto", "instruction")


def apply_mode(
    model: LoadedModel, mode: str, tasks: list[str], granularity: str | None = None
) -> None:
    """Check ``--mode``/``--task``/``--granularity`` against what the model accepts and set its
    conditions.

    Models that take no tasks run the same in both modes, so instruction mode on them is refused
    rather than silently ignored; the same goes for a granularity on a model without experts.
    """
    model.conditions.pop("granularity", None)
    if granularity is not None:
        if not model.spec.routed:
            raise ModelError(f"model {model.name} has no experts; --granularity needs a routed one")
        model.conditions["granularity"] = granularity
    if mode not in MODES:
        raise ModelError(f"--mode {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "auto":
        if tasks:
            raise ModelError("--task is only used with --mode instruction")
        model.conditions.pop("tasks", None)
        return
    valid = model.spec.tasks
    if not model.spec.instructable or not valid:
        raise ModelError(f"model {model.name} takes no task instructions; use --mode auto")
    if not tasks:
        raise ModelError(f"--mode instruction needs --task (valid: {', '.join(valid)})")
    unknown = [t for t in tasks if t not in valid]
    if unknown:
        raise ModelError(
            f"unknown task {unknown[0]!r} for {model.name} (valid: {', '.join(valid)})"
        )
    model.conditions["tasks"] = tuple(tasks)


def apply_sampling(model: LoadedModel, steps: int | None, seed: int | None) -> None:
    """``--steps``/``--seed`` for diffusion models; refused (not ignored) for the others."""
    for name, value in (("steps", steps), ("seed", seed)):
        model.conditions.pop(name, None)
        if value is None:
            continue
        if not model.spec.sampled:
            raise ModelError(f"model {model.name} is not a diffusion model; --{name} needs one")
        if name == "steps" and value < 1:
            raise ModelError(f"--steps {value}: must be >= 1")
        model.conditions[name] = value
