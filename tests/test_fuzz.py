"""Property-based fuzzing (hypothesis) of the code that reads untrusted input.

* image decoding: mutated valid files of every format and arbitrary bytes behind real magic
  numbers either decode to finite float32 RGB in [0, 1] or fail with one ImageReadError line;
* normalisation: any 8/16-bit or float array, in any channel layout, reads back as the exact
  scaled values and survives write_image -> read_image unchanged;
* tiling geometry: for any size, tile, overlap, alignment, scale and minimum size, a pointwise
  model's tiled output equals its whole-image output (every pixel covered, weights sum to 1);
* weights.yaml and training configs: arbitrary documents give a valid registry/config or one
  ConfigError line, never another exception; YAML tags that would build Python objects are
  refused;
* degradation parameters: sampled (any level, in- or out-of-distribution, any image size) or
  pinned with arbitrary values, a chain gives finite [0, 1] output of the input's shape, or a
  ConfigError before any pixel is touched.

The suite runs short versions. The long run (docs/reliability.md has the command and the
measured counts) multiplies every example budget::

    RESTORE_CLI_FUZZ_SCALE=40 nice -n 19 python -m pytest tests/test_fuzz.py -q \
        --hypothesis-show-statistics -p no:cacheprovider
"""

from __future__ import annotations

import io
import math
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from restore_cli.degradations import DEGRADATIONS, LEVELS
from restore_cli.degradations.base import Choice
from restore_cli.degradations.pipeline import single_step_chain
from restore_cli.errors import ConfigError, ImageReadError
from restore_cli.io.image import DecodedImage, read_image, write_image
from restore_cli.synthesize import make_spec
from restore_cli.tiling import run_tiled
from restore_cli.train.config import apply_overrides, parse_config
from restore_cli.weights import load_weights_registry

REPO = Path(__file__).resolve().parents[1]
SCALE = max(1, int(os.environ.get("RESTORE_CLI_FUZZ_SCALE", "1")))
MAX_PIXELS = 4_000_000  # mutated headers may claim anything; keep decoded sizes small


def fuzz(examples: int) -> settings:
    """Example budget ``examples`` in the suite, ``examples * RESTORE_CLI_FUZZ_SCALE`` long."""
    return settings(
        max_examples=examples * SCALE,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    """One folder for all examples (hypothesis runs many examples per test call)."""
    with tempfile.TemporaryDirectory(prefix="restore-cli-fuzz-") as folder:
        yield Path(folder)


# --------------------------------------------------------------------------- image decoding


def _encoded_seeds() -> dict[str, bytes]:
    """Small valid files of every format and layout the reader handles."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 9, 3), np.uint8)
    rgba = rng.integers(0, 256, (6, 9, 4), np.uint8)
    deep = rng.integers(0, 65536, (6, 9, 3), np.uint16)

    def pillow(array: np.ndarray | Image.Image, fmt: str, **options: Any) -> bytes:
        image = array if isinstance(array, Image.Image) else Image.fromarray(array)
        buffer = io.BytesIO()
        image.save(buffer, fmt, **options)
        return buffer.getvalue()

    def tiff(array: np.ndarray, **options: Any) -> bytes:
        buffer = io.BytesIO()
        tifffile.imwrite(buffer, array, **options)
        return buffer.getvalue()

    exif = Image.Exif()
    exif[0x0112] = 6
    palette = Image.fromarray(rgb[..., 0] // 32, "L").convert("P")
    buffer = io.BytesIO()
    palette.save(buffer, "PNG", transparency=2)
    frames = [Image.fromarray(rgb), Image.fromarray(rgb[::-1].copy())]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    return {
        "png": pillow(rgb, "PNG"),
        "png_rgba": pillow(rgba, "PNG"),
        "png_palette": buffer.getvalue(),
        "png_gray16": pillow(deep[..., 0], "PNG"),
        "png16": cv2.imencode(".png", deep[..., ::-1])[1].tobytes(),
        "jpeg_exif": pillow(rgb, "JPEG", exif=exif.tobytes()),
        "jpeg_cmyk": pillow(Image.fromarray(rgb).convert("CMYK"), "JPEG"),
        "webp": pillow(rgba, "WEBP", lossless=True),
        "bmp": pillow(rgb, "BMP"),
        "gif": gif.getvalue(),
        "tif8": pillow(rgb, "TIFF"),
        "tif16": tiff(deep, photometric="rgb"),
        "tif16_rgba": tiff(
            rng.integers(0, 65536, (6, 9, 4), np.uint16),
            photometric="rgb",
            extrasamples=["unassalpha"],
        ),
        "tif_float": tiff(rng.random((6, 9, 3), np.float32), photometric="rgb"),
        "tif16_planar": tiff(deep, photometric="rgb", planarconfig="separate"),
    }


SEEDS = _encoded_seeds()
MAGICS = [data[:16] for data in SEEDS.values()]

mutation = st.tuples(
    st.sampled_from(["flip", "set", "cut", "insert", "delete", "repeat"]),
    st.floats(0, 1),
    st.integers(0, 255),
)


def mutate(data: bytes, mutations: list[tuple[str, float, int]]) -> bytes:
    out = bytearray(data)
    for kind, where, value in mutations:
        if not out:
            break
        index = min(int(where * len(out)), len(out) - 1)
        if kind == "flip":
            out[index] ^= 1 << (value % 8)
        elif kind == "set":
            out[index] = value
        elif kind == "cut":
            del out[index:]
        elif kind == "insert":
            out[index:index] = bytes([value]) * (1 + value % 7)
        elif kind == "delete":
            del out[index : index + 1 + value % 16]
        else:
            out[index:index] = out[index : index + 1 + value % 32]
    return bytes(out)


def check_decoded_or_clean_error(path: Path) -> DecodedImage | None:
    """The decoding contract for untrusted bytes."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            decoded = read_image(path, max_pixels=MAX_PIXELS)
    except ImageReadError as error:
        text = str(error)
        assert "\n" not in text and text.startswith(str(path)), text
        return None
    rgb = decoded.rgb
    assert rgb.dtype == np.float32 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert rgb.flags.c_contiguous and rgb.shape[0] >= 1 and rgb.shape[1] >= 1
    assert np.isfinite(rgb).all() and rgb.min() >= 0 and rgb.max() <= 1
    alpha = decoded.extras.alpha
    if alpha is not None:
        assert alpha.shape == rgb.shape[:2] and np.isfinite(alpha).all()
        assert alpha.min() >= 0 and alpha.max() <= 1
    return decoded


@fuzz(150)
@given(
    seed=st.sampled_from(sorted(SEEDS)),
    mutations=st.lists(mutation, min_size=1, max_size=4),
    suffix=st.sampled_from([".png", ".jpg", ".tif", ".webp"]),
)
def test_mutated_files_decode_or_fail_with_one_line(scratch, seed, mutations, suffix):
    path = scratch / f"mutated{suffix}"
    path.write_bytes(mutate(SEEDS[seed], mutations))
    check_decoded_or_clean_error(path)


@fuzz(100)
@given(magic=st.sampled_from(MAGICS), cut=st.integers(1, 16), tail=st.binary(max_size=600))
def test_arbitrary_bytes_behind_real_magic_numbers(scratch, magic, cut, tail):
    path = scratch / "arbitrary.png"
    path.write_bytes(magic[:cut] + tail)
    check_decoded_or_clean_error(path)


# --------------------------------------------------------------------------- normalisation

layouts = st.sampled_from(
    [
        ("png", np.uint8, 1),
        ("png", np.uint8, 2),
        ("png", np.uint8, 3),
        ("png", np.uint8, 4),
        ("png", np.uint16, 1),
        ("png", np.uint16, 3),
        ("png", np.uint16, 4),
        ("tif", np.uint8, 1),
        ("tif", np.uint8, 3),
        ("tif", np.uint16, 1),
        ("tif", np.uint16, 3),
        ("tif", np.uint16, 4),
        ("tif", np.float32, 1),
        ("tif", np.float32, 3),
    ]
)


def encode_independently(path: Path, array: np.ndarray, fmt: str) -> None:
    """Write with a library directly (not write_image), so the reader is checked on its own."""
    channels = array.shape[2]
    if fmt == "tif":
        photometric = "minisblack" if channels < 3 else "rgb"
        extra = {"extrasamples": ["unassalpha"]} if channels == 4 else {}
        plane = array[..., 0] if channels == 1 else array
        tifffile.imwrite(path, plane, photometric=photometric, **extra)
    elif array.dtype == np.uint16 and channels >= 3:
        order = [2, 1, 0, 3][:channels]
        assert cv2.imwrite(str(path), np.ascontiguousarray(array[..., order]))
    else:
        Image.fromarray(array[..., 0] if channels == 1 else array).save(path)


@fuzz(120)
@given(layout=layouts, height=st.integers(1, 20), width=st.integers(1, 20), data=st.data())
def test_any_layout_reads_exactly_and_round_trips(scratch, layout, height, width, data):
    fmt, dtype, channels = layout
    shape = (height, width, channels)
    if dtype == np.float32:
        count = math.prod(shape)
        values = st.floats(allow_nan=True, allow_infinity=True, width=32)
        drawn = data.draw(st.lists(values, min_size=count, max_size=count))
        array = np.array(drawn, np.float32).reshape(shape)
        unit = np.clip(np.nan_to_num(array, nan=0.0, posinf=1.0, neginf=0.0), 0, 1)
    else:
        top = np.iinfo(dtype).max
        seed = data.draw(st.integers(0, 2**32 - 1))
        array = np.random.default_rng(seed).integers(0, top + 1, shape, dtype=dtype)
        unit = array.astype(np.float64) / top
    source = scratch / f"layout.{fmt}"
    encode_independently(source, array, fmt)
    decoded = read_image(source)
    colour = unit[..., :3] if channels >= 3 else np.repeat(unit[..., :1], 3, axis=2)
    np.testing.assert_allclose(decoded.rgb, colour, rtol=0, atol=1e-6)
    if channels in (2, 4):
        np.testing.assert_allclose(decoded.extras.alpha, unit[..., -1], rtol=0, atol=1e-6)
    else:
        assert decoded.extras.alpha is None
    copy = scratch / f"copy.{fmt}"
    write_image(copy, decoded.rgb, decoded.extras)
    again = read_image(copy)
    np.testing.assert_array_equal(again.rgb, decoded.rgb)
    assert (again.extras.alpha is None) == (decoded.extras.alpha is None)
    if decoded.extras.alpha is not None:
        np.testing.assert_array_equal(again.extras.alpha, decoded.extras.alpha)


# --------------------------------------------------------------------------- tiling


@fuzz(80)
@given(
    height=st.integers(1, 120),
    width=st.integers(1, 120),
    tile=st.integers(0, 100),
    overlap=st.integers(0, 70),
    multiple=st.sampled_from([1, 2, 3, 4, 8, 16]),
    scale=st.sampled_from([1, 2, 3]),
    min_size=st.sampled_from([0, 5, 40]),
    square=st.booleans(),
    batch=st.integers(1, 3),
)
def test_tiled_pointwise_model_equals_whole_image(
    height, width, tile, overlap, multiple, scale, min_size, square, batch
):
    """Nearest-neighbour upscaling is pointwise: any tiling must reproduce it exactly, which
    needs every output pixel covered by weights that sum to 1."""
    image = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(height))

    def forward(x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-2] % multiple == 0 and x.shape[-1] % multiple == 0
        assert min(x.shape[-2:]) >= min_size
        assert not square or x.shape[-2] == x.shape[-1]
        return F.interpolate(x, scale_factor=scale, mode="nearest")

    output = run_tiled(
        forward,
        image,
        tile=tile,
        overlap=overlap,
        scale=scale,
        size_multiple=multiple,
        batch_size=batch,
        min_size=min_size,
        square=square,
    )
    expected = F.interpolate(image, scale_factor=scale, mode="nearest")
    assert output.shape == expected.shape
    assert torch.isfinite(output).all()
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- YAML


VALID_ENTRY = {
    "name": "tiny",
    "arch": "nafnet",
    "config": {"width": 8},
    "url": "https://example.invalid/tiny.pth",
    "sha256": "a" * 64,
    "licence": "MIT",
    "source": "tests",
    "description": "a test entry",
}
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)
)
documents = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def load_or_config_error(path: Path) -> None:
    try:
        entries = load_weights_registry(path)
    except ConfigError as error:
        assert "\n" not in str(error)
        return
    for entry in entries.values():
        assert entry.sha256 is not None and len(entry.sha256) == 64


@fuzz(150)
@given(
    key=st.sampled_from([*VALID_ENTRY, "file", "hub", "default", "tasks", "wrapping", "other"]),
    value=documents,
    wrap=st.sampled_from(["entry", "models", "top"]),
)
def test_weights_registry_accepts_or_names_the_problem(scratch, key, value, wrap):
    entry = {**VALID_ENTRY, key: value}
    document: Any = {"models": [entry]} if wrap == "entry" else {"models": value}
    if wrap == "top":
        document = value
    path = scratch / "weights.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    load_or_config_error(path)


@fuzz(100)
@given(text=st.text(max_size=300), raw=st.binary(max_size=64), where=st.floats(0, 1))
def test_weights_registry_on_arbitrary_text_and_bytes(scratch, text, raw, where):
    """Text, and bytes spliced into it (not always UTF-8: atheris found that crash)."""
    path = scratch / "weights.yaml"
    path.write_text(text, encoding="utf-8")
    load_or_config_error(path)
    data = text.encode("utf-8")
    cut = int(where * len(data))
    path.write_bytes(data[:cut] + raw + data[cut:])
    load_or_config_error(path)


@pytest.mark.parametrize(
    "payload",
    [
        "!!python/object/apply:os.system ['touch {marker}']",
        "!!python/object/new:subprocess.Popen [['touch', '{marker}']]",
        "!!python/name:os.system",
    ],
)
def test_yaml_tags_that_build_python_objects_are_refused(tmp_path, payload):
    marker = tmp_path / "code-ran"
    registry = tmp_path / "weights.yaml"
    registry.write_text(f"models: {payload.format(marker=marker)}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_weights_registry(registry)
    config = tmp_path / "train.yaml"
    config.write_text(f"model: {payload.format(marker=marker)}\n", encoding="utf-8")
    from restore_cli.train.config import load_config

    with pytest.raises(ConfigError):
        load_config(config)
    assert not marker.exists()


TINY_CONFIG = yaml.safe_load((REPO / "configs" / "tiny-test.yaml").read_text())


def dotted_keys(node: Any, prefix: str = "") -> list[str]:
    if not isinstance(node, dict):
        return [prefix[:-1]] if prefix else []
    keys = [prefix[:-1]] if prefix else []
    for key, value in node.items():
        keys += dotted_keys(value, f"{prefix}{key}.")
    return keys


@fuzz(150)
@given(
    key=st.sampled_from([*dotted_keys(TINY_CONFIG), "unknown", "data.unknown"]),
    value=documents,
    text=st.text(max_size=30),
)
def test_training_config_values_are_validated_with_one_line_errors(key, value, text):
    raw = apply_overrides(yaml.safe_load(yaml.safe_dump(TINY_CONFIG)), [])
    for candidate in (
        [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}"],
        [text],
    ):
        try:
            parse_config(apply_overrides(raw, candidate))
        except ConfigError as error:
            assert "\n" not in str(error)


# --------------------------------------------------------------------------- degradations


@fuzz(120)
@given(
    name=st.sampled_from(sorted(DEGRADATIONS)),
    level=st.sampled_from(LEVELS),
    ood=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    height=st.integers(1, 40),
    width=st.integers(1, 40),
)
def test_sampled_degradations_keep_shape_range_and_finiteness(
    name, level, ood, seed, height, width
):
    image = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(seed))
    chain = single_step_chain(name, level, seed, ood)
    output = chain.apply(image, torch.Generator().manual_seed(seed))
    assert output.shape == image.shape
    assert torch.isfinite(output).all() and output.min() >= 0 and output.max() <= 1


def pinned_values(name: str) -> st.SearchStrategy[tuple[str, str]]:
    params = DEGRADATIONS[name].params
    numbers = st.one_of(
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.integers(-(10**6), 10**6).map(str),
        st.sampled_from(["", "abc", "1e400", "-0", "0x10"]),
    )
    return st.sampled_from(params).flatmap(
        lambda p: st.tuples(
            st.just(p.name),
            st.sampled_from(p.options) if isinstance(p, Choice) else numbers,
        )
    )


@fuzz(150)
@given(name=st.sampled_from(sorted(DEGRADATIONS)), data=st.data(), seed=st.integers(0, 999))
def test_pinned_parameters_are_validated_or_give_valid_output(name, data, seed):
    key, value = data.draw(pinned_values(name))
    try:
        spec = make_spec([name], ["medium"], fixed=[f"{name}.{key}={value}"])
    except ConfigError as error:
        assert "\n" not in str(error) and name in str(error)
        return
    from restore_cli.degradations import sample_chain

    chain = sample_chain(spec, np.random.default_rng(seed))
    image = torch.rand(1, 3, 24, 20, generator=torch.Generator().manual_seed(seed))
    output = chain.apply(image, torch.Generator().manual_seed(seed))
    assume(output.numel() > 0)
    assert output.shape == image.shape
    assert torch.isfinite(output).all() and output.min() >= 0 and output.max() <= 1
