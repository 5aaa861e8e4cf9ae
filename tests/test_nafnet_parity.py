"""NAFNet against the shared parity fixtures (official key layout and official outputs).

The fixtures live in ``shared/parity/nafnet`` beside the repository; without them every test here
is skipped with that reason. NAFNetLocal (TLSC, used by the GoPro/REDS releases) is a separate,
later architecture: its configs are listed but skipped.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from restore_cli.models.loading import load_model, strict_load, unwrap_checkpoint
from restore_cli.models.nafnet import CONFIG_KEYS, detect_nafnet
from restore_cli.models.registry import get_architecture
from restore_cli.weights import sha256_file

PARITY_ROOT = Path(__file__).resolve().parents[2] / "shared" / "parity"
FIXTURE_DIR = PARITY_ROOT / "nafnet"
MISSING_REASON = f"NAFNet parity fixtures not found at {FIXTURE_DIR}"

pytestmark = pytest.mark.skipif(not FIXTURE_DIR.is_dir(), reason=MISSING_REASON)


def _full_configs() -> dict[str, Any]:
    path = FIXTURE_DIR / "full_shapes.json"
    return json.loads(path.read_text())["configs"] if path.is_file() else {}


def _config_params() -> list[Any]:
    params = []
    for name, config in _full_configs().items():
        if config["official_class"] == "NAFNet":
            params.append(pytest.param(name, id=name))
        else:
            reason = f"{name} uses {config['official_class']} (TLSC), not plain NAFNet"
            params.append(
                pytest.param(
                    name,
                    id=f"{name}-skipped-{config['official_class']}-is-a-later-issue",
                    marks=pytest.mark.skip(reason=reason),
                )
            )
    return params or [pytest.param(None, id="no-fixtures", marks=pytest.mark.skip(MISSING_REASON))]


@pytest.fixture(scope="module")
def check_fixture() -> ModuleType:
    """The shared checker, imported from its file (it is not a package)."""
    spec = importlib.util.spec_from_file_location("check_fixture", PARITY_ROOT / "check_fixture.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _nafnet_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config["constructor_kwargs"].items() if k in CONFIG_KEYS}


@pytest.mark.parametrize("config_name", _config_params())
def test_official_checkpoint_layout_loads_strictly(
    config_name: str, check_fixture: ModuleType
) -> None:
    """Key names, order and shapes of the released checkpoint; detection recovers the config;
    a BasicSR-wrapped state dict of those shapes passes our strict load (on the meta device, so
    the 116 M-parameter configs cost no memory)."""
    config = _full_configs()[config_name]
    kwargs = _nafnet_kwargs(config)
    nafnet = get_architecture("nafnet")
    with torch.device("meta"):
        module = nafnet.build(kwargs)
        official = {k: torch.empty(shape) for k, (shape, _dtype) in config["state_dict"].items()}
    check_fixture.check_full_shapes(module, str(FIXTURE_DIR), config_name, check_order=True)

    state_dict = unwrap_checkpoint({"params": official})  # the release's wrapping
    assert detect_nafnet(state_dict) == kwargs
    strict_load(module, state_dict, Path(config["checkpoint_file"]), "nafnet")
    assert nafnet.spec(kwargs).size_multiple == 2 ** len(kwargs["enc_blk_nums"])


def test_tiny_fixture_matches_official_outputs(check_fixture: ModuleType) -> None:
    nafnet = get_architecture("nafnet")

    def factory(check: dict[str, Any]) -> torch.nn.Module | None:
        if check["module"] != "NAFNet":
            return None  # NAFNetLocal: later issue
        return nafnet.build(check["constructor_kwargs"])

    results = check_fixture.run_checks(str(FIXTURE_DIR), factory, verbose=False)
    assert [r["check"] for r in results] == ["nafnet"]
    assert results[0]["max_abs_diff"] <= results[0]["tolerance"]


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
