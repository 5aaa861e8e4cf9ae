"""Hostile and odd inputs for `restore`: the generated corpus and the cases needing their own run.

Every case must end in a correct output or in one ``error:`` line naming the file and the
cause; the batch goes on, the run CSV has the row, the exit code says so, and no temp or claim
file is left. The corpus (tests/hostile_corpus.py) runs twice in process: through a tiny random
NAFNet (size multiple, padding, tiling) and through the identity model, where outputs can be
compared with the inputs exactly. Permissions need a subprocess (root ignores them otherwise).
"""

from __future__ import annotations

import csv
import io
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from restore_cli.cli import app
from restore_cli.engine import EngineOptions
from restore_cli.errors import ConfigError
from restore_cli.io.atomic import CLAIM_SUFFIX, is_temp_file
from restore_cli.models.loading import load_model
from restore_cli.report import FileRecord, RunLog
from restore_cli.restore import RestoreOptions, RestoreRun, Streams
from tests.hostile_corpus import FAILED, IGNORED, OK, Case, build_corpus, pattern
from tests.test_restore_cli import tiny_nafnet_file

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Case]]:
    root = tmp_path_factory.mktemp("hostile") / "in"
    return root, build_corpus(root)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_nafnet_file(tmp_path_factory.mktemp("model") / "tiny.safetensors")


class Result:
    """What one in-process `restore` run produced."""

    def __init__(self, code: int, stdout: str, stderr: str, csv_path: Path) -> None:
        self.code, self.stdout, self.stderr = code, stdout, stderr
        with csv_path.open(newline="", encoding="utf-8") as handle:
            self.rows = list(csv.DictReader(handle))

    def row(self, path: Path) -> dict[str, str]:
        found = [r for r in self.rows if r["input"] == str(path)]
        assert len(found) == 1, (path, len(found))
        return found[0]

    def errors(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]


def restore(
    inputs: list[str], out: Path, model: str | Path, stdin: str | None = None, **options
) -> Result:
    loaded = load_model(str(model))
    streams = Streams(
        stdin=io.StringIO(stdin) if stdin is not None else None,
        stdout=io.StringIO(),
        stderr=io.StringIO(),
    )
    options.setdefault("engine", EngineOptions(device="cpu"))
    run = RestoreRun(RestoreOptions(inputs=inputs, output_dir=out, **options), loaded, streams)
    code = run.run()
    assert run.log.csv_path is not None
    return Result(code, streams.stdout.getvalue(), streams.stderr.getvalue(), run.log.csv_path)


def leftovers(folder: Path) -> list[Path]:
    """Temp or claim files: a run must never leave one behind."""
    return [p for p in folder.rglob("*") if is_temp_file(p) or p.name.endswith(CLAIM_SUFFIX)]


def assert_corpus_outcomes(result: Result, root: Path, out: Path, cases: list[Case]) -> None:
    assert result.code == 1  # some cases fail by design
    assert "Traceback" not in result.stderr
    for line in result.stderr.splitlines():
        assert line.startswith(("error: ", "warning: ", "note: ", "restored ")), line
    expected_rows = [c for c in cases if c.expect != IGNORED]
    assert len(result.rows) == len(expected_rows)  # nothing twice, not even through the loop
    errors = result.errors()
    for case in cases:
        source, output = root / case.relative, out / case.output
        if case.expect == IGNORED:
            assert not any(r["input"] == str(source) for r in result.rows), case.relative
            assert not output.is_file(), case.relative
            continue
        row = result.row(source)
        if case.expect == OK:
            assert row["status"] == "ok", (case.relative, row["error"])
            assert output.is_file(), case.relative
            if case.check is not None:
                case.check(source, output)
            assert case.warning in row["error"], (case.relative, row["error"])
            continue
        assert case.expect == FAILED
        assert row["status"] == "failed", case.relative
        assert case.cause in row["error"] and str(source) in row["error"], row["error"]
        assert "\n" not in row["error"]
        lines = [line for line in errors if str(source) in line]
        assert len(lines) == 1 and case.cause in lines[0], (case.relative, lines)
        assert not output.exists(), case.relative
    assert leftovers(out) == []


def test_corpus_has_at_least_40_cases_of_each_kind_needed(corpus):
    _, cases = corpus
    assert len(cases) >= 40
    assert {c.expect for c in cases} == {OK, FAILED, IGNORED}
    assert len({c.relative for c in cases}) == len(cases)


def test_corpus_through_a_tiny_nafnet(corpus, tiny_model, tmp_path):
    root, cases = corpus
    out = tmp_path / "out"
    result = restore([str(root)], out, tiny_model, recursive=True)
    assert_corpus_outcomes(result, root, out, cases)
    # Warnings are single lines naming the file (not Python's two-line format).
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert any("animated.webp" in line and "only the first" in line for line in warned)
    # A rerun skips every finished output and fails the same files again: nothing is lost.
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.suffix != ".csv"}
    again = restore([str(root)], out, tiny_model, recursive=True, quiet=True)
    assert {r["status"] for r in again.rows} == {"skipped", "failed"}
    assert {p: p.read_bytes() for p in before} == before


def test_corpus_through_the_identity_model_is_exact(corpus, tmp_path):
    root, cases = corpus
    out = tmp_path / "out"
    result = restore([str(root)], out, "identity", recursive=True)
    assert_corpus_outcomes(result, root, out, cases)
    exact = [c for c in cases if c.exact is not None]
    assert len(exact) >= 15
    for case in exact:
        case.exact(root / case.relative, out / case.output)


# --------------------------------------------------------------------------- naming scenarios


def save(path: Path, array: np.ndarray, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **options)
    return path


def test_names_differing_only_by_extension_collide_and_one_is_done(tmp_path):
    save(tmp_path / "in" / "x.png", pattern(8, 8))
    save(tmp_path / "in" / "x.jpg", pattern(8, 8))
    result = restore([str(tmp_path / "in")], tmp_path / "out", "identity", ext="png")
    assert result.code == 1
    assert [r["status"] for r in result.rows] == ["ok", "failed"]
    assert "would also be written by" in result.rows[1]["error"]
    assert len(result.errors()) == 1 and "x.png" in result.errors()[0]


def test_output_folder_equal_to_input_folder(tmp_path):
    folder = tmp_path / "photos"
    save(folder / "a.png", pattern(8, 8))
    same = restore([str(folder)], folder, "identity", quiet=True)
    assert same.code == 1 and "output path equals the input" in same.rows[0]["error"]
    assert (folder / "a.png").read_bytes() == save(tmp_path / "ref.png", pattern(8, 8)).read_bytes()
    # With a suffix it works, and a rerun does not restore its own outputs again (a_r_r.png).
    first = restore([str(folder)], folder, "identity", suffix="_r", quiet=True)
    assert first.code == 0 and (folder / "a_r.png").is_file()
    second = restore([str(folder)], folder, "identity", suffix="_r", quiet=True)
    assert second.code == 0
    assert [r["status"] for r in second.rows] == ["skipped", "skipped"]
    assert "is the output of" in second.rows[1]["error"]
    assert not (folder / "a_r_r.png").exists()


def test_an_existing_folder_at_the_output_path_is_an_error_not_a_skip(tmp_path):
    source = save(tmp_path / "in" / "a.png", pattern(8, 8))
    (tmp_path / "out" / "a.png").mkdir(parents=True)
    result = restore([str(source)], tmp_path / "out", "identity")
    assert result.code == 1 and "is an existing folder" in result.rows[0]["error"]


def test_named_pipes_gifs_links_and_stdin_lists_never_escape_or_hang(tmp_path):
    """Named inputs and stdin lines: odd ones fail up front; outputs stay inside -o."""
    inside = tmp_path / "in"
    plain = save(inside / "plain.png", pattern(8, 8))
    gif = save(inside / "anim.gif", pattern(8, 8))
    os.mkfifo(inside / "pipe.png")  # opening it would block the batch forever
    os.symlink("missing.png", inside / "dangling.png")
    os.symlink("loop.png", inside / "loop.png")
    outside = save(tmp_path / "elsewhere" / "deep" / "other.png", pattern(8, 8))
    listing = "\n".join(
        ["..", "/", str(outside), f"{inside}/../elsewhere/deep/../deep/other.png", str(plain)]
    )
    out = tmp_path / "out"
    before = sorted(p for p in tmp_path.rglob("*") if p != out)
    named = [str(gif), str(inside / "pipe.png"), str(inside / "dangling.png")]
    result = restore(["-", *named, str(inside / "loop.png")], out, "identity", stdin=listing)
    causes = {Path(r["input"]).name or r["input"]: (r["status"], r["error"]) for r in result.rows}
    assert causes["anim.gif"][1].endswith(
        "cannot write .gif outputs; choose --ext png, jpg, webp or tif"
    )
    assert "not a regular file" in causes["pipe.png"][1]
    assert "broken symbolic link" in causes["dangling.png"][1]
    assert "cannot access" in causes["loop.png"][1]
    assert "is a folder" in causes[".."][1] and "is a folder" in causes["/"][1]
    statuses = [r["status"] for r in result.rows if Path(r["input"]).name == "other.png"]
    assert statuses == ["ok", "failed"]  # the second one collides with the first
    assert sorted(p.name for p in out.iterdir()) == ["other.png", "plain.png", "restore_run.csv"]
    assert sorted(p for p in tmp_path.rglob("*") if out not in (p, *p.parents)) == before
    assert result.code == 1 and len(result.errors()) == 7


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--suffix", "/../../x"], "--suffix '/../../x': must not contain path separators"),
        (["--max-pixels", "0"], "--max-pixels"),
        (["--batch-size", "-1"], "--batch-size"),
        (["-o", "PLACEHOLDER_FILE/out"], "cannot write the run CSV"),
    ],
)
def test_bad_options_are_one_line_usage_errors(tmp_path, args, message):
    source = save(tmp_path / "a.png", pattern(8, 8))
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    args = [a.replace("PLACEHOLDER_FILE", str(blocker)) for a in args]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "out")]
    result = CliRunner().invoke(app, ["restore", str(source), "--model", "identity", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_max_pixels_is_validated_in_process_too():
    with pytest.raises(ConfigError, match="--max-pixels 0: must be at least 1"):
        RestoreRun(RestoreOptions(["x.png"], max_pixels=0), load_model("identity"))


# --------------------------------------------------------------------------- resources


@pytest.fixture
def file_size_limit():
    """RLIMIT_FSIZE: writes beyond it fail with EFBIG, as on a full disk (no tmpfs needed)."""
    if signal.getsignal(signal.SIGXFSZ) != signal.SIG_IGN:  # CPython ignores it at startup
        pytest.skip("SIGXFSZ is not ignored in this interpreter")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def limit(size: int) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))

    yield limit
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_disk_full_fails_the_file_keeps_the_earlier_result_and_goes_on(tmp_path, file_size_limit):
    noisy = np.random.default_rng(0).integers(0, 256, (160, 160, 3), dtype=np.uint8)
    big = save(tmp_path / "in" / "big.png", noisy)  # ~77 KB as PNG
    save(tmp_path / "in" / "small.png", pattern(4, 4))
    out = tmp_path / "out"
    (out).mkdir()
    (out / "big.png").write_bytes(b"an earlier result")
    file_size_limit(20_000)
    try:
        result = restore([str(tmp_path / "in")], out, "identity", overwrite=True)
    finally:
        file_size_limit(resource.RLIM_INFINITY)
    assert result.code == 1
    row = result.row(big)
    assert row["status"] == "failed"
    assert "disk full, quota or file size limit reached" in row["error"]
    assert (out / "big.png").read_bytes() == b"an earlier result"
    assert result.row(tmp_path / "in" / "small.png")["status"] == "ok"
    assert leftovers(out) == []


def test_a_run_csv_that_stops_accepting_rows_is_reported_once(tmp_path, file_size_limit):
    log = RunLog(tmp_path / "run.csv")
    header = (tmp_path / "run.csv").stat().st_size
    file_size_limit(header + 150)  # room for one row, not two
    try:
        for name in ("a" * 60, "b" * 60, "c" * 60):
            log.add(FileRecord(input=name, output=name, model="m"))
        log.close()
    finally:
        file_size_limit(resource.RLIM_INFINITY)
    assert log.log_error is not None and "File too large" in log.log_error
    assert "\n" not in log.log_error and str(tmp_path / "run.csv") in log.log_error
    assert log.counts["ok"] == 3  # counting goes on; restore.py turns log_error into exit 1
    with (tmp_path / "run.csv").open(newline="") as handle:
        assert [r["input"] for r in csv.DictReader(handle)] == ["a" * 60]


def nan_model(tmp_path: Path, tiny_model: Path) -> Path:
    state = load_file(str(tiny_model))
    name = next(k for k in state if k.endswith("ending.bias"))
    state[name] = torch.full_like(state[name], float("nan"))
    path = tmp_path / "nan.safetensors"
    save_file(state, str(path))
    return path


def test_a_model_that_produces_nan_fails_each_file_with_one_line(tmp_path, tiny_model):
    save(tmp_path / "in" / "a.png", pattern(16, 16))
    save(tmp_path / "in" / "b.jpg", pattern(16, 16))
    out = tmp_path / "out"
    result = restore([str(tmp_path / "in")], out, nan_model(tmp_path, tiny_model))
    assert result.code == 1
    assert [r["status"] for r in result.rows] == ["failed", "failed"]
    assert all("NaN/Inf" in line for line in result.errors()) and len(result.errors()) == 2
    assert sorted(p.name for p in out.iterdir()) == ["restore_run.csv"]


def permission_wrapper() -> list[str]:
    """A command prefix under which file permissions apply, even when the tests run as root."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    prefix = [setpriv or "setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    probe = subprocess.run([*prefix, "true"], capture_output=True) if setpriv else None
    if probe is None or probe.returncode != 0:
        pytest.skip("running as root and cannot drop CAP_DAC_OVERRIDE (no usable setpriv)")
    return prefix


@pytest.mark.slow
def test_unreadable_files_and_folders_and_an_unwritable_output_folder(tmp_path, tiny_model):
    """One CLI run (as a subprocess, with root's permission override dropped)."""
    prefix = permission_wrapper()
    inputs, out = tmp_path / "in", tmp_path / "out"
    locked = save(inputs / "locked.png", pattern(8, 8))
    save(inputs / "secret" / "hidden.png", pattern(8, 8))
    save(inputs / "sub" / "fine.png", pattern(8, 8))
    save(inputs / "ok.png", pattern(8, 8))
    (out / "sub").mkdir(parents=True)
    modes = {locked: 0o000, inputs / "secret": 0o000, out / "sub": 0o555}
    for path, mode in modes.items():
        path.chmod(mode)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "restore_cli", "restore", str(inputs), "-r", "-o", str(out)]
    try:
        done = subprocess.run(
            [*prefix, *command, "--model", str(tiny_model)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
    finally:
        for path in modes:
            path.chmod(0o755)
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {locked}: permission denied",
        f"error: {inputs / 'secret'}: cannot list this folder (Permission denied)",
        f"error: {out / 'sub' / 'fine.png'}: cannot write there (Permission denied)",
    ]
    with (out / "restore_run.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(Path(r["input"]).name, r["status"]) for r in rows] == [
        ("locked.png", "failed"),
        ("ok.png", "ok"),
        ("secret", "failed"),
        ("fine.png", "failed"),
    ]
    assert list((out / "sub").iterdir()) == [] and leftovers(out) == []
