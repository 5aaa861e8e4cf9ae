"""restore --engine ray: a local Ray cluster gives the local engine's outputs and CSV rows."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from restore_cli.cli import app
from tests.test_restore_cli import tiny_nafnet_file
from tests.test_synthesize import clean, options, tree_bytes  # noqa: F401 - fixture


def restore(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["restore", *args, "--quiet", "--device", "cpu"])
    return result.exit_code, result.output


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def test_missing_ray_is_a_one_line_usage_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    code, output = restore(str(tmp_path), "-o", str(tmp_path / "out"), "--model", "identity",
                           "--engine", "ray")  # fmt: skip
    assert code == 2
    assert "--engine ray needs Ray Data: pip install 'restore-cli[ray]'" in output
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_engine_matches_the_local_engine(ray_cluster, tmp_path, monkeypatch):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(7):
        name = f"sub/p{index}.png" if index % 3 == 0 else f"p{index}.png"
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / name)
    (folder / "broken.png").write_text("not an image")
    tiny_nafnet_file(tmp_path / "m.safetensors")
    monkeypatch.chdir(tmp_path)  # relative paths in, as users type them
    local, remote = Path("local"), Path("remote")
    (remote / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(remote / "p1.png")
    (local / "sub").mkdir(parents=True)
    (local / "p1.png").write_bytes((remote / "p1.png").read_bytes())  # skipped by both

    args = ["in", "-r", "--model", "m.safetensors"]
    assert restore(*args, "-o", str(local))[0] == 1  # the broken file
    code, output = restore(*args, "-o", str(remote), "--engine", "ray", "--ray-workers", "2")
    assert code == 1, output
    assert tree_bytes(remote).keys() == tree_bytes(local).keys()
    for name, data in tree_bytes(local).items():
        if not name.endswith(".csv"):
            assert tree_bytes(remote)[name] == data, name
    local_rows = rows(local / "restore_run.csv")
    remote_rows = rows(remote / "restore_run.csv")
    for row in local_rows + remote_rows:
        row["output"] = Path(row["output"]).relative_to(Path(row["output"]).parts[0]).as_posix()
    assert remote_rows == local_rows
    assert [row["status"] for row in local_rows].count("ok") == 6
    # A rerun on the cluster finds everything done.
    assert restore(*args, "-o", str(remote), "--engine", "ray")[0] == 1
    assert {row["status"] for row in rows(remote / "restore_run.csv")} == {"skipped", "failed"}


def test_synthesize_on_ray_makes_the_same_bytes(ray_cluster, clean, tmp_path):  # noqa: F811
    from restore_cli.distributed import RayOptions
    from restore_cli.synthesize import synthesize

    (clean / "broken.png").write_text("not an image")
    local, remote = tmp_path / "local", tmp_path / "remote"
    assert synthesize(options(clean, local)) == 1
    assert synthesize(options(clean, remote, ray=RayOptions(workers=2))) == 1
    assert tree_bytes(remote) == tree_bytes(local)  # pairs and metadata.csv


def test_eval_on_ray_gives_the_local_tables(ray_cluster, clean, tmp_path, monkeypatch):  # noqa: F811
    from restore_cli.synthesize import synthesize

    monkeypatch.chdir(tmp_path)  # relative paths in, as users type them
    assert synthesize(options(clean, Path("data"))) == 0
    next(Path("data/lq").rglob("*.png")).unlink()  # its ground truth gets no prediction
    tables = {}
    # One actor with both CPUs (and two torch threads) of the test cluster.
    for name, extra in (("local", []), ("remote", ["--engine", "ray", "--cpus-per-worker", "2"])):
        args = ["eval", "--model", "identity", "--data", "data", "-o", name, "-q", *extra]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1, result.output  # the missing prediction
        assert "no prediction with the same relative path" in result.output
        per_image = rows(Path(name) / "per_image.csv")
        for row in per_image:
            for column in ("pred", "error"):
                row[column] = row[column].replace(f"{name}/pred", "OUT/pred")
        tables[name] = (per_image, (Path(name) / "summary.csv").read_bytes())
    assert tables["remote"] == tables["local"]
    assert [row["status"] for row in tables["local"][0]].count("ok") == 5


def test_worker_count_divides_the_cluster_by_what_each_worker_takes():
    from types import SimpleNamespace

    from restore_cli.distributed import JOBS_PER_BATCH, RayOptions, worker_count

    cluster = SimpleNamespace(cluster_resources=lambda: {"CPU": 16.0, "GPU": 2.0})
    many = 100 * JOBS_PER_BATCH
    assert worker_count(cluster, RayOptions(), many) == 16
    assert worker_count(cluster, RayOptions(cpus_per_worker=4), many, cpus=4) == 4
    assert worker_count(cluster, RayOptions(gpus_per_worker=0.5), many) == 4
    assert worker_count(cluster, RayOptions(), 2 * JOBS_PER_BATCH) == 2  # no idle actors
    assert worker_count(cluster, RayOptions(workers=3), many) == 3


@pytest.mark.parametrize(
    ("values", "message"),
    [({"gpus_per_worker": -1}, "--gpus-per-worker"), ({"workers": 0}, "--ray-workers"),
     ({"cpus_per_worker": 0}, "--cpus-per-worker")],
)  # fmt: skip
def test_bad_ray_options_are_usage_errors_for_every_command(values, message):
    from restore_cli.distributed import RayOptions
    from restore_cli.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        RayOptions(**values)
