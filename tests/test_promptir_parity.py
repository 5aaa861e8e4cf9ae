"""PromptIR against the shared parity fixtures (official key layout and official outputs).

The fixtures live in ``shared/parity/promptir`` beside the repository; tests that need them are
skipped with that reason when it is absent. The release is a PyTorch-Lightning checkpoint whose
state dict sits under ``state_dict`` with a ``net.`` prefix; the tests rebuild that wrapping.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from restore_cli.errors import ModelError
from restore_cli.models.loading import load_model, read_state_dict, strict_load, unwrap_checkpoint
from restore_cli.models.promptir import (
    ALL_IN_ONE_TASKS,
    CONFIG_DEFAULTS,
    PromptGenBlock,
    detect_promptir,
)
from restore_cli.models.registry import detect_architecture, get_architecture
from tests.parity import PARITY_ROOT, load_check_fixture

FIXTURE_DIR = PARITY_ROOT / "promptir"
MISSING_REASON = f"PromptIR parity fixtures not found at {FIXTURE_DIR}"
needs_fixtures = pytest.mark.skipif(not FIXTURE_DIR.is_dir(), reason=MISSING_REASON)

RELEASE = "all_in_one"
SMALL_CONFIG: dict[str, Any] = {"num_blocks": [1, 1, 1, 1], "num_refinement_blocks": 1}


@pytest.fixture(scope="module")
def check_fixture() -> ModuleType:
    return load_check_fixture()


def _full_shapes(name: str) -> dict[str, Any]:
    return json.loads((PARITY_ROOT / name / "full_shapes.json").read_text())["configs"]


def _meta_state_dict(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return {k: torch.empty(shape) for k, (shape, _dtype) in config["state_dict"].items()}


def _lightning_checkpoint(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The released ``model.ckpt`` layout: training state around ``net.``-prefixed weights."""
    return {
        "epoch": 119,
        "global_step": 1000,
        "pytorch-lightning_version": "2.0.0",
        "state_dict": {f"net.{key}": value for key, value in state_dict.items()},
        "loops": {},
        "callbacks": {},
        "optimizer_states": [],
        "lr_schedulers": [],
    }


# ----------------------------------------------------------------------------- official layout


@needs_fixtures
def test_official_checkpoint_layout_loads_strictly(check_fixture: ModuleType) -> None:
    """Same keys/order/shapes (incl. the unused chnl_reduce*/reduce_noise_channel_*), the
    Lightning wrapping unwraps, detection recovers the config, strict load succeeds."""
    config = _full_shapes("promptir")[RELEASE]
    kwargs = config["constructor_kwargs"]
    promptir = get_architecture("promptir")
    with torch.device("meta"):
        module = promptir.build(kwargs)
    check_fixture.check_full_shapes(module, str(FIXTURE_DIR), RELEASE, check_order=True)

    checkpoint = _lightning_checkpoint(_meta_state_dict(config))
    for state_dict in (
        unwrap_checkpoint(checkpoint),
        unwrap_checkpoint(checkpoint, "state_dict:net."),
    ):
        assert list(state_dict) == list(config["state_dict"])
        assert detect_promptir(state_dict) == kwargs
        detected = detect_architecture(state_dict)
        assert detected is not None and detected[0].name == "promptir"
        strict_load(module, state_dict, Path(config["checkpoint_file"]), "promptir")

    spec = promptir.spec(kwargs)
    assert (spec.arch, spec.size_multiple, spec.scale) == ("promptir", 8, 1)
    assert spec.tasks == ALL_IN_ONE_TASKS == ("denoise", "derain", "dehaze")


@needs_fixtures
def test_detectors_never_claim_each_others_releases() -> None:
    """Every released layout of NAFNet, Restormer and PromptIR goes to exactly its own detector."""
    owners = {"nafnet": "nafnet", "restormer": "restormer", "promptir": "promptir"}
    detectors = {
        name: get_architecture(name).detect for name in ("nafnet", "restormer", "promptir")
    }
    for folder, owner in owners.items():
        if not (PARITY_ROOT / folder).is_dir():
            continue
        for config_name, config in _full_shapes(folder).items():
            state_dict = _meta_state_dict(config)
            claims = [name for name, detect in detectors.items() if detect(state_dict) is not None]
            assert claims == [owner], f"{folder}/{config_name} claimed by {claims}"
            assert get_architecture("nafnet-local").detect(state_dict) is None


# ----------------------------------------------------------------------------- tiny fixture


@needs_fixtures
def test_tiny_fixture_matches_official_output(check_fixture: ModuleType) -> None:
    promptir = get_architecture("promptir")

    def factory(check: dict[str, Any]) -> torch.nn.Module | None:
        return (
            promptir.build(check["constructor_kwargs"]) if check["module"] == "PromptIR" else None
        )

    results = check_fixture.run_checks(str(FIXTURE_DIR), factory, verbose=False)
    assert [r["check"] for r in results] == ["promptir"]
    assert results[0]["max_abs_diff"] <= results[0]["tolerance"]


@needs_fixtures
def test_lightning_checkpoint_through_load_model(check_fixture: ModuleType, tmp_path: Path) -> None:
    """What a user does with the release: ``--model model.ckpt`` → unwrap → detect → same
    numbers."""
    tiny = json.loads((FIXTURE_DIR / "tiny.json").read_text())
    weights = dict(check_fixture.load_weights(str(FIXTURE_DIR / tiny["weights_file"])))
    checkpoint = tmp_path / "model.ckpt"
    torch.save(_lightning_checkpoint(weights), checkpoint)
    assert read_state_dict(checkpoint, wrapping="state_dict:net.").keys() == weights.keys()

    loaded = load_model(checkpoint)
    assert loaded.spec.arch == "promptir"
    io = check_fixture.load_io(str(FIXTURE_DIR))
    with torch.no_grad():
        output = loaded(io["input"])
    check_fixture.compare(output, io["output"], tiny["tolerance"]["max_abs"])


# ----------------------------------------------------------------------------- without fixtures


def test_detection_recovers_a_small_config() -> None:
    torch.manual_seed(0)
    promptir = get_architecture("promptir")
    state_dict = promptir.build(SMALL_CONFIG).state_dict()
    expected = {**CONFIG_DEFAULTS, **SMALL_CONFIG}
    assert detect_promptir(state_dict) == expected
    assert get_architecture("restormer").detect(state_dict) is None


def test_prompt_block_mixes_prompts_by_softmax_weights() -> None:
    """One prompt dominating the softmax → the output is that prompt, resized and convolved."""
    block = PromptGenBlock(prompt_channels=4, prompt_size=6, feature_channels=3, num_prompts=5)
    with torch.no_grad():
        block.linear_layer.weight.zero_()
        block.linear_layer.bias.copy_(torch.tensor([0.0, 0.0, 50.0, 0.0, 0.0]))
        features = torch.rand(2, 3, 9, 12)
        expected = block.conv3x3(
            torch.nn.functional.interpolate(
                block.prompt_param[0, 2:3].expand(2, -1, -1, -1),
                size=(9, 12),
                mode="bilinear",
                align_corners=False,
            )
        )
        torch.testing.assert_close(block(features), expected)


def test_configs_the_release_cannot_run_are_refused() -> None:
    promptir = get_architecture("promptir")
    with pytest.raises(ValueError, match="dim=48"):
        promptir.build({**SMALL_CONFIG, "dim": 32})
    with pytest.raises(ValueError, match="decoder=False"):
        promptir.build({**SMALL_CONFIG, "decoder": False})
    with pytest.raises(ModelError, match="unknown keys"):
        promptir.build({**SMALL_CONFIG, "dual_pixel_task": False})


def test_spec_and_licence() -> None:
    promptir = get_architecture("promptir")
    spec = promptir.spec({})
    assert (spec.supports_half, spec.supports_bf16) == (False, True)
    assert "non-commercial" in promptir.licence
