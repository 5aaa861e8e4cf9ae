"""Errors a user can fix.

Each carries one sentence that names the file (or option) and the cause; the CLI prints it as a
single line without a traceback (``--debug`` shows the traceback).
"""

from __future__ import annotations


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
