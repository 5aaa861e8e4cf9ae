"""Atomic file writes: an output is either the old file, the complete new file, or absent.

Encoders write to a hidden temporary file in the target's own directory (same filesystem, so
``os.replace`` is an atomic rename); only a fully written and fsynced file is renamed over the
target. Interrupted runs therefore never leave half-written images that a later
``--skip-existing`` run would mistake for finished work.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

TEMP_MARKER = ".tmp"
"""Part of every temporary name: ``.<name>.<8 hex digits>.tmp<suffix>``."""

_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp(\.[^.]*)?$")
_MAX_NAME_PART = 100  # keeps temp names under the usual 255-byte filename limit
_CREATE_ATTEMPTS = 16


def is_temp_file(path: Path | str) -> bool:
    """True for a temporary file made by :func:`atomic_path` (discovery must skip these)."""
    return bool(_TEMP_NAME.match(Path(path).name))


def temp_path_for(target: Path) -> Path:
    """A fresh temp name next to ``target``; keeps the real suffix so encoders that look at it
    pick the right format."""
    name = target.name[:_MAX_NAME_PART]
    return target.with_name(f".{name}.{secrets.token_hex(4)}{TEMP_MARKER}{target.suffix}")


def _create_temp_file(target: Path) -> Path:
    """Create an empty temp file exclusively (no two writers can share one).

    Mode 0o666 filtered by the umask gives the output the permissions a plain ``open`` would,
    unlike ``tempfile.mkstemp`` (0o600).
    """
    for _ in range(_CREATE_ATTEMPTS):
        tmp = temp_path_for(target)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"could not create a unique temporary file next to {target}")


def _fsync_file(path: Path) -> None:
    """Flush the file's data to disk so the rename never exposes an empty or partial file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(directory: Path) -> None:
    """Persist the rename itself; best effort (not possible on Windows and some filesystems)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path in ``target``'s directory to write to.

    On normal exit the temp file is fsynced and renamed over ``target`` (``os.replace``); on any
    exception, KeyboardInterrupt included, the temp file is removed and the exception re-raised,
    so an existing ``target`` is untouched.
    """
    target = Path(target)
    tmp = _create_temp_file(target)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)


def atomic_write_bytes(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
