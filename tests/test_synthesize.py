"""`synthesize`: determinism across workers, resume, metadata round trip, mixtures, errors."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from restore_cli.degradations import DEGRADATIONS, MIXTURE_ORDER, MixtureSpec, sample_chain
from restore_cli.degradations.dataset import DegradedCropDataset
from restore_cli.degradations.pipeline import Chain, family_of
from restore_cli.errors import ConfigError
from restore_cli.synthesize import SynthesizeOptions, make_spec, regenerate_pair, synthesize

REPO = Path(__file__).resolve().parents[1]
ALL_TYPES = ["noise", "blur", "jpeg", "lowlight", "haze", "rain", "raindrop", "snow", "shadow",
             "inpaint"]  # fmt: skip


def natural_image(seed: int, size=(96, 80)) -> np.ndarray:
    """Smooth gradients + edges + mild texture, uint8 HxWx3."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]] / max(size)
    base = np.stack([0.5 + 0.4 * np.sin(5 * x + seed), 0.4 + 0.4 * y, 0.3 + 0.3 * (x > 0.5)], -1)
    return np.uint8(np.clip(base + 0.03 * rng.standard_normal(base.shape), 0, 1) * 255)


@pytest.fixture
def clean(tmp_path: Path) -> Path:
    folder = tmp_path / "clean"
    (folder / "sub").mkdir(parents=True)
    for index, name in enumerate(["a.png", "b.png", "sub/c.png"]):
        Image.fromarray(natural_image(index)).save(folder / name)
    return folder


def options(clean: Path, out: Path, **overrides) -> SynthesizeOptions:
    spec = overrides.pop("spec", None) or make_spec(
        ALL_TYPES, ["light", "medium", "heavy"], mixed=(1, 3)
    )
    return SynthesizeOptions(
        inputs=[str(clean)],
        output_dir=out,
        spec=spec,
        per_image=2,
        crop=64,
        quiet=True,
        **overrides,
    )


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_whatever_the_worker_count(clean, tmp_path):
    assert synthesize(options(clean, tmp_path / "one", seed=7)) == 0
    assert synthesize(options(clean, tmp_path / "two", seed=7, workers=2)) == 0
    one, two = tree_bytes(tmp_path / "one"), tree_bytes(tmp_path / "two")
    assert len(one) == 3 * 2 * 2 + 1  # lq + gt per pair, plus metadata.csv
    assert one == two
    assert synthesize(options(clean, tmp_path / "other", seed=8)) == 0
    other = tree_bytes(tmp_path / "other")
    assert other["lq/a_000.png"] != one["lq/a_000.png"]


def test_metadata_round_trip_regenerates_each_pair_exactly(clean, tmp_path):
    out = tmp_path / "out"
    assert synthesize(options(clean, out, seed=3)) == 0
    with (out / "metadata.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 and {r["source"] for r in rows} == {"a.png", "b.png", "sub/c.png"}
    for row in rows:
        lq, gt = regenerate_pair(row, clean)
        for tensor, column in ((lq, "lq"), (gt, "gt")):
            expected = np.asarray(Image.open(out / row[column]))
            regenerated = np.rint(tensor[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
            np.testing.assert_array_equal(regenerated, expected)
        steps = Chain.from_json(row["chain"]).steps
        assert row["types"] == "+".join(DEGRADATIONS[s.name].family for s in steps)


def test_rerun_makes_only_missing_pairs(clean, tmp_path):
    out = tmp_path / "out"
    synthesize(options(clean, out))
    before = tree_bytes(out)
    kept = out / "lq" / "b_001.png"
    stamp = kept.stat().st_mtime_ns
    (out / "lq" / "a_000.png").unlink()
    assert synthesize(options(clean, out)) == 0
    assert tree_bytes(out) == before
    assert kept.stat().st_mtime_ns == stamp


def test_bad_clean_image_fails_alone(clean, tmp_path, capsys):
    (clean / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    assert synthesize(options(clean, out), stderr=sys.stderr) == 1
    assert "broken.png" in capsys.readouterr().err
    assert (out / "lq" / "a_000.png").exists()


@pytest.mark.parametrize(
    ("types", "levels", "message"),
    [
        (["fog"], ["light"], "unknown degradation type 'fog'"),
        (["noise"], ["extreme"], "level 'extreme'"),
        (["noise", "noise"], ["light"], "listed twice"),
    ],
)
def test_bad_types_and_levels_are_clear_errors(types, levels, message):
    with pytest.raises(ConfigError, match=message):
        make_spec(types, levels)


def test_mixtures_follow_the_physical_order_and_count():
    spec = make_spec(ALL_TYPES, ["medium"], mixed=(2, 4))
    rng = np.random.default_rng(0)
    for _ in range(200):
        chain = sample_chain(spec, rng)
        families = [family_of(step.name) for step in chain.steps]
        assert 2 <= len(families) <= 4 and len(set(families)) == len(families)
        assert families == sorted(families, key=MIXTURE_ORDER.index)
        assert all(step.level == "medium" and not step.ood for step in chain.steps)


def test_gated_mixture_keeps_each_type_with_its_probability():
    spec = make_spec(["noise", "haze", "jpeg"], ["light"], gated=True, probability=0.5)
    rng = np.random.default_rng(1)
    counts = {"noise": 0, "haze": 0, "jpeg": 0}
    for _ in range(2000):
        for step in sample_chain(spec, rng).steps:
            counts[family_of(step.name)] += 1
    assert all(900 < c < 1300 for c in counts.values())  # 0.5, plus the at-least-one rule


def test_type_probability_overrides_one_gate():
    spec = make_spec(
        ["noise", "haze", "jpeg"],
        ["light"],
        gated=True,
        probability=0.1,
        type_probability={"noise": 0.8},
    )
    rng = np.random.default_rng(2)
    counts = {"noise": 0, "haze": 0, "jpeg": 0}
    for _ in range(2000):
        for step in sample_chain(spec, rng).steps:
            counts[family_of(step.name)] += 1
    # 0.8 + P(no gate open) 0.162 x 0.8 (the at-least-one draw is weighted by the gates)
    assert 1780 < counts["noise"] < 1950
    assert all(150 < counts[t] < 330 for t in ("haze", "jpeg"))  # 0.1 + 0.162 x 0.1
    with pytest.raises(ConfigError, match="snow, which are not among the types"):
        make_spec(["noise"], ["light"], type_probability={"snow": 0.5})


def test_clean_share_leaves_items_undegraded_and_keeps_other_seeds():
    spec = make_spec(["noise", "haze"], ["light"], gated=True, probability=0.5, clean=0.25)
    chains = [sample_chain(spec, np.random.default_rng(seed)) for seed in range(2000)]
    empty = sum(not chain.steps for chain in chains)
    assert 420 < empty < 580  # 0.25 of 2000; the gates alone never give an empty chain
    image = torch.rand(1, 3, 8, 8)
    assert torch.equal(Chain(()).apply(image, torch.Generator()), image)
    no_clean = make_spec(["noise", "haze"], ["light"], gated=True, probability=0.5)
    assert sample_chain(no_clean, np.random.default_rng(7)) == sample_chain(
        MixtureSpec(no_clean.types, no_clean.components, gated=True), np.random.default_rng(7)
    )
    with pytest.raises(ConfigError, match="clean probability"):
        make_spec(["noise"], ["light"], clean=1.5)


def test_preview_contact_sheet(clean, tmp_path):
    spec = make_spec(["noise", "haze"], ["light", "medium", "heavy"])
    out = tmp_path / "out"
    synthesize(options(clean, out, spec=spec, preview=True))
    with Image.open(out / "preview.png") as sheet:
        rows = sum(1 for d in DEGRADATIONS.values() if d.family in ("noise", "haze"))
        assert sheet.height == 18 + 192 * rows and sheet.width == 130 + 192 * 4


def test_dataset_is_deterministic_per_epoch_and_index(clean):
    spec = MixtureSpec(("noise", "blur"), mixed=(1, 2))
    paths = sorted(clean.rglob("*.png"))
    first = DegradedCropDataset(paths, spec, crop=48, seed=5, length=6)
    second = DegradedCropDataset(paths, spec, crop=48, seed=5, length=6)
    item = first[3]
    assert item["lq"].shape == item["gt"].shape == (3, 48, 48)
    assert torch.equal(item["lq"], second[3]["lq"]) and item["chain"] == second[3]["chain"]
    second.set_epoch(1)
    assert not torch.equal(item["lq"], second[3]["lq"])


def test_cli_synthesize(clean, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "restore_cli",
            "synthesize",
            str(clean),
            "-o",
            str(out),
            "--types",
            "noise,jpeg",
            "--mixed",
            "1-2",
            "--per-image",
            "1",
            "--crop",
            "48",
            "-q",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert len(list((out / "lq").rglob("*.png"))) == 3
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "restore_cli",
            "synthesize",
            str(clean),
            "-o",
            str(out),
            "--types",
            "fog",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert bad.returncode == 2 and "unknown degradation type 'fog'" in bad.stderr


def test_pinned_parameters_override_the_sampled_ones():
    spec = make_spec(["gaussian_noise"], ["heavy"], fixed=["gaussian_noise.sigma=25"])
    chain = sample_chain(spec, np.random.default_rng(0))
    assert chain.steps[0].params == {"sigma": 25}
    with pytest.raises(ConfigError, match="unknown parameter"):
        make_spec(["gaussian_noise"], ["heavy"], fixed=["gaussian_noise.sgima=25"])
    with pytest.raises(ConfigError, match=r"NAME\.PARAM=VALUE"):
        make_spec(["gaussian_noise"], ["heavy"], fixed=["sigma25"])
    # a MixtureSpec made in code checks the pinned values as --param does
    with pytest.raises(ConfigError, match="must be between"):
        MixtureSpec(("gaussian_noise",), fixed={"gaussian_noise": {"sigma": 1e6}})


def test_cli_clean_share_writes_identity_pairs_that_eval_groups_as_clean(clean, tmp_path):
    from typer.testing import CliRunner

    from restore_cli.cli import app

    out = tmp_path / "out"
    args = ["synthesize", str(clean), "-o", str(out), "--types", "noise", "--clean", "1", "-q"]
    args += ["--per-image", "1", "--crop", "48"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    with (out / "metadata.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 and all(r["types"] == "" and r["ood"] == "0" for r in rows)
    for row in rows:
        lq, gt = (np.asarray(Image.open(out / row[k])) for k in ("lq", "gt"))
        assert np.array_equal(lq, gt)
    evaluated = tmp_path / "eval"
    result = CliRunner().invoke(
        app, ["eval", "--model", "identity", "--data", str(out), "-o", str(evaluated)]
    )
    assert result.exit_code == 0, result.output
    with (evaluated / "summary.csv").open(newline="") as handle:
        groups = {(r["group"], r["value"]): r for r in csv.DictReader(handle)}
    assert groups[("type", "clean")]["files"] == "3"
    bad_args = ["synthesize", str(clean), "-o", str(tmp_path / "bad"), "--types", "noise"]
    bad = CliRunner().invoke(app, [*bad_args, "--clean", "2"])
    assert bad.exit_code == 2 and "clean probability" in bad.output
