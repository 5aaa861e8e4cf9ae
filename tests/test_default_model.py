"""The shipped default model: registered, verified, small, and it actually restores."""

from __future__ import annotations

import numpy as np
import torch

from restore_cli.degradations import DEGRADATIONS
from restore_cli.engine import Engine, EngineOptions
from restore_cli.models.loading import load_model
from restore_cli.models.registry import apply_sampling
from restore_cli.weights import (
    default_entry,
    entry_status,
    load_weights_registry,
    shipped_path,
)

MAX_FILE_BYTES = 15 * 2**20


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a.astype(np.float64) - b) ** 2)))


def test_default_is_shipped_small_and_verified():
    entry = default_entry()
    assert entry is not None and entry.file is not None
    assert entry_status(entry) == "shipped"
    assert shipped_path(entry).stat().st_size <= MAX_FILE_BYTES
    loaded = load_model(entry.name)  # verifies the sha256
    # compact enough for a 2-core CPU user (the developers' guide: about 1 M parameters run per
    # pixel; UniRestorer's 29 experts share one 1.26 M backbone, plus a 0.42 M encoder)
    assert sum(p.numel() for p in loaded.module.parameters()) < 3_000_000


def test_default_model_removes_noise_from_a_photo_like_image():
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:192, 0:192] / 192
    clean = np.stack([0.5 + 0.3 * np.sin(7 * x), 0.3 + 0.5 * y, 0.4 + 0.3 * (x > 0.6)], -1)
    clean = np.clip(clean + 0.02 * rng.standard_normal(clean.shape), 0, 1).astype(np.float32)
    tensor = torch.from_numpy(clean).permute(2, 0, 1)[None]
    noisy = DEGRADATIONS["gaussian_noise"](
        tensor, {"sigma": 25.0}, torch.Generator().manual_seed(1)
    )
    noisy = noisy[0].permute(1, 2, 0).numpy()
    engine = Engine(load_model(default_entry().name), EngineOptions(device="cpu"))
    restored, _ = engine.restore(noisy)
    assert psnr(restored, clean) > psnr(noisy, clean) + 3.0


def test_every_shipped_model_is_verified_small_and_runs():
    """All weights inside the package: present, sha256-checked, ≤ 15 MiB each, ≤ 40 MiB in all
    (the tree travels to GPU machines), and each restores a small image through the engine."""
    shipped = [entry for entry in load_weights_registry().values() if entry.file is not None]
    assert {"unirestorer", "nafnet-allinone-s", "diffuir-t"} <= {e.name for e in shipped}
    sizes = [shipped_path(entry).stat().st_size for entry in shipped]
    assert max(sizes) <= MAX_FILE_BYTES and sum(sizes) <= 40 * 2**20
    image = np.random.default_rng(0).random((40, 48, 3), dtype=np.float32)
    for entry in shipped:
        assert entry_status(entry) == "shipped"
        loaded = load_model(entry.name)  # verifies the sha256
        assert loaded.spec.arch == entry.arch
        if loaded.spec.sampled:
            apply_sampling(loaded, 1, 7)  # one step keeps the test fast
        restored, _ = Engine(loaded, EngineOptions(device="cpu")).restore(image)
        assert restored.shape == image.shape and np.isfinite(restored).all(), entry.name
