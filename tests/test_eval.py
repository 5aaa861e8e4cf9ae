"""`eval`: pairing, metadata join, CSV schema, no-reference failures, --compare, baselines."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from restore_cli.errors import ConfigError, ModelError
from restore_cli.evaluate import (
    EvalOptions,
    evaluate,
    model_names,
    pair_folders,
    parse_metrics,
    read_metadata,
    split_paths,
)
from restore_cli.metrics import iqa
from restore_cli.metrics.report import groups_of, statistics
from restore_cli.models.baselines import estimate_noise_sigma, load_baseline
from restore_cli.models.loading import list_models, load_model
from restore_cli.synthesize import SynthesizeOptions, make_spec, synthesize

PSNR = "psnr_rgb_crop0_uint8"
SSIM = "ssim_rgb_crop0_uint8"


def photo(seed: int, size: tuple[int, int] = (40, 48)) -> np.ndarray:
    """Smooth gradients + an edge + mild texture, uint8 HxWx3 (height, width = size)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[0], 0 : size[1]] / max(size)
    base = np.stack([0.5 + 0.4 * np.sin(5 * x + seed), 0.4 + 0.4 * y, 0.3 + 0.3 * (x > 0.5)], -1)
    return np.uint8(np.clip(base + 0.03 * rng.standard_normal(base.shape), 0, 1) * 255)


def noisy(image: np.ndarray, seed: int, sigma: float = 8.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.uint8(np.clip(np.round(image + sigma * rng.standard_normal(image.shape)), 0, 255))


def save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def isolate_torch_home(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point torch.hub (and pyiqa, which fixes its folder at import) at ``folder``/hub."""
    monkeypatch.setenv("TORCH_HOME", str(folder))
    loaded = sys.modules.get("pyiqa.utils.download_util")
    if loaded is not None:
        monkeypatch.setattr(loaded, "DEFAULT_CACHE_DIR", str(folder / "hub" / "pyiqa"))
    return folder / "hub"


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def run(options: EvalOptions) -> tuple[int, str]:
    stderr = io.StringIO()
    code = evaluate(options, stderr=stderr)
    return code, stderr.getvalue()


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """gt: a, b, sub/c, only_gt; pred: a (as .bmp), b, sub/c, only_pred, big (size mismatch)."""
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    for index, key in enumerate(["a", "b", "sub/c", "only_gt", "big"]):
        save(gt / f"{key}.png", photo(index))
    for index, key in enumerate(["a", "b", "sub/c"]):
        extension = ".bmp" if key == "a" else ".png"  # lossless, but another extension
        save(pred / f"{key}{extension}", noisy(photo(index), 10 + index))
    save(pred / "only_pred.png", photo(7))
    save(pred / "big.png", photo(4, (44, 48)))
    return pred, gt


# ----------------------------------------------------------------------------- pairing


def test_pairs_by_relative_path_without_extension_never_by_position(folders):
    pred, gt = folders
    pairs = {pair.key: pair for pair in pair_folders(pred, gt)}
    assert sorted(pairs) == ["a", "b", "big", "only_gt", "only_pred", "sub/c"]
    assert pairs["a"].pred == pred / "a.bmp" and pairs["a"].gt == gt / "a.png"
    assert pairs["sub/c"].pred == pred / "sub" / "c.png"
    assert pairs["only_gt"].status == "missing_pred" and pairs["only_gt"].pred is None
    assert pairs["only_pred"].status == "missing_gt" and pairs["only_pred"].gt is None


def test_two_files_claiming_one_name_are_reported(tmp_path: Path):
    save(tmp_path / "pred" / "x.png", photo(0))
    save(tmp_path / "pred" / "x.bmp", photo(0))
    save(tmp_path / "gt" / "x.png", photo(0))
    (pair,) = pair_folders(tmp_path / "pred", tmp_path / "gt")
    assert pair.status == "failed" and "several files share the name 'x'" in pair.error


def test_every_problem_is_listed_counted_and_fails_the_run(folders, tmp_path: Path, capsys):
    pred, gt = folders
    out = tmp_path / "out"
    code, stderr = run(EvalOptions([pred], gt, out, quiet=True))
    assert code == 1
    assert capsys.readouterr().out == ""  # stdout stays free for pipelines
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 3
    assert any("only_gt.png: no prediction" in line for line in errors)
    assert any("only_pred.png: no ground truth" in line for line in errors)
    assert any("big.png: size 48x44 but ground truth is 48x40" in line for line in errors)
    _, rows = read_csv(out / "per_image.csv")
    status = {row["file"]: row["status"] for row in rows}
    assert status == {
        "a": "ok",
        "b": "ok",
        "big": "size_mismatch",
        "only_gt": "missing_pred",
        "only_pred": "missing_gt",
        "sub/c": "ok",
    }
    # A rerun with the output folder inside the predictions does not score its own files.
    assert run(EvalOptions([pred], gt, pred / "eval", quiet=True))[0] == 1
    assert len(read_csv(pred / "eval" / "per_image.csv")[1]) == 6
    assert run(EvalOptions([pred], gt, pred / "eval", quiet=True))[0] == 1
    assert len(read_csv(pred / "eval" / "per_image.csv")[1]) == 6
    _, summary = read_csv(out / "summary.csv")
    overall = summary[0]
    assert (overall["group"], overall["files"], overall["scored"]) == ("all", "6", "3")
    assert (overall["unmatched"], overall["failed"]) == ("2", "1")
    assert overall[f"{PSNR}_count"] == "3"


def test_values_in_the_csv_match_scikit_image(folders, tmp_path: Path):
    skmetrics = pytest.importorskip("skimage.metrics")
    pred, gt = folders
    out = tmp_path / "out"
    run(EvalOptions([pred], gt, out, quiet=True, batch_size=2))
    _, rows = read_csv(out / "per_image.csv")
    for row in (r for r in rows if r["status"] == "ok"):
        p = np.asarray(Image.open(row["pred"]).convert("RGB"))
        g = np.asarray(Image.open(row["gt"]).convert("RGB"))
        expected = skmetrics.peak_signal_noise_ratio(g, p, data_range=255)
        ssim_expected = skmetrics.structural_similarity(
            g,
            p,
            channel_axis=-1,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=255,
        )
        assert float(row[PSNR]) == pytest.approx(expected, abs=1e-4)
        assert float(row[SSIM]) == pytest.approx(ssim_expected, abs=1e-5)


# ----------------------------------------------------------------------------- CSV schema


def test_csv_headers_state_the_convention(folders, tmp_path: Path):
    pred, gt = folders
    out = tmp_path / "out"
    run(EvalOptions([pred], gt, out, color="y", crop_border=4, quiet=True))
    header, rows = read_csv(out / "per_image.csv")
    assert header == [
        "file",
        "model",
        "status",
        "psnr_y_bt601_crop4_uint8",
        "ssim_y_bt601_crop4_uint8",
        "height",
        "width",
        "pred",
        "gt",
        "error",
    ]
    assert {row["model"] for row in rows} == {"pred"}
    header, _ = read_csv(out / "summary.csv")
    assert header[:7] == ["model", "group", "value", "files", "scored", "unmatched", "failed"]
    assert header[7:] == [
        "psnr_y_bt601_crop4_uint8_mean",
        "psnr_y_bt601_crop4_uint8_std",
        "psnr_y_bt601_crop4_uint8_count",
        "psnr_y_bt601_crop4_uint8_inf",
        "ssim_y_bt601_crop4_uint8_mean",
        "ssim_y_bt601_crop4_uint8_std",
        "ssim_y_bt601_crop4_uint8_count",
    ]
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_identical_images_are_inf_and_kept_out_of_the_mean(tmp_path: Path):
    for key in ("same", "other"):
        save(tmp_path / "gt" / f"{key}.png", photo(1))
    save(tmp_path / "pred" / "same.png", photo(1))
    save(tmp_path / "pred" / "other.png", noisy(photo(1), 3))
    out = tmp_path / "out"
    assert run(EvalOptions([tmp_path / "pred"], tmp_path / "gt", out, quiet=True))[0] == 0
    _, rows = read_csv(out / "per_image.csv")
    values = {row["file"]: row[PSNR] for row in rows}
    assert values["same"] == "inf" and float(values["other"]) < 60
    _, summary = read_csv(out / "summary.csv")
    assert summary[0][f"{PSNR}_mean"] == values["other"]
    assert summary[0][f"{PSNR}_inf"] == "1" and summary[0][f"{PSNR}_count"] == "1"


def test_summary_statistics_and_groups():
    mean, std, count, infinite = statistics([1.0, 3.0, float("inf")])
    assert (mean, std, count, infinite) == (2.0, 1.0, 2, 1)
    assert statistics([]) == ("", "", 0, 0)
    row = {"types": "noise+jpeg", "levels": "heavy+light"}
    assert groups_of(row) == [
        ("all", ""),
        ("type", "noise"),
        ("type", "jpeg"),
        ("level", "heavy"),
        ("level", "light"),
        ("type_level", "noise/heavy"),
        ("type_level", "jpeg/light"),
    ]
    # an undegraded pair (synthesize --clean) has metadata naming no type; a row without
    # metadata (empty ood, as an unmatched row reads back from per_image.csv) has none
    assert groups_of({"types": "", "levels": "", "ood": 0}) == [("all", ""), ("type", "clean")]
    assert groups_of({"types": "", "levels": "", "ood": ""}) == [("all", "")]


# ----------------------------------------------------------------------------- metadata


def test_metadata_joins_by_relative_path(folders, tmp_path: Path):
    pred, gt = folders
    metadata = tmp_path / "metadata.csv"
    metadata.write_text(
        "lq,gt,types,degradations,levels,ood\n"
        "lq/a.png,gt/a.png,noise,gaussian_noise,heavy,0\n"
        "lq/b.png,gt/b.png,noise+jpeg,gaussian_noise+jpeg,light+medium,1\n"
        "lq/sub/c.png,gt/sub/c.png,blur,gaussian_blur,light,0\n",
        encoding="utf-8",
    )
    assert set(read_metadata(metadata)) >= {"a", "b", "sub/c", "gt/sub/c"}
    out = tmp_path / "out"
    code, stderr = run(EvalOptions([pred], gt, out, metadata=metadata, quiet=True))
    assert code == 1  # the fixture's unmatched files
    header, rows = read_csv(out / "per_image.csv")
    assert header[5:9] == ["types", "degradations", "levels", "ood"]
    by_file = {row["file"]: row for row in rows}
    assert by_file["sub/c"]["types"] == "blur" and by_file["b"]["ood"] == "1"
    assert by_file["only_pred"]["types"] == ""
    assert "3 of 6 rows have no metadata row" in stderr
    _, summary = read_csv(out / "summary.csv")
    groups = {(row["group"], row["value"]): row for row in summary}
    assert groups[("type", "noise")]["files"] == "2"
    assert groups[("level", "light")]["files"] == "2"
    assert groups[("type_level", "jpeg/medium")]["files"] == "1"


# ----------------------------------------------------------------------------- no reference


def test_no_reference_metric_without_weights_fails_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    isolate_torch_home(tmp_path / "empty-torch-home", monkeypatch)
    save(tmp_path / "pred" / "a.png", photo(0))
    out = tmp_path / "out"
    code, stderr = run(EvalOptions([tmp_path / "pred"], None, out, metrics=["niqe"], quiet=True))
    assert code == 1
    lines = stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: niqe: weights not in the cache")
    assert "niqe_modelparameters.mat" in lines[0]
    assert str(tmp_path / "empty-torch-home" / "hub" / "pyiqa") in lines[0]
    header, rows = read_csv(out / "per_image.csv")
    assert "niqe" in header and rows[0]["niqe"] == "" and rows[0]["status"] == "ok"


def test_full_reference_metric_needs_gt():
    with pytest.raises(ConfigError, match="psnr needs ground truth"):
        split_paths([Path("pred")], compare=False, gt=None, metrics=["psnr"])
    assert split_paths([Path("p")], compare=False, gt=None, metrics=["niqe"]) == ([Path("p")], None)
    assert split_paths([Path("p"), Path("g")], compare=False, gt=None, metrics=["ssim"]) == (
        [Path("p")],
        Path("g"),
    )
    assert split_paths(
        [Path("a"), Path("b"), Path("g")], compare=True, gt=None, metrics=["psnr"]
    ) == ([Path("a"), Path("b")], Path("g"))
    with pytest.raises(ConfigError, match="--compare"):
        split_paths([Path("a"), Path("b"), Path("g")], compare=False, gt=None, metrics=["psnr"])
    data = split_paths([Path("p")], compare=False, gt=None, metrics=["psnr"], data=Path("d"))
    assert data == ([Path("p")], None)  # GT comes from d/gt
    assert parse_metrics(" PSNR, ssim ,niqe") == ["psnr", "ssim", "niqe"]
    if iqa.pyiqa_available():
        with pytest.raises(ConfigError, match="unknown metric 'nosuch'"):
            evaluate(EvalOptions([Path("p")], Path("g"), metrics=["psnr", "nosuch"]))
    with pytest.raises(ConfigError, match="twice"):
        parse_metrics("psnr,psnr")


# ----------------------------------------------------------------------------- --compare


def test_compare_scores_folders_side_by_side(tmp_path: Path):
    gt = tmp_path / "gt"
    for index in range(3):
        save(gt / f"{index}.png", photo(index))
        save(tmp_path / "light" / f"{index}.png", noisy(photo(index), index, sigma=3))
        save(tmp_path / "heavy" / f"{index}.png", noisy(photo(index), index, sigma=20))
    out = tmp_path / "out"
    predictions = [tmp_path / "light", tmp_path / "heavy"]
    code, stderr = run(EvalOptions(predictions, gt, out))
    assert code == 0
    assert "eval summary" in stderr
    _, rows = read_csv(out / "per_image.csv")
    assert [row["model"] for row in rows] == ["light"] * 3 + ["heavy"] * 3
    _, summary = read_csv(out / "summary.csv")
    means = {row["model"]: float(row[f"{PSNR}_mean"]) for row in summary}
    assert means["light"] > means["heavy"] + 10
    assert model_names([Path("x/pred"), Path("y/pred"), Path("z")]) == ["x/pred", "y/pred", "z"]


# ----------------------------------------------------------------------------- baselines


def test_baselines_are_registered_models():
    rows = {row["name"]: row for row in list_models()}
    for name in ("identity", "nlmeans", "bm3d"):
        assert rows[name]["status"] in ("builtin", "missing") and rows[name]["licence"]
    assert rows["identity"]["status"] == "builtin"
    assert "non-commercial" in rows["bm3d"]["licence"]
    model = load_model("identity")
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(model(x), x)
    with pytest.raises(ModelError, match="takes no --weights"):
        load_model("identity", weights="w.pth")


def test_noise_estimate_is_close_on_white_noise():
    rng = np.random.default_rng(0)
    flat = np.full((128, 128, 3), 0.5) + 0.1 * rng.standard_normal((128, 128, 3))
    assert estimate_noise_sigma(flat) == pytest.approx(0.1, rel=0.05)
    assert estimate_noise_sigma(np.full((16, 16, 3), 0.3)) == 0.0


def test_bm3d_denoises():
    pytest.importorskip("bm3d")
    skmetrics = pytest.importorskip("skimage.metrics")
    clean = photo(3, (32, 32)).astype(np.float32) / 255
    dirty = noisy(photo(3, (32, 32)), 1, sigma=20).astype(np.float32) / 255
    model = load_baseline("bm3d")
    restored = model(torch.from_numpy(dirty).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    before = skmetrics.peak_signal_noise_ratio(clean, dirty, data_range=1)
    after = skmetrics.peak_signal_noise_ratio(clean, restored, data_range=1)
    assert after > before + 3


# ----------------------------------------------------------------------------- end to end


def test_end_to_end_on_a_synthesized_set(tmp_path: Path):
    clean = tmp_path / "clean"
    for index in range(3):
        save(clean / f"photo{index}.png", photo(index, (64, 64)))
    data = tmp_path / "data"
    spec = make_spec(["gaussian_noise"], ["medium", "heavy"])
    synthesis = SynthesizeOptions(inputs=[str(clean)], output_dir=data, spec=spec, quiet=True)
    assert synthesize(synthesis) == 0
    out = tmp_path / "eval"
    options = EvalOptions(models=["identity", "nlmeans"], data=data, output_dir=out, quiet=True)
    code, stderr = run(options)
    assert code == 0, stderr
    assert sorted(p.name for p in (out / "pred" / "nlmeans").glob("*.png")) == [
        "photo0_000.png",
        "photo1_000.png",
        "photo2_000.png",
    ]
    header, rows = read_csv(out / "per_image.csv")
    assert "types" in header and {row["types"] for row in rows} == {"noise"}
    assert {row["degradations"] for row in rows} == {"gaussian_noise"}
    _, summary = read_csv(out / "summary.csv")
    noise = {
        row["model"]: row for row in summary if (row["group"], row["value"]) == ("type", "noise")
    }
    assert float(noise["nlmeans"][f"{PSNR}_mean"]) > float(noise["identity"][f"{PSNR}_mean"]) + 2
    assert float(noise["nlmeans"][f"{SSIM}_mean"]) > float(noise["identity"][f"{SSIM}_mean"])

    # identity really is the degraded input: its scores equal lq against gt.
    lq_code, _ = run(EvalOptions([data / "lq"], data / "gt", tmp_path / "lq-eval", quiet=True))
    assert lq_code == 0
    _, lq_rows = read_csv(tmp_path / "lq-eval" / "per_image.csv")
    identity = [row[PSNR] for row in rows if row["model"] == "identity"]
    assert identity == [row[PSNR] for row in lq_rows]

    # A second run keeps the existing predictions (skip-existing) and gives the same numbers.
    before = (out / "per_image.csv").read_bytes()
    assert run(options)[0] == 0
    _, restore_log = read_csv(out / "pred" / "nlmeans" / "restore_run.csv")
    assert {row["status"] for row in restore_log} == {"skipped"}
    assert (out / "per_image.csv").read_bytes() == before


def test_no_reference_mode_scores_predictions_alone(tmp_path: Path, monkeypatch):
    """NIQE with a stand-in parameter file in pyiqa's cache (the real one cannot be fetched
    here): proves the files-present path builds the metric and scores without GT."""
    if not iqa.pyiqa_available():
        pytest.skip("pyiqa not installed")
    scipy_io = pytest.importorskip("scipy.io")
    isolate_torch_home(tmp_path / "torch", monkeypatch)
    (params,) = iqa.WEIGHT_FILES["niqe"]
    target = params.path()
    assert target is not None
    target.parent.mkdir(parents=True)
    scipy_io.savemat(target, {"mu_prisparam": np.full((1, 36), 0.5), "cov_prisparam": np.eye(36)})
    for index in range(2):
        save(tmp_path / "pred" / f"{index}.png", photo(index, (96, 96)))
    out = tmp_path / "out"
    code, stderr = run(EvalOptions([tmp_path / "pred"], None, out, metrics=["niqe"], quiet=True))
    assert code == 0, stderr
    header, rows = read_csv(out / "per_image.csv")
    assert header[:4] == ["file", "model", "status", "niqe"]
    assert all(float(row["niqe"]) > 0 for row in rows) and rows[0]["gt"] == ""


def one_photo_set(tmp_path: Path, side: int) -> Path:
    """A `synthesize` output of one random photo with medium Gaussian noise."""
    clean = tmp_path / "clean"
    save(clean / "photo.png", photo(0, (side, side)))
    data = tmp_path / "data"
    spec = make_spec(["gaussian_noise"], ["medium"])
    assert synthesize(SynthesizeOptions([str(clean)], output_dir=data, spec=spec, quiet=True)) == 0
    return data


def test_the_cli_builds_the_same_options(tmp_path: Path):
    """Through `restore-cli eval` itself: every option the command passes must exist (a
    renamed field once made every eval invocation crash with a TypeError)."""
    from typer.testing import CliRunner

    from restore_cli.cli import app

    data = one_photo_set(tmp_path, 48)
    out = tmp_path / "eval"
    args = ["eval", "--model", "identity", "--data", str(data), "-o", str(out), "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    _, rows = read_csv(out / "per_image.csv")
    assert [row["status"] for row in rows] == ["ok"]
    result = CliRunner().invoke(app, ["eval", str(data / "lq"), str(data / "gt"), "-o", str(out)])
    assert result.exit_code == 0, result.output


def test_predictions_of_other_weights_under_the_same_name_are_never_reused(tmp_path: Path):
    """Two checkpoints both called final.safetensors: a rerun into the same -o must not score
    the first one's kept predictions as the second's, nor may one run mix them."""
    from safetensors.torch import save_file

    from restore_cli.models.nafnet import build_nafnet

    files = []
    for seed, folder in ((0, "run-a"), (1, "run-b")):
        torch.manual_seed(seed)
        module = build_nafnet({"width": 8, "enc_blk_nums": [1], "dec_blk_nums": [1]})
        with torch.no_grad():
            for parameter in module.parameters():
                parameter.add_(0.1 * torch.randn_like(parameter))
        path = tmp_path / folder / "final.safetensors"
        path.parent.mkdir()
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
        files.append(str(path))
    data = one_photo_set(tmp_path, 32)
    out = tmp_path / "eval"

    def scores() -> list[str]:
        return [row[PSNR] for row in read_csv(out / "per_image.csv")[1]]

    with pytest.raises(ConfigError, match="are both named 'final'"):
        run(EvalOptions(models=files, data=data, output_dir=out, quiet=True))
    assert not (out / "pred").exists()  # refused before the first model ran
    assert run(EvalOptions(models=files[:1], data=data, output_dir=out, quiet=True))[0] == 0
    first = scores()
    assert run(EvalOptions(models=files[:1], data=data, output_dir=out, quiet=True))[0] == 0
    assert scores() == first  # same model: the predictions are reused
    with pytest.raises(ConfigError, match=r"another model or options \(weights_sha256 differ"):
        run(EvalOptions(models=files[1:], data=data, output_dir=out, quiet=True))
    options = EvalOptions(models=files[1:], data=data, output_dir=out, overwrite=True, quiet=True)
    assert run(options)[0] == 0
    assert scores() != first  # redone with the second weights
    # Predictions without a record (an older restore-cli) are not trusted either.
    (out / "pred" / "final" / ".restore-cli-model.json").unlink()
    with pytest.raises(ConfigError, match="no recorded model made"):
        run(EvalOptions(models=files[1:], data=data, output_dir=out, quiet=True))
