"""Errors a user can fix.

Each carries one sentence that names the file (or option) and the cause; the CLI prints it as a
single line without a traceback (``--debug`` shows the traceback).
"""

from __future__ import annotations

from pathlib import Path


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
