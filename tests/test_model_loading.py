"""Safe loading of weight files, detection of our architectures and the spandrel bridge."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import spandrel
import torch
import yaml
from safetensors.torch import save_file
from spandrel.architectures.SwinIR import SwinIR
from torch import nn

from restore_cli import weights
from restore_cli.errors import ModelError, WeightsError
from restore_cli.models.loading import (
    list_models,
    load_model,
    read_state_dict,
    resolve_model,
    unwrap_checkpoint,
)
from restore_cli.models.nafnet import build_nafnet

TINY_NAFNET = {
    "img_channel": 3,
    "width": 8,
    "middle_blk_num": 1,
    "enc_blk_nums": [1, 1],
    "dec_blk_nums": [1, 1],
}


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("RESTORE_CLI_CACHE", str(cache))
    return cache


def random_nafnet(seed: int = 0, config: dict[str, Any] = TINY_NAFNET) -> nn.Module:
    """A tiny NAFNet whose zero-initialised scales are randomised, so every block matters."""
    torch.manual_seed(seed)
    module = build_nafnet(config)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return module.eval()


def state_dict_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


def same_function(
    loaded: nn.Module, reference: nn.Module, size: tuple[int, int] = (32, 48)
) -> bool:
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.allclose(loaded(x), reference(x), atol=1e-6)


def assert_ready_for_inference(module: nn.Module) -> None:
    assert not module.training
    assert all(not p.requires_grad for p in module.parameters())
    assert all(p.device.type == "cpu" for p in module.parameters())


# ----------------------------------------------------------------------------- our architectures


@pytest.mark.parametrize(
    "layout", ["safetensors", "params", "params_ema", "lightning", "dataparallel"]
)
def test_tiny_nafnet_loads_from_every_layout(tmp_path: Path, layout: str) -> None:
    reference = random_nafnet()
    sd = state_dict_of(reference)
    if layout == "safetensors":
        path = tmp_path / "tiny.safetensors"
        save_file(sd, str(path))
    else:
        path = tmp_path / f"tiny-{layout}.pth"
        other = state_dict_of(random_nafnet(seed=5))
        checkpoint: dict[str, Any] = {
            "params": {"params": sd},
            # BasicSR keeps raw and EMA weights; the EMA ones are the ones to use.
            "params_ema": {"params": other, "params_ema": sd},
            "lightning": {
                "epoch": 3,
                "global_step": 100,
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-3}]}],
                "state_dict": {
                    **{f"net.{k}": v for k, v in sd.items()},
                    **{f"net_ema.{k}": v for k, v in other.items()},
                },
            },
            "dataparallel": {"params": {f"module.{k}": v for k, v in sd.items()}},
        }[layout]
        torch.save(checkpoint, path)

    loaded = load_model(str(path))
    assert loaded.spec.arch == "nafnet"
    assert loaded.spec.size_multiple == 4  # 2 ** len(enc_blk_nums)
    assert loaded.spec.scale == 1
    assert loaded.name == path.stem
    assert_ready_for_inference(loaded.module)
    assert same_function(loaded.module, reference)
    assert same_function(loaded, reference)  # LoadedModel is callable too


def test_explicit_wrapping() -> None:
    sd = {"a.weight": torch.zeros(2), "b.bias": torch.ones(1)}
    checkpoint = {"state_dict": {"net.a.weight": sd["a.weight"], "loss.x": torch.zeros(1)}}
    assert list(unwrap_checkpoint(checkpoint, "state_dict:net.")) == ["a.weight"]
    assert list(unwrap_checkpoint({"params": sd, "meta": "x"}, "params")) == list(sd)
    with pytest.raises(WeightsError, match="no 'params_ema' dict"):
        unwrap_checkpoint({"params": sd}, "params_ema")
    with pytest.raises(WeightsError, match="no tensors"):
        unwrap_checkpoint({"epoch": 3})
    with pytest.raises(WeightsError, match="not a dict"):
        unwrap_checkpoint([torch.zeros(1)])


def test_strict_load_failure_is_a_short_summary(tmp_path: Path) -> None:
    sd = state_dict_of(random_nafnet())
    del sd["ending.bias"]
    sd["intro.bias"] = torch.zeros(5)
    path = tmp_path / "broken.safetensors"
    save_file(sd, str(path))
    with pytest.raises(WeightsError) as caught:
        load_model(str(path))
    message = str(caught.value)
    assert "\n" not in message
    assert str(path) in message
    assert "1 missing (ending.bias)" in message
    assert "1 with wrong shape (intro.bias file [5] vs model [8])" in message


# ----------------------------------------------------------------------------- spandrel


def tiny_swinir_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = SwinIR(
        img_size=16,
        patch_size=1,
        in_chans=3,
        embed_dim=12,
        depths=[1],
        num_heads=[2],
        window_size=4,
        mlp_ratio=2.0,
        upscale=2,
        upsampler="pixelshuffledirect",
        resi_connection="1conv",
    )
    return state_dict_of(model)


@pytest.mark.filterwarnings("ignore:torch.meshgrid")
def test_architecture_only_spandrel_knows_loads_through_spandrel(tmp_path: Path) -> None:
    path = tmp_path / "swinir-x2.pth"
    torch.save({"params": tiny_swinir_state_dict()}, path)
    loaded = load_model(path)
    spec = loaded.spec
    assert spec.arch == "spandrel:SwinIR"
    assert spec.scale == 2
    assert spec.min_size == 16
    assert spec.size_multiple == 1
    assert (spec.supports_half, spec.supports_bf16) == (False, True)
    assert (spec.input_channels, spec.output_channels) == (3, 3)
    assert_ready_for_inference(loaded.module)
    with torch.no_grad():
        assert loaded(torch.rand(1, 3, 16, 20)).shape == (1, 3, 32, 40)


def test_masked_spandrel_models_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spandrel.architectures.LaMa import LaMaArch

    path = tmp_path / "inpaint.safetensors"
    save_file(tiny_swinir_state_dict(), str(path))
    tiny = nn.Conv2d(3, 3, 1)

    def masked_descriptor(self: Any, state_dict: Any) -> spandrel.MaskedImageModelDescriptor:
        return spandrel.MaskedImageModelDescriptor(
            tiny, tiny.state_dict(), architecture=LaMaArch(), purpose="Inpainting", tags=[],
            supports_half=False, supports_bfloat16=False, input_channels=3, output_channels=3,
        )  # fmt: skip

    monkeypatch.setattr(spandrel.ModelLoader, "load_from_state_dict", masked_descriptor)
    with pytest.raises(ModelError, match="inpainting model that needs a mask"):
        load_model(path)


def test_unknown_architecture_is_a_model_error(tmp_path: Path) -> None:
    path = tmp_path / "mystery.safetensors"
    save_file({"mystery.layer.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(ModelError, match="unrecognised architecture"):
        load_model(path)


# ----------------------------------------------------------------------------- unsafe files


class CodeOnUnpickle:
    """Unpickling this would call ``touch_marker``: the safe loader must never get that far."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (touch_marker, (str(self.marker),))


def touch_marker(path: str) -> None:
    Path(path).touch()


def test_pickled_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    sd = state_dict_of(random_nafnet())
    torch.save({"params": sd, "payload": CodeOnUnpickle(marker)}, path)
    assert not marker.exists()
    with pytest.raises(WeightsError) as caught:
        load_model(path)
    message = str(caught.value)
    assert "\n" not in message
    assert str(path) in message
    assert "contains pickled Python objects" in message
    assert "touch_marker" in message
    assert "refusing to load it" in message and "Convert it to safetensors" in message
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".ckpt"])
def test_garbage_file_is_a_weights_error(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(b"this is not a checkpoint at all " * 32)
    with pytest.raises(WeightsError) as caught:
        load_model(path)
    assert str(path) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_truncated_checkpoint_is_a_weights_error(tmp_path: Path) -> None:
    path = tmp_path / "truncated.pth"
    torch.save({"params": state_dict_of(random_nafnet())}, path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(WeightsError, match="not a readable PyTorch checkpoint"):
        read_state_dict(path)


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "weights.onnx"
    path.write_bytes(b"x")
    with pytest.raises(WeightsError, match="unsupported weights file type"):
        load_model(path)


# ----------------------------------------------------------------------------- names (weights.yaml)


@pytest.fixture
def tiny_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A weights.yaml with a tiny NAFNet reachable through a file:// URL."""
    reference = random_nafnet()
    checkpoint = tmp_path / "remote" / "tiny-nafnet.pth"
    checkpoint.parent.mkdir()
    torch.save({"params": state_dict_of(reference)}, checkpoint)
    entry = {
        "name": "tiny-nafnet",
        "arch": "nafnet",
        "config": TINY_NAFNET,
        "url": checkpoint.as_uri(),
        "sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest(),
        "wrapping": "params",
        "tasks": ["denoise"],
        "licence": "MIT (test)",
        "source": "test suite",
        "description": "tiny random NAFNet",
    }
    wide = {**entry, "name": "wide-nafnet", "config": {**TINY_NAFNET, "width": 16}}
    registry = tmp_path / "weights.yaml"
    registry.write_text(yaml.safe_dump({"models": [entry, wide]}), encoding="utf-8")
    monkeypatch.setattr(weights, "DEFAULT_REGISTRY_PATH", registry)
    return {"reference": reference, "checkpoint": checkpoint}


def test_name_loads_verified_weights_with_entry_metadata(tiny_registry: dict[str, Any]) -> None:
    loaded = load_model("tiny-nafnet")
    assert loaded.name == "tiny-nafnet"
    assert loaded.spec.arch == "nafnet"
    assert loaded.spec.tasks == ("denoise",)
    assert loaded.licence == "MIT (test)"
    assert loaded.source == "test suite"
    assert_ready_for_inference(loaded.module)
    assert same_function(loaded.module, tiny_registry["reference"])


def test_weights_override_uses_the_users_file(
    tiny_registry: dict[str, Any], tmp_path: Path
) -> None:
    other = random_nafnet(seed=7)
    users_file = tmp_path / "mine.safetensors"
    save_file(state_dict_of(other), str(users_file))  # not the entry's sha256: not checked
    loaded = load_model("tiny-nafnet", weights=users_file)
    assert loaded.name == "tiny-nafnet"
    assert loaded.source == str(users_file)
    assert same_function(loaded.module, other)


def test_resolve_model_names_it_as_loading_does(
    tiny_registry: dict[str, Any], tmp_path: Path
) -> None:
    users_file = tmp_path / "mine.safetensors"
    save_file(state_dict_of(random_nafnet(seed=7)), str(users_file))
    for model, weights_file in [
        ("tiny-nafnet", None),  # a registered name
        ("tiny-nafnet", users_file),  # a registered name with the user's file
        (str(users_file), None),  # a file
        ("nafnet", users_file),  # --model ARCH --weights FILE
        ("nlmeans", None),  # a built-in baseline
    ]:
        request = resolve_model(model, weights=weights_file)
        assert request.load().name == request.name, model
        assert load_model(model, weights=weights_file).name == request.name, model


def test_entry_config_that_does_not_fit_the_file(tiny_registry: dict[str, Any]) -> None:
    with pytest.raises(WeightsError) as caught:
        load_model("wide-nafnet")
    message = str(caught.value)
    assert "does not fit nafnet" in message and "with wrong shape" in message
    assert "\n" not in message


def test_unknown_name_lists_known_names(tiny_registry: dict[str, Any]) -> None:
    with pytest.raises(ModelError) as caught:
        load_model("no-such-model")
    assert "tiny-nafnet" in str(caught.value) and "wide-nafnet" in str(caught.value)


def test_missing_path_is_a_weights_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="weights file not found"):
        load_model(str(tmp_path / "absent.pth"))


def test_path_and_weights_together_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    save_file(state_dict_of(random_nafnet()), str(path))
    with pytest.raises(ModelError, match="--weights only goes with a model name"):
        load_model(path, weights=path)


def test_list_models_rows(tiny_registry: dict[str, Any]) -> None:
    rows = list_models()
    registered = [row["name"] for row in rows if not row["arch"].startswith("baseline:")]
    assert registered == ["tiny-nafnet", "wide-nafnet"]
    assert rows[0] == {
        "name": "tiny-nafnet",
        "arch": "nafnet",
        "status": "downloadable",
        "licence": "MIT (test)",
        "source": "test suite",
        "description": "tiny random NAFNet",
        "default": False,
    }
    load_model("tiny-nafnet")
    assert list_models()[0]["status"] == "cached"


def test_declared_architecture_in_our_header_wins_over_key_detection(tmp_path):
    """A file written by `train` names its arch, e.g. nafnet-local, which keys cannot tell."""
    import json

    from safetensors.torch import save_file

    from restore_cli.models.registry import get_architecture

    config = {"img_channel": 3, "width": 8, "middle_blk_num": 1, "enc_blk_nums": [1, 1],
              "dec_blk_nums": [1, 1], "train_size": [1, 3, 32, 32]}  # fmt: skip
    module = get_architecture("nafnet-local").build(config)
    path = tmp_path / "local.safetensors"
    tensors = {k: v.contiguous() for k, v in module.state_dict().items()}
    save_file(tensors, str(path), metadata={"arch": "nafnet-local", "config": json.dumps(config)})
    assert load_model(path).spec.arch == get_architecture("nafnet-local").spec(config).arch
    plain = tmp_path / "plain.safetensors"
    save_file(tensors, str(plain))
    assert load_model(plain).spec.arch == "nafnet"  # keys alone say plain NAFNet
    forced = load_model("nafnet-local", weights=plain)  # --model ARCH --weights FILE
    assert forced.spec.arch == load_model(path).spec.arch
