"""Point-spread functions (blur kernels) and the convolution that applies them.

Kernels are built on the CPU in float64 from closed-form shapes, normalised to sum 1 (blur
moves light around, it neither adds nor removes it) and returned as float32 ``[kh, kw]`` with
odd sides, centred on the middle pixel. Angles are in degrees, counter-clockwise from the image's
horizontal axis as seen on screen (rows grow downwards).

Meant for the blur degradations and streak-like effects (rain can reuse the line kernel).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Kernels with more taps than this go through the FFT: a depthwise conv2d on the CPU costs
# H·W·kh·kw per channel while the FFT path costs a few H·W·log(H·W), whatever the kernel size.
DIRECT_MAX_TAPS = 81


def _offsets(half_h: int, half_w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre offsets from the kernel centre: ``x`` to the right, ``y`` upwards."""
    ys = torch.arange(half_h, -half_h - 1, -1, dtype=torch.float64)
    xs = torch.arange(-half_w, half_w + 1, dtype=torch.float64)
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return x, y


def _rotate(x: torch.Tensor, y: torch.Tensor, angle: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates along (``u``) and across (``v``) the direction ``angle``."""
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return x * c + y * s, -x * s + y * c


def _normalise(kernel: torch.Tensor) -> torch.Tensor:
    return (kernel / kernel.sum()).to(torch.float32)


def _trim(kernel: torch.Tensor) -> torch.Tensor:
    """Drop all-zero outer rows/columns symmetrically, so the centre stays the centre."""
    rows = torch.nonzero(kernel.sum(1)).flatten()
    cols = torch.nonzero(kernel.sum(0)).flatten()
    mid_r, mid_c = kernel.shape[0] // 2, kernel.shape[1] // 2
    half_r = int((rows - mid_r).abs().max())
    half_c = int((cols - mid_c).abs().max())
    return kernel[mid_r - half_r : mid_r + half_r + 1, mid_c - half_c : mid_c + half_c + 1]


def gaussian_kernel(size: int, sigma_u: float, sigma_v: float, angle: float = 0.0) -> torch.Tensor:
    """Sampled 2-D Gaussian ``exp(-(u²/σu² + v²/σv²)/2)`` on a ``size × size`` grid.

    ``u`` runs along ``angle`` and ``v`` across it, so ``σu ≠ σv`` gives the rotated anisotropic
    kernels of the Real-ESRGAN / BSRGAN pipelines and ``σu = σv`` the isotropic one.
    """
    half = size // 2
    u, v = _rotate(*_offsets(half, half), angle)
    return _normalise(torch.exp(-0.5 * ((u / sigma_u) ** 2 + (v / sigma_v) ** 2)))


def disk_kernel(radius: float) -> torch.Tensor:
    """Anti-aliased disk: each tap is ``clip(radius + ½ − distance, 0, 1)``.

    A defocused lens images a point as a uniform disk (the aperture's shape); the half-pixel ramp
    at the rim approximates the fraction of each pixel the disk covers, so the blur grows smoothly
    with ``radius`` instead of jumping at integer radii.
    """
    half = max(0, math.ceil(radius + 0.5) - 1)
    x, y = _offsets(half, half)
    return _normalise((radius + 0.5 - torch.hypot(x, y)).clamp(0, 1))


def line_kernel(length: float, angle: float) -> torch.Tensor:
    """Anti-aliased straight segment of ``length`` pixels through the centre, at ``angle``.

    Uniform linear motion during the exposure smears each point along a segment. Each tap is
    ``max(0, 1 − |v|) · clip(length/2 + ½ − |u|, 0, 1)``: a one-pixel tent across the segment and
    a fractional end cap, so a horizontal line's taps sum to exactly ``length`` before
    normalising and sub-pixel angles and lengths change the kernel smoothly.
    """
    half = math.ceil(length / 2) + 1
    u, v = _rotate(*_offsets(half, half), angle)
    across = (1 - v.abs()).clamp(min=0)
    along = (length / 2 + 0.5 - u.abs()).clamp(0, 1)
    kernel = across * along
    # Rounding in the rotation leaves ~1e-17 crumbs on grid-aligned lines; they are not taps.
    return _normalise(_trim(torch.where(kernel > 1e-9, kernel, 0.0)))


def convolve(image: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Convolve every channel of ``image`` [B,C,H,W] with one odd-sized ``kernel`` [kh,kw].

    Borders are reflect-padded (replicate when the image is smaller than the kernel), which keeps
    edges free of the dark frame a zero pad would blur in. Small kernels use a depthwise
    ``conv2d``; large ones multiply spectra of the padded image (see ``DIRECT_MAX_TAPS``). The
    result is computed in float32 and returned in the image's dtype.
    """
    kh, kw = kernel.shape
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"kernel sides must be odd, got {kh}×{kw}")
    ph, pw = kh // 2, kw // 2
    height, width = image.shape[-2:]
    mode = "reflect" if ph < height and pw < width else "replicate"
    x = image.float()
    padded = F.pad(x, (pw, pw, ph, ph), mode=mode)
    kernel = kernel.to(x.device, torch.float32)
    if kh * kw <= DIRECT_MAX_TAPS:
        channels = x.shape[1]
        # conv2d correlates; flipping turns it into a convolution (a no-op for symmetric PSFs).
        weight = kernel.flip(0, 1).expand(channels, 1, kh, kw)
        out = F.conv2d(padded, weight, groups=channels)
    else:
        out = _fft_convolve(padded, kernel)[..., ph : ph + height, pw : pw + width]
    return out.to(image.dtype)


def _fft_size(n: int) -> int:
    """Smallest ``2^a·3^b·5^c ≥ n``: FFT lengths with large prime factors run 2–3× slower."""
    while True:
        m = n
        for prime in (2, 3, 5):
            while m % prime == 0:
                m //= prime
        if m == 1:
            return n
        n += 1


def _fft_convolve(padded: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Convolution of ``padded`` with ``kernel`` (centred at the origin) through the FFT.

    Circular on a zero-extended grid: output pixel ``i`` reads input ``i − half … i + half``, so
    pixels at least ``half`` away from the start never wrap and the caller's centre crop equals
    the linear convolution.
    """
    kh, kw = kernel.shape
    size = (_fft_size(padded.shape[-2]), _fft_size(padded.shape[-1]))
    spread = torch.zeros(size, device=padded.device, dtype=torch.float32)
    spread[:kh, :kw] = kernel
    spread = spread.roll((-(kh // 2), -(kw // 2)), dims=(0, 1))
    spectrum = torch.fft.rfft2(padded, s=size) * torch.fft.rfft2(spread)
    return torch.fft.irfft2(spectrum, s=size)
