"""DA-CLIP (Algolzw/daclip-uir @ c2cc1414) image/text encoder against the shared fixtures.

The daclip fixture folder also holds the IR-SDE ConditionalUNet checks; those are skipped here
(the factory returns None for them) until the UNet is ported.
"""

from __future__ import annotations

import json
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn

from restore_cli.models.daclip import DACLIP_VIT_B_32, DaCLIP, unwrap_daclip_checkpoint
from tests.parity import PARITY_ROOT

FIXTURE_DIR = PARITY_ROOT / "daclip"
MISSING_REASON = f"DA-CLIP parity fixtures not found at {FIXTURE_DIR}"
needs_fixtures = pytest.mark.skipif(not FIXTURE_DIR.is_dir(), reason=MISSING_REASON)
RELEASE_CONFIG = "daclip_ViT-B-32"
# Fixture-free tiny config (embed 16, 2 control/main blocks).
SMALL_CONFIG: dict[str, Any] = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 32, "width": 16, "heads": 2, "layers": 1},
    "custom_text": True,
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _factory(check: dict[str, Any]) -> nn.Module | None:
    if check["module"] == "DaCLIP":
        return DaCLIP(**check["constructor_kwargs"])
    return None  # the ConditionalUNet checks (not ported yet)


def _daclip_check() -> dict[str, Any]:
    checks = json.loads((FIXTURE_DIR / "tiny.json").read_text())["checks"]
    return next(check for check in checks if check["module"] == "DaCLIP")


@needs_fixtures
def test_tiny_daclip_matches_official_outputs(check_fixture: ModuleType) -> None:
    """encode_image with and without control, and the training forward (text path too)."""
    results = check_fixture.run_checks(str(FIXTURE_DIR), _factory, verbose=False)
    assert {r["check"] for r in results} == {
        "daclip_encode_image_control",
        "daclip_encode_image_plain",
        "daclip_forward",
    }
    assert len(results) == 8
    for result in results:
        assert result["max_abs_diff"] <= result["tolerance"]


@needs_fixtures
def test_control_signals_pair_blocks_in_reverse(check_fixture: ModuleType) -> None:
    """Main block j gets control block L-1-j: permuting the zero modules breaks the match, so the
    fixture pins the pairing (and the control path matters at all)."""
    check = _daclip_check()
    model = DaCLIP(**check["constructor_kwargs"])
    check_fixture.strict_load(
        model, check_fixture.load_weights(str(FIXTURE_DIR / check["weights"]))
    )
    model.eval()
    io = check_fixture.load_io(str(FIXTURE_DIR))
    zero_modules = model.visual_control.transformer.zero_modules
    with torch.no_grad():
        image_features, _ = model.encode_image(io["clip_image"], control=True)
        check_fixture.compare(image_features, io["clip_image_features"], check["max_abs"])
        zero_modules[0], zero_modules[-1] = zero_modules[-1], zero_modules[0]
        swapped, _ = model.encode_image(io["clip_image"], control=True)
    assert float((swapped - io["clip_image_features"]).abs().max()) > 10 * check["max_abs"]


@needs_fixtures
def test_open_clip_checkpoint_wrapping_loads(check_fixture: ModuleType) -> None:
    """``{"state_dict": {"module.<key>": ...}, "epoch": ...}`` (DataParallel training file)."""
    check = _daclip_check()
    weights = check_fixture.load_weights(str(FIXTURE_DIR / check["weights"]))
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in weights.items()}}
    state_dict = unwrap_daclip_checkpoint(wrapped)
    assert list(state_dict) == list(weights)
    model = DaCLIP(**check["constructor_kwargs"])
    model.load_state_dict(state_dict, strict=True)


@needs_fixtures
def test_released_daclip_layout(check_fixture: ModuleType) -> None:
    """daclip_ViT-B-32 (and UniRestorer's ``daclip_model.*``): 631 keys, official order."""
    with torch.device("meta"):
        model = DaCLIP(DACLIP_VIT_B_32)
    check_fixture.check_full_shapes(model, str(FIXTURE_DIR), RELEASE_CONFIG, check_order=True)
    config = json.loads((FIXTURE_DIR / "full_shapes.json").read_text())["configs"][RELEASE_CONFIG]
    assert config["model_config"] == DACLIP_VIT_B_32


def test_aliased_visual_keys_are_one_module() -> None:
    """``visual.*`` and ``clip.visual.*`` are the same tensors (upstream registers it twice)."""
    model = DaCLIP(SMALL_CONFIG)
    state_dict = model.state_dict()
    aliased = [k for k in state_dict if k.startswith("visual.")]
    assert aliased
    for key in aliased:
        assert state_dict[key].data_ptr() == state_dict[f"clip.{key}"].data_ptr()
    assert "clip.attn_mask" not in state_dict


def test_zero_control_equals_plain_clip() -> None:
    """With zero-initialised control modules the controlled tower is plain CLIP; with nonzero
    ones it is not (so the control path is wired in)."""
    model = DaCLIP(SMALL_CONFIG).eval()
    image = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        controlled, _ = model.encode_image(image, control=True)
        torch.testing.assert_close(controlled, model.encode_image(image), rtol=0, atol=0)
        for linear in model.visual_control.transformer.zero_modules:
            nn.init.normal_(linear.weight, std=0.1)
        changed, _ = model.encode_image(image, control=True)
    assert float((changed - controlled).abs().max()) > 1e-3


def test_unsupported_open_clip_options_are_refused() -> None:
    with pytest.raises(ValueError, match="attentional_pool"):
        DaCLIP(
            {**SMALL_CONFIG, "vision_cfg": {**SMALL_CONFIG["vision_cfg"], "attentional_pool": True}}
        )
    with pytest.raises(ValueError, match="unsupported keys"):
        DaCLIP({**SMALL_CONFIG, "multimodal_cfg": {}})
