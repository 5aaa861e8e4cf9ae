"""DiffUIR training: the release's residual-diffusion objective, via `train`, resumed exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from restore_cli.errors import ModelError
from restore_cli.models.diffuir import DiffUIR, residual_schedule
from restore_cli.models.loading import load_model
from restore_cli.train import TrainOptions, load_config, train
from restore_cli.train.checkpoint import list_checkpoints
from tests.test_train import natural_image, read_rows

REPO = Path(__file__).resolve().parents[1]
TINY = {"dim": 8, "dim_mults": [1, 1]}
pytestmark = pytest.mark.usefixtures("one_thread")


class RecordingNetwork:
    """Stands in for the U-Net: records its inputs and answers with a given residual."""

    def __init__(self, answer: torch.Tensor) -> None:
        self.answer = answer
        self.inputs: list[torch.Tensor] = []
        self.times: list[list[torch.Tensor]] = []

    def __call__(self, x: torch.Tensor, time: list[torch.Tensor]) -> list[torch.Tensor]:
        self.inputs.append(x)
        self.times.append(time)
        return [self.answer]


def test_training_loss_is_the_release_objective(monkeypatch):
    model = DiffUIR(**TINY)
    generator = torch.Generator().manual_seed(0)
    lq = torch.rand(4, 3, 16, 16, generator=generator)
    gt = torch.rand(4, 3, 16, 16, generator=generator)
    residual = (lq * 2 - 1) - (gt * 2 - 1)

    # A network that predicts the true residual has zero loss; one that predicts 0 has |res|.
    for answer, expected in ((residual, 0.0), (torch.zeros_like(lq), float(residual.abs().mean()))):
        network = RecordingNetwork(answer)
        monkeypatch.setattr(model, "network", network)
        torch.manual_seed(5)
        loss, parts = model(lq, stage="diffusion", batch={"gt": gt})
        assert parts == {"loss_l1_res": loss}
        assert float(loss) == pytest.approx(expected, abs=1e-6)

    # The network saw cat(x_t, x_in) with x_t = x_0 + a_t res + b_t noise - d_t x_in at the
    # timesteps drawn from the global RNG, and the release's time inputs a_t * T, b_t * T.
    torch.manual_seed(5)
    t = torch.randint(0, 1000, (4,))
    noise = torch.randn(4, 3, 16, 16)
    schedule = residual_schedule()
    a, b, d = (v[t].view(-1, 1, 1, 1) for v in (schedule.alphas_cumsum, schedule.betas_cumsum,
                                                 schedule.delta_cumsum))  # fmt: skip
    x_in = lq * 2 - 1
    x_t = (gt * 2 - 1) + a * residual + b * noise - d * x_in
    seen = network.inputs[-1]
    torch.testing.assert_close(seen[:, :3], x_t)
    torch.testing.assert_close(seen[:, 3:], x_in)
    torch.testing.assert_close(network.times[-1][0], a.flatten() * 1000)
    torch.testing.assert_close(network.times[-1][1], b.flatten() * 1000)


def test_training_loss_has_gradients_and_unknown_stages_fail():
    model = DiffUIR(**TINY)
    lq, gt = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    loss, _ = model(lq, stage="diffusion", batch={"gt": gt})
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.loss_names("diffusion") == ["loss_l1_res"]
    with pytest.raises(ModelError, match="unknown DiffUIR stage 'encoder'"):
        model.set_stage("encoder")


def test_shipped_config_builds_the_released_tiny_size():
    config = load_config(REPO / "configs" / "diffuir-t.yaml")
    assert config.model.arch == "diffuir" and config.model.stage is None
    model = DiffUIR(**config.model.config)
    assert sum(p.numel() for p in model.parameters()) == 886_435  # README: 0.89 M


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    photos = tmp_path / "photos"
    photos.mkdir()
    for seed in (0, 1):
        Image.fromarray(natural_image(seed)).save(photos / f"p{seed}.png")
    raw = yaml.safe_load((REPO / "configs" / "tiny-test.yaml").read_text())
    raw["model"] = {"arch": "diffuir", "config": TINY}
    raw["data"]["clean"] = raw["data"]["val_clean"] = [str(photos)]
    raw["iterations"], raw["val_every"], raw["checkpoint_every"] = 4, 4, 2
    path = tmp_path / "diffuir-tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_train_runs_the_diffusion_objective_and_resumes_exactly(tiny_config, tmp_path):
    def run(run_dir: Path, **options) -> Path:
        train_options = TrainOptions(tiny_config, [], run_dir=run_dir, quiet=True, **options)
        assert train(train_options) == 0
        return run_dir

    straight = run(tmp_path / "straight")
    split = run(tmp_path / "split", stop_at=2)
    run(split, resume="auto")
    rows = read_rows(straight / "log.csv")
    assert {"loss_l1_res", "val_psnr_rgb_crop0_uint8"} <= set(rows[-1])
    assert float(rows[-1]["val_psnr_rgb_crop0_uint8"]) > 0
    assert [r["loss"] for r in rows] == [r["loss"] for r in read_rows(split / "log.csv")]
    for name in ("step_0000004.safetensors", "step_0000004_ema.safetensors"):
        a = load_file(straight / "checkpoints" / name)
        b = load_file(split / "checkpoints" / name)
        assert all(torch.equal(a[key], b[key]) for key in a), name
    # The checkpoint is a restore-cli model: detected as DiffUIR, sampled at restore time.
    loaded = load_model(list_checkpoints(straight)[-1].ema)
    assert loaded.spec.arch == "diffuir" and loaded.spec.sampled
