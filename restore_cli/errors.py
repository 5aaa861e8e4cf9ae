"""Errors a user can fix.

Each carries one sentence that names the file (or option) and the cause; the CLI prints it as a
single line without a traceback (``--debug`` shows the traceback).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO


class RestoreCliError(Exception):
    """Base class: an error the user can fix, printed as one line."""


class ImageReadError(RestoreCliError):
    """An input image could not be decoded (or is refused, e.g. too many pixels)."""


class ImageWriteError(RestoreCliError):
    """An output image could not be encoded or written."""


class OutputConflictError(RestoreCliError):
    """Two inputs map to one output, or an output would overwrite its input."""


class WeightsError(RestoreCliError):
    """A weights file is missing, unsafe, corrupt, or does not match its sha256."""


class ModelError(RestoreCliError):
    """Unknown model name, unrecognised architecture, or a bad model option."""


class ConfigError(RestoreCliError):
    """A configuration value is invalid."""


def one_line(error: BaseException) -> str:
    """A single line for any exception: ours already are; others get their type and first line."""
    if isinstance(error, RestoreCliError):
        return str(error).splitlines()[0] if str(error) else type(error).__name__
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def with_file(path: Path, message: str) -> str:
    """``path: message``, unless the message already starts with the path."""
    return message if message.startswith(str(path)) else f"{path}: {message}"


@contextmanager
def warnings_as_lines(stream: TextIO) -> Iterator[None]:
    """Show warnings as one ``warning: <file>: <cause>`` line each while a batch runs.

    Python's default shows the warning's source line too (two lines, pointing into our code).
    Warnings raised while a reader or writer thread handles a file get that file's name when
    their text lacks it (library warnings such as Pillow's rarely name the file).
    """
    from restore_cli.io.image import file_being_read  # io.image imports this module

    def show(message: Any, category: type, *_: Any, **__: Any) -> None:
        lines = str(message).strip().splitlines()
        text = lines[0] if lines else category.__name__
        path = file_being_read()
        if path is not None and not text.startswith(str(path)):
            text = f"{path}: {text}"
        print(f"warning: {text}", file=stream, flush=True)

    shown = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown
