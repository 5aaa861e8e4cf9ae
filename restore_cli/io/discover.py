"""Turn command-line inputs into one ordered list of jobs (input path → output path).

Everything about *which* files run and *where* they go is decided here, before any pixel is
decoded: folder walks (optionally recursive, symlink loops broken), globs, stdin lists, output
naming (mirrored tree, extension, suffix), collisions, output == input, and skip-existing.
A job that cannot run carries its error so the batch reports it and goes on.
"""

from __future__ import annotations

import glob
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from restore_cli.errors import ConfigError
from restore_cli.io.atomic import is_temp_file
from restore_cli.io.image import INPUT_EXTENSIONS, OUTPUT_EXTENSIONS

# What write_image can encode (``--ext same`` keeps the input's extension, which must be one).
WRITABLE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"})

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
    skip: bool = False  # output exists and --overwrite is off (or the input is an output)
    error: str | None = None  # decided before decoding (missing input, collision, ...)
    note: str = "output exists"  # why a skipped job is skipped (the CSV's error column)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in INPUT_EXTENSIONS and not is_temp_file(path)


def walk_images(root: Path, recursive: bool, exclude: Path | None) -> Iterator[Path]:
    """Image files under ``root`` in sorted order; follows symlinks but never loops.

    ``exclude`` (the output folder, when it lies inside an input folder) is not descended into,
    so a rerun never treats earlier outputs as inputs. Folders that cannot be listed and
    dangling links are skipped silently here; :func:`expand_inputs` reports them.
    """
    return (path for path, problem in walk_with_problems(root, recursive, exclude) if not problem)


def walk_with_problems(
    root: Path, recursive: bool, exclude: Path | None
) -> Iterator[tuple[Path, str | None]]:
    """Like :func:`walk_images`, plus ``(path, cause)`` for what a user would expect to be
    read but cannot be: folders we may not list, and image-named dangling symlinks."""
    excluded = exclude.resolve() if exclude is not None else None

    def is_excluded(folder: Path) -> bool:
        return excluded is not None and folder.resolve() == excluded

    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            info = folder.stat()
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as error:
            yield folder, f"cannot list this folder ({error.strerror or error})"
            continue
        subfolders = []
        for entry in entries:
            path = Path(entry.path)
            try:
                if entry.is_dir():
                    if recursive and not entry.name.startswith(".") and not is_excluded(path):
                        subfolders.append(path)
                elif is_image_file(path) and entry.is_file():
                    yield path, None
                elif is_image_file(path) and is_dangling_link(path):
                    yield path, "broken symbolic link (its target is missing)"
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
            for found, problem in walk_with_problems(path, recursive, exclude):
                relative = found.relative_to(path) if found != path else Path(path.name or "_")
                sources.append(Source(found, relative, problem or input_problem(found)))
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
    """A named file (argument or stdin line): only its name is kept for the output."""
    name = Path(path.name)
    if path.name in ("", ".", ".."):
        return Source(path, Path("_"), "is a folder, not an image file")
    return Source(path, name, input_problem(path))


def input_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read as an image, decided without opening it (None: try it).

    Opening a named pipe would block the whole batch, and a device could stream forever, so only
    regular files (or links to them) are read.
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            return "broken symbolic link (its target is missing)"
        return "no such file"
    except OSError as error:
        return f"cannot access ({error.strerror or error})"
    if stat.S_ISDIR(info.st_mode):
        return "is a folder (listed on stdin?)"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file (a named pipe, socket or device); not opened"
    return None


def is_dangling_link(path: Path) -> bool:
    return path.is_symlink() and not path.exists()


def check_suffix(suffix: str) -> None:
    """``--suffix`` becomes part of a file name: it must not reach another folder."""
    separators = {"/", "\0", os.sep, os.altsep} - {None}
    if any(sep in suffix for sep in separators):
        raise ConfigError(f"--suffix {suffix!r}: must not contain path separators")


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
    """Assign outputs; flag collisions, output == input, unwritable formats, outputs that are
    folders, and existing outputs (skip). An input that is itself the output of another input
    of this run (``-o`` inside the input folder, a rerun) is skipped rather than restored
    again."""
    check_suffix(suffix)
    sources = list(sources)
    planned = [_planned_output(s, output_dir, ext, suffix) for s in sources]
    produced = {_key(output): source.path for source, output in zip(sources, planned, strict=True)}
    jobs: list[Job] = []
    claimed: dict[str, Path] = {}
    for source, output in zip(sources, planned, strict=True):
        if source.error:
            jobs.append(Job(source.path, output, error=f"{source.path}: {source.error}"))
            continue
        maker = produced.get(_key(source.path))
        if maker is not None and maker != source.path:
            note = f"is the output of {maker} in this run; not restored again"
            jobs.append(Job(source.path, output, skip=True, note=note))
            continue
        key = _key(output)
        if key in claimed:
            error = f"{source.path}: output {output} would also be written by {claimed[key]}"
            jobs.append(Job(source.path, output, error=error))
            continue
        claimed[key] = source.path
        jobs.append(_job_for(source.path, output, overwrite))
    return jobs


def _planned_output(source: Source, output_dir: Path, ext: str, suffix: str) -> Path:
    try:
        return output_dir / output_relative(source.relative, ext, suffix)
    except ValueError:  # only for sources that already carry an error (no usable name)
        return output_dir / source.relative


def _key(path: Path) -> str:
    """Case-folded, so that a.JPG and a.jpg never race for one file on macOS/Windows disks."""
    return os.path.normcase(os.path.abspath(path)).casefold()


def _job_for(source: Path, output: Path, overwrite: bool) -> Job:
    if same_file(source, output):
        error = f"{source}: output path equals the input; choose another -o or --suffix"
        return Job(source, output, error=error)
    if output.suffix.lower() not in WRITABLE_EXTENSIONS:
        error = (
            f"{source}: cannot write {output.suffix or 'extension-less'} outputs; "
            "choose --ext png, jpg, webp or tif"
        )
        return Job(source, output, error=error)
    if output.is_dir():
        return Job(source, output, error=f"{source}: output path {output} is an existing folder")
    return Job(source, output, skip=output.exists() and not overwrite)


def same_file(a: Path, b: Path) -> bool:
    try:
        return b.exists() and os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)
