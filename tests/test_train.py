"""`train`: config validation and overrides, a short run's outputs, exact resume, checkpoints
that load as models, paired-folder data and a 2-process gloo run (all on the CPU, tiny model)."""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from restore_cli.errors import ConfigError
from restore_cli.train import TrainOptions, load_config, run_training, train
from restore_cli.train.checkpoint import list_checkpoints, resolve_resume, weights_bytes
from restore_cli.train.config import LossTerm, apply_overrides, parse_config
from restore_cli.train.data import StepBatchSampler
from restore_cli.train.loop import config_changes, lr_factor
from restore_cli.train.losses import WeightedLoss, charbonnier_loss, fft_loss, psnr_loss

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny-test.yaml"
SHIPPED = REPO / "configs" / "nafnet-allinone-s.yaml"
# spandrel's NAFNet LayerNorm backward uses a deprecated autograd attribute, once per block.
pytestmark = pytest.mark.filterwarnings("ignore:'saved_variables' is deprecated")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convolutions run faster on one thread, and much faster on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def natural_image(seed: int, size=(72, 56)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]] / max(size)
    base = np.stack([0.5 + 0.4 * np.sin(6 * x + seed), 0.4 + 0.4 * y, 0.3 + 0.3 * (x > 0.4)], -1)
    return np.uint8(np.clip(base + 0.03 * rng.standard_normal(base.shape), 0, 1) * 255)


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for split, seeds in (("train", [0, 1, 2]), ("val", [7])):
        (root / split).mkdir(parents=True)
        for seed in seeds:
            Image.fromarray(natural_image(seed)).save(root / split / f"p{seed}.png")
    return root


def data_overrides(photos: Path) -> list[str]:
    return [f"data.clean=[{photos / 'train'}]", f"data.val_clean=[{photos / 'val'}]"]


def tiny_raw() -> dict:
    return yaml.safe_load(TINY.read_text())


def error_of(raw) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    message = str(caught.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- config


def test_both_shipped_configs_validate():
    assert load_config(TINY).model.arch == "nafnet"
    shipped = load_config(SHIPPED)
    assert shipped.ema == 0.999 and shipped.crop == 128 and shipped.batch == 8
    assert {"noise", "blur", "jpeg", "lowlight", "haze", "rain", "snow"} <= set(
        shipped.data.degradations.types
    )


def test_unknown_keys_are_one_line_errors_naming_the_key():
    raw = tiny_raw()
    raw["optimizer"]["lrr"] = 1
    assert "'optimizer.lrr'" in error_of(raw)
    raw = tiny_raw()
    raw["warmpu"] = 3
    assert "unknown config key 'warmpu'" in error_of(raw)
    raw = tiny_raw()
    raw["model"]["config"]["widht"] = 8
    assert "'model.config'" in error_of(raw)


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("batch", "eight", "'batch': expected an integer"),
        ("batch", 0, "'batch': must be >= 1"),
        ("ema", 1.5, "'ema'"),
        ("precision", "fp8", "'precision'"),
        ("grad_clip", [1], "'grad_clip': expected a number"),
        ("channels_last", "yes", "'channels_last': expected true or false"),
        ("losses", [{"type": "l3"}], "'losses.0.type': 'l3' is not one of"),
        ("losses", [{"type": "l1", "weight": -1}], "'losses.0.weight'"),
        ("scheduler", {"type": "multistep"}, "'scheduler.milestones'"),
        ("optimizer", {"betas": [0.9]}, "'optimizer.betas'"),
        ("val", {"metrics": ["lpips"]}, "'val.metrics'"),
        ("model", {"arch": "nosuchnet"}, "'model.arch'"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_key(key, value, named):
    raw = tiny_raw()
    raw[key] = value
    assert named in error_of(raw)


def test_data_needs_exactly_one_source_and_valid_degradations():
    raw = tiny_raw()
    raw["data"]["pairs"] = "somewhere"
    assert "exactly one of 'data.pairs'" in error_of(raw)
    raw = tiny_raw()
    raw["data"]["degradations"]["types"] = ["noise", "fog"]
    assert "'data.degradations'" in error_of(raw) and "fog" in error_of(raw)
    raw = tiny_raw()
    raw["data"]["degradations"]["clean"] = 1.5
    assert "data.degradations.clean" in error_of(raw)
    raw = tiny_raw()
    raw["data"]["degradations"]["type_probability"] = {"noise": 2}
    assert "data.degradations.type_probability" in error_of(raw)
    raw["data"]["degradations"]["type_probability"] = {"fog": 0.5}
    assert "fog, which are not among the types" in error_of(raw)


def test_set_overrides_are_parsed_as_yaml_and_validated():
    config = load_config(
        TINY,
        [
            "optimizer.lr=2e-4",  # YAML 1.1 reads this as a string; numbers are accepted
            "ema=null",
            "losses.1.weight=0.5",
            "data.clean=[/a, /b]",
            "scheduler.milestones=[4]",
            "scheduler.type=multistep",
            "log.tensorboard=true",
        ],
    )
    assert config.optimizer.lr == 2e-4 and config.ema is None
    assert config.losses[1] == LossTerm("fft", 0.5)
    assert config.data.clean == ("/a", "/b")
    assert config.scheduler.milestones == (4,) and config.log.tensorboard
    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer\.lrr'"):
        load_config(TINY, ["optimizer.lrr=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(TINY, ["optimizer.lr"])
    with pytest.raises(ConfigError, match="'ema' is a value, not a section"):
        apply_overrides({"ema": 0.9}, ["ema.decay=0.5"])
    with pytest.raises(ConfigError, match="index"):
        apply_overrides({"losses": []}, ["losses.3.weight=1"])


def test_resolved_config_round_trips():
    config = load_config(TINY, ["ema=null"])
    again = parse_config(yaml.safe_load(yaml.safe_dump(config.to_dict())))
    assert again == config
    assert parse_config(json.loads(json.dumps(config.to_dict()))) == config


# ----------------------------------------------------------------------------- pieces


def test_lr_schedule_warmup_cosine_and_multistep():
    config = load_config(TINY, ["iterations=101", "scheduler.warmup=10", "scheduler.min_lr=0"])
    factors = [lr_factor(step, config) for step in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[100] == pytest.approx(0.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))
    steps = load_config(
        TINY, ["scheduler.type=multistep", "scheduler.milestones=[3, 5]", "scheduler.gamma=0.5"]
    )
    assert [lr_factor(s, steps) for s in (2, 3, 4, 5, 7)] == [1.0, 0.5, 0.5, 0.25, 0.25]


def test_losses():
    gt = torch.rand(2, 3, 16, 16)
    pred = (gt + 0.1 * torch.randn_like(gt)).clamp(0, 1)
    mse = (pred - gt).pow(2).flatten(1).mean(1)
    assert psnr_loss(pred, gt).item() == pytest.approx(-(10 * torch.log10(1 / mse)).mean().item())
    assert fft_loss(gt, gt).item() == 0
    assert charbonnier_loss(gt + 0.5, gt).item() == pytest.approx(math.sqrt(0.25 + 1e-6))
    total, parts = WeightedLoss([LossTerm("l1", 2.0), LossTerm("l1", 1.0)])(pred, gt)
    assert list(parts) == ["loss_l1", "loss_l1_2"]
    assert total.item() == pytest.approx(3 * (pred - gt).abs().mean().item())


def test_batches_are_a_pure_function_of_seed_and_step():
    def batches(start: int, count: int, rank: int = 0, world: int = 1):
        sampler = StepBatchSampler(10, 2, seed=3, rank=rank, world=world, start_step=start)
        stream = iter(sampler)
        return [next(stream) for _ in range(count)]

    straight = batches(0, 12)
    assert batches(7, 5) == straight[7:]  # resuming mid-epoch gives the same batches
    assert [key[0] for batch in straight for key in batch][:10:2] == [0, 0, 0, 0, 0]
    assert straight[5][0][0] == 1  # 5 steps per epoch, then a new permutation
    rank0, rank1 = batches(0, 4, 0, 2), batches(0, 4, 1, 2)
    for a, b in zip(rank0, rank1, strict=True):
        assert not set(a) & set(b)  # the ranks split each global batch


# ----------------------------------------------------------------------------- runs


def run(photos: Path, run_dir: Path, *extra: str, resume=None, stop_at=None, code=0) -> Path:
    options = TrainOptions(
        config=TINY,
        overrides=[*data_overrides(photos), *extra],
        run_dir=run_dir,
        resume=resume,
        stop_at=stop_at,
        quiet=True,
    )
    assert train(options) == code
    return run_dir


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_short_run_writes_checkpoints_logs_and_config(photos, tmp_path):
    run_dir = run(photos, tmp_path / "run", "keep_checkpoints=2", "checkpoint_every=3")
    saved = list_checkpoints(run_dir)
    assert [c.step for c in saved] == [6, 8]  # every 3 steps and the last; only 2 kept
    for checkpoint in saved:
        assert checkpoint.ema.is_file()
        assert checkpoint.weights.stat().st_size < 16 * 2**20
    assert not (run_dir / "checkpoints" / "step_0000003.safetensors").exists()
    with safe_open(str(saved[-1].weights), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["arch"] == "nafnet"
    assert json.loads(metadata["config"])["width"] == 8
    state = torch.load(saved[-1].state, weights_only=True)
    assert state["step"] == 8 and set(state["rng"]) >= {"python", "numpy", "torch"}
    rows = read_rows(run_dir / "log.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert {"loss", "loss_charbonnier", "loss_fft", "lr", "seconds"} <= set(rows[0])
    val_columns = ["val_psnr_rgb_crop0_uint8", "val_ssim_rgb_crop0_uint8"]
    assert [bool(rows[i][val_columns[0]]) for i in (2, 3, 7)] == [False, True, True]
    assert float(rows[7][val_columns[1]]) > 0
    assert len(read_rows(run_dir / "val.csv")) == 4  # 2 images x 2 validations
    resolved = load_config(run_dir / "config.yaml")
    assert resolved == load_config(TINY, [*data_overrides(photos), "keep_checkpoints=2",
                                          "checkpoint_every=3"])  # fmt: skip
    assert (run_dir / "final.safetensors").is_file()
    # A finished run is not restarted by accident, and --resume auto has nothing left to do.
    with pytest.raises(ConfigError, match="--resume auto"):
        run(photos, run_dir)
    run(photos, run_dir, resume="auto")


@pytest.mark.parametrize("ema", ["0.9", "null", "0.999 warm-up"])
def test_resume_is_bit_exact(photos, tmp_path, ema):
    settings = [f"ema={ema.split()[0]}", f"ema_warmup={'warm-up' in ema}".lower()]
    straight = run(photos, tmp_path / "straight", *settings)
    split = tmp_path / "split"
    run(photos, split, *settings, stop_at=3)
    assert [c.step for c in list_checkpoints(split)] == [3]
    # The second half also runs with a loader worker: data must not depend on it.
    run(photos, split, *settings, "workers=1", resume="auto")
    names = ["step_0000008.safetensors"]
    names += ["step_0000008_ema.safetensors"] if ema != "null" else []
    for name in names:
        a = load_file(straight / "checkpoints" / name)
        b = load_file(split / "checkpoints" / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[key], b[key]) for key in a), name
    losses = [[r["loss"] for r in read_rows(d / "log.csv")] for d in (straight, split)]
    assert losses[0] == losses[1]


def test_resume_notes_real_config_changes_not_keys_added_since(photos):
    config = load_config(TINY, data_overrides(photos))
    saved = config.to_dict()
    del saved["model"]["expert_route"]  # a checkpoint from before that key existed
    assert config_changes(saved, config) == []
    saved["batch"] = config.batch + 1
    assert config_changes(saved, config) == ["batch"]


def test_resume_auto_takes_the_latest_complete_checkpoint(photos, tmp_path):
    run_dir = run(photos, tmp_path / "run", "checkpoint_every=2", "keep_checkpoints=5")
    latest = list_checkpoints(run_dir)[-1]
    latest.state.unlink()  # as if killed while saving step 8
    assert resolve_resume(run_dir, "auto").step == 6
    named = run_dir / "checkpoints" / "step_0000004.safetensors"
    assert resolve_resume(run_dir, str(named)).step == 4
    with pytest.raises(ConfigError, match="incomplete"):
        resolve_resume(run_dir, str(latest.weights))
    with (run_dir / "log.csv").open("a") as handle:
        handle.write("1")  # and killed in the middle of writing a log row
    result = run_training(
        TrainOptions(TINY, data_overrides(photos), resume="auto", run_dir=run_dir, quiet=True)
    )
    assert result.exit_code == 0 and result.step == 8
    assert [int(r["step"]) for r in read_rows(run_dir / "log.csv")] == list(range(1, 9))


def test_time_limit_stops_cleanly_with_a_checkpoint(photos, tmp_path):
    options = TrainOptions(TINY, data_overrides(photos), run_dir=tmp_path / "run", quiet=True)
    options.max_minutes = 0  # stop after the first iteration
    assert train(options) == 75
    assert [c.step for c in list_checkpoints(tmp_path / "run")] == [1]
    options.max_minutes, options.resume = None, "auto"
    assert train(options) == 0
    assert [int(r["step"]) for r in read_rows(tmp_path / "run" / "log.csv")] == list(range(1, 9))


def test_checkpoint_loads_as_a_model_and_restores_an_image(photos, tmp_path):
    from typer.testing import CliRunner

    from restore_cli.cli import app
    from restore_cli.models.loading import load_model

    run_dir = run(photos, tmp_path / "run", "iterations=2", "scheduler.warmup=0", "val_every=0")
    weights = run_dir / "checkpoints" / "step_0000002_ema.safetensors"
    loaded = load_model(weights)
    assert loaded.spec.arch == "nafnet" and loaded.spec.size_multiple == 4
    result = CliRunner().invoke(
        app,
        ["restore", str(photos / "val"), "-o", str(tmp_path / "out"), "--model", str(weights),
         "--device", "cpu", "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "out" / "p7.png") as restored:
        assert restored.size == (72, 56)


def test_paired_folders_from_synthesize(photos, tmp_path):
    from restore_cli.synthesize import SynthesizeOptions, make_spec, synthesize

    pairs = tmp_path / "pairs"
    spec = make_spec(["noise", "jpeg"], ["medium"])
    options = SynthesizeOptions([str(photos / "train")], pairs, spec, per_image=2, quiet=True)
    assert synthesize(options) == 0
    overrides = [
        f"data={{pairs: {pairs}, val_pairs: {pairs}}}",
        "iterations=3",
        "val_every=3",
        "workers=1",
    ]
    result = run_training(TrainOptions(TINY, overrides, run_dir=tmp_path / "run", quiet=True))
    assert result.exit_code == 0
    val_rows = read_rows(tmp_path / "run" / "val.csv")
    assert len(val_rows) == 6 and {r["types"] for r in val_rows} <= {"noise", "jpeg"}


def test_fp16_needs_cuda(photos, tmp_path):
    with pytest.raises(ConfigError, match="fp16"):
        run(photos, tmp_path / "run", "precision=fp16", "device=cpu")


def test_two_processes_with_gloo_end_with_identical_weights(photos, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, sys
            from pathlib import Path
            import torch
            from safetensors.torch import save_file
            from restore_cli.train import TrainOptions, run_training

            torch.set_num_threads(1)
            config, run_dir, out, *overrides = sys.argv[1:]
            rank = os.environ["RANK"]
            options = TrainOptions(Path(config), overrides, run_dir=Path(run_dir), quiet=True)
            result = run_training(options)
            weights = {k: v.contiguous() for k, v in result.model.state_dict().items()}
            save_file(weights, f"{out}/rank{rank}.safetensors")
            sys.exit(result.exit_code)
            """
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(script), str(TINY), str(tmp_path / "run"), str(tmp_path),
        *data_overrides(photos), "iterations=4",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    # the launcher's own traceback is ~2 000 characters; the worker's error comes before it
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]
    rank0 = load_file(tmp_path / "rank0.safetensors")
    rank1 = load_file(tmp_path / "rank1.safetensors")
    saved = load_file(tmp_path / "run" / "checkpoints" / "step_0000004.safetensors")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert all(torch.equal(rank0[k], saved[k]) for k in rank0)
    assert [int(r["step"]) for r in read_rows(tmp_path / "run" / "log.csv")] == [1, 2, 3, 4]
    # DDP's strict stride check on conv weight grads is silenced (see Trainer.__init__)
    assert "Grad strides do not match" not in done.stderr


def test_ema_warmup_forgets_the_random_init_quickly():
    from torch import nn

    from restore_cli.train.ema import ModelEma

    def residual(warmup: bool, steps: int) -> float:
        model = nn.Linear(1, 1, bias=False)
        nn.init.constant_(model.weight, 0.0)  # the "random init"
        ema = ModelEma(model, 0.999, warmup)
        nn.init.constant_(model.weight, 1.0)  # training has moved the weights to 1
        for step in range(1, steps + 1):
            ema.update(model, step)
        return 1.0 - float(ema.module.weight)  # the share of the init still in the average

    assert residual(False, 1000) == pytest.approx(0.999**1000, rel=1e-4)  # 37 %
    assert residual(True, 1000) < 0.01
    assert ModelEma(nn.Linear(1, 1), 0.999, True).decay_at(1) == pytest.approx(2 / 11)
    assert ModelEma(nn.Linear(1, 1), 0.999, True).decay_at(10**6) == 0.999


def test_weights_bytes_do_not_depend_on_metadata_order():
    """Identical runs must give identical files: weights.yaml pins their sha256."""
    from safetensors.torch import load

    tensors = {"b.weight": torch.arange(6.0).view(2, 3), "a.bias": torch.ones(5)}
    metadata = {f"key{i}": str(i) for i in range(12)}
    forward = weights_bytes(tensors, metadata)
    backward = weights_bytes(dict(reversed(tensors.items())), dict(reversed(metadata.items())))
    assert forward == backward
    assert int.from_bytes(forward[:8], "little") % 8 == 0  # the header stays 8-byte aligned
    loaded = load(forward)
    assert set(loaded) == set(tensors)
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
