"""--shard I/N: shards 0..N-1 together do exactly what one unsharded run does, stably by path."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from restore_cli.cli import app
from restore_cli.errors import ConfigError
from restore_cli.io.shard import Shard, parse_shard
from restore_cli.synthesize import METADATA_NAME, synthesize
from tests.test_synthesize import clean, options, tree_bytes  # noqa: F401 - fixture

NAMES = [f"img{index:02d}.png" for index in range(12)] + ["sub/x.png", "sub/y.JPG"]


def test_parse_and_tag():
    assert parse_shard(None) is None
    assert parse_shard("2/8") == Shard(2, 8) and parse_shard(" 0 / 1 ") == Shard(0, 1)
    for bad in ("8/8", "1/0", "-1/4", "a/b", "3", "1/2/3"):
        with pytest.raises(ConfigError, match="--shard") as caught:
            parse_shard(bad)
        assert "\n" not in str(caught.value)
    assert Shard(2, 8).tag(Path("out/restore_run.csv")) == Path("out/restore_run.shard-2-of-8.csv")


def test_every_path_has_exactly_one_shard_which_does_not_change_when_files_are_added():
    paths = [f"folder/{index}.png" for index in range(400)]
    owners = {p: [i for i in range(5) if Shard(i, 5).owns(p)] for p in paths}
    assert all(len(found) == 1 for found in owners.values())
    sizes = np.bincount([found[0] for found in owners.values()], minlength=5)
    assert sizes.min() > 50  # a spread, not everything in one shard
    # Ownership is a function of the path alone (not of the list), case-folded.
    assert Shard(3, 5).owns("A/B.PNG") == Shard(3, 5).owns("a/b.png")
    assert Shard(3, 5).owns(Path("a") / "b.png") == Shard(3, 5).owns("a/b.png")
    # ... and extension-free, as eval pairs files: a.jpg restored to a.png stays in its shard.
    assert Shard(3, 5).owns("a/b.png") == Shard(3, 5).owns("a/b.jpg") == Shard(3, 5).owns("a/b")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "in"
    rng = np.random.default_rng(0)
    for name in NAMES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / name)
    (root / "broken.png").write_text("not an image")
    return root


def restore(folder: Path, out: Path, *extra: str) -> int:
    args = ["restore", str(folder), "-r", "-o", str(out), "--model", "identity", "--quiet"]
    return CliRunner().invoke(app, [*args, *extra]).exit_code


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_restore_shards_together_equal_the_unsharded_run(folder, tmp_path):
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    assert restore(folder, whole) == 1  # the broken file fails
    codes = [restore(folder, sharded, "--shard", f"{index}/3") for index in range(3)]
    assert sorted(codes) == [0, 0, 1]  # only the broken file's shard fails
    outputs = {k: v for k, v in tree_bytes(sharded).items() if not k.endswith(".csv")}
    assert outputs == {k: v for k, v in tree_bytes(whole).items() if not k.endswith(".csv")}
    shard_rows = [
        row for i in range(3) for row in rows(sharded / f"restore_run.shard-{i}-of-3.csv")
    ]
    whole_rows = rows(whole / "restore_run.csv")
    assert sorted(r["input"] for r in shard_rows) == sorted(r["input"] for r in whole_rows)
    assert len(shard_rows) == len(NAMES) + 1
    assert not (sharded / "restore_run.csv").exists()
    # Rerunning a shard finds its own files done and touches no other shard's.
    assert restore(folder, sharded, "--shard", "0/3") == codes[0]
    again = rows(sharded / "restore_run.shard-0-of-3.csv")
    assert {r["status"] for r in again} <= {"skipped", "failed"}


def test_synthesize_shards_make_the_same_pairs_and_a_final_run_writes_all_metadata(
    clean,  # noqa: F811 - fixture
    tmp_path,
):
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    assert synthesize(options(clean, whole)) == 0
    for index in range(2):
        assert synthesize(options(clean, sharded, shard=Shard(index, 2))) == 0
    parts = [rows(sharded / f"metadata.shard-{i}-of-2.csv") for i in range(2)]
    assert sum(len(part) for part in parts) == len(rows(whole / METADATA_NAME)) == 6
    assert synthesize(options(clean, sharded)) == 0  # every pair exists: only the table
    assert tree_bytes(sharded / "lq") == tree_bytes(whole / "lq")
    assert tree_bytes(sharded / "gt") == tree_bytes(whole / "gt")
    assert (sharded / METADATA_NAME).read_bytes() == (whole / METADATA_NAME).read_bytes()


def test_route_shards_cover_every_input_once_with_a_table_each(tmp_path, monkeypatch):
    from tests.test_unirestorer import fitted_model, save_tiny, write_photos

    weights = save_tiny(tmp_path / "tiny.safetensors", fitted_model())
    photos = write_photos(tmp_path / "in")
    monkeypatch.chdir(tmp_path)  # the default table name lands here
    for index in range(2):
        args = ["route", str(photos), "--model", str(weights), "--device", "cpu", "-q"]
        assert CliRunner().invoke(app, [*args, "--shard", f"{index}/2"]).exit_code == 0
    tables = [rows(tmp_path / f"routes.shard-{index}-of-2.csv") for index in range(2)]
    names = sorted(Path(row["input"]).name for table in tables for row in table)
    assert names == sorted(p.name for p in photos.iterdir())
    assert not (tmp_path / "routes.csv").exists()


def eval_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "--model", "identity", "--data", str(data), "-o", str(out), "-q", *extra]


def test_eval_shards_merged_equal_the_unsharded_eval(clean, tmp_path):  # noqa: F811
    data, whole, sharded = tmp_path / "data", tmp_path / "whole", tmp_path / "sharded"
    assert synthesize(options(clean, data)) == 0
    runner = CliRunner()
    assert runner.invoke(app, eval_args(data, whole)).exit_code == 0
    sharded.mkdir()
    early = runner.invoke(app, ["eval", "--merge-shards", "-o", str(sharded)])
    assert early.exit_code == 2 and "no per_image.shard" in early.output
    for index in range(3):
        assert runner.invoke(app, eval_args(data, sharded, "--shard", f"{index}/3")).exit_code == 0
        if index == 0:
            partial = runner.invoke(app, ["eval", "--merge-shards", "-o", str(sharded)])
            assert partial.exit_code == 2
            assert "shard(s) 1, 2 of 3 have no table yet" in partial.output
    # Each shard restored and scored only its own files; together, every file once.
    parts = [rows(sharded / f"per_image.shard-{i}-of-3.csv") for i in range(3)]
    assert sorted(r["file"] for part in parts for r in part) == sorted(
        r["file"] for r in rows(whole / "per_image.csv")
    )
    assert all(len(part) < 6 for part in parts)
    assert runner.invoke(app, ["eval", "--merge-shards", "-o", str(sharded)]).exit_code == 0

    def comparable(table: list[dict[str, str]]) -> list[dict[str, str]]:
        return [{k: v for k, v in row.items() if k != "pred"} for row in table]

    assert comparable(rows(sharded / "per_image.csv")) == comparable(rows(whole / "per_image.csv"))
    merged, direct = rows(sharded / "summary.csv"), rows(whole / "summary.csv")
    assert [r["group"] + r["value"] for r in merged] == [r["group"] + r["value"] for r in direct]
    for got, want in zip(merged, direct, strict=True):
        for column, value in want.items():
            if column.endswith(("_mean", "_std")) and value:
                assert abs(float(got[column]) - float(value)) < 1e-6, column
            else:
                assert got[column] == value, column
    assert (sharded / "summary.png").is_file()
