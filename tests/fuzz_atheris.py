"""Coverage-guided fuzzing with atheris (libFuzzer) of image decoding and weights.yaml parsing.

Not part of the suite (atheris is optional and runs until stopped). Each target starts from the
valid seed files of tests/test_fuzz.py and mutates them guided by coverage of the instrumented
Python code (Pillow, tifffile and restore_cli's readers; the C codecs are not instrumented).
The property is the same as in tests/test_fuzz.py: a result, or one ImageReadError / ConfigError
line; any other exception is reported by libFuzzer as a crash, with the input saved.

    pip install atheris
    python tests/fuzz_atheris.py image -max_total_time=300 -rss_limit_mb=4096
    python tests/fuzz_atheris.py registry -max_total_time=120
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

with atheris.instrument_imports():
    import PIL.Image  # noqa: F401  (instrumented: Pillow's Python-level parsers)
    import tifffile  # noqa: F401
    import yaml  # noqa: F401

    from restore_cli.errors import ConfigError, ImageReadError
    from restore_cli.io.image import read_image
    from restore_cli.weights import load_weights_registry

SCRATCH = Path(tempfile.mkdtemp(prefix="restore-cli-atheris-", dir="/dev/shm"))
MAX_PIXELS = 4_000_000


def fuzz_image(data: bytes) -> None:
    path = SCRATCH / "input.img"
    path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            decoded = read_image(path, max_pixels=MAX_PIXELS)
        except ImageReadError as error:
            if "\n" in str(error):
                raise AssertionError(f"multi-line error: {error!r}") from None
            return
    rgb = decoded.rgb
    if not (rgb.ndim == 3 and rgb.shape[2] == 3 and (rgb >= 0).all() and (rgb <= 1).all()):
        raise AssertionError(f"bad pixels: shape {rgb.shape}")


def fuzz_registry(data: bytes) -> None:
    path = SCRATCH / "weights.yaml"
    path.write_bytes(data)
    try:
        load_weights_registry(path)
    except ConfigError as error:
        if "\n" in str(error):
            raise AssertionError(f"multi-line error: {error!r}") from None


def seed_corpus(target: str) -> Path:
    """A folder of valid inputs to start from (libFuzzer adds what it finds to it)."""
    folder = Path(tempfile.mkdtemp(prefix=f"restore-cli-atheris-{target}-"))
    if target == "image":
        from tests.test_fuzz import SEEDS

        for name, data in SEEDS.items():
            (folder / name).write_bytes(data)
    else:
        registry = Path(__file__).resolve().parents[1] / "weights.yaml"
        (folder / "weights.yaml").write_bytes(registry.read_bytes())
    return folder


def main() -> None:
    target = sys.argv[1] if len(sys.argv) > 1 else "image"
    function = {"image": fuzz_image, "registry": fuzz_registry}[target]
    arguments = [sys.argv[0], *sys.argv[2:], str(seed_corpus(target))]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    atheris.Setup(arguments, function)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
