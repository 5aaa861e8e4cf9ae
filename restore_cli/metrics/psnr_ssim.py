"""PSNR and SSIM with the conventions of restoration papers and BasicSR, written out in full.

Published numbers differ by tenths of a dB depending on unstated details, so every choice is
fixed here and named in the CSV header (:meth:`Convention.column`):

* Both images are clamped to [0, 1], scaled to 0–255 and rounded to integers ("uint8"), as
  BasicSR's ``tensor2img`` does before scoring saved results. 16-bit images are scored the same
  way (scaled to 0–255 and rounded), so their numbers compare with papers, which use 8 bits.
* ``color="y"``: ITU-R BT.601 limited-range luma on the 0–255 scale,
  ``Y = 16 + (65.481 R + 128.553 G + 24.966 B)`` with R, G, B in [0, 1] (BasicSR's
  ``rgb2ycbcr(y_only=True)``); Y is not rounded again. ``color="rgb"``: the three channels.
* ``crop_border=N`` removes N pixels from every side of both images before scoring.
* PSNR = 10·log10(255² / MSE), MSE over every pixel and channel; identical images give
  ``inf`` (kept as ``inf``: never capped).
* SSIM: 11×11 Gaussian window, σ = 1.5, C1 = (0.01·255)², C2 = (0.03·255)², statistics over the
  valid region only (no padding: the map is (H−10)×(W−10)), mean of the map; for RGB the mean
  of the three per-channel SSIMs.

Functions take batches ``[B, 3, H, W]`` in [0, 1] on any device and return one value per
image (float64). The SSIM filtering runs as a float64 convolution on CUDA and through OpenCV's
separable filter on the CPU, where torch's float64 convolution is about 20× slower.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch.nn import functional as F

from restore_cli.errors import ConfigError

COLORS = ("rgb", "y")
PIXEL_MAX = 255.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = (0.01 * PIXEL_MAX) ** 2
SSIM_C2 = (0.03 * PIXEL_MAX) ** 2
BT601_Y_WEIGHTS = (65.481, 128.553, 24.966)  # for R, G, B in [0, 1]
BT601_Y_OFFSET = 16.0


@dataclass(frozen=True)
class Convention:
    """How PSNR/SSIM are computed; :meth:`column` spells it out for the CSV header."""

    color: str = "rgb"
    crop_border: int = 0

    def __post_init__(self) -> None:
        if self.color not in COLORS:
            raise ConfigError(f"--color {self.color!r}: expected one of {', '.join(COLORS)}")
        if self.crop_border < 0:
            raise ConfigError(f"--crop-border {self.crop_border}: must be >= 0")

    @property
    def tag(self) -> str:
        """e.g. ``y_bt601_crop4_uint8`` or ``rgb_crop0_uint8``."""
        color = "y_bt601" if self.color == "y" else "rgb"
        return f"{color}_crop{self.crop_border}_uint8"

    def column(self, metric: str) -> str:
        return f"{metric}_{self.tag}"


def quantize(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images → float64 integers 0..255: clamp, ×255 and round half to even in float32,
    exactly as BasicSR's ``tensor2img`` does, then widen (exactly) to float64."""
    return images.float().clamp(0, 1).mul_(PIXEL_MAX).round_().double()


def rgb_to_y(images: torch.Tensor) -> torch.Tensor:
    """BT.601 limited-range luma on the 0–255 scale of [B, 3, H, W] 0–255 images → [B, 1, H, W]."""
    weights = images.new_tensor(BT601_Y_WEIGHTS).view(1, 3, 1, 1)
    return BT601_Y_OFFSET + (images / PIXEL_MAX * weights).sum(dim=1, keepdim=True)


def prepare(images: torch.Tensor, convention: Convention) -> torch.Tensor:
    """Quantize, crop the border and convert to Y if asked: the exact arrays that get scored."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected a [B, 3, H, W] batch, got shape {tuple(images.shape)}")
    scored = quantize(images)
    border = convention.crop_border
    if border:
        height, width = scored.shape[-2:]
        if height <= 2 * border or width <= 2 * border:
            raise ValueError(f"{width}x{height} image is too small for --crop-border {border}")
        scored = scored[..., border:-border, border:-border]
    return rgb_to_y(scored) if convention.color == "y" else scored


def psnr(
    pred: torch.Tensor, gt: torch.Tensor, convention: Convention | None = None
) -> torch.Tensor:
    """Per-image PSNR in dB (``inf`` for identical images) of two [B, 3, H, W] batches."""
    return score(pred, gt, convention, ("psnr",))["psnr"]


def ssim(
    pred: torch.Tensor, gt: torch.Tensor, convention: Convention | None = None
) -> torch.Tensor:
    """Per-image SSIM of two [B, 3, H, W] batches (mean over channels for RGB)."""
    return score(pred, gt, convention, ("ssim",))["ssim"]


def score(
    pred: torch.Tensor,
    gt: torch.Tensor,
    convention: Convention | None = None,
    metrics: tuple[str, ...] = ("psnr", "ssim"),
) -> dict[str, torch.Tensor]:
    """PSNR and/or SSIM per image from one preparation of each image.

    On the CPU images are scored one at a time: float64 temporaries of a whole batch exceed the
    size malloc recycles, and fresh pages for every temporary cost more than the arithmetic.
    """
    convention = convention or Convention()
    _check_same_shape(pred, gt)
    unknown = set(metrics) - {"psnr", "ssim"}
    if unknown:
        raise ValueError(f"unknown metric(s) {sorted(unknown)}")
    chunks = (
        [(pred, gt)]
        if pred.device.type != "cpu"
        else [(pred[i : i + 1], gt[i : i + 1]) for i in range(pred.shape[0])]
    )
    results: dict[str, list[torch.Tensor]] = {name: [] for name in metrics}
    for pred_chunk, gt_chunk in chunks:
        prepared_pred, prepared_gt = prepare(pred_chunk, convention), prepare(gt_chunk, convention)
        if "psnr" in results:
            results["psnr"].append(psnr_prepared(prepared_pred, prepared_gt))
        if "ssim" in results:
            results["ssim"].append(ssim_prepared(prepared_pred, prepared_gt))
    return {name: torch.cat(values) for name, values in results.items()}


def psnr_prepared(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    _check_same_shape(pred, gt)
    mse = (pred - gt).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(PIXEL_MAX**2 / mse)  # mse == 0 → +inf (torch divides to inf)


def ssim_prepared(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """SSIM of prepared (0–255, float64) batches [B, C, H, W]: mean map, then mean over C."""
    _check_same_shape(pred, gt)
    height, width = pred.shape[-2:]
    if min(height, width) < SSIM_WINDOW:
        raise ValueError(
            f"{width}x{height} (after any border crop) is smaller than the {SSIM_WINDOW}x"
            f"{SSIM_WINDOW} SSIM window"
        )
    mu1, mu2 = gaussian_filter_valid(pred), gaussian_filter_valid(gt)
    mu1_sq, mu2_sq, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    sigma1_sq = gaussian_filter_valid(pred * pred).sub_(mu1_sq)
    sigma2_sq = gaussian_filter_valid(gt * gt).sub_(mu2_sq)
    sigma12 = gaussian_filter_valid(pred * gt).sub_(mu12)
    # ((2 μ1μ2 + C1)(2 σ12 + C2)) / ((μ1² + μ2² + C1)(σ1² + σ2² + C2)), in place.
    numerator = mu12.mul_(2).add_(SSIM_C1).mul_(sigma12.mul_(2).add_(SSIM_C2))
    denominator = mu1_sq.add_(mu2_sq).add_(SSIM_C1).mul_(sigma1_sq.add_(sigma2_sq).add_(SSIM_C2))
    return numerator.div_(denominator).mean(dim=(2, 3)).mean(dim=1)


def gaussian_window_1d() -> np.ndarray:
    """The normalised 11-tap Gaussian (σ = 1.5); its outer product is BasicSR's 2-D window."""
    return cv2.getGaussianKernel(SSIM_WINDOW, SSIM_SIGMA, cv2.CV_64F)[:, 0]


def gaussian_filter_valid(images: torch.Tensor) -> torch.Tensor:
    """Filter each channel of float64 [B, C, H, W] with the SSIM window, valid region only."""
    if images.device.type == "cpu":
        return _filter_valid_opencv(images)
    return _filter_valid_torch(images)


def _filter_valid_torch(images: torch.Tensor) -> torch.Tensor:
    taps = torch.from_numpy(gaussian_window_1d()).to(images)
    batch, channels, height, width = images.shape
    planes = images.reshape(batch * channels, 1, height, width)
    planes = F.conv2d(planes, taps.view(1, 1, SSIM_WINDOW, 1))
    planes = F.conv2d(planes, taps.view(1, 1, 1, SSIM_WINDOW))
    return planes.reshape(batch, channels, *planes.shape[-2:])


def _filter_valid_opencv(images: torch.Tensor) -> torch.Tensor:
    taps = gaussian_window_1d()
    pad = SSIM_WINDOW // 2
    array = images.numpy()
    out = np.empty((*array.shape[:2], array.shape[2] - 2 * pad, array.shape[3] - 2 * pad))
    for b in range(array.shape[0]):
        for c in range(array.shape[1]):
            full = cv2.sepFilter2D(array[b, c], cv2.CV_64F, taps, taps)
            out[b, c] = full[pad:-pad, pad:-pad]  # border-handled pixels are dropped
    return torch.from_numpy(out)


def _check_same_shape(pred: torch.Tensor, gt: torch.Tensor) -> None:
    if pred.shape != gt.shape:
        raise ValueError(f"shape mismatch: {tuple(pred.shape)} vs {tuple(gt.shape)}")
