"""Restormer against the shared parity fixtures (official key layout and official outputs).

The fixtures live in ``shared/parity/restormer`` beside the repository; tests that need them are
skipped with that reason when it is absent. The rest (detection, config errors) runs anywhere.
Official-size models are built on the meta device, so the 26 M-parameter configs cost nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from restore_cli.errors import ModelError
from restore_cli.models.loading import load_model, strict_load, unwrap_checkpoint
from restore_cli.models.registry import detect_architecture, get_architecture
from restore_cli.models.restormer import ChannelLayerNorm, detect_restormer
from restore_cli.tiling import forward_padded, pad_to_multiple
from restore_cli.weights import sha256_file
from tests.parity import PARITY_ROOT, config_params, full_configs, load_check_fixture

FIXTURE_DIR = PARITY_ROOT / "restormer"
MISSING_REASON = f"Restormer parity fixtures not found at {FIXTURE_DIR}"
needs_fixtures = pytest.mark.skipif(not FIXTURE_DIR.is_dir(), reason=MISSING_REASON)

TINY_CONFIG: dict[str, Any] = {
    "inp_channels": 3,
    "out_channels": 3,
    "dim": 8,
    "num_blocks": [1, 2, 1, 2],
    "num_refinement_blocks": 2,
    "heads": [1, 2, 4, 8],
    "ffn_expansion_factor": 2.66,
    "bias": False,
    "LayerNorm_type": "WithBias",
    "dual_pixel_task": False,
}


def _full_configs() -> dict[str, Any]:
    return full_configs(FIXTURE_DIR)


def _config_params() -> list[Any]:
    return config_params(FIXTURE_DIR, MISSING_REASON)


@pytest.fixture(scope="module")
def check_fixture() -> ModuleType:
    return load_check_fixture()


def _meta_state_dict(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return {k: torch.empty(shape) for k, (shape, _dtype) in config["state_dict"].items()}


# ----------------------------------------------------------------------------- official layouts


@needs_fixtures
@pytest.mark.parametrize("config_name", _config_params())
def test_official_checkpoint_layout_loads_strictly(
    config_name: str, check_fixture: ModuleType
) -> None:
    """Every release: same key names, order and shapes; the ``params`` wrapping unwraps; detection
    recovers the constructor config (WithBias vs BiasFree, gray model); strict load succeeds."""
    config = _full_configs()[config_name]
    kwargs = config["constructor_kwargs"]
    restormer = get_architecture("restormer")
    with torch.device("meta"):
        module = restormer.build(kwargs)
    check_fixture.check_full_shapes(module, str(FIXTURE_DIR), config_name, check_order=True)

    state_dict = unwrap_checkpoint({"params": _meta_state_dict(config)})  # the release's wrapping
    assert detect_restormer(state_dict) == kwargs
    detected = detect_architecture(state_dict)
    assert detected is not None and detected[0].name == "restormer"
    strict_load(module, state_dict, Path(config["checkpoint_file"]), "restormer")

    spec = restormer.spec(kwargs)
    assert (spec.size_multiple, spec.scale) == (8, 1)
    assert spec.input_channels == kwargs["inp_channels"]


# ----------------------------------------------------------------------------- tiny fixtures


@needs_fixtures
def test_tiny_fixtures_match_official_outputs(check_fixture: ModuleType) -> None:
    """WithBias and BiasFree weights, strict load, forward on the reflect-padded input."""
    restormer = get_architecture("restormer")

    def factory(check: dict[str, Any]) -> torch.nn.Module | None:
        return (
            restormer.build(check["constructor_kwargs"]) if check["module"] == "Restormer" else None
        )

    results = check_fixture.run_checks(str(FIXTURE_DIR), factory, verbose=False)
    assert [r["check"] for r in results] == ["restormer_withbias", "restormer_biasfree"]
    for result in results:
        assert result["max_abs_diff"] <= result["tolerance"]


@needs_fixtures
@pytest.mark.parametrize("variant", ["", "_biasfree"])
def test_engine_padding_reproduces_the_official_scripts(
    check_fixture: ModuleType, tmp_path: Path, variant: str
) -> None:
    """File → detection → the engine's reflect padding to 8 → crop = the official test script."""
    tiny = json.loads((FIXTURE_DIR / "tiny.json").read_text())
    weights_name = f"tiny{variant}.safetensors"
    expected_sha = (
        tiny["variants"]["biasfree"]["weights_sha256"] if variant else tiny["weights_sha256"]
    )
    assert sha256_file(FIXTURE_DIR / weights_name) == expected_sha
    weights = check_fixture.load_weights(str(FIXTURE_DIR / weights_name))
    checkpoint = tmp_path / "restormer.pth"
    torch.save({"params": dict(weights)}, checkpoint)  # the release's layout

    loaded = load_model(checkpoint)
    assert loaded.spec.arch == "restormer"
    io = check_fixture.load_io(str(FIXTURE_DIR))
    assert torch.equal(pad_to_multiple(io["input"], loaded.spec.size_multiple), io["input_padded"])
    with torch.no_grad():
        output = forward_padded(loaded, io["input"], loaded.spec.size_multiple, 1)
    check_fixture.compare(output, io[f"output{variant}"], tiny["tolerance"]["max_abs"])


# ----------------------------------------------------------------------------- without fixtures


def _random_state_dict(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return get_architecture("restormer").build(config).state_dict()


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"LayerNorm_type": "BiasFree"},
        {"inp_channels": 1, "out_channels": 1, "heads": [1, 1, 2, 2]},
        {"bias": True, "num_refinement_blocks": 1, "ffn_expansion_factor": 2.0},
        {"inp_channels": 6, "dual_pixel_task": True},
    ],
    ids=["withbias", "biasfree", "gray", "bias-ffn2", "dual-pixel"],
)
def test_detection_recovers_the_config(changes: dict[str, Any]) -> None:
    config = {**TINY_CONFIG, **changes}
    state_dict = _random_state_dict(config)
    assert detect_restormer(state_dict) == config
    module = get_architecture("restormer").build(config)
    module.load_state_dict(state_dict, strict=True)
    x = torch.rand(1, config["inp_channels"], 16, 24)
    with torch.no_grad():
        assert module(x).shape == (1, config["out_channels"], 16, 24)


def test_detection_refuses_foreign_state_dicts() -> None:
    state_dict = _random_state_dict(TINY_CONFIG)
    assert detect_restormer({**state_dict, "prompt1.prompt_param": torch.zeros(1)}) is None
    assert detect_restormer({"intro.weight": torch.zeros(8, 3, 3, 3)}) is None
    without_output = {k: v for k, v in state_dict.items() if not k.startswith("output.")}
    assert detect_restormer(without_output) is None


def test_layernorm_types_follow_the_definitions() -> None:
    """WithBias = standard LayerNorm over channels; BiasFree = x / std (no centring), eps 1e-5."""
    x = torch.randn(2, 6, 5, 7) * 3 + 1
    with_bias = ChannelLayerNorm(6, "WithBias")
    bias_free = ChannelLayerNorm(6, "BiasFree")
    with torch.no_grad():
        with_bias.body.weight.uniform_(0.5, 1.5)
        with_bias.body.bias.uniform_(-1, 1)
        bias_free.body.weight.uniform_(0.5, 1.5)
        channels_last = x.permute(0, 2, 3, 1)
        reference = torch.nn.functional.layer_norm(
            channels_last, (6,), with_bias.body.weight, with_bias.body.bias, eps=1e-5
        ).permute(0, 3, 1, 2)
        torch.testing.assert_close(with_bias(x), reference)
        std = torch.sqrt(x.var(dim=1, keepdim=True, unbiased=False) + 1e-5)
        expected = x / std * bias_free.body.weight.view(1, -1, 1, 1)
        torch.testing.assert_close(bias_free(x), expected)
    assert "body.bias" not in bias_free.state_dict()


def test_bad_configs_are_user_errors() -> None:
    restormer = get_architecture("restormer")
    with pytest.raises(ModelError, match="unknown keys"):
        restormer.build({**TINY_CONFIG, "decoder": True})
    with pytest.raises(ValueError, match="LayerNorm_type"):
        restormer.build({**TINY_CONFIG, "LayerNorm_type": "RMS"})


def test_spec_is_fp32_or_bf16_with_multiples_of_8() -> None:
    spec = get_architecture("restormer").spec({"inp_channels": 1, "out_channels": 1})
    assert (spec.arch, spec.size_multiple, spec.scale) == ("restormer", 8, 1)
    assert (spec.supports_half, spec.supports_bf16) == (False, True)
    assert (spec.input_channels, spec.output_channels) == (1, 1)
    assert "non-commercial" in get_architecture("restormer").licence
