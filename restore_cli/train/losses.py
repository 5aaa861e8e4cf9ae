"""Training losses: L1, Charbonnier, PSNR loss, FFT loss, and their weighted sum.

Every loss is computed in float32 whatever the autocast precision (a bf16 mean over a batch of
crops loses the small differences training is about, and ``torch.fft`` has no bf16 kernels on
the CPU). Each returns a scalar tensor; :class:`WeightedLoss` also returns the weighted terms
so the log can show which one dominates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from restore_cli.train.config import LossTerm

LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_PSNR_SCALE = 10 / math.log(10)
_PSNR_MSE_FLOOR = 1e-8


def l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred - target).abs().mean()


def charbonnier_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """sqrt(d² + eps²): L1 away from zero, smooth at zero (stable gradients for small errors)."""
    diff = pred - target
    return torch.sqrt(diff * diff + eps * eps).mean()


def psnr_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Negative PSNR in dB (for images in [0, 1]), averaged per image, as NAFNet trains.

    ``10·log10(mse)`` per image: minimising it maximises PSNR, and every image counts in dB
    rather than in squared error, so clean-ish crops are not drowned out by heavy ones.
    """
    mse = (pred - target).pow(2).flatten(1).mean(dim=1)
    return _PSNR_SCALE * torch.log(mse + _PSNR_MSE_FLOOR).mean()


def fft_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 distance of the (real, imaginary) 2-D spectra, orthonormal FFT.

    The orthonormal scaling keeps the value independent of the crop size, so one weight works
    for any ``crop``; it pushes the network to restore high frequencies that pixel losses blur.
    """
    diff = torch.fft.rfft2(pred - target, norm="ortho")
    return torch.view_as_real(diff).abs().mean()


def loss_function(term: LossTerm) -> LossFunction:
    if term.type == "l1":
        return l1_loss
    if term.type == "charbonnier":
        return lambda pred, target: charbonnier_loss(pred, target, term.eps)
    if term.type == "psnr":
        return psnr_loss
    if term.type == "fft":
        return fft_loss
    raise ValueError(f"unknown loss {term.type!r}")  # the config validation lists the names


class WeightedLoss:
    """Sum of ``weight · loss`` over the configured terms."""

    def __init__(self, terms: Sequence[LossTerm]) -> None:
        self.terms = list(terms)
        self.functions = [loss_function(term) for term in self.terms]
        self.names = unique_names(self.terms)

    def __call__(
        self, pred: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pred, target = pred.float(), target.float()
        parts = {
            name: term.weight * function(pred, target)
            for name, term, function in zip(self.names, self.terms, self.functions, strict=True)
        }
        total = torch.stack(list(parts.values())).sum()
        return total, parts


def unique_names(terms: Sequence[LossTerm]) -> list[str]:
    """Log column names: ``loss_l1``, ``loss_fft``, …; repeated types get ``_2``, ``_3``."""
    seen: dict[str, int] = {}
    names = []
    for term in terms:
        seen[term.type] = seen.get(term.type, 0) + 1
        suffix = "" if seen[term.type] == 1 else f"_{seen[term.type]}"
        names.append(f"loss_{term.type}{suffix}")
    return names
