"""Our compact UniRestorer: experts, routers, clusters, modes, staged training, restore/route."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from restore_cli.cli import app
from restore_cli.errors import ModelError
from restore_cli.models.loading import load_model, read_state_dict
from restore_cli.models.registry import apply_mode, get_architecture
from restore_cli.models.unirestorer import (
    ExpertConv1x1,
    UniRestorer,
    detect_unirestorer,
    kmeans,
)
from restore_cli.routing import GRANULARITIES
from restore_cli.train.checkpoint import weights_bytes, weights_metadata
from restore_cli.train.loop import TrainOptions, train

TINY = {
    "width": 8,
    "enc_blk_nums": [1, 1],
    "middle_blk_num": 1,
    "dec_blk_nums": [1, 1],
    "rank": 2,
    "leaves": 6,
    "types": 3,
    "embed_dim": 16,
    "encoder_width": 8,
    "encoder_crop": 32,
    "cluster_samples": 48,
}
FAMILIES = ("noise", "blur", "jpeg", "lowlight", "haze", "rain", "snow")


pytestmark = pytest.mark.usefixtures("one_thread")


def fitted_model(seed: int = 0) -> UniRestorer:
    """A tiny model whose clusters come from six well separated embedding blobs, one per
    (family, degree) combination, so every leaf has a known, pure task."""
    torch.manual_seed(seed)
    model = UniRestorer(**TINY)
    generator = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(6, 16, generator=generator), dim=1)
    embeddings = torch.cat([c + 0.01 * torch.randn(20, 16, generator=generator) for c in centres])
    families = torch.zeros(120, len(FAMILIES))
    for blob, family in enumerate([0, 0, 5, 5, 3, 6]):  # noise, noise, rain, rain, lowlight, snow
        families[blob * 20 : (blob + 1) * 20, family] = 1
    model.fit_clusters(embeddings, families, seed=3)
    # Random routers give near-uniform probabilities; sharpen them so choices are meaningful.
    with torch.no_grad():
        model.leaf_gate.weight.mul_(20)
        model.layer_gate.weight.mul_(20)
    return model.eval()


def image(seed: int, size=(40, 56)) -> torch.Tensor:
    return torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- experts


def test_expert_conv_mixes_per_sample_exactly_like_separate_runs():
    torch.manual_seed(0)
    conv = ExpertConv1x1(6, 4, experts=5, rank=2)
    torch.nn.init.normal_(conv.lora_b)
    x = torch.randn(3, 6, 7, 9)
    gates = torch.tensor([[1.0, 0, 0, 0, 0], [0, 0.3, 0.7, 0, 0], [0, 0, 0, 0, 1.0]])
    together = conv(x, gates)
    for b in range(3):
        alone = conv(x[b : b + 1], gates[b : b + 1])  # the single-mix conv2d path
        torch.testing.assert_close(together[b : b + 1], alone, atol=1e-5, rtol=1e-5)
    # Mixing weights == mixing outputs (the layer is linear): the MoE definition.
    first = conv(x[1:2], torch.tensor([[0, 1.0, 0, 0, 0]]))
    second = conv(x[1:2], torch.tensor([[0, 0, 1.0, 0, 0]]))
    torch.testing.assert_close(together[1:2], 0.3 * first + 0.7 * second, atol=1e-5, rtol=1e-5)


def test_zero_initialised_deltas_make_every_expert_the_dense_backbone():
    torch.manual_seed(0)
    model = UniRestorer(**TINY).eval()
    x = image(1, (32, 32))
    outputs = [
        model.restorer(x, torch.nn.functional.one_hot(torch.tensor([e]), model.num_experts).float())
        for e in (0, 3, model.num_experts - 1)
    ]
    for output in outputs[1:]:
        torch.testing.assert_close(output, outputs[0])


def lit_model(seed: int = 0) -> tuple[UniRestorer, UniRestorer]:
    """The fitted tiny model and the same weights with an illumination front end (width 8)."""
    plain = fitted_model(seed)
    lit = UniRestorer(**TINY, illumination=8).eval()
    missing, unexpected = lit.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all("illumination" in key for key in missing)
    return plain, lit


def one_hot_gates(model: UniRestorer, expert: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor([expert]), model.num_experts).float()


def test_illumination_front_end_starts_as_identity_and_serves_only_low_light_experts():
    plain, lit = lit_model()
    low = lit.low_light_experts()
    # blob 4 is the only low-light blob: its leaf, and its type if that is mostly low light
    leaf_low = (lit.leaf_families[:, FAMILIES.index("lowlight")] >= 0.5).tolist()
    assert low[1 + lit.num_types :].tolist() == leaf_low and sum(leaf_low) == 1
    assert not bool(low[0])  # ``all`` never
    x = image(2, (32, 32))
    with torch.no_grad():
        torch.testing.assert_close(lit(x), plain(x), rtol=0, atol=0)  # zero-initialised
        for name, weight in lit.restorer.named_parameters():
            if "illumination" in name:
                weight.normal_(0, 0.5)
        for expert in range(lit.num_experts):
            gates = one_hot_gates(lit, expert)
            assert torch.equal(lit.light_weight(gates), low[expert : expert + 1].float())
            same = torch.equal(lit.restorer(x, gates, lit.light_weight(gates)),
                               plain.restorer(x, gates))  # fmt: skip
            assert same != bool(low[expert]), lit.expert_names()[expert]
    assert plain.light_weight(one_hot_gates(plain, 0)) is None


def test_training_the_low_light_expert_trains_its_front_end_and_nothing_else():
    _, lit = lit_model()
    lit.set_stage("experts")
    expert = int(lit.low_light_experts().nonzero()[-1])  # the low-light leaf
    lit.train_only_experts([lit.expert_names()[expert]])
    trainable = {name for name, p in lit.named_parameters() if p.requires_grad}
    assert {n for n in trainable if "illumination" in n} == {
        n for n, _ in lit.named_parameters() if "illumination" in n
    }
    assert all("illumination" in n or n.endswith(("lora_a", "lora_b")) for n in trainable)
    other = next(e for e in range(lit.num_experts) if not bool(lit.low_light_experts()[e]))
    x = image(3, (32, 32))
    with torch.no_grad():
        before = lit.restorer(
            x, one_hot_gates(lit, other), lit.light_weight(one_hot_gates(lit, other))
        )
    optimizer = torch.optim.AdamW([p for p in lit.parameters() if p.requires_grad], lr=1e-2,
                                  weight_decay=0.0)  # fmt: skip
    lq = x.repeat(2, 1, 1, 1)
    gates = one_hot_gates(lit, expert).repeat(2, 1)
    pred = lit.restorer(lq, gates, lit.light_weight(gates))
    (pred - torch.rand_like(pred)).abs().mean().backward()
    optimizer.step()
    with torch.no_grad():
        after = lit.restorer(
            x, one_hot_gates(lit, other), lit.light_weight(one_hot_gates(lit, other))
        )
        lit_up = lit.restorer(
            x, one_hot_gates(lit, expert), lit.light_weight(one_hot_gates(lit, expert))
        )
    assert torch.equal(before, after)  # every other route is bit for bit unchanged
    assert not torch.equal(lit_up, after)


def test_illumination_width_is_detected_and_checked(tmp_path):
    _, lit = lit_model()
    path = save_tiny(tmp_path / "lit.safetensors", lit)
    config = detect_unirestorer(read_state_dict(path))
    assert config is not None and config["illumination"] == 8
    assert detect_unirestorer(fitted_model().state_dict())["illumination"] == 0
    with pytest.raises(ModelError, match="multiple of 4"):
        UniRestorer(**TINY, illumination=6)


# ----------------------------------------------------------------------------- clustering


def test_kmeans_recovers_separated_blobs_and_is_reproducible():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0]])
    points = torch.cat([c + 0.1 * torch.randn(30, 2, generator=generator) for c in centres])
    found, assignment = kmeans(points, 3, seed=7)
    again, assignment_again = kmeans(points, 3, seed=7)
    assert torch.equal(found, again) and torch.equal(assignment, assignment_again)
    for blob in range(3):  # each blob is exactly one cluster
        assert len(set(assignment[blob * 30 : (blob + 1) * 30].tolist())) == 1
    assert len(set(assignment.tolist())) == 3


def test_clusters_are_a_hierarchy_with_task_labels():
    model = fitted_model()
    again = fitted_model()
    for name in ("leaf_centres", "leaf_parent", "leaf_families", "type_families"):
        assert torch.equal(getattr(model, name), getattr(again, name)), name
    assert int(model.clusters_fitted) == 1
    assert set(model.leaf_parent.tolist()) <= set(range(TINY["types"]))
    # every leaf holds one blob, so its family share is exactly one-hot
    assert torch.equal(model.leaf_families.sum(1), torch.ones(TINY["leaves"]))


# ----------------------------------------------------------------------------- routing


def test_router_probabilities_and_expert_weights_sum_to_one():
    model = fitted_model()
    with torch.no_grad():
        route = model.route(torch.cat([image(s) for s in range(4)]))
    for probabilities in (route.leaf_probs, route.granularity_probs, route.expert_weights):
        torch.testing.assert_close(probabilities.sum(1), torch.ones(4))
    assert (route.expert_weights >= 0).all()
    assert route.expert_weights.count_nonzero(dim=1).tolist() == [1, 1, 1, 1]  # top-1


def test_topk_mixes_several_experts_with_normalised_weights():
    model = fitted_model()
    model.topk = 3
    with torch.no_grad():
        route = model.route(image(2))
    weights = route.expert_weights[0]
    assert 2 <= int(weights.count_nonzero()) <= 3
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0))


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_granularity_override_selects_that_level(granularity):
    model = fitted_model()
    with torch.no_grad():
        route = model.route(torch.cat([image(s) for s in range(3)]), granularity=granularity)
    experts = route.expert_weights.argmax(1)
    leaves, types = TINY["leaves"], TINY["types"]
    level = {
        "all": range(0, 1),
        "type": range(1, 1 + types),
        "degree": range(1 + types, 1 + types + leaves),
    }
    assert all(int(e) in level[granularity] for e in experts)
    assert route.rows()[0]["granularity"] == granularity


def test_instruction_mode_masks_leaves_of_other_tasks():
    model = fitted_model()
    rain_leaves = set(torch.nonzero(model.leaf_families[:, 5] > 0.5).flatten().tolist())
    assert rain_leaves
    with torch.no_grad():
        route = model.route(torch.cat([image(s) for s in range(6)]), tasks=["derain"])
    assert set(route.leaf.tolist()) <= rain_leaves
    outside = [leaf for leaf in range(TINY["leaves"]) if leaf not in rain_leaves]
    assert torch.all(route.leaf_probs[:, outside] == 0)
    with pytest.raises(ModelError, match="no expert"):
        model.route(image(0), tasks=["dehaze"])  # no haze leaf in this model


def test_auto_mode_sends_only_crops_called_low_light_to_low_light_leaves():
    model = fitted_model()
    column = FAMILIES.index("lowlight")
    low_leaf = int((model.leaf_families[:, column] >= 0.5).nonzero())
    embedding = model.leaf_centres[low_leaf].repeat(2, 1)
    with torch.no_grad():  # make it the leaf gate's choice for any crop
        model.leaf_gate.bias[low_leaf] += 100.0
    type_logits = torch.zeros(2, len(FAMILIES))
    type_logits[:, column] = torch.tensor([3.0, -3.0])  # the type head: dark, and not dark
    degree = torch.zeros(2)
    with torch.no_grad():
        with_veto = model.route_embedding(embedding, type_logits, degree)
        model.low_light_veto = 0.0
        without = model.route_embedding(embedding, type_logits, degree)
        model.low_light_veto = 0.5
        model.train()
        training = model.route_embedding(embedding, type_logits, degree)
    assert without.leaf.tolist() == [low_leaf, low_leaf]
    assert int(with_veto.leaf[0]) == low_leaf and int(with_veto.leaf[1]) != low_leaf
    assert float(with_veto.leaf_probs[1, low_leaf]) == 0.0
    torch.testing.assert_close(with_veto.expert_weights.sum(1), torch.ones(2))
    assert training.leaf.tolist() == [low_leaf, low_leaf]  # training keeps the raw traffic


def test_apply_mode_lists_valid_tasks_for_unknown_names():
    spec = get_architecture("unirestorer").spec({})
    assert spec.routed and spec.instructable
    loaded = load_model_from(fitted_model())
    with pytest.raises(ModelError) as caught:
        apply_mode(loaded, "instruction", ["derian"])
    assert "derian" in str(caught.value) and "derain" in str(caught.value)
    apply_mode(loaded, "instruction", ["derain"], "type")
    assert loaded.conditions == {"tasks": ("derain",), "granularity": "type"}


def load_model_from(model: UniRestorer):
    from restore_cli.models.registry import LoadedModel

    spec = get_architecture("unirestorer").spec(TINY)
    return LoadedModel(name="tiny-unirestorer", module=model, spec=spec)


# ----------------------------------------------------------------------------- files and CLI


def save_tiny(path: Path, model: UniRestorer) -> Path:
    metadata = weights_metadata("unirestorer", TINY, 0, ema=False, train_config={})
    path.write_bytes(weights_bytes(model.state_dict(), metadata))
    return path


def test_config_detected_from_the_state_dict(tmp_path):
    path = save_tiny(tmp_path / "tiny.safetensors", fitted_model())
    config = detect_unirestorer(read_state_dict(path))
    assert config is not None
    rebuilt = UniRestorer(**config)
    rebuilt.load_state_dict(read_state_dict(path), strict=True)
    loaded = load_model(str(path))
    assert loaded.spec.arch == "unirestorer" and loaded.spec.routed


def test_a_file_from_before_the_blockiness_cue_still_loads(tmp_path):
    """Its header config has no ``encoder_block_cues``; the shapes say the cue is absent."""
    torch.manual_seed(0)
    older = UniRestorer(**TINY, encoder_block_cues=False)
    path = save_tiny(tmp_path / "older.safetensors", older)  # header: TINY, without the key
    loaded = load_model(str(path))
    assert not loaded.module.encoder.block_cues
    for name, tensor in older.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[name], tensor)


def write_photos(folder: Path, count: int = 3) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels = rng.integers(0, 256, (48 + 8 * index, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{index}.png")
    return folder


def test_restore_writes_route_columns_and_tiles_share_one_route(tmp_path, monkeypatch):
    weights = save_tiny(tmp_path / "tiny.safetensors", fitted_model())
    photos = write_photos(tmp_path / "in")
    calls = []
    original = UniRestorer.route

    def counting_route(self, image, **kwargs):
        calls.append(tuple(image.shape))
        return original(self, image, **kwargs)

    monkeypatch.setattr(UniRestorer, "route", counting_route)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        ["restore", str(photos), "-o", str(out), "--model", str(weights), "--tile", "32",
         "--device", "cpu", "-q"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.png")) == ["img0.png", "img1.png", "img2.png"]
    # one routing per image, on the whole image (not per 32 px tile)
    assert [shape[-2:] for shape in calls] == [(48, 64), (56, 64), (64, 64)]
    with (out / "restore_run.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert all(row["route_granularity"] in GRANULARITIES for row in rows)
    assert all(row["route_experts"] for row in rows)


def test_route_command_streams_one_row_per_input_and_reports_bad_files(tmp_path):
    weights = save_tiny(tmp_path / "tiny.safetensors", fitted_model())
    photos = write_photos(tmp_path / "in")
    (photos / "broken.png").write_bytes(b"not a png")
    routes = tmp_path / "routes.csv"
    result = CliRunner().invoke(
        app,
        ["route", str(photos), "-o", str(routes), "--model", str(weights), "--device", "cpu",
         "--mode", "instruction", "--task", "derain,denoise", "-q"],
    )  # fmt: skip
    assert result.exit_code == 1  # one input failed
    with routes.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [Path(r["input"]).name for r in rows] == [
        "broken.png",
        "img0.png",
        "img1.png",
        "img2.png",
    ]
    assert rows[0]["status"] == "failed" and "broken.png" in rows[0]["error"]
    for row in rows[1:]:
        assert row["status"] == "ok"
        probabilities = json.loads(row["type_probs"])
        assert set(probabilities) == set(FAMILIES)
        assert 0 <= float(row["confidence"]) <= 1
    unknown = CliRunner().invoke(
        app,
        ["route", str(photos / "img0.png"), "-o", str(routes), "--model", str(weights),
         "--mode", "instruction", "--task", "dehazee"],
    )  # fmt: skip
    assert unknown.exit_code == 2
    assert "dehazee" in unknown.output and "derain" in unknown.output


def test_route_refuses_a_model_without_experts(tmp_path):
    from restore_cli.models.nafnet import build_nafnet

    config = {"width": 8, "enc_blk_nums": [1], "middle_blk_num": 1, "dec_blk_nums": [1]}
    dense = build_nafnet(config)
    metadata = weights_metadata("nafnet", config, 0, ema=False, train_config={})
    path = tmp_path / "dense.safetensors"
    path.write_bytes(weights_bytes(dense.state_dict(), metadata))
    photos = write_photos(tmp_path / "in", 1)
    result = CliRunner().invoke(app, ["route", str(photos), "--model", str(path), "-o", "-"])
    assert result.exit_code == 2 and "does not route" in result.output


# ----------------------------------------------------------------------------- training stages


# DA-CLIP at the size of the parity fixture's (shared/parity/unirestorer/tiny.json).
TINY_DACLIP = {
    "embed_dim": 512,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 32, "width": 32, "heads": 2, "layers": 1},
    "custom_text": True,
}


def open_clip_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A random tiny DA-CLIP saved the way open_clip's trainer saves it (DataParallel keys)."""
    from restore_cli.models.daclip import DaCLIP

    torch.manual_seed(5)
    tensors = DaCLIP(TINY_DACLIP).state_dict()
    state = {"module." + key: value.clone() for key, value in tensors.items()}
    torch.save({"epoch": 1, "name": "daclip", "state_dict": state}, path)
    return tensors


@pytest.mark.parametrize("encoder", ["cnn", "daclip"])
def test_three_training_stages_chain_through_init(tmp_path, encoder):
    """Encoder → experts → router, each stage started from the last; with ``encoder: daclip``
    the encoder stage starts from an open_clip DA-CLIP checkpoint, which stays frozen."""
    from tests.test_train import natural_image

    photos = tmp_path / "photos"
    for split, seeds in (("train", [0, 1, 2]), ("val", [7])):
        (photos / split).mkdir(parents=True)
        for seed in seeds:
            Image.fromarray(natural_image(seed)).save(photos / split / f"p{seed}.png")
    config_model = dict(TINY)
    if encoder == "daclip":
        config_model.update(encoder="daclip", daclip_config=TINY_DACLIP)
        daclip = open_clip_checkpoint(tmp_path / "daclip.pt")
        previous_init = [{"path": str(tmp_path / "daclip.pt"), "prefix": "encoder.daclip."}]
    base = {
        "model": {"arch": "unirestorer", "config": config_model},
        "data": {
            "clean": [str(photos / "train")],
            "degradations": {"types": list(FAMILIES), "gated": True, "probability": 0.2},
            "val_clean": [str(photos / "val")],
            "val_count": 2,
            "val_crop": 32,
        },
        "crop": 32,
        "batch": 4,
        "workers": 0,
        "device": "cpu",
        "iterations": 2,
        "scheduler": {"type": "constant", "warmup": 0},
        "val_every": 2,
        "checkpoint_every": 2,
        "log": {"every": 1},
    }
    previous = None
    for stage in ("encoder", "experts", "router"):
        raw = json.loads(json.dumps(base))
        raw["model"]["stage"] = stage
        if previous is not None:
            raw["model"]["init"] = [str(previous)]
        elif encoder == "daclip":
            raw["model"]["init"] = previous_init
        if stage == "encoder":
            raw["val_every"] = 0
        if stage == "experts":  # the experts restore with the configured losses, clean crops too
            raw["losses"] = [{"type": "psnr"}]
            raw["data"]["degradations"]["clean"] = 0.25
        config = tmp_path / f"{stage}.yaml"
        config.write_text(yaml.safe_dump(raw))
        run = tmp_path / stage
        assert train(TrainOptions(config=config, run_dir=run, quiet=True)) == 0
        previous = run / "final.safetensors"
        with (run / "log.csv").open() as handle:
            columns = next(csv.reader(handle))
        expected = ["loss_psnr"] if stage == "experts" else UniRestorer(**TINY).loss_names(stage)
        assert set(expected) <= set(columns)
        assert stage != "experts" or "loss_charbonnier" not in columns
    final = read_state_dict(previous)
    assert int(final["clusters_fitted"]) == 1
    encoder_weights = read_state_dict(tmp_path / "encoder" / "final.safetensors")
    # later stages leave the encoder alone
    kept = ["encoder.type_head.weight", "encoder.project.1.weight"]
    if encoder == "cnn":
        kept += ["encoder.stem.weight", "encoder.stages.0.down_norm.running_mean"]
    else:  # DA-CLIP is frozen from the start, and the encoder stage trained its heads
        for key, value in daclip.items():
            torch.testing.assert_close(final["encoder.daclip." + key], value)
        fresh = UniRestorer(**config_model).state_dict()
        assert not torch.equal(
            encoder_weights["encoder.type_head.bias"], fresh["encoder.type_head.bias"]
        )
    for key in kept:
        torch.testing.assert_close(final[key], encoder_weights[key])
    loaded = load_model(str(previous))
    with torch.no_grad():
        output = loaded(image(0, (32, 32)))
    assert output.shape == (1, 3, 32, 32) and torch.isfinite(output).all()


def test_unknown_stage_and_stage_on_a_dense_model_are_config_errors(tmp_path):
    from restore_cli.errors import ConfigError
    from restore_cli.train.config import parse_config

    raw = {"model": {"arch": "nafnet", "config": {"width": 8}, "init": [{"pathh": "x"}]},
           "data": {"clean": ["/nonexistent"]}}  # fmt: skip
    with pytest.raises(ConfigError, match=r"model\.init"):
        parse_config(raw)
    with pytest.raises(ModelError, match="unknown UniRestorer stage"):
        UniRestorer(**TINY).set_stage("decoder")


def expert_batch(count: int) -> dict:
    chain = json.dumps([{"name": "gaussian_noise", "level": "medium"}])
    return {"chain": [chain] * count, "gt": torch.rand(count, 3, 32, 32)}


def assert_one_step_changes_only_expert(model: UniRestorer, lq: torch.Tensor, trained: int):
    """One AdamW step of the experts stage changes only expert ``trained``'s delta rows."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                                  weight_decay=0.0)  # fmt: skip
    model.train()
    loss, _ = model(lq, stage="experts", batch=expert_batch(lq.shape[0]))
    loss.backward()
    optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.endswith(("lora_a", "lora_b")) for k in changed)
    for key in changed:
        rows = (model.state_dict()[key] - before[key]).flatten(1).abs().amax(1).nonzero()
        assert rows.flatten().tolist() == [trained]


def test_training_only_some_experts_changes_only_their_rows():
    model = fitted_model()
    model.set_stage("experts")
    lq = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        leaves = torch.cdist(model.encoder(lq)[0], model.leaf_centres).argmin(1)
    trained = 1 + model.num_types + int(leaves[0])  # the first sample's leaf expert
    with torch.no_grad():  # a fresh NAFNet's blocks are identities (beta = gamma = 0)
        for name, weight in model.restorer.named_parameters():
            if name.endswith(("beta", "gamma", "lora_b")):
                weight.normal_(0, 0.1)
    model.train_only_experts([f"degree{int(leaves[0])}"])
    granularity, keep = model.training_granularity(leaves)
    assert keep is not None and bool(keep[0]) and int(granularity[0]) == 2  # only degree trains
    assert_one_step_changes_only_expert(model, lq, trained)


def test_a_batch_without_a_trained_expert_gives_a_zero_loss():
    model = fitted_model()
    model.set_stage("experts")
    lq = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        leaves = set(torch.cdist(model.encoder(lq)[0], model.leaf_centres).argmin(1).tolist())
    other = next(leaf for leaf in range(model.num_leaves) if leaf not in leaves)
    model.train_only_experts([f"degree{other}"])
    model.train()
    loss, _ = model(lq, stage="experts", batch=expert_batch(2))
    assert float(loss.detach()) == 0.0


def test_auto_expert_route_trains_what_auto_mode_picks_and_only_the_named_rows():
    model = fitted_model()
    model.topk = 2  # every sample mixes two experts, so the row guard is what keeps the rest
    model.set_stage("experts")
    model.use_expert_route("auto")
    lq = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        encoded = model.encoder(lq)
        auto = model.route_embedding(*encoded).expert_weights
    gates, keep = model.training_gates(*encoded)
    assert torch.equal(gates, auto) and keep is None
    assert bool(((auto > 0).sum(1) == 2).all())
    trained = int(auto[0].argmax())
    with torch.no_grad():  # a fresh NAFNet's blocks are identities (beta = gamma = 0)
        for name, weight in model.restorer.named_parameters():
            if name.endswith(("beta", "gamma", "lora_b")):
                weight.normal_(0, 0.1)
    model.train_only_experts([model.expert_names()[trained]])
    gates, keep = model.training_gates(*encoded)
    assert keep is not None and bool(keep[0])
    assert_one_step_changes_only_expert(model, lq, trained)


def test_expert_route_is_checked_and_needs_the_experts_stage():
    from restore_cli.errors import ConfigError
    from restore_cli.train.config import parse_config

    model = fitted_model()
    with pytest.raises(ModelError, match=r"needs model\.stage 'experts'"):
        model.use_expert_route("auto")
    model.set_stage("experts")
    with pytest.raises(ModelError, match=r"unknown expert route 'router' \(valid: nearest, auto\)"):
        model.use_expert_route("router")
    raw = {"model": {"arch": "unirestorer", "config": TINY, "expert_route": "auto"},
           "data": {"clean": ["/nonexistent"]}}  # fmt: skip
    with pytest.raises(ConfigError, match=r"model\.expert_route.*needs model\.stage"):
        parse_config(raw)
    raw["model"]["stage"] = "experts"
    assert parse_config(raw).model.expert_route == "auto"


def test_expert_names_are_checked_and_need_the_experts_stage():
    from restore_cli.errors import ConfigError
    from restore_cli.train.config import parse_config

    model = fitted_model()
    with pytest.raises(ModelError, match=r"needs model\.stage 'experts'"):
        model.train_only_experts(["degree0"])
    model.set_stage("experts")
    with pytest.raises(ModelError, match=r"unknown expert names \['leaf0'\].*degree0\.\.degree5"):
        model.train_only_experts(["leaf0"])
    raw = {"model": {"arch": "unirestorer", "config": TINY, "experts": ["degree0"]},
           "data": {"clean": ["/nonexistent"]}}  # fmt: skip
    with pytest.raises(ConfigError, match=r"model\.experts.*needs model\.stage"):
        parse_config(raw)
    raw["model"]["stage"] = "experts"
    assert parse_config(raw).model.experts == ("degree0",)
    raw["optimizer"] = {"type": "adamw", "weight_decay": 0.01}
    with pytest.raises(ConfigError, match=r"weight_decay.*must be 0 when model\.experts"):
        parse_config(raw)


def test_daclip_encoder_embeds_the_control_towers_features_of_each_crop():
    from restore_cli.models.daclip import clip_preprocess
    from restore_cli.models.degradation_encoder import DaclipDegradationEncoder

    torch.manual_seed(0)
    encoder = DaclipDegradationEncoder(7, embed_dim=16, crop=24, daclip_config=TINY_DACLIP).eval()
    crops = torch.rand(2, 3, 24, 24)
    _, degradation = encoder.daclip.encode_image(clip_preprocess(crops, 32, quantize=False), True)
    torch.testing.assert_close(encoder.features(crops), encoder.project(degradation))
    embedding, type_logits, degree = encoder.encode_image(torch.rand(1, 3, 40, 56))
    assert embedding.shape == (1, 16) and type_logits.shape == degree.shape == (1, 7)
    with pytest.raises(ModelError, match="encoder 'clip' unknown"):
        get_architecture("unirestorer").build({**TINY, "encoder": "clip"})


def test_blockiness_sees_jpeg_blocks_on_the_crop_grid_only():
    from restore_cli.degradations.jpeg import jpeg_round_trip
    from restore_cli.models.degradation_encoder import blockiness, fixed_crop
    from tests.test_train import natural_image

    clean = natural_image(3)[:128, :128]
    jpeg = jpeg_round_trip(np.ascontiguousarray(clean), 60)

    def as_tensor(pixels: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(pixels)).permute(2, 0, 1)[None].float() / 255

    cue_clean, cue_jpeg = blockiness(as_tensor(clean)), blockiness(as_tensor(jpeg))
    assert (cue_jpeg > 0.2).all() and (cue_clean.abs() < 0.1).all()
    shifted = blockiness(as_tensor(jpeg)[..., 3:, 5:])  # off the 8x8 grid: the cue is gone
    assert (shifted < cue_jpeg / 2).all()
    # fixed crops start on the 16 px grid, so a JPEG's blocks line up as in training
    ramp = torch.arange(100 * 150, dtype=torch.float32).view(1, 1, 100, 150)
    for fy, fx in ((0.5, 0.5), (0.3, 0.7)):
        corner = fixed_crop(ramp, 32, fy, fx)[0, 0, 0, 0]
        assert int(corner) // 150 % 16 == 0 and int(corner) % 150 % 16 == 0


def test_benchmark_counts_the_best_forced_granularity_per_crop():
    from benchmarks.unirestorer import best_granularity

    table = {"all_psnr": [30.0, 20.0, 25.0], "type_psnr": [29.0, 22.0, 25.5]}
    assert best_granularity(table) == {}  # degree did not run: no winner can be named
    table["degree_psnr"] = [28.0, 21.0, 26.0]
    assert best_granularity(table) == {"all": 1, "type": 1, "degree": 1}
