"""UniRestorer (mrluin/UniRestorer @ 88b933cd) against the shared parity fixtures.

* the tiny fixture: tiny DA-CLIP + tiny experts of the official classes, official outputs for a
  batch routed to every expert family (Restormer WithBias/BiasFree, LoRA-Restormer,
  DehazeFormer, RetinexFormer, NAFNetLocal);
* the released layout (full_shapes.json, 18 471 tensors): per expert kind, router and DA-CLIP at
  full size, plus the whole model on the meta device (no memory) for names, order and shapes;
* LoRA merge-on-eval and CLIP preprocessing, which need no fixtures.
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import transforms

from restore_cli.models.daclip import CLIP_MEAN, CLIP_STD, DACLIP_VIT_B_32, DaCLIP, clip_preprocess
from restore_cli.models.lora_restormer import ConvLoRA, LoRARestormer, lora_modules
from restore_cli.models.unirestorer_release import (
    EXPERT_INDICES,
    EXPERT_KINDS,
    EXPERT_LAYOUT,
    EXPERT_POOL_PREFIXES,
    RELEASE_EXPERT_KWARGS,
    UniRestorerRelease,
    build_expert,
    layer_load_loss,
    router_body,
    unwrap_release_checkpoint,
)
from tests.parity import PARITY_ROOT

FIXTURE_DIR = PARITY_ROOT / "unirestorer"
MISSING_REASON = f"UniRestorer parity fixtures not found at {FIXTURE_DIR}"
needs_fixtures = pytest.mark.skipif(not FIXTURE_DIR.is_dir(), reason=MISSING_REASON)

# Small LoRA-Restormer for the fixture-free merge tests (per-level ranks differ on purpose).
SMALL_LORA: dict[str, Any] = {
    "dim": 8,
    "num_blocks": [1, 1, 1, 1],
    "num_refinement_blocks": 1,
    "heads": [1, 2, 4, 8],
    "r": [2, 3, 2, 4],
    "lora_alpha": [4, 3, 8, 4],
}


def _tiny_json() -> dict[str, Any]:
    return json.loads((FIXTURE_DIR / "tiny.json").read_text())


def _manifest() -> dict[str, Any]:
    return json.loads((FIXTURE_DIR / "full_shapes.json").read_text(), object_pairs_hook=OrderedDict)


def _kind_of_arch(arch: str) -> str:
    """Our expert kind for an ``arch`` description of the fixture's layout table."""
    if arch.startswith("LoRARestormer"):
        return "lora_restormer"
    if arch.startswith("Restormer"):
        return "restormer_biasfree" if "BiasFree" in arch else "restormer_withbias"
    if arch.startswith("dehazeformer_l"):
        return "dehazeformer"
    if arch.startswith("RetinexFormer"):
        return "retinexformer"
    if arch.startswith("NAFNetLocal"):
        return "nafnetlocal"
    raise AssertionError(f"unknown arch in the fixture layout: {arch}")


def _layout_problems(got: dict[str, list[int]], ref: dict[str, Any], label: str) -> list[str]:
    """Readable differences between our {key: shape} and the manifest's {key: [shape, dtype]}."""
    missing = [k for k in ref if k not in got]
    unexpected = [k for k in got if k not in ref]
    shapes = [k for k in ref if k in got and got[k] != ref[k][0]]
    problems = []
    if missing:
        problems.append(f"{label}: missing {len(missing)}: {missing[:5]}")
    if unexpected:
        problems.append(f"{label}: unexpected {len(unexpected)}: {unexpected[:5]}")
    problems += [f"{label}: {k} ours {got[k]} vs official {ref[k][0]}" for k in shapes[:5]]
    if not problems and list(got) != list(ref):
        problems.append(f"{label}: same keys, different order")
    return problems


def _shapes(module: nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def _under(ref: dict[str, Any], prefix: str) -> dict[str, Any]:
    start = prefix + "."
    return OrderedDict((k[len(start) :], v) for k, v in ref.items() if k.startswith(start))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_run(check_fixture: ModuleType) -> dict[str, Any]:
    """The fixture's check run once (strict load in train mode, eval, forward); model kept."""
    built: list[UniRestorerRelease] = []

    def factory(check: dict[str, Any]) -> nn.Module:
        built.append(UniRestorerRelease(**check["constructor_kwargs"]))
        return built[-1]

    results = check_fixture.run_checks(str(FIXTURE_DIR), factory, verbose=False)
    return {"results": results, "model": built[0], "io": check_fixture.load_io(str(FIXTURE_DIR))}


# ----------------------------------------------------------------------------- tiny fixture


@needs_fixtures
def test_tiny_fixture_matches_official_outputs(tiny_run: dict[str, Any]) -> None:
    """output, mu and logvar of the official forward within the fixture's tolerances."""
    results = tiny_run["results"]
    assert [r["output"] for r in results] == ["output", "mu", "logvar"]
    for result in results:
        assert result["max_abs_diff"] <= result["tolerance"]


@needs_fixtures
def test_tiny_fixture_routes_and_encodes_like_official(
    tiny_run: dict[str, Any], check_fixture: ModuleType
) -> None:
    model, io = tiny_run["model"], tiny_run["io"]
    tiny = _tiny_json()
    tolerance = tiny["tolerance"]
    with torch.no_grad():
        routing = model.route_clip(io["daclip_lq"])
        image_features, degra_features = model.daclip_model.encode_image(
            io["daclip_lq"], control=True
        )
    assert torch.equal(routing["expert"], io["routed_expert"])
    assert routing["expert_prefix"] == [entry["prefix"] for entry in tiny["routed"]]
    check_fixture.compare(
        degra_features, io["degra_features"], tolerance["per_output"]["degra_features"]
    )
    check_fixture.compare(image_features, io["image_features"], tolerance["max_abs"])
    aux_loss = layer_load_loss(routing["layer_probs"])  # what forward returns as aux_loss
    check_fixture.compare(aux_loss.reshape(1), io["aux_loss"], tolerance["max_abs"])
    # The batch really covers every expert family.
    assert set(routing["expert_kind"]) == set(EXPERT_KINDS)
    # Per-sample bookkeeping is consistent with the table and the probabilities.
    assert torch.equal(routing["leaf"], routing["leaf_probs"].argmax(-1))
    assert torch.equal(routing["granularity"], routing["layer_probs"].argmax(-1))
    table = torch.tensor(EXPERT_INDICES)
    assert torch.equal(routing["expert"], table[routing["leaf"], routing["granularity"]])


@needs_fixtures
def test_pool_order_and_leaf_table_are_the_official_ones() -> None:
    experts = _tiny_json()["experts"]
    manifest = _manifest()
    assert list(EXPERT_POOL_PREFIXES) == experts["expert_pool_order"]
    assert list(EXPERT_POOL_PREFIXES) == manifest["expert_pool_order"]
    assert [list(row) for row in EXPERT_INDICES] == experts["expert_indices_dict"]
    assert UniRestorerRelease.expert_kind(0) == "restormer_withbias"
    for layout in (experts["layout"], manifest["expert_layout"]):
        described = [(entry["prefix"], _kind_of_arch(entry["arch"])) for entry in layout]
        assert described == list(EXPERT_LAYOUT)


@needs_fixtures
def test_lora_delta_reaches_the_routed_lora_expert(tiny_run: dict[str, Any]) -> None:
    """Sample 1 runs through LoRA expert l2_experts.5: without its merged deltas the output
    would be far off, so the fixture really checks the merge."""
    model, io = tiny_run["model"], tiny_run["io"]
    tolerance = _tiny_json()["tolerance"]["max_abs"]
    sample = [
        entry["sample"] for entry in _tiny_json()["routed"] if entry["prefix"] == "l2_experts.5"
    ]
    assert sample
    expert = model.get_submodule("l2_experts.5")
    without_delta = copy.deepcopy(expert).train()  # unmerge ...
    for layer in lora_modules(without_delta):
        layer.lora_B.data.zero_()  # ... and drop the delta
    without_delta.eval()
    x = io["lq"][sample]
    with torch.no_grad():
        torch.testing.assert_close(expert(x), io["output"][sample], atol=tolerance, rtol=0)
        assert float((without_delta(x) - io["output"][sample]).abs().max()) > 10 * tolerance


@needs_fixtures
def test_meta_build_with_assign_loads_and_matches(check_fixture: ModuleType) -> None:
    """Build on the meta device, load with assign=True (how the 5 GB release can be loaded
    without a second copy): nothing stays on meta and the outputs still match."""
    tiny = _tiny_json()
    check = tiny["checks"][0]
    weights = check_fixture.load_weights(str(FIXTURE_DIR / check["weights"]))
    with torch.device("meta"):
        model = UniRestorerRelease(**check["constructor_kwargs"])
    model.load_state_dict(weights, strict=True, assign=True)
    model.eval()
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    io = check_fixture.load_io(str(FIXTURE_DIR))
    with torch.no_grad():
        output = model(io["lq"][:1], io["daclip_lq"][:1])[0]
    check_fixture.compare(output, io["output"][:1], check["max_abs"])


# ----------------------------------------------------------------------------- released layout


@needs_fixtures
def test_release_layout_per_expert_kind_router_and_daclip() -> None:
    """Each expert kind, the router bodies and DA-CLIP built once at full size (meta device)
    and compared with every manifest prefix that uses them."""
    ref = _manifest()["state_dict"]
    problems: list[str] = []
    with torch.device("meta"):
        by_kind = {
            kind: _shapes(build_expert(kind, RELEASE_EXPERT_KWARGS)) for kind in EXPERT_KINDS
        }
        router = _shapes(router_body(512))
        daclip = _shapes(DaCLIP(DACLIP_VIT_B_32))
    for prefix, kind in EXPERT_LAYOUT:
        problems += _layout_problems(by_kind[kind], _under(ref, prefix), f"{prefix} ({kind})")
    for prefix in ("mu", "sigma"):
        problems += _layout_problems(router, _under(ref, prefix), prefix)
    problems += _layout_problems(daclip, _under(ref, "daclip_model"), "daclip_model")
    assert not problems, "\n".join(problems)
    covered = {p for p, _ in EXPERT_LAYOUT} | {"mu", "sigma", "daclip_model"}
    rest = [k for k in ref if not any(k.startswith(p + ".") for p in covered)]
    assert rest == ["gamma", "beta", "mean", "std", "lf_gate.0.weight", "layer_gate.0.weight"]


@needs_fixtures
def test_release_checkpoint_loads_strictly_on_meta() -> None:
    """The whole released model (1.22 G elements) on the meta device: same keys in the same
    order, same shapes and dtypes; the ``params`` wrapping with ``module.`` unwraps and loads."""
    manifest = _manifest()
    ref = manifest["state_dict"]
    with torch.device("meta"):
        model = UniRestorerRelease()
        official = {
            f"module.{k}": torch.empty(shape, dtype=getattr(torch, dtype))
            for k, (shape, dtype) in ref.items()
        }
    state_dict = model.state_dict()
    problems = _layout_problems(_shapes(model), ref, "UniRestorer")
    assert not problems, "\n".join(problems)
    assert [str(v.dtype).removeprefix("torch.") for v in state_dict.values()] == [
        dtype for _, dtype in ref.values()
    ]
    assert sum(v.numel() for v in state_dict.values()) == manifest["num_elements"]
    model.load_state_dict(unwrap_release_checkpoint({"params": official}), strict=True)
    assert len(model.expert_pool) == len(EXPERT_POOL_PREFIXES) == 30
    assert len(model.l2_experts) == 23


# ----------------------------------------------------------------------------- without fixtures


def _randomised_lora(seed: int = 0) -> LoRARestormer:
    """Train-mode LoRA-Restormer with random (nonzero) base, norm and LoRA weights."""
    module = LoRARestormer(**SMALL_LORA).train()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            scale = 0.1 if name.endswith("lora_B") else 0.05
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return module


def test_lora_merges_on_eval_exactly_once_and_unmerges_on_train() -> None:
    module = _randomised_lora()
    x = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(1))
    layers = lora_modules(module)
    assert len(layers) == sum(isinstance(m, nn.Conv2d) for m in module.modules())
    base = [layer.conv.weight.detach().clone() for layer in layers]
    with torch.no_grad():
        unmerged_output = module(x)
        module.eval()
        for layer, weight in zip(layers, base, strict=True):
            delta = (layer.lora_B @ layer.lora_A).view(weight.shape) * (layer.lora_alpha / layer.r)
            assert layer.merged
            assert torch.equal(layer.conv.weight, weight + delta)
        merged = [layer.conv.weight.clone() for layer in layers]
        torch.testing.assert_close(module(x), unmerged_output, atol=1e-5, rtol=0)
        module.eval()  # a second eval() must not merge again
        assert all(torch.equal(m.conv.weight, w) for m, w in zip(layers, merged, strict=True))
        module.train()
        for layer, weight in zip(layers, base, strict=True):
            assert not layer.merged
            torch.testing.assert_close(layer.conv.weight, weight, atol=1e-6, rtol=0)


def test_lora_checkpoints_must_be_loaded_before_eval() -> None:
    """Upstream semantics: unmerged weights loaded into a merged (eval) module are never merged,
    so the LoRA delta is lost; load first, then eval()."""
    trained = _randomised_lora()
    state_dict = {k: v.clone() for k, v in trained.state_dict().items()}
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = trained(x)
        good = LoRARestormer(**SMALL_LORA).train()
        good.load_state_dict(state_dict)
        good.eval()
        late = LoRARestormer(**SMALL_LORA).eval()
        late.load_state_dict(state_dict)
        no_delta = copy.deepcopy(trained)
        for layer in lora_modules(no_delta):
            layer.lora_B.zero_()
        late_output = late(x)
        torch.testing.assert_close(good(x), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(late_output, no_delta(x), atol=1e-5, rtol=0)
        assert float((late_output - expected).abs().max()) > 1e-3


def test_lora_key_names_follow_loralib() -> None:
    module = LoRARestormer(**SMALL_LORA)
    layer = module.get_submodule("encoder_level1.0.attn.qkv_dwconv")
    assert isinstance(layer, ConvLoRA)
    prefix = "encoder_level1.0.attn.qkv_dwconv."
    keys = [k.removeprefix(prefix) for k in module.state_dict() if k.startswith(prefix)]
    assert keys == ["lora_A", "lora_B", "conv.weight"]
    # depthwise: lora_B has out/groups·k rows, lora_A in·k columns
    channels, r = 3 * SMALL_LORA["dim"], SMALL_LORA["r"][0]
    assert tuple(layer.lora_A.shape) == (r * 3, channels * 3)
    assert tuple(layer.lora_B.shape) == (3, r * 3)


@pytest.mark.parametrize("size", [(300, 451), (481, 320), (100, 150), (224, 224)])
def test_clip_preprocess_matches_the_pil_pipeline(size: tuple[int, int]) -> None:
    """Against open_clip's eval transform on a PIL image (what upstream runs): at most 2 uint8
    levels anywhere (PIL's fixed-point rounding), far less on average."""
    height, width = size
    pixels = np.random.default_rng(height * width).integers(0, 256, (height, width, 3), np.uint8)
    reference = transforms.Compose(
        [
            transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )(Image.fromarray(pixels))
    ours = clip_preprocess(torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0)
    assert ours.shape == (1, 3, 224, 224)
    levels = ((ours[0] - reference) * torch.tensor(CLIP_STD).view(3, 1, 1) * 255).abs()
    assert float(levels.max()) <= 2.0 + 1e-3
    assert float(levels.mean()) <= 0.05


def test_unwrap_release_checkpoint() -> None:
    tensor = torch.zeros(1)
    assert unwrap_release_checkpoint({"params": {"module.gamma": tensor}}) == {"gamma": tensor}
    assert unwrap_release_checkpoint({"gamma": tensor}) == {"gamma": tensor}
    with pytest.raises(ValueError, match="params"):
        unwrap_release_checkpoint({"params": {}})
    with pytest.raises(ValueError, match="non-tensor"):
        unwrap_release_checkpoint({"params": {"gamma": tensor, "step": 3}})


def test_aux_loss_is_the_cv_squared_of_the_layer_load() -> None:
    """Upstream's cv² sees the 3-vector of summed layer probabilities, so it is not 0 for a
    batch of one (only for a uniform load)."""
    probs = torch.tensor([[0.2, 0.3, 0.5]])
    expected = 0.01 * probs[0].var() / probs[0].mean() ** 2
    torch.testing.assert_close(layer_load_loss(probs), expected)
    assert float(layer_load_loss(torch.full((4, 3), 1 / 3))) == pytest.approx(0.0, abs=1e-12)


def test_constructor_refuses_what_the_release_cannot_do() -> None:
    with pytest.raises(ValueError, match="num_experts"):
        UniRestorerRelease(num_experts=[1, 7, 21])
    with pytest.raises(NotImplementedError, match="topk"):
        UniRestorerRelease(topk=2)
    with pytest.raises(ValueError, match="expert kinds"):
        UniRestorerRelease(experts={"swinir": {}})
    with pytest.raises(ValueError, match="LayerNorm_type"):
        UniRestorerRelease(experts={"restormer": {"LayerNorm_type": "BiasFree"}})
    small_clip = {**DACLIP_VIT_B_32, "embed_dim": 32}
    with pytest.raises(ValueError, match="embed_dim"):
        UniRestorerRelease(daclip_model_config=small_clip)


# ----------------------------------------------------------------------------- restore and route


@needs_fixtures
def test_tiny_release_runs_through_restore_and_route(tmp_path, check_fixture: ModuleType) -> None:
    """The release behind the routed-model protocol: one route per image, every tile through
    that image's expert, route columns in both CSVs; the route equals the official routing."""
    import csv

    from typer.testing import CliRunner

    from restore_cli.cli import app
    from restore_cli.models.loading import load_model
    from restore_cli.train.checkpoint import weights_bytes, weights_metadata

    config = _tiny_json()["checks"][0]["constructor_kwargs"]
    weights = check_fixture.load_weights(str(FIXTURE_DIR / "tiny.safetensors.gz"))
    metadata = weights_metadata("unirestorer-release", config, 0, ema=False, train_config={})
    path = tmp_path / "tiny-release.safetensors"
    path.write_bytes(weights_bytes(weights, metadata))

    loaded = load_model("unirestorer-release", weights=path)
    assert loaded.spec.routed
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.random((1, 3, 40, 52), dtype=np.float32))
    with torch.no_grad():
        route = loaded.route(image)
        official = loaded.module.route_clip(clip_preprocess(image, 32))
        expert = int(route.expert_weights.argmax(1))
        assert expert == int(official["expert"])
        padded = torch.nn.functional.pad(image, (0, 12, 0, 8), mode="reflect")
        expected = loaded.module.expert_pool[expert](padded)[..., :40, :52]
        torch.testing.assert_close(loaded(padded, route=route)[..., :40, :52], expected)

    photos = tmp_path / "in"
    photos.mkdir()
    for index in range(2):
        pixels = rng.integers(0, 256, (40 + 8 * index, 52, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(photos / f"img{index}.png")
    runner = CliRunner()
    restored = runner.invoke(
        app,
        ["restore", str(photos), "-o", str(tmp_path / "out"), "--model", "unirestorer-release",
         "--weights", str(path), "--device", "cpu", "-q"],
    )  # fmt: skip
    assert restored.exit_code == 0, restored.output
    with (tmp_path / "out" / "restore_run.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert all(row["route_experts"] in EXPERT_POOL_PREFIXES for row in rows)
    routes = tmp_path / "routes.csv"
    routed = runner.invoke(
        app,
        ["route", str(photos), "-o", str(routes), "--model", "unirestorer-release",
         "--weights", str(path), "--granularity", "all", "-q"],
    )  # fmt: skip
    assert routed.exit_code == 0, routed.output
    with routes.open() as handle:
        assert [row["experts"] for row in csv.DictReader(handle)] == ["l0_experts.0"] * 2
