"""restore-cli: all-in-one image restoration from the command line."""

__version__ = "0.1.0"
