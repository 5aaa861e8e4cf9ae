"""NAFNet and NAFNetLocal (TLSC) against the shared parity fixtures.

The fixtures live in ``shared/parity/nafnet`` beside the repository; tests that need them are
skipped with that reason when it is absent. The SIDD releases are plain NAFNet (``nafnet``); the
GoPro/REDS releases are NAFNetLocal (``nafnet-local``): same keys, local pooling at run time.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from restore_cli import weights
from restore_cli.errors import ModelError
from restore_cli.models.loading import load_model, strict_load, unwrap_checkpoint
from restore_cli.models.nafnet import (
    CONFIG_KEYS,
    LocalMeanPool2d,
    detect_nafnet,
    tlsc_kernel_sizes,
)
from restore_cli.models.registry import detect_architecture, get_architecture
from restore_cli.weights import sha256_file
from tests.parity import PARITY_ROOT, config_params, full_configs, load_check_fixture

FIXTURE_DIR = PARITY_ROOT / "nafnet"
MISSING_REASON = f"NAFNet parity fixtures not found at {FIXTURE_DIR}"
needs_fixtures = pytest.mark.skipif(not FIXTURE_DIR.is_dir(), reason=MISSING_REASON)

# Which of our architectures runs each official class.
ARCH_OF_CLASS = {"NAFNet": "nafnet", "NAFNetLocal": "nafnet-local"}
SMALL_CONFIG: dict[str, Any] = {
    "img_channel": 3,
    "width": 8,
    "enc_blk_nums": [1, 1, 1, 2],
    "middle_blk_num": 1,
    "dec_blk_nums": [1, 1, 1, 1],
}


def _full_configs() -> dict[str, Any]:
    return full_configs(FIXTURE_DIR)


def _config_params() -> list[Any]:
    return config_params(FIXTURE_DIR, MISSING_REASON)


@pytest.fixture(scope="module")
def check_fixture() -> ModuleType:
    return load_check_fixture()


def _nafnet_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config["constructor_kwargs"].items() if k in CONFIG_KEYS}


def _randomised(module: nn.Module, seed: int = 0) -> nn.Module:
    """Zero-initialised scales (beta, gamma) randomised so every block changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return module.eval()


# ----------------------------------------------------------------------------- official layouts


@needs_fixtures
@pytest.mark.parametrize("config_name", _config_params())
def test_official_checkpoint_layout_loads_strictly(
    config_name: str, check_fixture: ModuleType
) -> None:
    """Key names, order and shapes of every release (SIDD: nafnet, GoPro/REDS: nafnet-local with
    its official train_size/fast_imp); the ``params`` wrapping unwraps and passes our strict load
    (on the meta device, so the 116 M-parameter configs cost no memory)."""
    config = _full_configs()[config_name]
    arch = get_architecture(ARCH_OF_CLASS[config["official_class"]])
    kwargs = config["constructor_kwargs"]
    with torch.device("meta"):
        module = arch.build(kwargs)
        official = {k: torch.empty(shape) for k, (shape, _dtype) in config["state_dict"].items()}
    check_fixture.check_full_shapes(module, str(FIXTURE_DIR), config_name, check_order=True)

    state_dict = unwrap_checkpoint({"params": official})  # the release's wrapping
    strict_load(module, state_dict, Path(config["checkpoint_file"]), arch.name)
    # Keys cannot tell NAFNetLocal from NAFNet: detection finds the plain network's config and
    # nafnet-local is chosen by name only.
    assert detect_nafnet(state_dict) == _nafnet_kwargs(config)
    detected = detect_architecture(state_dict)
    assert detected is not None and detected[0].name == "nafnet"
    assert get_architecture("nafnet-local").detect(state_dict) is None

    spec = arch.spec(kwargs)
    assert spec.arch == arch.name
    assert spec.size_multiple == 2 ** len(kwargs["enc_blk_nums"])


@needs_fixtures
def test_gopro_release_pools_over_1_5x_the_training_features() -> None:
    """GoPro/REDS (train 256): level-0 pools 384, the 28-block level-3 stage 48, middle 24."""
    kwargs = _full_configs()["NAFNet-GoPro-width64"]["constructor_kwargs"]
    kernels = tlsc_kernel_sizes(kwargs, kwargs["train_size"])
    assert kernels["encoders.0.0.sca.0"] == (384, 384)
    assert {kernels[f"encoders.3.{i}.sca.0"] for i in range(28)} == {(48, 48)}
    assert kernels["middle_blks.0.sca.0"] == (24, 24)
    assert kernels["decoders.3.0.sca.0"] == (384, 384)
    assert len(kernels) == 28 + 3 + 1 + 4


# ----------------------------------------------------------------------------- tiny fixtures


@needs_fixtures
def test_tiny_fixture_matches_official_outputs(check_fixture: ModuleType) -> None:
    """Both checks: plain NAFNet and NAFNetLocal with train_size 16 (local path at 48×64)."""

    def factory(check: dict[str, Any]) -> torch.nn.Module | None:
        arch = ARCH_OF_CLASS.get(check["module"])
        return get_architecture(arch).build(check["constructor_kwargs"]) if arch else None

    results = check_fixture.run_checks(str(FIXTURE_DIR), factory, verbose=False)
    assert [r["check"] for r in results] == ["nafnet", "nafnet_local"]
    for result in results:
        assert result["max_abs_diff"] <= result["tolerance"]

    # The fixture really exercises TLSC: local and global outputs differ far beyond tolerance.
    io = check_fixture.load_io(str(FIXTURE_DIR))
    tolerance = results[1]["tolerance"]
    assert float((io["output_local"] - io["output"]).abs().max()) > 10 * tolerance


@needs_fixtures
def test_tlsc_kernels_match_the_fixture() -> None:
    tiny = json.loads((FIXTURE_DIR / "tiny.json").read_text())
    local = tiny["local_variant"]
    kernels = tlsc_kernel_sizes(tiny["constructor_kwargs"], local["extra_kwargs"]["train_size"])
    assert kernels == {path: tuple(size) for path, size in local["kernel_sizes"].items()}
    module = get_architecture("nafnet-local").build(
        {**tiny["constructor_kwargs"], **local["extra_kwargs"]}
    )
    installed = {
        name: m.kernel_size for name, m in module.named_modules() if isinstance(m, LocalMeanPool2d)
    }
    assert installed == kernels


@needs_fixtures
def test_tiny_fixture_through_load_model(check_fixture: ModuleType) -> None:
    """The whole path a user takes: file → detection → strict load → same numbers."""
    tiny = json.loads((FIXTURE_DIR / "tiny.json").read_text())
    weights_path = FIXTURE_DIR / tiny["weights_file"]
    assert sha256_file(weights_path) == tiny["weights_sha256"]

    loaded = load_model(weights_path)
    assert loaded.spec.arch == "nafnet"
    assert loaded.spec.size_multiple == 2 ** len(tiny["constructor_kwargs"]["enc_blk_nums"])
    io = check_fixture.load_io(str(FIXTURE_DIR))
    with torch.no_grad():
        output = loaded(io["input"])
    check_fixture.compare(output, io["output"], tiny["tolerance"]["max_abs"])


@needs_fixtures
def test_weights_yaml_entry_selects_nafnet_local(
    check_fixture: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``arch: nafnet-local`` in weights.yaml (how the GoPro/REDS releases are chosen) gives the
    official NAFNetLocal output from the same weights file."""
    tiny = json.loads((FIXTURE_DIR / "tiny.json").read_text())
    weights_path = FIXTURE_DIR / tiny["weights_file"]
    entry = {
        "name": "tiny-nafnet-local",
        "arch": "nafnet-local",
        "config": {**tiny["constructor_kwargs"], **tiny["local_variant"]["extra_kwargs"]},
        "url": weights_path.as_uri(),
        "sha256": hashlib.sha256(weights_path.read_bytes()).hexdigest(),
        "tasks": ["deblur"],
        "licence": "MIT (test)",
        "source": "shared parity fixture",
        "description": "tiny NAFNetLocal",
    }
    registry = tmp_path / "weights.yaml"
    registry.write_text(yaml.safe_dump({"models": [entry]}), encoding="utf-8")
    monkeypatch.setattr(weights, "DEFAULT_REGISTRY_PATH", registry)
    monkeypatch.setenv("RESTORE_CLI_CACHE", str(tmp_path / "cache"))

    loaded = load_model("tiny-nafnet-local")
    assert loaded.spec.arch == "nafnet-local"
    io = check_fixture.load_io(str(FIXTURE_DIR))
    with torch.no_grad():
        output = loaded(io["input"])
    check_fixture.compare(output, io["output_local"], tiny["tolerance"]["max_abs"])


# ----------------------------------------------------------------------------- without fixtures


@pytest.mark.parametrize("train_size", [(1, 3, 256, 256), (1, 3, 100, 90), (48, 40)])
def test_tlsc_kernels_equal_an_official_style_dummy_forward(train_size: tuple[int, ...]) -> None:
    """Our closed-form kernels = feature size seen by each pool during a forward at train_size
    (NAFNet zero-pads to 16 first) × int(1.5·H) // H — what the official constructor measures."""
    config = {**SMALL_CONFIG, "enc_blk_nums": [1, 1, 1, 28], "width": 4}
    module = get_architecture("nafnet").build(config).eval()
    seen: dict[str, tuple[int, int]] = {}

    def record(name: str) -> Any:
        def hook(_module: nn.Module, args: tuple[torch.Tensor]) -> None:
            seen[name] = (args[0].shape[-2], args[0].shape[-1])

        return hook

    for name, pool in module.named_modules():
        if isinstance(pool, nn.AdaptiveAvgPool2d):
            pool.register_forward_pre_hook(record(name))
    train_h, train_w = train_size[-2:]
    with torch.no_grad():
        module(torch.rand(1, 3, train_h, train_w))
    base_h, base_w = int(1.5 * train_h), int(1.5 * train_w)
    measured = {
        name: (h * base_h // train_h, w * base_w // train_w) for name, (h, w) in seen.items()
    }
    assert tlsc_kernel_sizes(config, train_size) == measured


def test_local_pool_is_the_box_mean_with_replicate_border() -> None:
    x = torch.randn(2, 3, 13, 17, dtype=torch.float64)
    pool = LocalMeanPool2d((5, 8))
    box = F.avg_pool2d(x, (5, 8), stride=1)  # every 5×8 window inside the map
    expected = F.pad(box, (3, 4, 2, 2), mode="replicate")
    torch.testing.assert_close(pool(x), expected)
    # kernel larger than one side only: full-height boxes sliding horizontally
    full_height = F.pad(F.avg_pool2d(x, (13, 8), stride=1), (3, 4, 6, 6), mode="replicate")
    torch.testing.assert_close(LocalMeanPool2d((20, 8))(x), full_height)
    # kernel covering the whole map: the global mean, as in plain NAFNet
    torch.testing.assert_close(LocalMeanPool2d((13, 17))(x), x.mean(dim=(-2, -1), keepdim=True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_local_pool_stays_accurate_in_half_precision(dtype: torch.dtype) -> None:
    """A 512×512 running sum overflows fp16 and loses bf16's precision; ours accumulates in fp32."""
    x = torch.rand(1, 2, 512, 512) + 1.0
    reference = LocalMeanPool2d((96, 96))(x)
    result = LocalMeanPool2d((96, 96))(x.to(dtype))
    assert result.dtype == dtype
    assert torch.isfinite(result).all()
    assert float((result.float() - reference).abs().max()) < 0.02


def test_nafnet_local_equals_nafnet_while_the_kernel_covers_the_image() -> None:
    """Up to 1.5× the training crop the local pools are global means: same output as NAFNet."""
    plain = _randomised(get_architecture("nafnet").build(SMALL_CONFIG))
    local = get_architecture("nafnet-local").build({**SMALL_CONFIG, "train_size": [1, 3, 32, 32]})
    local.load_state_dict(plain.state_dict(), strict=True)
    local.eval()
    x = torch.rand(1, 3, 48, 48)
    larger = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(local(x), plain(x))
        assert float((local(larger) - plain(larger)).abs().max()) > 1e-4


def test_nafnet_local_configs_are_checked() -> None:
    local = get_architecture("nafnet-local")
    with pytest.raises(ModelError, match="fast_imp"):
        local.build({**SMALL_CONFIG, "fast_imp": True})
    with pytest.raises(ModelError, match="train_size"):
        local.build({**SMALL_CONFIG, "train_size": [256]})
    with pytest.raises(ModelError, match="unknown keys"):
        local.build({**SMALL_CONFIG, "base_size": 384})
    with pytest.raises(ModelError, match="nafnet-local"):
        get_architecture("nafnet").build({**SMALL_CONFIG, "train_size": [1, 3, 256, 256]})
    spec = local.spec({**SMALL_CONFIG, "train_size": [1, 3, 256, 256], "fast_imp": False})
    assert (spec.arch, spec.size_multiple, spec.supports_half, spec.supports_bf16) == (
        "nafnet-local",
        16,
        True,
        True,
    )
    assert local.detect(_randomised(local.build(SMALL_CONFIG)).state_dict()) is None


@pytest.mark.filterwarnings("ignore:'saved_variables' is deprecated")  # spandrel's backward
def test_fused_layer_norms_keep_the_parameters_and_the_numbers() -> None:
    """Our NAFNet is spandrel's with its LayerNorm2d swapped for the fused kernel: the same
    state dict (keys and tensors), the same output as spandrel's own module, forward and back."""
    from spandrel.architectures.NAFNet import NAFNet

    config = {"width": 8, "enc_blk_nums": [1, 1], "middle_blk_num": 1, "dec_blk_nums": [1, 1]}
    torch.manual_seed(0)
    reference = NAFNet(img_channel=3, **config)
    for parameter in reference.parameters():  # not the init's ones and zeros
        nn.init.normal_(parameter, std=0.1)
    ours = get_architecture("nafnet").build({"img_channel": 3, **config})
    strict_load(ours, reference.state_dict(), Path("reference"), "nafnet")
    assert ours.state_dict().keys() == reference.state_dict().keys()
    norms = [type(m).__module__ for m in ours.modules() if type(m).__name__ == "LayerNorm2d"]
    assert norms and set(norms) == {"restore_cli.models.nafnet"}
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    expected, got = reference(x), ours(x)
    assert torch.allclose(got, expected, atol=1e-5)
    (grad_ref,) = torch.autograd.grad(expected.square().sum(), x)
    (grad_ours,) = torch.autograd.grad(got.square().sum(), x)
    assert torch.allclose(grad_ours, grad_ref, atol=1e-4)
