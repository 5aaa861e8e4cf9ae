"""`restore` end to end: the real CLI in a subprocess, plus in-process pipeline checks.

Models here are tiny NAFNets with random weights: they exercise every path without pretending
to restore anything.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from restore_cli.engine import EngineOptions
from restore_cli.models.loading import load_model
from restore_cli.report import CSV_COLUMNS
from restore_cli.restore import RestoreOptions, RestoreRun, Streams, io_threads

REPO = Path(__file__).resolve().parents[1]


def tiny_nafnet_file(path: Path) -> Path:
    from spandrel.architectures.NAFNet import NAFNet

    torch.manual_seed(0)
    net = NAFNet(img_channel=3, width=8, middle_blk_num=1, enc_blk_nums=[1, 1], dec_blk_nums=[1, 1])
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def photo(seed: int, size=(48, 40)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


@pytest.fixture
def workspace(tmp_path: Path) -> dict[str, Path]:
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    Image.fromarray(photo(1)).save(inputs / "a.png")
    Image.fromarray(photo(2)).save(inputs / "b.jpg", quality=90)
    rgba = np.dstack([photo(3), np.full((40, 48), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(inputs / "sub" / "c.png")
    (inputs / "broken.png").write_text("this is not an image")
    return {
        "in": inputs,
        "out": tmp_path / "out",
        "model": tiny_nafnet_file(tmp_path / "m.safetensors"),
    }


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "restore_cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_cli_restores_a_folder_isolates_failures_and_skips_on_rerun(workspace):
    args = [
        "restore",
        str(workspace["in"]),
        "-r",
        "-o",
        str(workspace["out"]),
        "--model",
        str(workspace["model"]),
    ]
    first = run_cli(*args)
    assert first.returncode == 1, first.stderr  # one file failed
    error_lines = [line for line in first.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "broken.png" in error_lines[0]
    out = workspace["out"]
    assert sorted(first.stdout.split()) == sorted(
        str(out / name) for name in ["a.png", "b.jpg", "sub/c.png"]
    )
    rows = read_rows(out / "restore_run.csv")
    assert list(rows[0]) == CSV_COLUMNS
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "ok"]  # job order
    assert rows[0]["height"] == "40" and rows[0]["width"] == "48" and rows[0]["device"] == "cpu"
    with Image.open(out / "sub" / "c.png") as restored:
        assert restored.mode == "RGBA"
        assert np.all(np.asarray(restored)[..., 3] == 128)  # alpha carried unchanged
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".")]
    assert leftovers == []

    second = run_cli(*args, "--quiet")
    assert second.returncode == 1
    assert [r["status"] for r in read_rows(out / "restore_run.csv")] == [
        "skipped",
        "skipped",
        "failed",
        "skipped",
    ]


def test_cli_reads_paths_from_stdin_and_prints_json(workspace):
    listing = f"{workspace['in'] / 'a.png'}\n{workspace['in'] / 'sub' / 'c.png'}\n"
    result = run_cli(
        "restore",
        "-",
        "-o",
        str(workspace["out"]),
        "--model",
        str(workspace["model"]),
        "--json",
        "--ext",
        "webp",
        stdin=listing,
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(r["output"]).name for r in records] == ["a.webp", "c.webp"]
    assert all(r["status"] == "ok" for r in records)


def test_cli_errors_are_one_line_with_exit_code_2(workspace, tmp_path):
    unknown = run_cli("restore", str(workspace["in"]), "--model", "no-such-model")
    assert unknown.returncode == 2 and "no-such-model" in unknown.stderr
    assert "Traceback" not in unknown.stderr

    instruction = run_cli(
        "restore",
        str(workspace["in"]),
        "--model",
        str(workspace["model"]),
        "--mode",
        "instruction",
        "--task",
        "derain",
    )
    assert instruction.returncode == 2 and "takes no task" in instruction.stderr


def test_version_and_models_listing():
    assert run_cli("--version").stdout.startswith("restore-cli ")
    listing = run_cli("models", "--json")
    assert listing.returncode == 0, listing.stderr


def restore_in_process(workspace, **overrides) -> tuple[int, Streams]:
    model = load_model(str(workspace["model"]))
    streams = Streams(stdin=None, stdout=io.StringIO(), stderr=io.StringIO())
    options = RestoreOptions(
        inputs=[str(workspace["in"])],
        output_dir=workspace["out"],
        recursive=True,
        engine=EngineOptions(device="cpu"),
        **overrides,
    )
    return RestoreRun(options, model, streams).run(), streams


def test_tiled_run_equals_whole_image_run_for_the_cli_model(workspace):
    """End to end through the pipeline: --tile 32 vs --tile 0 on 48x40 images."""
    code, _ = restore_in_process(workspace, csv_path=workspace["out"] / "whole.csv")
    tiled_dir = workspace["out"].with_name("tiled")
    model = load_model(str(workspace["model"]))
    options = RestoreOptions(
        inputs=[str(workspace["in"])],
        output_dir=tiled_dir,
        recursive=True,
        engine=EngineOptions(device="cpu", tile=32, tile_overlap=8),
        ext="png",
    )
    streams = Streams(stdout=io.StringIO(), stderr=io.StringIO())
    assert RestoreRun(options, model, streams).run() == code == 1
    whole = np.asarray(Image.open(workspace["out"] / "a.png"), np.float64)
    tiled = np.asarray(Image.open(tiled_dir / "a.png"), np.float64)
    mse = np.mean((whole - tiled) ** 2)
    # 8-bit outputs of a random strided net with a 32 px receptive field: close, not exact.
    assert 10 * np.log10(255**2 / max(mse, 1e-12)) >= 40


def test_interrupt_keeps_finished_outputs_and_flushes_the_csv(workspace, monkeypatch):
    from restore_cli.engine import Engine

    calls = {"n": 0}
    original = Engine.restore

    def interrupt_on_second(self, rgb):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, rgb)

    monkeypatch.setattr(Engine, "restore", interrupt_on_second)
    code, streams = restore_in_process(workspace)
    assert code == 130
    assert "interrupted" in streams.stderr.getvalue()
    rows = read_rows(workspace["out"] / "restore_run.csv")
    assert [r["status"] for r in rows] == ["ok"]
    assert (workspace["out"] / "a.png").exists()
    assert not (workspace["out"] / "b.jpg").exists()
    assert not [p for p in workspace["out"].rglob(".*")]


def test_default_model_is_used_without_model_and_its_absence_is_one_clear_error(monkeypatch):
    import restore_cli.weights as weights
    from restore_cli.cli import load_requested_model
    from restore_cli.errors import RestoreCliError

    assert load_requested_model(None, None).name == weights.default_entry().name
    monkeypatch.setattr(weights, "default_entry", lambda: None)
    with pytest.raises(RestoreCliError, match="no default model"):
        load_requested_model(None, None)


@pytest.mark.parametrize(("cores", "device", "threads"), [
    (2, "cpu", 2), (64, "cpu", 2), (2, "cuda", 2), (16, "cuda", 8), (12, "cuda", 6),
])  # fmt: skip
def test_io_threads_keep_up_with_a_gpu_and_leave_a_cpu_model_its_cores(
    monkeypatch, cores, device, threads
):
    monkeypatch.setattr("restore_cli.restore.os.cpu_count", lambda: cores)
    assert io_threads(device) == threads
