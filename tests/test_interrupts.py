"""Interrupted and concurrent runs, with real processes and real signals.

* `restore` and `synthesize`: Ctrl-C (SIGINT) stops cleanly; SIGKILL leaves at most temp and
  claim files, which the rerun removes; the rerun's outputs are byte-identical to an
  uninterrupted run.
* `train`: SIGKILL after a checkpoint, then ``--resume auto``: the final weights and the logged
  losses equal those of an uninterrupted run.
* Two `restore` runs into one folder (a subprocess and this process) share the work: every
  output is made exactly once, by one of them, and both logs are intact.

Every subprocess runs with one thread (OMP_NUM_THREADS=1) and so does the in-process reference,
so "identical" means identical bytes, not "close". Tiny random models keep it fast.
"""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from restore_cli.engine import EngineOptions
from restore_cli.io.atomic import (
    CLAIM_SUFFIX,
    OutputClaim,
    atomic_path,
    claim_path_for,
    is_temp_file,
    remove_stale_temp_files,
)
from restore_cli.models.loading import load_model
from restore_cli.report import RunLog
from restore_cli.restore import RestoreOptions, RestoreRun, Streams
from restore_cli.synthesize import SynthesizeOptions, make_spec, synthesize
from tests.test_restore_cli import tiny_nafnet_file

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny-test.yaml"
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "PYTHONPATH": str(REPO),
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
pytestmark = pytest.mark.filterwarnings("ignore:'saved_variables' is deprecated")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """The in-process references run on one thread, like the subprocesses."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def photo(seed: int, side: int = 192) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    base = np.stack([0.5 + 0.4 * np.sin(6 * x + seed), 0.3 + 0.5 * y, 0.4 + 0.3 * (x > 0.5)], -1)
    return np.uint8(np.clip(base + 0.05 * rng.standard_normal(base.shape), 0, 1) * 255)


def photo_folder(folder: Path, count: int, side: int = 192) -> Path:
    folder.mkdir(parents=True)
    for index in range(count):
        Image.fromarray(photo(index, side)).save(folder / f"p{index:02d}.png")
    return folder


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "restore_cli", *args]


def default_sigint() -> None:
    """Children get Ctrl-C like a terminal's foreground job. A test run started in the
    background of a non-interactive shell (`pytest &`, CI wrappers) ignores SIGINT, children
    inherit that, and Python then installs no KeyboardInterrupt handler at all."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Child:
    """A CLI subprocess whose stderr goes to a file (a full pipe would stall it)."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        self._stderr = log.open("w")
        self.process = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            env=ENV,
            cwd=REPO,
            preexec_fn=default_sigint,
        )

    def wait_until(self, condition: Callable[[], bool], timeout: float = 240) -> None:
        """Poll ``condition`` (every 10 ms) while the child runs; fail if it ends first."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                pytest.fail(f"the run ended before the signal:\n{self.stderr()}")
            if time.monotonic() > deadline:
                self.process.kill()
                pytest.fail("timed out waiting for the run to make progress")
            time.sleep(0.01)

    def signal(self, signum: int) -> int:
        self.process.send_signal(signum)
        return self.finish()

    def finish(self, timeout: float = 300) -> int:
        code = self.process.wait(timeout)
        self._stderr.close()
        return code

    def stderr(self) -> str:
        if not self._stderr.closed:
            self._stderr.flush()
        return self.log.read_text()


def images_in(folder: Path) -> list[Path]:
    """Finished images (temp files excluded), relative, sorted."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.rglob("*.png") if not is_temp_file(p)]
    return sorted(p.relative_to(folder) for p in found)


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if is_temp_file(p) or p.name.endswith(CLAIM_SUFFIX)]


def tree_bytes(folder: Path, pattern: str = "*.png") -> dict[str, bytes]:
    found = sorted(p for p in folder.rglob(pattern) if p.is_file())
    return {str(p.relative_to(folder)): p.read_bytes() for p in found}


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def plant_stale_files(folder: Path, name: str) -> list[Path]:
    """What a SIGKILL during a write leaves: an unlocked temp file and an unlocked claim."""
    target = folder / name
    stale = [target.with_name(f".{name}.deadbeef.tmp.png"), claim_path_for(target)]
    for path in stale:
        path.write_bytes(b"half-written")
    return stale


def restore_in_process(inputs: Path, out: Path, model: Path) -> tuple[int, str]:
    streams = Streams(stdout=io.StringIO(), stderr=io.StringIO())
    options = RestoreOptions([str(inputs)], out, engine=EngineOptions(device="cpu"), quiet=True)
    code = RestoreRun(options, load_model(str(model)), streams).run()
    return code, streams.stderr.getvalue()


# --------------------------------------------------------------------------- restore

PHOTOS = 20


@pytest.fixture(scope="module")
def restore_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Inputs, a tiny model and the uninterrupted reference run, shared by the restore tests."""
    root = tmp_path_factory.mktemp("restore")
    inputs = photo_folder(root / "in", PHOTOS)
    model = tiny_nafnet_file(root / "tiny.safetensors")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert restore_in_process(inputs, root / "reference", model)[0] == 0
    finally:
        torch.set_num_threads(previous)
    return inputs, model, root / "reference"


@pytest.mark.slow
def test_restore_ctrl_c_then_kill_9_then_rerun_equals_an_uninterrupted_run(tmp_path, restore_setup):
    inputs, model, reference = restore_setup
    out = tmp_path / "out"
    command = cli("restore", str(inputs), "-o", str(out), "--model", str(model))

    # 1. Ctrl-C: the file in flight is finished or discarded, the CSV is complete, summary.
    first = Child(command, tmp_path / "first.log")
    first.wait_until(lambda: len(images_in(out)) >= 2)
    assert first.signal(signal.SIGINT) == 130
    assert "interrupted: restored" in first.stderr()
    rows = read_rows(out / "restore_run.csv")
    done = {Path(r["output"]).name for r in rows if r["status"] == "ok"}
    assert 2 <= len(done) < PHOTOS and all(r["status"] == "ok" for r in rows)
    assert {p.name for p in images_in(out)} == done  # nothing unlogged, nothing half-done
    assert leftovers(out) == []
    assert tree_bytes(out) == {name: (reference / name).read_bytes() for name in sorted(done)}

    # 2. kill -9 part-way through the rest; plant what a kill during a write would leave.
    second = Child(command, tmp_path / "second.log")
    second.wait_until(lambda: len(images_in(out)) >= len(done) + 2)
    assert second.signal(signal.SIGKILL) == -signal.SIGKILL
    assert len(images_in(out)) < PHOTOS
    stale = plant_stale_files(out, f"p{PHOTOS - 1:02d}.png")

    # 3. The rerun removes the leftovers, skips finished files and makes the others.
    third = Child(command, tmp_path / "third.log")
    assert third.finish() == 0, third.stderr()
    assert "removed" in third.stderr() and not any(p.exists() for p in stale)
    assert tree_bytes(out) == tree_bytes(reference)
    assert leftovers(out) == []
    statuses = [r["status"] for r in read_rows(out / "restore_run.csv")]
    assert len(statuses) == PHOTOS and {"ok", "skipped"} == set(statuses)


@pytest.mark.slow
def test_two_runs_into_one_folder_share_the_work(tmp_path, restore_setup):
    """A CLI run and an in-process run, overlapping for sure: each output made exactly once."""
    inputs, model, reference = restore_setup
    out = tmp_path / "out"
    command = cli("restore", str(inputs), "-o", str(out), "--model", str(model))
    child = Child(command, tmp_path / "child.log")
    child.wait_until(lambda: len(images_in(out)) >= 1)
    code, stderr = restore_in_process(inputs, out, model)  # starts while the child works
    assert code == 0 and child.finish() == 0, child.stderr()
    ours = read_rows(out / f"restore_run.{os.getpid()}.csv")
    assert "restore_run.csv is in use by another run; this run logs to" in stderr
    theirs = read_rows(out / "restore_run.csv")
    made = [Path(r["output"]).name for r in ours + theirs if r["status"] == "ok"]
    assert sorted(made) == sorted(p.name for p in inputs.iterdir())  # each once, by one run
    assert any(r["status"] == "ok" for r in ours)  # this run did share the work
    assert tree_bytes(out) == tree_bytes(reference)
    assert leftovers(out) == []


# --------------------------------------------------------------------------- synthesize


def synthesize_args(clean: Path, out: Path) -> list[str]:
    return ["synthesize", str(clean), "-o", str(out), "--types", "noise,blur,jpeg,haze",
            "--mixed", "1-3", "--per-image", "4", "--crop", "96", "--seed", "5"]  # fmt: skip


@pytest.mark.slow
def test_synthesize_ctrl_c_then_kill_9_then_rerun_equals_an_uninterrupted_run(
    tmp_path, monkeypatch
):
    import restore_cli.synthesize as synthesize_module

    clean = photo_folder(tmp_path / "clean", 10, side=128)
    spec = make_spec(["noise", "blur", "jpeg", "haze"], ["light", "medium", "heavy"], mixed=(1, 3))
    options = SynthesizeOptions([str(clean)], tmp_path / "reference", spec, per_image=4, crop=96,
                                seed=5, quiet=True)  # fmt: skip
    assert synthesize(options, stderr=io.StringIO()) == 0
    out = tmp_path / "out"

    # 1. Ctrl-C (in process: the same KeyboardInterrupt path the CLI takes) on the 4th pair.
    calls = {"n": 0}
    make_pair = synthesize_module.make_pair

    def interrupted_on_the_fourth(job, opts):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return make_pair(job, opts)

    monkeypatch.setattr(synthesize_module, "make_pair", interrupted_on_the_fourth)
    stderr = io.StringIO()
    options.output_dir, options.quiet = out, False
    assert synthesize(options, stderr=stderr) == 130
    assert "interrupted: made 3, skipped 0, failed 0 pairs" in stderr.getvalue()
    assert len(images_in(out / "lq")) == 3 and not (out / "metadata.csv").exists()
    monkeypatch.undo()

    # 2. kill -9 part-way, with what a kill during a write would leave.
    command = cli(*synthesize_args(clean, out))
    second = Child(command, tmp_path / "second.log")
    second.wait_until(lambda: len(images_in(out / "lq")) >= 6)
    assert second.signal(signal.SIGKILL) == -signal.SIGKILL
    assert len(images_in(out / "lq")) < 40
    stale = plant_stale_files(out / "lq", "p09_003.png")

    # 3. The rerun: byte-identical pairs and metadata.csv, nothing left over.
    third = Child(command, tmp_path / "third.log")
    assert third.finish() == 0, third.stderr()
    assert not any(p.exists() for p in stale) and leftovers(out) == []
    assert tree_bytes(out, "*") == tree_bytes(tmp_path / "reference", "*")


# --------------------------------------------------------------------------- train


def photos_for_training(root: Path) -> list[str]:
    photo_folder(root / "train", 3, side=64)
    photo_folder(root / "val", 1, side=64)
    return [
        f"data.clean=[{root / 'train'}]",
        f"data.val_clean=[{root / 'val'}]",
        "iterations=16",
        "checkpoint_every=2",
        "keep_checkpoints=3",
    ]


@pytest.mark.slow
def test_train_killed_with_kill_9_resumes_exactly(tmp_path):
    from restore_cli.train import TrainOptions, train

    overrides = photos_for_training(tmp_path / "photos")
    straight = tmp_path / "straight"
    options = TrainOptions(TINY_CONFIG, overrides, run_dir=straight, quiet=True)
    assert train(options, stderr=io.StringIO()) == 0

    run_dir = tmp_path / "run"
    sets = [item for override in overrides for item in ("--set", override)]
    command = cli("train", str(TINY_CONFIG), *sets, "--out", str(run_dir), "-q")
    state = run_dir / "checkpoints" / "step_0000004.state.pt"
    killed = Child(command, tmp_path / "killed.log")
    killed.wait_until(state.is_file)
    assert killed.signal(signal.SIGKILL) == -signal.SIGKILL
    assert not (run_dir / "final.safetensors").exists()
    stale = run_dir / "checkpoints" / ".step_0000006.safetensors.deadbeef.tmp.safetensors"
    stale.write_bytes(b"a save killed half-way")  # removed before the next save

    resumed = Child([*command, "--resume", "auto"], tmp_path / "resumed.log")
    assert resumed.finish() == 0, resumed.stderr()
    for name in ("step_0000016.safetensors", "step_0000016_ema.safetensors"):
        a = load_file(straight / "checkpoints" / name)
        b = load_file(run_dir / "checkpoints" / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[key], b[key]) for key in a), name
    losses = [[r["loss"] for r in read_rows(d / "log.csv")] for d in (straight, run_dir)]
    assert losses[0] == losses[1] and len(losses[0]) == 16
    assert not stale.exists() and leftovers(run_dir) == []


# --------------------------------------------------------------------------- building blocks


def test_claims_exclude_each_other_and_die_with_their_holder(tmp_path):
    target = tmp_path / "out" / "a.png"
    first = OutputClaim.acquire(target)
    assert first is not None and claim_path_for(target).exists()
    assert OutputClaim.acquire(target) is None  # a second holder, even in this process
    first.release()
    assert not claim_path_for(target).exists()
    second = OutputClaim.acquire(target)
    assert second is not None
    second.release()
    # A claim file nobody holds (its process was killed) is taken over, then cleaned away.
    claim_path_for(target).write_bytes(b"")
    third = OutputClaim.acquire(target)
    assert third is not None
    third.release()
    claim_path_for(target).write_bytes(b"")
    assert remove_stale_temp_files([target.parent]) == [claim_path_for(target)]


def test_stale_temp_files_are_removed_but_a_live_write_is_not(tmp_path):
    stale = tmp_path / ".a.png.0123abcd.tmp.png"
    stale.write_bytes(b"left by a killed run")
    user_file = tmp_path / ".notes.tmp"
    user_file.write_bytes(b"not ours")
    with atomic_path(tmp_path / "b.png") as live:
        live.write_bytes(b"being written")
        assert remove_stale_temp_files([tmp_path]) == [stale]
        assert live.exists()
    assert (tmp_path / "b.png").read_bytes() == b"being written"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.tmp", "b.png"]


def test_a_second_log_on_the_same_csv_writes_beside_it(tmp_path):
    path = tmp_path / "restore_run.csv"
    first = RunLog(path)
    second = RunLog(path)
    assert second.csv_path == tmp_path / f"restore_run.{os.getpid()}.csv"
    assert second.notices and "in use by another run" in second.notices[0]
    first.close()
    second.close()
    assert read_rows(path) == [] and path.read_text().startswith("input,output,model")


def test_sigterm_is_handled_like_ctrl_c_while_a_batch_runs():
    from restore_cli.io.signals import terminate_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), terminate_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises long before this ends
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_killed_download_never_becomes_a_cache_hit_and_is_cleaned(tmp_path, monkeypatch):
    import hashlib

    from restore_cli.weights import WeightsEntry, cached_path, resolve_weights

    monkeypatch.setenv("RESTORE_CLI_CACHE", str(tmp_path / "cache"))
    payload = b"weights" * 1000
    source = tmp_path / "remote.pth"
    source.write_bytes(payload)
    entry = WeightsEntry(
        name="tiny",
        arch="nafnet",
        url=source.as_uri(),
        sha256=hashlib.sha256(payload).hexdigest(),
        licence="MIT",
        source="tests",
    )
    target = cached_path(entry)
    target.parent.mkdir(parents=True)
    partial = target.with_name(f".{target.name}.x1y2z3.part")  # a download killed half-way
    partial.write_bytes(payload[:100])
    assert resolve_weights(entry) == target  # downloaded and verified, not the partial file
    assert target.read_bytes() == payload
    assert not partial.exists()
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]
