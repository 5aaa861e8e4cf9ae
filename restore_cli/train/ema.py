"""Exponential moving average of the weights: the copy that gets validated and shipped.

Averaging the last few thousand steps' weights removes most of the step-to-step noise of the
optimiser and is usually a few tenths of a dB better than the raw weights (BasicSR keeps it as
``params_ema``). The update ``ema ← ema + (1 − decay)·(w − ema)`` is one ``lerp_`` per tensor,
deterministic, so a resumed run reproduces it exactly from the saved EMA weights.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma:
    """An eval-mode, no-grad copy of a network that trails it by ``1 / (1 − decay)`` steps.

    Without warm-up the copy starts as the random init and keeps ``decay**steps`` of it: 37 %
    after 1 000 steps at 0.999, which ruins short runs. ``warmup`` uses ``min(decay, (1 + t) /
    (10 + t))`` at step ``t`` (TensorFlow's and timm's schedule), so early steps average fast.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.module = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        """The decay of the update made at optimiser step ``step`` (1 for the first)."""
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        source = unwrap(model).state_dict()
        decay = self.decay_at(step)
        for name, average in self.module.state_dict().items():
            current = source[name].detach()
            if average.is_floating_point():
                average.lerp_(current.to(average.dtype), 1 - decay)
            else:  # integer buffers (counters) are copied, not averaged
                average.copy_(current)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a DistributedDataParallel (or torch.compile) wrapper."""
    while True:
        inner = next(
            (
                getattr(model, name)
                for name in ("module", "_orig_mod")
                if isinstance(getattr(model, name, None), nn.Module)
            ),
            None,
        )
        if inner is None:
            return model
        model = inner
