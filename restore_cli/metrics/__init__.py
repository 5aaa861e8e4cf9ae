"""Image quality metrics: PSNR/SSIM with paper conventions, pyiqa for the rest, reporting.

Metrics take [B, 3, H, W] tensors in [0, 1] and return one value per image; reporting
(CSV, table, plot) lives in :mod:`restore_cli.metrics.report`. Nothing heavy is imported here.
"""

from restore_cli.metrics.iqa import IqaMetric, MetricUnavailable, load_iqa_metric
from restore_cli.metrics.psnr_ssim import Convention, psnr, rgb_to_y, ssim

__all__ = [
    "Convention",
    "IqaMetric",
    "MetricUnavailable",
    "load_iqa_metric",
    "psnr",
    "rgb_to_y",
    "ssim",
]
