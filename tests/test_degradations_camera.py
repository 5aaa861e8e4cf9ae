"""Camera-side degradations: noise, blur, JPEG and low light.

Checks the contract (seeded, shape/dtype/range, batches, level sampling) for every type and that
each one does what its name says on a synthetic natural-ish image (smooth gradients, hard edges
and fine texture).
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from restore_cli.degradations import blur, jpeg, lowlight, noise  # noqa: F401  (registers)
from restore_cli.degradations.base import DEGRADATIONS, LEVELS, Choice, Degradation, Param
from restore_cli.degradations.kernels import (
    convolve,
    disk_kernel,
    gaussian_kernel,
    line_kernel,
)
from restore_cli.degradations.noise import linear_to_srgb, srgb_to_linear

CAMERA = {
    "gaussian_noise": ("noise", "denoise"),
    "camera_noise": ("noise", "denoise"),
    "gaussian_blur": ("blur", "deblur"),
    "defocus_blur": ("blur", "deblur"),
    "motion_blur": ("blur", "deblur"),
    "jpeg": ("jpeg", "dejpeg"),
    "lowlight": ("lowlight", "lowlight"),
}
RANDOM = {"gaussian_noise", "camera_noise", "lowlight"}
BLURS = ("gaussian_blur", "defocus_blur", "motion_blur")


def synthetic_photo(size: int = 256) -> torch.Tensor:
    """[1,3,size,size] in [0.05,0.95]: colour ramps, a bright box, a dark disk, fine texture."""
    t = torch.linspace(0, 1, size)
    y, x = torch.meshgrid(t, t, indexing="ij")
    image = torch.stack([0.2 + 0.6 * x, 0.2 + 0.6 * y, 0.5 - 0.3 * (x - y)])
    box = (x > 0.15) & (x < 0.45) & (y > 0.55) & (y < 0.85)
    image = torch.where(box, image + 0.25, image)
    disk = (x - 0.7) ** 2 + (y - 0.3) ** 2 < 0.15**2
    image = torch.where(disk, image * 0.4, image)
    stripes = 0.08 * torch.sin(2 * math.pi * x * size / 5) * torch.sin(2 * math.pi * y * size / 7)
    image = image + torch.where((x > 0.55) & (y > 0.55), stripes, 0.0)
    grain = torch.rand((3, size, size), generator=torch.Generator().manual_seed(7))
    image = image + 0.04 * (grain - 0.5)
    return image.clamp(0.05, 0.95).unsqueeze(0)


def typical_params(degradation: Degradation, level: str, ood: bool = False) -> dict:
    return degradation.typical_params(level, ood)


def run(name: str, image: torch.Tensor, params: dict, seed: int = 0) -> torch.Tensor:
    return DEGRADATIONS[name](image, params, torch.Generator().manual_seed(seed))


def laplacian_energy(image: torch.Tensor) -> float:
    lap = (
        image[..., 1:-1, :-2]
        + image[..., 1:-1, 2:]
        + image[..., :-2, 1:-1]
        + image[..., 2:, 1:-1]
        - 4 * image[..., 1:-1, 1:-1]
    )
    return float((lap**2).mean())


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


def luminance(image: torch.Tensor) -> torch.Tensor:
    return 0.2126 * image[:, 0] + 0.7152 * image[:, 1] + 0.0722 * image[:, 2]


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    return synthetic_photo()


# --- contract ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CAMERA))
def test_registered_with_family_task_and_source(name):
    degradation = DEGRADATIONS[name]
    assert (degradation.family, degradation.task) == CAMERA[name]
    assert degradation.summary and degradation.source
    assert degradation.apply.__doc__


@pytest.mark.parametrize("name", sorted(CAMERA))
@pytest.mark.parametrize(("level", "ood"), [("light", False), ("heavy", False), ("medium", True)])
def test_seeded_shape_dtype_range_and_batch(name, level, ood):
    degradation = DEGRADATIONS[name]
    image = synthetic_photo(64).repeat(2, 1, 1, 1)
    image[1] = image[1].flip(-1)
    params = degradation.sample_params(level, np.random.default_rng(3), ood=ood)
    first = run(name, image, params, seed=11)
    again = run(name, image, params, seed=11)
    assert first.shape == image.shape and first.dtype == torch.float32
    assert float(first.min()) >= 0 and float(first.max()) <= 1
    assert first.numpy().tobytes() == again.numpy().tobytes()
    assert not torch.equal(first, image)
    other = run(name, image, params, seed=12)
    assert torch.equal(first, other) == (name not in RANDOM)
    if name in RANDOM:  # every item of the batch gets its own noise
        assert not torch.equal(first[0] - image[0], (first[1] - image[1]).flip(-1))
    else:  # deterministic types treat each item as if it were alone
        assert torch.allclose(first[1:], run(name, image[1:], params), atol=1e-6)


@pytest.mark.parametrize("name", sorted(CAMERA))
def test_same_bytes_with_any_thread_count(name):
    image = synthetic_photo(256).repeat(2, 1, 1, 1)
    params = typical_params(DEGRADATIONS[name], "heavy") | {"kind": "anisotropic"}
    threads = torch.get_num_threads()
    outputs = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            outputs.append(run(name, image, params, seed=5).numpy().tobytes())
    finally:
        torch.set_num_threads(threads)
    assert outputs[0] == outputs[1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(CAMERA))
def test_cuda_gives_the_cpu_result(name):
    """Random fields come from the CPU generator, so only float rounding may differ on CUDA."""
    image = synthetic_photo(128)
    params = typical_params(DEGRADATIONS[name], "heavy") | {"kind": "anisotropic"}
    on_cpu = run(name, image, params, seed=5)
    on_cuda = run(name, image.cuda(), params, seed=5).cpu()
    assert on_cuda.shape == on_cpu.shape and on_cuda.dtype == on_cpu.dtype
    # A one-ulp different Poisson rate can flip a rare draw, hence a fraction, not allclose.
    assert float(((on_cuda - on_cpu).abs() > 1e-3).float().mean()) < 1e-3


def _tolerance(param: Param) -> float:
    if not param.integer:
        return 1e-9
    return 1.0 if param.odd else 0.5


@pytest.mark.parametrize("name", sorted(CAMERA))
def test_level_sampling_respects_thirds_and_ood_is_beyond_heavy(name):
    degradation = DEGRADATIONS[name]
    rng = np.random.default_rng(0)
    draws = {
        (level, ood): [degradation.sample_params(level, rng, ood=ood) for _ in range(200)]
        for level in LEVELS
        for ood in (False, True)
    }
    for p in degradation.params:
        values = {key: [d[p.name] for d in ds] for key, ds in draws.items()}
        if isinstance(p, Choice):
            assert all(v in p.options for vs in values.values() for v in vs)
            assert set(values["medium", False]) == set(p.options)
            continue
        start, end = p.in_dist
        low, high = sorted(p.in_dist)
        tol = _tolerance(p)
        if not p.severity:
            assert all(low - tol <= v <= high + tol for vs in values.values() for v in vs)
            continue
        direction = 1 if end > start else -1
        for third, level in enumerate(LEVELS):
            # Position along light→heavy as a fraction of the in-distribution span.
            position = [(v - start) / (end - start) for v in values[level, False]]
            slack = tol / abs(end - start)
            assert min(position) >= third / 3 - slack, (p.name, level)
            assert max(position) <= (third + 1) / 3 + slack, (p.name, level)
            beyond = [direction * (v - end) for v in values[level, True]]
            assert min(beyond) >= -tol, (p.name, level, "ood")
        assert p.ood is not None
        assert all(direction * (v - p.ood[1]) <= tol for v in values["heavy", True])


def test_gaussian_blur_kernel_grows_with_sigma():
    assert blur.gaussian_kernel_size(0.5, 7) == 7
    assert blur.gaussian_kernel_size(2.9, 7) == 19
    assert blur.gaussian_kernel_size(5.0, 21) == 31
    assert blur.gaussian_kernel_size(9.0, 7) == 31


def test_kernels_are_normalised_centred_and_symmetric():
    for kernel in (
        gaussian_kernel(15, 2.0, 0.8, 30.0),
        disk_kernel(3.3),
        line_kernel(17.5, 63.0),
        line_kernel(9.0, 0.0),
    ):
        assert kernel.shape[0] % 2 == 1 and kernel.shape[1] % 2 == 1
        assert abs(float(kernel.sum()) - 1) < 1e-5
        assert torch.allclose(kernel, kernel.flip(0, 1), atol=1e-7)
    assert line_kernel(9.0, 0.0).shape == (1, 9)
    assert line_kernel(4.0, 90.0).flatten().tolist() == [0.125, 0.25, 0.25, 0.25, 0.125]


def test_fft_and_direct_convolution_agree(monkeypatch):
    image = synthetic_photo(48)
    kernel = line_kernel(11.0, 35.0)
    direct = convolve(image, kernel)
    from restore_cli.degradations import kernels

    monkeypatch.setattr(kernels, "DIRECT_MAX_TAPS", 10**9)
    assert torch.allclose(convolve(image, kernel), direct, atol=1e-5)
    monkeypatch.setattr(kernels, "DIRECT_MAX_TAPS", 0)
    assert torch.allclose(convolve(image, kernel), direct, atol=1e-5)
    # An image smaller than the kernel still works (replicate padding).
    assert convolve(image[..., :8, :8], line_kernel(25.0, 0.0)).shape == (1, 3, 8, 8)


def test_srgb_round_trip():
    x = torch.linspace(0, 1, 1001)
    assert torch.allclose(linear_to_srgb(srgb_to_linear(x)), x, atol=1e-6)
    assert abs(float(srgb_to_linear(torch.tensor(0.5))) - 0.21404) < 1e-4


# --- direction of effect -------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [5.0, 15.0, 25.0])
def test_gaussian_noise_std_matches_sigma(sigma):
    grey = torch.full((1, 3, 256, 256), 0.5)
    out = run("gaussian_noise", grey, {"sigma": sigma})
    assert abs(float((out - grey).std()) / (sigma / 255) - 1) < 0.05
    assert abs(float((out - grey).mean())) < 0.1 * sigma / 255


def test_camera_noise_variance_grows_with_brightness_in_linear_light():
    photons, read_sigma = 400.0, 0.01
    variances = []
    for linear_level in (0.1, 0.4, 0.8):
        patch = linear_to_srgb(torch.full((1, 3, 128, 128), linear_level))
        out = run("camera_noise", patch, {"photons": photons, "read_sigma": read_sigma})
        variance = float((srgb_to_linear(out) - linear_level).var())
        expected = linear_level / photons + read_sigma**2
        assert abs(variance / expected - 1) < 0.1, (linear_level, variance, expected)
        variances.append(variance)
    assert variances == sorted(variances)


@pytest.mark.parametrize("name", BLURS)
@pytest.mark.parametrize("kind", ["isotropic", "anisotropic"])
def test_blur_removes_high_frequencies_more_when_heavier(name, kind, photo):
    if name != "gaussian_blur" and kind == "anisotropic":
        pytest.skip("only Gaussian blur has kinds")
    energy = {"clean": laplacian_energy(photo)}
    for level in ("light", "heavy"):
        params = typical_params(DEGRADATIONS[name], level) | {"kind": kind}
        energy[level] = laplacian_energy(run(name, photo, params))
    assert energy["clean"] > 1.2 * energy["light"] > 1.2 * energy["heavy"], energy


def block_edge_ratio(image: torch.Tensor) -> float:
    """Mean |jump| between pixels 8k−1 and 8k over the mean |jump| inside 8×8 blocks."""
    jumps = (image[..., :, 1:] - image[..., :, :-1]).abs().mean(dim=(0, 1, 2))
    jumps = jumps + (image[..., 1:, :] - image[..., :-1, :]).abs().mean(dim=(0, 1, 3))
    within = torch.cat([jumps[i::8] for i in range(7)])
    return float(jumps[7::8].mean() / within.mean())


def test_jpeg_makes_8x8_blocks(photo):
    ratios = [block_edge_ratio(run("jpeg", photo, {"quality": q})) for q in (50, 20, 5)]
    assert block_edge_ratio(photo) < 1.1
    assert ratios[1] > 2, ratios
    assert ratios == sorted(ratios), ratios


def test_jpeg_lower_quality_lowers_psnr(photo):
    scores = [psnr(run("jpeg", photo, {"quality": q}), photo) for q in (90, 50, 20, 5)]
    assert scores == sorted(scores, reverse=True), scores
    assert scores[0] > 35


def test_lowlight_darkens_more_when_heavier(photo):
    means = {"clean": float(luminance(photo).mean())}
    for level in ("light", "heavy"):
        params = typical_params(DEGRADATIONS["lowlight"], level)
        means[level] = float(luminance(run("lowlight", photo, params)).mean())
    assert means["clean"] > 1.2 * means["light"] > 1.2 * means["heavy"], means


# --- speed ---------------------------------------------------------------------------------


def test_speed_report_512():
    """Pairs per second at 512×512 with heavy in-distribution params (printed, not asserted)."""
    image = synthetic_photo(512)
    report = []
    for name in sorted(CAMERA):
        params = typical_params(DEGRADATIONS[name], "heavy")
        generator = torch.Generator().manual_seed(0)
        DEGRADATIONS[name](image, params, generator)  # warm-up
        repeats = 5
        start = time.perf_counter()
        for _ in range(repeats):
            DEGRADATIONS[name](image, params, generator)
        report.append(f"{name}: {repeats / (time.perf_counter() - start):.1f} pairs/s")
    print(f"\n512×512 on {torch.get_num_threads()} threads: " + "; ".join(report))
