"""PSNR/SSIM against scikit-image, the Y conversion, and the offline pyiqa bridge."""

from __future__ import annotations

import math
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from restore_cli.errors import ConfigError
from restore_cli.metrics import (
    Convention,
    MetricUnavailable,
    iqa,
    load_iqa_metric,
    psnr,
    rgb_to_y,
    ssim,
)
from restore_cli.metrics.psnr_ssim import (
    _filter_valid_opencv,
    _filter_valid_torch,
    gaussian_filter_valid,
    gaussian_window_1d,
    prepare,
    quantize,
)

skmetrics = pytest.importorskip("skimage.metrics")
skcolor = pytest.importorskip("skimage.color")

SSIM_REFERENCE = {
    "gaussian_weights": True,
    "sigma": 1.5,
    "use_sample_covariance": False,
    "data_range": 255,
}


def pair_batch(seed: int, height: int, width: int, batch: int = 2, noise: float = 0.04):
    """Float images off the 8-bit grid (so rounding matters) and noisy copies."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([0.5 + 0.4 * np.sin(7 * x), 0.3 + 0.5 * y, 0.2 + 0.6 * (x > 0.4)], 0)
    clean = np.clip(base[None] + 0.05 * rng.standard_normal((batch, 3, height, width)), 0, 1)
    noisy = np.clip(clean + noise * rng.standard_normal(clean.shape), 0, 1)
    return torch.from_numpy(noisy).float(), torch.from_numpy(clean).float()


def reference_arrays(images: torch.Tensor, convention: Convention) -> list[np.ndarray]:
    """The documented convention, done independently: uint8 HWC (BasicSR's tensor2img: float32
    clip, ×255, round) → crop → scikit-image's Y."""
    arrays = []
    for image in images:
        rgb = np.round(np.clip(image.permute(1, 2, 0).float().numpy(), 0, 1) * np.float32(255))
        rgb = rgb.astype(np.uint8)
        border = convention.crop_border
        if border:
            rgb = rgb[border:-border, border:-border]
        if convention.color == "y":
            arrays.append(skcolor.rgb2ycbcr(rgb)[..., 0])  # BT.601, 16..235 on 0-255
        else:
            arrays.append(rgb.astype(np.float64))
    return arrays


@pytest.mark.parametrize(
    ("convention", "size"),
    [
        (Convention("rgb", 0), (48, 64)),
        (Convention("y", 0), (48, 64)),
        (Convention("rgb", 4), (37, 53)),  # odd sizes
        (Convention("y", 4), (37, 53)),
        (Convention("y", 0), (11, 11)),  # the smallest SSIM window
        (Convention("rgb", 3), (17, 29)),
    ],
)
def test_psnr_and_ssim_match_scikit_image(convention: Convention, size: tuple[int, int]) -> None:
    pred, gt = pair_batch(sum(size), *size)
    ours_psnr, ours_ssim = psnr(pred, gt, convention), ssim(pred, gt, convention)
    for index, (p, g) in enumerate(
        zip(reference_arrays(pred, convention), reference_arrays(gt, convention), strict=True)
    ):
        expected_psnr = skmetrics.peak_signal_noise_ratio(g, p, data_range=255)
        channel_axis = -1 if convention.color == "rgb" else None
        expected_ssim = skmetrics.structural_similarity(
            g, p, channel_axis=channel_axis, **SSIM_REFERENCE
        )
        assert ours_psnr[index].item() == pytest.approx(expected_psnr, abs=1e-4)
        assert ours_ssim[index].item() == pytest.approx(expected_ssim, abs=1e-5)


def test_y_channel_is_bt601_limited_range() -> None:
    rgb = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.2, 0.5, 0.9]])
    images = (rgb * 255).T.reshape(1, 3, 4, 1).double()
    ours = rgb_to_y(images).flatten().numpy()
    expected = skcolor.rgb2ycbcr(rgb.numpy().reshape(4, 1, 3))[..., 0].flatten()
    np.testing.assert_allclose(ours, expected, atol=1e-9)
    assert ours[0] == pytest.approx(16.0) and ours[1] == pytest.approx(235.0)


def test_predictions_and_gt_are_rounded_to_8_bits_first() -> None:
    gt = torch.full((1, 3, 16, 16), 100 / 255)
    nudged = gt + 0.3 / 255  # rounds back to 100
    assert math.isinf(psnr(nudged, gt).item())
    assert ssim(nudged, gt).item() == pytest.approx(1.0)
    assert quantize(torch.tensor([-0.1, 1.2, 0.5])).tolist() == [0.0, 255.0, 128.0]


def test_identical_images_give_inf_psnr_and_ssim_one() -> None:
    _, gt = pair_batch(1, 24, 24)
    for convention in (Convention("rgb"), Convention("y", 2)):
        assert torch.isinf(psnr(gt, gt, convention)).all()
        np.testing.assert_allclose(ssim(gt, gt, convention).numpy(), 1.0, atol=1e-12)


def test_sixteen_bit_values_are_scored_on_the_8_bit_scale() -> None:
    levels = torch.arange(0, 65536, 257, dtype=torch.float64)[:64]  # exactly the 8-bit levels
    image = (levels / 65535).float().reshape(1, 1, 8, 8).expand(1, 3, 8, 8)
    assert torch.equal(
        prepare(image, Convention()), (levels / 257).reshape(1, 1, 8, 8).expand(1, 3, 8, 8)
    )


def test_column_names_state_the_convention() -> None:
    assert Convention("y", 4).column("psnr") == "psnr_y_bt601_crop4_uint8"
    assert Convention("rgb", 0).column("ssim") == "ssim_rgb_crop0_uint8"
    with pytest.raises(ConfigError, match="--color"):
        Convention("lab")
    with pytest.raises(ConfigError, match="--crop-border"):
        Convention("rgb", -1)


def test_too_small_images_raise_clear_errors() -> None:
    pred, gt = pair_batch(3, 10, 20)
    with pytest.raises(ValueError, match="smaller than the 11x11 SSIM window"):
        ssim(pred, gt)
    with pytest.raises(ValueError, match="too small for --crop-border 5"):
        psnr(pred, gt, Convention("rgb", 5))
    with pytest.raises(ValueError, match="shape mismatch"):
        psnr(pred, gt[..., :19])


def test_cuda_code_path_equals_the_opencv_path() -> None:
    """The conv2d branch used on CUDA, run on CPU tensors, against the CPU (OpenCV) branch."""
    images = quantize(pair_batch(5, 23, 31)[0])
    expected = _filter_valid_opencv(images)
    assert expected.shape == (2, 3, 13, 21)
    torch.testing.assert_close(_filter_valid_torch(images), expected)
    torch.testing.assert_close(gaussian_filter_valid(images), expected)
    window = gaussian_window_1d()
    assert window.shape == (11,) and window.sum() == pytest.approx(1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_and_cpu_scores_agree() -> None:
    pred, gt = pair_batch(9, 64, 48, batch=4)
    convention = Convention("y", 2)
    torch.testing.assert_close(
        ssim(pred.cuda(), gt.cuda(), convention).cpu(), ssim(pred, gt, convention)
    )
    torch.testing.assert_close(
        psnr(pred.cuda(), gt.cuda(), convention).cpu(), psnr(pred, gt, convention)
    )


# ----------------------------------------------------------------------------- pyiqa bridge


def isolate_torch_home(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point torch.hub (and pyiqa, which fixes its folder at import) at ``folder``/hub."""
    monkeypatch.setenv("TORCH_HOME", str(folder))
    loaded = sys.modules.get("pyiqa.utils.download_util")
    if loaded is not None:
        monkeypatch.setattr(loaded, "DEFAULT_CACHE_DIR", str(folder / "hub" / "pyiqa"))
    return folder / "hub"


@pytest.fixture
def empty_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return isolate_torch_home(tmp_path / "torch", monkeypatch)


def test_missing_weights_fail_with_one_line_naming_file_url_and_folder(empty_torch_home):
    with pytest.raises(MetricUnavailable) as caught:
        load_iqa_metric("niqe")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("niqe: weights not in the cache")
    assert "niqe_modelparameters.mat" in message
    assert iqa.PYIQA_URL + "niqe_modelparameters.mat" in message
    assert str(empty_torch_home / "pyiqa") in message


def test_every_missing_file_is_listed(empty_torch_home):
    with pytest.raises(MetricUnavailable) as caught:
        load_iqa_metric("lpips")
    message = str(caught.value)
    assert "LPIPS_v0.1_alex-df73285e.pth" in message and "alexnet-owt-7be5be79.pth" in message
    assert str(empty_torch_home / "checkpoints") in message
    # Once the files are there the check passes (whatever pyiqa then makes of them).
    for file in iqa.WEIGHT_FILES["niqe"]:
        target = file.path()
        assert target is not None
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"x")
    assert iqa.missing_weight_files("niqe") == []


def test_set_level_metrics_are_refused() -> None:
    with pytest.raises(MetricUnavailable, match="set-level"):
        load_iqa_metric("fid")


def test_network_is_refused_while_metrics_are_built(tmp_path: Path) -> None:
    original_download = torch.hub.download_url_to_file
    original_urlopen = urllib.request.urlopen
    with iqa.network_refused():
        with pytest.raises(iqa.DownloadRefused, match=r"never downloads.*→ put it at"):
            torch.hub.download_url_to_file("https://example.invalid/w.pth", str(tmp_path / "w"))
        with pytest.raises(iqa.DownloadRefused):
            urllib.request.urlopen("https://example.invalid/clip.pt")
    assert torch.hub.download_url_to_file is original_download
    assert urllib.request.urlopen is original_urlopen
    assert not (tmp_path / "w").exists()


def test_metric_modes_are_known_without_importing_pyiqa() -> None:
    assert iqa.metric_mode("niqe", {}) == "NR"
    assert iqa.metric_mode("lpips", {}) == "FR"
    assert iqa.metric_mode("gmsd", {}) == "FR"  # unknown without pyiqa: assume it needs GT
    with pytest.raises(ConfigError, match="unknown metric 'no-such-metric'"):
        iqa.metric_mode("no-such-metric", {"psnr": "FR"})


requires_pyiqa = pytest.mark.skipif(not iqa.pyiqa_available(), reason="pyiqa not installed")


@requires_pyiqa
def test_weight_table_matches_what_pyiqa_downloads(empty_torch_home):
    """The first file pyiqa would fetch for a tabled metric is one the table names."""
    import pyiqa

    for name in ("niqe", "lpips", "musiq", "dists"):
        with pytest.raises(iqa.DownloadRefused) as caught, iqa.network_refused(), iqa._quiet():
            pyiqa.create_metric(name, device="cpu")
        names = {file.name for file in iqa.WEIGHT_FILES[name]}
        assert caught.value.destination is not None
        assert caught.value.destination.name in names, name


@requires_pyiqa
def test_weightless_pyiqa_metric_scores_each_image() -> None:
    metric = load_iqa_metric("gmsd")
    assert metric.full_reference and metric.lower_better
    pred, gt = pair_batch(4, 32, 32, batch=3)
    values = metric(pred, gt)
    assert values.shape == (3,) and values.dtype == torch.float64
    assert metric(gt, gt).abs().max().item() < 1e-6
