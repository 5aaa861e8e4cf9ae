"""A generated corpus of hostile and odd inputs for `restore`, each with its expected outcome.

``build_corpus(root)`` writes every file under ``root`` and returns one :class:`Case` per input
(the files a recursive walk of ``root`` finds, plus the ones it must ignore). The files are made
here, at test time, from numpy arrays and byte-level edits of valid files, so the corpus needs
no binary fixtures in the repository and each case says in code what makes it odd.

Expected outcomes (``Case.expect``):

* ``ok``: an output is written; ``Case.check`` (when given) inspects it. With the identity
  model the checks are exact (``identity_checks``); with any other model only geometry and
  format are checked.
* ``failed``: no output, one ``error:`` line naming the file and containing ``Case.cause``,
  a ``failed`` CSV row with the same text, and the batch goes on.
* ``ignored``: discovery never lists it (not an image, a temp file, a hidden folder...).

Run the corpus by hand (the path is kept for inspection)::

    python -m tests.hostile_corpus /tmp/corpus && \
        restore-cli restore /tmp/corpus/in -r -o /tmp/corpus/out --model identity
"""

from __future__ import annotations

import io
import os
import struct
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from tests.test_io_image import stored_for  # Pillow's transposes, not the reader's

OK, FAILED, IGNORED = "ok", "failed", "ignored"

Check = Callable[[Path, Path], None]  # (input file, output file) -> raises AssertionError


@dataclass(frozen=True)
class Case:
    """One input of the corpus and what `restore` must do with it."""

    relative: str  # path under the corpus input folder (POSIX separators)
    what: str  # one line for docs/reliability.md
    expect: str  # OK, FAILED or IGNORED
    cause: str = ""  # FAILED: a substring of the one-line error
    check: Check | None = None  # OK: extra checks on the output (any model)
    exact: Check | None = None  # OK: checks that hold with the identity model only
    warning: str = ""  # OK: a substring of the warning recorded for this file

    @property
    def output(self) -> str:
        return self.relative


# --------------------------------------------------------------------------- pixel helpers


def pattern(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Asymmetric uint8 content: smooth ramps plus noise, so flips and rotations are visible."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1)], -1)
    planes = [base[..., i % 2] for i in range(channels)]
    noise = rng.integers(0, 40, (height, width, channels))
    return np.clip(np.stack(planes, -1) * 0.8 + noise, 0, 255).astype(np.uint8)


def deep16(height: int, width: int, channels: int, seed: int = 0) -> np.ndarray:
    """16-bit samples that are not multiples of 257 (an 8-bit round trip would show)."""
    values = np.random.default_rng(seed).integers(0, 65535, (height, width, channels), np.uint16)
    values[values % 257 == 0] += 1
    return values


def encode(array: np.ndarray, fmt: str, mode: str | None = None, **options: object) -> bytes:
    """Encode with Pillow; the mode follows from the array (``mode`` is asserted, not forced)."""
    image = Image.fromarray(array)
    assert mode is None or image.mode == mode, (image.mode, mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data)
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_header(width: int, height: int, depth: int = 8, colour: int = 0) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)


def zlib_bomb_png(side: int) -> bytes:
    """A real decompression bomb: ``side``² gray pixels of zeros in a few hundred KB."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + samples
    chunks = [compressor.compress(row) for _ in range(side)]
    idat = b"".join(chunks) + compressor.flush()
    return png_header(side, side) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def ztxt_bomb_png() -> bytes:
    """A valid 8x8 PNG with a zTXt chunk that inflates to 64 MB of text."""
    valid = encode(pattern(8, 8), "PNG")
    compressor = zlib.compressobj(9)
    text = b"".join(compressor.compress(b"A" * (1 << 20)) for _ in range(64)) + compressor.flush()
    ztxt = png_chunk(b"zTXt", b"Comment\x00\x00" + text)
    return valid[:33] + ztxt + valid[33:]  # after the signature and IHDR


def jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the SOF0 frame size of a baseline JPEG (pixel data stays 16x16)."""
    index = data.index(b"\xff\xc0")
    return data[: index + 5] + struct.pack(">HH", height, width) + data[index + 9 :]


def tiff16_with_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite ImageWidth/ImageLength of a little-endian tifffile TIFF in place."""
    out = bytearray(data)
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        tags = tif.pages[0].tags
        for name, value in (("ImageWidth", width), ("ImageLength", height)):
            tag = tags[name]
            code = "<I" if tag.dtype == 4 else "<H"  # LONG or SHORT, stored in the entry
            struct.pack_into(code, out, tag.valueoffset, value)
    return bytes(out)


def tiff_with_samples(samples: int) -> bytes:
    """A 3x400 16-bit TIFF in separate planes, one row per strip, whose SamplesPerPixel tag
    claims ``samples``: a reader that believes it walks samples x 400 strips."""
    buffer = io.BytesIO()
    planes = deep16(400, 3, 3).transpose(2, 0, 1).copy()  # (samples, height, width)
    tifffile.imwrite(buffer, planes, photometric="rgb", planarconfig="separate", rowsperstrip=1)
    out = bytearray(buffer.getvalue())
    with tifffile.TiffFile(io.BytesIO(bytes(out))) as tif:
        tag = tif.pages[0].tags["SamplesPerPixel"]
        struct.pack_into("<H", out, tag.valueoffset, samples)
    return bytes(out)


def exif_with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "HostileCam"
    exif[0x0112] = orientation
    return exif.tobytes()


# --------------------------------------------------------------------------- output checks


def opened(path: Path) -> Image.Image:
    image = Image.open(path)
    image.load()
    return image


def size_is(width: int, height: int) -> Check:
    def check(_: Path, output: Path) -> None:
        with opened(output) as image:
            assert image.size == (width, height), (output, image.size)

    return check


def format_is(fmt: str, mode: str | None = None, size: tuple[int, int] | None = None) -> Check:
    def check(_: Path, output: Path) -> None:
        with opened(output) as image:
            assert image.format == fmt, (output, image.format)
            assert mode is None or image.mode == mode, (output, image.mode)
            assert size is None or image.size == size, (output, image.size)

    return check


def tiff_is(dtype: str, shape: tuple[int, ...]) -> Check:
    def check(_: Path, output: Path) -> None:
        array = tifffile.imread(output)
        assert str(array.dtype) == dtype and array.shape == shape, (array.dtype, array.shape)

    return check


def same_pixels(expected: np.ndarray, atol: int = 0) -> Check:
    """Identity model: the output decodes to ``expected`` (lossless formats: exactly)."""

    def check(_: Path, output: Path) -> None:
        with opened(output) as image:
            actual = np.asarray(image)
        assert actual.shape == expected.shape, (actual.shape, expected.shape)
        difference = np.abs(actual.astype(np.int64) - expected.astype(np.int64)).max()
        assert difference <= atol, (output, difference)

    return check


def same_tiff(expected: np.ndarray) -> Check:
    def check(_: Path, output: Path) -> None:
        np.testing.assert_array_equal(tifffile.imread(output), expected)

    return check


def orientation_reset(_: Path, output: Path) -> None:
    with opened(output) as image:
        assert image.getexif().get(0x0112, 1) == 1


def both(*checks: Check) -> Check:
    def check(source: Path, output: Path) -> None:
        for one in checks:
            one(source, output)

    return check


# --------------------------------------------------------------------------- the corpus


def write(root: Path, relative: str, data: bytes) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def build_corpus(root: Path) -> list[Case]:
    """Write the corpus under ``root`` and return its cases (see the module docstring)."""
    cases: list[Case] = []

    def add(relative: str, data: bytes | None, case: Case) -> None:
        if data is not None:
            write(root, relative, data)
        cases.append(case)

    rgb = pattern(32, 40)
    png, jpeg = encode(rgb, "PNG"), encode(rgb, "JPEG", quality=95)

    # --- ordinary files, as a baseline
    add("plain.png", png, Case("plain.png", "plain 8-bit RGB PNG", OK, exact=same_pixels(rgb)))
    add("plain.jpg", jpeg, Case("plain.jpg", "plain baseline JPEG", OK, check=size_is(40, 32)))

    # --- broken files
    add("zero_byte.png", b"", Case("zero_byte.png", "zero-byte file", FAILED, "empty file"))
    add(
        "truncated.jpg",
        jpeg[: len(jpeg) // 2],
        Case("truncated.jpg", "JPEG cut in half", FAILED, "truncated"),
    )
    add(
        "truncated.png",
        png[: len(png) // 2],
        Case("truncated.png", "PNG cut in half", FAILED, "truncated"),
    )
    add(
        "no_iend.png",
        png[:-12],
        Case("no_iend.png", "PNG without its IEND chunk (pixels complete)", OK),
    )
    corrupt = bytearray(png)
    start = corrupt.index(b"IDAT") + 8
    corrupt[start : start + 32] = bytes(32)  # zeroed deflate stream: invalid block type
    add(
        "corrupt_idat.png",
        bytes(corrupt),
        Case("corrupt_idat.png", "PNG with a zeroed IDAT deflate stream", FAILED, "corrupt"),
    )
    tif16 = io.BytesIO()
    tifffile.imwrite(tif16, deep16(64, 64, 3), photometric="rgb")
    add(
        "truncated16.tif",
        tif16.getvalue()[:4000],
        Case("truncated16.tif", "16-bit TIFF cut short", FAILED, "truncated"),
    )
    webp = encode(rgb, "WEBP", quality=90)
    add(
        "truncated.webp",
        webp[: len(webp) // 2],
        Case("truncated.webp", "WebP cut in half", FAILED, "truncated"),
    )
    add(
        "text.jpg",
        b"Just some notes, not a photo.\n" * 20,
        Case("text.jpg", "text file named .jpg", FAILED, "not a recognised image"),
    )
    add(
        "garbage.tif",
        b"II*\x00" + os.urandom(0) + b"\xff" * 200,
        Case("garbage.tif", "TIFF magic followed by garbage", FAILED, "garbage.tif"),
    )

    # --- wrong extensions: the content decides, the output keeps the input's extension
    add(
        "png_named.jpg",
        png,
        Case(
            "png_named.jpg",
            "valid PNG named .jpg",
            OK,
            check=format_is("JPEG", size=(40, 32)),
        ),
    )
    add(
        "jpeg_named.png",
        jpeg,
        Case("jpeg_named.png", "valid JPEG named .png", OK, check=format_is("PNG", "RGB")),
    )
    add(
        "jpeg_named.tif",
        jpeg,
        Case("jpeg_named.tif", "valid JPEG named .tif", OK, check=format_is("TIFF", "RGB")),
    )

    # --- decompression bombs (refused from the header, before decoding)
    bomb = png_header(20000, 10001) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    add(
        "bomb_header.png",
        bomb + png_chunk(b"IEND", b""),
        Case("bomb_header.png", "PNG header claiming 20000x10001", FAILED, "--max-pixels"),
    )
    add(
        "bomb_zlib.png",
        zlib_bomb_png(15000),
        Case(
            "bomb_zlib.png",
            "real zlib bomb: 15000x15000 zeros in ~220 KB",
            FAILED,
            "exceeds the limit of 200,000,000",
        ),
    )
    small_jpeg = encode(pattern(16, 16), "JPEG")
    add(
        "bomb_header.jpg",
        jpeg_with_size(small_jpeg, 65000, 65000),
        Case("bomb_header.jpg", "JPEG SOF claiming 65000x65000", FAILED, "--max-pixels"),
    )
    small16 = io.BytesIO()
    tifffile.imwrite(small16, deep16(8, 8, 3), photometric="rgb")
    add(
        "bomb_header16.tif",
        tiff16_with_size(small16.getvalue(), 30000, 30000),
        Case("bomb_header16.tif", "16-bit TIFF tags claiming 30000x30000", FAILED, "--max-pixels"),
    )
    add(
        "tiff_65000_samples.tif",
        tiff_with_samples(65000),
        Case(
            "tiff_65000_samples.tif",
            "16-bit TIFF claiming 65000 samples per pixel (26 M strips for 1200 pixels)",
            FAILED,
            "samples per pixel",
        ),
    )
    add(
        "ztxt_bomb.png",
        ztxt_bomb_png(),
        Case("ztxt_bomb.png", "8x8 PNG with a 64 MB zTXt text bomb", FAILED, "ztxt_bomb.png"),
    )

    # --- tiny and odd geometry
    for relative, (h, w), what in (
        ("tiny_1x1.png", (1, 1), "1x1 image"),
        ("line_1x257.png", (1, 257), "1 pixel high, 257 wide"),
        ("column_300x1.png", (300, 1), "300 high, 1 pixel wide"),
        ("small_5x7.png", (5, 7), "5x7: smaller than the model's size multiple"),
        ("aspect_3x1500.png", (3, 1500), "aspect ratio 500:1 (tiled on CPU)"),
    ):
        array = pattern(h, w)
        check = both(size_is(w, h), format_is("PNG", "RGB"))
        case = Case(relative, what, OK, check=check, exact=same_pixels(array))
        add(relative, encode(array, "PNG"), case)

    # --- colour modes and bit depths
    cmyk = io.BytesIO()
    Image.fromarray(pattern(16, 16)).convert("CMYK").save(cmyk, "JPEG", quality=95)
    add(
        "cmyk.jpg",
        cmyk.getvalue(),
        Case("cmyk.jpg", "CMYK JPEG (no profile)", OK, check=format_is("JPEG", "RGB")),
    )
    index = (pattern(12, 20, 1)[..., 0] // 16).astype(np.uint8)
    index[0, :5] = 3
    palette = Image.fromarray(index, "P")
    palette.putpalette(np.random.default_rng(5).integers(0, 256, 48, np.uint8).tolist())
    buffer = io.BytesIO()
    palette.save(buffer, "PNG", transparency=3)
    expected_rgba = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGBA"))
    add(
        "palette_trns.png",
        buffer.getvalue(),
        Case(
            "palette_trns.png",
            "palette PNG with a transparent index",
            OK,
            check=format_is("PNG", "RGBA"),
            exact=same_pixels(expected_rgba),
        ),
    )
    la = pattern(10, 14, 2, seed=2)
    add(
        "la.png",
        encode(la, "PNG", "LA"),
        Case(
            "la.png",
            "8-bit gray + alpha (LA)",
            OK,
            check=format_is("PNG", "LA"),
            exact=same_pixels(la),
        ),
    )
    gray16 = deep16(10, 12, 1)[..., 0]
    add(
        "gray16.png",
        encode(gray16, "PNG", "I;16"),
        Case(
            "gray16.png",
            "16-bit grayscale PNG",
            OK,
            check=format_is("PNG", "I;16"),
            exact=same_pixels(gray16),
        ),
    )
    rgba16 = deep16(9, 11, 4, seed=3)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, rgba16, photometric="rgb", extrasamples=["unassalpha"])
    add(
        "rgba16.tif",
        buffer.getvalue(),
        Case(
            "rgba16.tif",
            "16-bit RGBA TIFF",
            OK,
            check=tiff_is("uint16", (9, 11, 4)),
            exact=same_tiff(rgba16),
        ),
    )
    floats = np.random.default_rng(4).random((8, 10, 3), dtype=np.float32)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, floats, photometric="rgb")
    add(
        "float.tif",
        buffer.getvalue(),
        Case("float.tif", "32-bit float RGB TIFF", OK, check=tiff_is("float32", (8, 10, 3)),
             exact=same_tiff(floats)),
    )  # fmt: skip
    rgb16 = deep16(8, 9, 3, seed=6)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, rgb16, photometric="rgb")
    add(
        "rgb16.tif",
        buffer.getvalue(),
        Case(
            "rgb16.tif",
            "16-bit RGB TIFF",
            OK,
            check=tiff_is("uint16", (8, 9, 3)),
            exact=same_tiff(rgb16),
        ),
    )
    gray8 = pattern(10, 10, 1)[..., 0]
    add(
        "gray.jpg",
        encode(gray8, "JPEG", "L", quality=95),
        Case("gray.jpg", "grayscale JPEG", OK, check=format_is("JPEG", "L")),
    )
    bilevel = pattern(16, 16, 1)[..., 0] > 128
    add(
        "bilevel.png",
        encode(bilevel, "PNG", "1"),
        Case("bilevel.png", "1-bit PNG", OK, check=format_is("PNG", "L")),
    )
    add(
        "plain.bmp",
        encode(rgb, "BMP"),
        Case("plain.bmp", "BMP", OK, check=format_is("BMP"), exact=same_pixels(rgb)),
    )

    # --- animations and multi-page files: first frame, with a warning
    frames = [Image.fromarray(pattern(12, 12, seed=s)) for s in (7, 8)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    add(
        "animated.webp",
        buffer.getvalue(),
        Case(
            "animated.webp",
            "animated WebP (2 frames)",
            OK,
            check=size_is(12, 12),
            warning="only the first is read",
        ),
    )
    pages = deep16(6, 6, 3, seed=9)
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as tif:
        tif.write(pages, photometric="rgb")
        tif.write(pages, photometric="rgb")
    add(
        "multipage16.tif",
        buffer.getvalue(),
        Case(
            "multipage16.tif",
            "2-page 16-bit TIFF",
            OK,
            check=tiff_is("uint16", (6, 6, 3)),
            exact=same_tiff(pages),
            warning="only the first is read",
        ),
    )
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    add(
        "animated.gif",
        gif.getvalue(),
        Case("animated.gif", "animated GIF in a folder (not an input format)", IGNORED),
    )

    # --- EXIF orientation 1-8 (stored 24 wide, 16 high when upright)
    upright = np.kron(pattern(2, 3, seed=11), np.ones((8, 8, 1), np.uint8))
    for orientation in range(1, 9):
        relative = f"exif_orientation_{orientation}.jpg"
        data = encode(
            stored_for(upright, orientation),
            "JPEG",
            quality=98,
            subsampling=0,
            exif=exif_with_orientation(orientation),
        )
        add(
            relative,
            data,
            Case(
                relative,
                f"JPEG with EXIF orientation {orientation}",
                OK,
                check=both(size_is(24, 16), orientation_reset),
                exact=same_pixels(upright, atol=12),
            ),
        )
    add(
        "exif_orientation_9.jpg",
        encode(upright, "JPEG", quality=95, exif=exif_with_orientation(9)),
        Case("exif_orientation_9.jpg", "EXIF orientation 9 (invalid): ignored", OK,
             check=size_is(24, 16)),
    )  # fmt: skip
    broken = encode(upright, "JPEG", quality=95, exif=b"Exif\x00\x00MM\x00*\x00\x00\xff\xff")
    add(
        "broken_exif.jpg",
        broken,
        Case(
            "broken_exif.jpg",
            "EXIF block with a dangling IFD offset",
            OK,
            check=size_is(24, 16),
            warning="EXIF data is corrupt",
        ),
    )

    # --- names
    for relative, what in (
        ("unicode фото 照片.png", "unicode name with spaces"),
        ("with space.png", "space in the name"),
        ("UPPER.PNG", "upper-case extension"),
        (".hidden.png", "hidden file (dot name) in a visible folder"),
        ("sub/nested.png", "image in a sub-folder (mirrored under -o)"),
        ("sub/deeper/nested.jpg", "two levels down"),
    ):
        data = jpeg if relative.endswith(".jpg") else png
        add(relative, data, Case(relative, what, OK, check=size_is(40, 32)))

    # --- things discovery must skip
    add("notes.txt", b"not an image", Case("notes.txt", "text file, .txt", IGNORED))
    add(
        ".plain.png.0123abcd.tmp.png",
        png[:100],
        Case(".plain.png.0123abcd.tmp.png", "temp file of an interrupted write", IGNORED),
    )
    add(
        ".cache/hidden.png",
        png,
        Case(".cache/hidden.png", "image inside a hidden folder", IGNORED),
    )
    (root / "folder.jpg").mkdir(parents=True, exist_ok=True)
    cases.append(Case("folder.jpg", "folder named like an image", IGNORED))
    if hasattr(os, "mkfifo"):
        os.mkfifo(root / "fifo.png")
        cases.append(Case("fifo.png", "named pipe called fifo.png (never opened)", IGNORED))

    # --- links
    os.symlink("plain.png", root / "link_to_plain.png")
    cases.append(Case("link_to_plain.png", "symlink to an image", OK, check=size_is(40, 32)))
    os.symlink("does_not_exist.png", root / "dangling.png")
    cases.append(Case("dangling.png", "dangling symlink", FAILED, "broken symbolic link"))
    os.symlink("..", root / "sub" / "loop")  # sub/loop -> root: a cycle for --recursive
    cases.append(Case("sub/loop", "symlink loop back to the top folder (-r)", IGNORED))
    return cases


def main(argv: list[str]) -> None:
    """Write the corpus to the folder given on the command line and list its cases."""
    root = Path(argv[1]) / "in"
    root.mkdir(parents=True, exist_ok=False)
    for case in build_corpus(root):
        print(f"{case.expect:8} {case.relative:40} {case.what}")


if __name__ == "__main__":
    main(sys.argv)
