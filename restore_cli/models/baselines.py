"""Classical baselines registered as models: identity, BM3D and OpenCV non-local means.

Every report should show how far a learned model is above the obvious alternatives, so these
load by name like any other model (``restore``, ``eval --model``, ``models``). They are plain
``nn.Module`` wrappers around numpy/OpenCV code: the engine's tiling, batching and I/O treat
them like networks, while the work itself happens on the CPU (BM3D and OpenCV's NLM have no
GPU implementation in these packages); tensors on CUDA are copied to the CPU and back.

Noise level: BM3D and NLM need σ. It is estimated per image (per tile when the engine tiles)
with Donoho's robust estimator, σ̂ = median(|HH₁|) / 0.6745, where HH₁ are the finest-scale
diagonal Haar wavelet coefficients ((a − b − c + d) / 2 over each 2×2 block) of each channel;
the three channel estimates are averaged. Image structure barely reaches the diagonal
detail band, and the median ignores the edges that do.

Measured on this project's 2-core CPU (see docs/metrics.md): identity is free, NLM takes
about 2.5 s per megapixel, BM3D about 180 s per megapixel (σ = 25 photo, 512² and 1024²).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import cv2
import numpy as np
import torch
from torch import nn

from restore_cli.errors import ModelError
from restore_cli.models.registry import LoadedModel, ModelSpec

MAD_TO_SIGMA = 0.6745  # median(|N(0, 1)|)
NLM_H_PER_SIGMA = 0.8  # OpenCV's h as a multiple of σ (0–255); best of 0.6–1.2 at σ 5–50
NLM_TEMPLATE, NLM_SEARCH = 7, 21  # OpenCV's recommended patch and search window sizes
MIN_SIGMA = 1e-4  # BM3D needs σ > 0; a clean image gets an almost-identity filter


def estimate_noise_sigma(rgb: np.ndarray) -> float:
    """Robust σ of additive white noise in an HxWxC float image (same scale as the image)."""
    height, width = rgb.shape[:2]
    even = rgb[: height // 2 * 2, : width // 2 * 2].astype(np.float64)
    if even.size == 0:
        return 0.0
    diagonal = (even[0::2, 0::2] - even[0::2, 1::2] - even[1::2, 0::2] + even[1::2, 1::2]) / 2
    per_channel = np.median(np.abs(diagonal.reshape(-1, rgb.shape[2])), axis=0) / MAD_TO_SIGMA
    return float(per_channel.mean())


def identity(rgb: np.ndarray) -> np.ndarray:
    """The degraded input itself: the floor every restoration must beat."""
    return rgb


def nlmeans(rgb: np.ndarray) -> np.ndarray:
    """OpenCV ``fastNlMeansDenoisingColored`` with h = hColor = 0.8 σ̂ (0–255 scale).

    OpenCV's implementation takes 8-bit images only, so the input is rounded to 8 bits.
    """
    sigma = estimate_noise_sigma(rgb) * 255
    h = max(NLM_H_PER_SIGMA * sigma, 0.01)
    bgr = np.ascontiguousarray((np.clip(rgb, 0, 1)[..., ::-1] * 255).round().astype(np.uint8))
    out = cv2.fastNlMeansDenoisingColored(bgr, None, h, h, NLM_TEMPLATE, NLM_SEARCH)
    return out[..., ::-1].astype(np.float32) / 255


def bm3d_denoise(rgb: np.ndarray) -> np.ndarray:
    """BM3D (``bm3d.bm3d_rgb``, opponent colour space, default "np" profile) at σ̂."""
    import bm3d

    sigma = max(estimate_noise_sigma(rgb), MIN_SIGMA)
    out = bm3d.bm3d_rgb(rgb.astype(np.float64), sigma_psd=sigma)
    return np.clip(out, 0, 1).astype(np.float32)


class NumpyRestorer(nn.Module):
    """Runs an HxWx3 float32 numpy function on each image of a [B, 3, H, W] batch."""

    def __init__(self, function: Callable[[np.ndarray], np.ndarray]) -> None:
        super().__init__()
        self.function = function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = x.detach().float().cpu().permute(0, 2, 3, 1).numpy()
        outputs = [np.ascontiguousarray(self.function(image)) for image in images]
        return torch.from_numpy(np.stack(outputs)).permute(0, 3, 1, 2).to(x.device, x.dtype)


BASELINES: dict[str, dict[str, object]] = {
    "identity": {
        "function": identity,
        "licence": "MIT (restore-cli)",
        "source": "restore_cli.models.baselines",
        "description": "the degraded input unchanged (lower bound for every report)",
        "package": None,
    },
    "nlmeans": {
        "function": nlmeans,
        "licence": "Apache-2.0 (OpenCV)",
        "source": "cv2.fastNlMeansDenoisingColored",
        "description": "OpenCV non-local means denoising, h from the estimated noise σ",
        "package": None,
    },
    "bm3d": {
        "function": bm3d_denoise,
        "licence": "non-commercial only (bm3d package, Tampere University)",
        "source": "https://pypi.org/project/bm3d/",
        "description": "BM3D denoising at the estimated noise σ (pip install bm3d)",
        "package": "bm3d",
    },
}


def is_baseline(name: str) -> bool:
    return name in BASELINES


def baseline_available(name: str) -> bool:
    package = BASELINES[name]["package"]
    return package is None or importlib.util.find_spec(str(package)) is not None


def load_baseline(name: str) -> LoadedModel:
    """The baseline as a LoadedModel; fp32 only, tasks none (each does one fixed thing)."""
    entry = BASELINES[name]
    if not baseline_available(name):
        raise ModelError(
            f"model {name!r} needs the {entry['package']} package "
            f'(pip install "restore-cli[baselines]"; licence: {entry["licence"]})'
        )
    spec = ModelSpec(
        arch=f"baseline:{name}",
        supports_half=False,
        supports_bf16=False,
        memory_mib_per_mp=1.0,  # works on CPU copies; no probe on CUDA needed
    )
    function = entry["function"]
    assert callable(function)
    return LoadedModel(
        name=name,
        module=NumpyRestorer(function),
        spec=spec,
        source=str(entry["source"]),
        licence=str(entry["licence"]),
    )


def baseline_rows() -> list[dict[str, object]]:
    """Rows for ``restore-cli models``: status builtin (or missing without its package)."""
    return [
        {
            "name": name,
            "arch": f"baseline:{name}",
            "status": "builtin" if baseline_available(name) else "missing",
            "licence": entry["licence"],
            "source": entry["source"],
            "description": entry["description"],
            "default": False,
        }
        for name, entry in BASELINES.items()
    ]
