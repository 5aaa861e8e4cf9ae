"""Input discovery and output planning: folders, recursion, globs, stdin, collisions, skips."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from restore_cli.io.discover import expand_inputs, plan_jobs


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for name in ["b.png", "a.JPG", "notes.txt", "sub/c.tif", "sub/deeper/d.webp", ".hidden/e.png"]:
        touch(root / name)
    touch(root / ".a.png.0123abcd.tmp.png")  # a temp file of an interrupted write
    return root


def relatives(sources):
    return [str(s.relative) for s in sources]


def test_folder_lists_images_sorted_without_recursion(tree):
    assert relatives(expand_inputs([str(tree)], recursive=False, stdin=None)) == ["a.JPG", "b.png"]


def test_recursive_mirrors_the_tree_and_skips_hidden_folders(tree):
    found = relatives(expand_inputs([str(tree)], recursive=True, stdin=None))
    assert found == ["a.JPG", "b.png", "sub/c.tif", "sub/deeper/d.webp"]


def test_recursive_walk_survives_symlink_loops(tree):
    os.symlink(tree, tree / "sub" / "loop")
    found = relatives(expand_inputs([str(tree)], recursive=True, stdin=None))
    assert found.count("b.png") == 1
    assert len(found) <= 8  # the loop is entered at most once, never forever


def test_output_folder_inside_the_input_is_not_an_input(tree):
    touch(tree / "restored" / "a.png")
    found = expand_inputs([str(tree)], recursive=True, stdin=None, exclude=tree / "restored")
    assert "restored/a.png" not in relatives(found)


def test_glob_and_missing_inputs(tree):
    sources = expand_inputs(
        [str(tree / "*.png"), str(tree / "nope.png"), str(tree / "*.gif")],
        recursive=False,
        stdin=None,
    )
    assert [s.relative.name for s in sources] == ["b.png", "nope.png", "*.gif"]
    assert sources[0].error is None
    assert sources[1].error == "no such file"
    assert "no image files match" in sources[2].error


def test_stdin_paths_keep_only_their_name(tree):
    stdin = io.StringIO(f"{tree / 'sub' / 'c.tif'}\n\n../../{tree / 'b.png'}\n")
    sources = expand_inputs(["-"], recursive=False, stdin=stdin)
    assert relatives(sources) == ["c.tif", "b.png"]


def test_plan_jobs_extension_suffix_and_skip_existing(tree, tmp_path):
    out = tmp_path / "out"
    touch(out / "b_r.png")
    sources = expand_inputs([str(tree)], recursive=False, stdin=None)
    jobs = plan_jobs(sources, out, ext="png", suffix="_r")
    assert [j.output.name for j in jobs] == ["a_r.png", "b_r.png"]
    assert [j.skip for j in jobs] == [False, True]
    again = plan_jobs(sources, out, ext="png", suffix="_r", overwrite=True)
    assert not any(j.skip for j in again)


def test_names_differing_only_by_extension_collide(tmp_path):
    for name in ["x.png", "x.jpg"]:
        touch(tmp_path / "in" / name)
    sources = expand_inputs([str(tmp_path / "in")], recursive=False, stdin=None)
    jobs = plan_jobs(sources, tmp_path / "out", ext="png")
    assert jobs[0].error is None
    assert "would also be written by" in jobs[1].error and "x.jpg" in jobs[1].error


def test_output_equal_to_input_is_refused(tree):
    jobs = plan_jobs(expand_inputs([str(tree)], recursive=False, stdin=None), tree, ext="same")
    assert all("output path equals the input" in j.error for j in jobs)
