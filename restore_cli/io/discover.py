"""Turn command-line inputs into one ordered list of jobs (input path → output path).

Everything about *which* files run and *where* they go is decided here, before any pixel is
decoded: folder walks (optionally recursive, symlink loops broken), globs, stdin lists, output
naming (mirrored tree, extension, suffix), collisions, output == input, and skip-existing.
A job that cannot run carries its error so the batch reports it and goes on.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from restore_cli.io.atomic import is_temp_file
from restore_cli.io.image import INPUT_EXTENSIONS, OUTPUT_EXTENSIONS

GLOB_CHARACTERS = frozenset("*?[")


@dataclass(frozen=True)
class Source:
    """An input file and the relative path its output takes inside the output folder."""

    path: Path
    relative: Path
    error: str | None = None


@dataclass(frozen=True)
class Job:
    input: Path
    output: Path
    skip: bool = False  # output exists and --overwrite is off
    error: str | None = None  # decided before decoding (missing input, collision, ...)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in INPUT_EXTENSIONS and not is_temp_file(path)


def walk_images(root: Path, recursive: bool, exclude: Path | None) -> Iterator[Path]:
    """Image files under ``root`` in sorted order; follows symlinks but never loops.

    ``exclude`` (the output folder, when it lies inside an input folder) is not descended into,
    so a rerun never treats earlier outputs as inputs.
    """
    excluded = exclude.resolve() if exclude is not None else None

    def is_excluded(folder: Path) -> bool:
        return excluded is not None and folder.resolve() == excluded

    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            info = folder.stat()
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        if (info.st_dev, info.st_ino) in seen:
            continue
        seen.add((info.st_dev, info.st_ino))
        subfolders = []
        for entry in entries:
            path = Path(entry.path)
            try:
                if entry.is_dir():
                    if recursive and not entry.name.startswith(".") and not is_excluded(path):
                        subfolders.append(path)
                elif entry.is_file() and is_image_file(path):
                    yield path
            except OSError:
                continue
        stack.extend(reversed(subfolders))


def expand_inputs(
    inputs: Iterable[str], *, recursive: bool, stdin: TextIO | None, exclude: Path | None = None
) -> list[Source]:
    """Expand files, folders, globs and ``-`` (paths on stdin, one per line) into sources.

    Files (named or listed) keep only their name in the output folder, so a list from stdin can
    never place an output outside it; folders keep their inner tree.
    """
    sources: list[Source] = []
    for item in inputs:
        if item == "-":
            if stdin is None:
                continue
            lines = (line.rstrip("\r\n") for line in stdin)
            sources.extend(source_for_file(Path(line)) for line in lines if line.strip())
            continue
        path = Path(item)
        if path.is_dir():
            sources.extend(
                Source(found, found.relative_to(path))
                for found in walk_images(path, recursive, exclude)
            )
        elif path.exists() or path.is_symlink() or not GLOB_CHARACTERS & set(item):
            sources.append(source_for_file(path))
        else:
            matches = sorted(glob.glob(item, recursive=True))
            files = [Path(m) for m in matches if Path(m).is_file() and is_image_file(Path(m))]
            if not files:
                sources.append(Source(path, Path(path.name), "no image files match this pattern"))
            sources.extend(source_for_file(f) for f in files)
    return sources


def source_for_file(path: Path) -> Source:
    if not path.exists():
        return Source(path, Path(path.name), "no such file")
    if path.is_dir():
        return Source(path, Path(path.name), "is a folder (listed on stdin?)")
    return Source(path, Path(path.name))


def output_relative(relative: Path, ext: str, suffix: str) -> Path:
    """Output path inside the output folder: new extension (or the same) and a stem suffix."""
    extension = relative.suffix if ext == "same" else OUTPUT_EXTENSIONS[ext]
    return relative.with_name(f"{relative.stem}{suffix}{extension}")


def plan_jobs(
    sources: Iterable[Source],
    output_dir: Path,
    *,
    ext: str = "same",
    suffix: str = "",
    overwrite: bool = False,
) -> list[Job]:
    """Assign outputs; flag collisions, output == input, and existing outputs (skip)."""
    jobs: list[Job] = []
    claimed: dict[str, Path] = {}
    for source in sources:
        output = output_dir / output_relative(source.relative, ext, suffix)
        if source.error:
            jobs.append(Job(source.path, output, error=f"{source.path}: {source.error}"))
            continue
        # Case-folded so that a.JPG and a.jpg never race for one file on macOS/Windows disks.
        key = os.path.normcase(os.path.abspath(output)).casefold()
        if key in claimed:
            error = f"{source.path}: output {output} would also be written by {claimed[key]}"
            jobs.append(Job(source.path, output, error=error))
            continue
        claimed[key] = source.path
        if same_file(source.path, output):
            error = f"{source.path}: output path equals the input; choose another -o or --suffix"
            jobs.append(Job(source.path, output, error=error))
            continue
        jobs.append(Job(source.path, output, skip=output.exists() and not overwrite))
    return jobs


def same_file(a: Path, b: Path) -> bool:
    try:
        return b.exists() and os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)
