"""Atomic file writes: an output is either the old file, the complete new file, or absent.

Encoders write to a hidden temporary file in the target's own directory (same filesystem, so
``os.replace`` is an atomic rename); only a fully written and fsynced file is renamed over the
target. Interrupted runs therefore never leave half-written images that a later
``--skip-existing`` run would mistake for finished work.

A process killed with SIGKILL cannot remove its temp file, so every writer holds an advisory
``flock`` on its temp file until the rename: :func:`remove_stale_temp_files` deletes only temp
files nobody holds, which are exactly those of dead processes, and never one that a concurrent
run is still writing. :class:`OutputClaim` uses the same mechanism so that two runs writing into
one folder never work on the same output at once.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

try:  # advisory locks: POSIX only; elsewhere nothing is locked and nothing stale is removed
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

TEMP_MARKER = ".tmp"
"""Part of every temporary name: ``.<name>.<8 hex digits>.tmp<suffix>``."""

_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp(\.[^.]*)?$")
CLAIM_SUFFIX = ".restore-cli-claim"
"""Claim files are ``.<output name>.claim`` beside the output."""
_CLAIM_NAME = re.compile(r"^\..+\.restore-cli-claim$")
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


def _try_lock(fd: int) -> bool:
    """Take an exclusive advisory lock without waiting; True when it is ours (or unsupported)."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # a filesystem without locks (some network mounts): behave as before
        return True
    return True


def lock_file(fd: int) -> None:
    """Mark an open temp file as live for :func:`remove_stale_temp_files` (best effort)."""
    _try_lock(fd)


def _still_named(fd: int, path: Path) -> bool:
    """True while ``path`` still names the file open as ``fd`` (nobody unlinked or replaced it)."""
    try:
        named, opened = os.stat(path, follow_symlinks=False), os.fstat(fd)
    except OSError:
        return False
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _create_temp_file(target: Path) -> tuple[Path, int]:
    """Create an empty temp file exclusively and lock it; returns its path and open descriptor.

    Mode 0o666 filtered by the umask gives the output the permissions a plain ``open`` would,
    unlike ``tempfile.mkstemp`` (0o600). The lock marks the file as live for
    :func:`remove_stale_temp_files`; a cleaner that slipped in between create and lock is
    detected (the name no longer points at our file) and we start over with a new name.
    """
    for _ in range(_CREATE_ATTEMPTS):
        tmp = temp_path_for(target)
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        if _try_lock(fd) and _still_named(fd, tmp):
            return tmp, fd
        os.close(fd)
    raise FileExistsError(f"could not create a unique temporary file next to {target}")


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
    so an existing ``target`` is untouched. The temp file stays locked until it is renamed.
    """
    target = Path(target)
    tmp, fd = _create_temp_file(target)
    if fcntl is None:  # no locks to hold, and Windows cannot rename a file that is open
        os.close(fd)
        fd = -1
    try:
        try:
            yield tmp
            _fsync(fd, tmp)
            os.replace(tmp, target)
        except BaseException:
            with suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
    finally:
        if fd >= 0:
            os.close(fd)
    _fsync_directory(target.parent)


def _fsync(fd: int, path: Path) -> None:
    """Flush the file's data so the rename never exposes an empty or partial file.

    The encoder wrote through its own descriptor; any descriptor of the same file flushes it.
    """
    if fd >= 0:
        os.fsync(fd)
        return
    own = os.open(path, os.O_RDONLY)
    try:
        os.fsync(own)
    finally:
        os.close(own)


def atomic_write_bytes(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


# --------------------------------------------------------------------------- stale files


def remove_stale_temp_files(
    folders: Iterable[Path], *, pattern: re.Pattern[str] | None = None
) -> list[Path]:
    """Delete temp and claim files in ``folders`` (not below) that no live process holds.

    They are what a killed run leaves behind. A file is removed only while we hold its lock, so
    a concurrent writer's temp file is never touched. ``pattern`` replaces the default names
    (our temp files and claims), e.g. for partial downloads. Returns the removed paths.
    """
    if fcntl is None:
        return []
    removed = []
    for folder in dict.fromkeys(Path(f) for f in folders):
        try:
            names = sorted(entry.name for entry in os.scandir(folder) if entry.is_file())
        except OSError:
            continue
        for name in names:
            matches = pattern.match(name) if pattern else _is_ours(name)
            if matches and _remove_if_unlocked(folder / name):
                removed.append(folder / name)
    return removed


def _is_ours(name: str) -> bool:
    return bool(_TEMP_NAME.match(name) or _CLAIM_NAME.match(name))


def _remove_if_unlocked(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False
    try:
        if not _try_lock(fd) or not _still_named(fd, path):
            return False
        path.unlink()
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- claims


def claim_path_for(target: Path) -> Path:
    return target.with_name(f".{target.name[:_MAX_NAME_PART]}{CLAIM_SUFFIX}")


class OutputClaim:
    """An exclusive, crash-safe claim on one output path, shared by all processes.

    Two `restore` runs into one folder each claim an output before working on it; the second
    sees the claim and leaves that output to the first. The claim is a locked hidden file next
    to the output: the kernel drops the lock when its process dies, so a killed run never
    blocks a later one, and the leftover file is removed by :func:`remove_stale_temp_files`.
    """

    def __init__(self, target: Path, fd: int, path: Path) -> None:
        self.target = target
        self._fd: int | None = fd
        self._path = path

    @classmethod
    def acquire(cls, target: Path) -> OutputClaim | None:
        """The claim on ``target``, or None while another process (or claim) holds it."""
        path = claim_path_for(Path(target))
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(_CREATE_ATTEMPTS):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
            if not _try_lock(fd):
                os.close(fd)
                return None
            if _still_named(fd, path):
                return cls(Path(target), fd, path)
            os.close(fd)  # the holder released and removed it meanwhile: try again
        return None

    def release(self) -> None:
        """Remove the claim file, then drop the lock (in that order, see ``acquire``)."""
        if self._fd is None:
            return
        with suppress(OSError):
            self._path.unlink()
        os.close(self._fd)
        self._fd = None
