"""Image I/O: exact round trips for every mode and bit depth, metadata, errors, atomic writes."""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image, ImageCms, ImageOps, JpegImagePlugin

from restore_cli.errors import ImageReadError, ImageWriteError
from restore_cli.io import image as image_mod
from restore_cli.io.atomic import atomic_path, atomic_write_bytes, is_temp_file, temp_path_for
from restore_cli.io.image import (
    INPUT_EXTENSIONS,
    MAX_PIXELS_DEFAULT,
    OUTPUT_EXTENSIONS,
    DecodedImage,
    ImageExtras,
    output_bit_depth,
    read_image,
    resize_alpha,
    write_image,
)

RNG = np.random.default_rng(1234)
H, W = 6, 9  # asymmetric, so every orientation gives a distinct layout


# --------------------------------------------------------------------------- fixtures


def rgb8(h: int = H, w: int = W, channels: int = 3) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, channels), dtype=np.uint8)


def deep16(shape: tuple[int, ...]) -> np.ndarray:
    """16-bit samples none of which is a multiple of 257 (so an 8-bit round trip would show)."""
    v = RNG.integers(0, 65535, shape, dtype=np.uint16)
    v[v % 257 == 0] += 1
    return v


def as8(a: np.ndarray) -> np.ndarray:
    return np.rint(a * 255).astype(np.uint8)


def as16(a: np.ndarray) -> np.ndarray:
    return np.rint(a * 65535).astype(np.uint16)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_by_hand(width: int, height: int, depth: int, colour_type: int, rows: bytes) -> bytes:
    """Fixtures Pillow/OpenCV cannot write (16-bit gray+alpha, absurd headers)."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def srgb_icc() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def exif_bytes(orientation: int | None = None, make: str = "TestCam") -> bytes:
    exif = Image.Exif()
    exif[0x010F] = make
    if orientation is not None:
        exif[0x0112] = orientation
    sub = exif.get_ifd(0x8769)
    sub[0x9003] = "2024:05:06 07:08:09"  # DateTimeOriginal lives in the EXIF sub-IFD
    exif[0x8769] = sub
    return exif.tobytes()


def cv_write_png16(path: Path, rgb_or_rgba: np.ndarray, exif: bytes | None = None) -> None:
    n = rgb_or_rgba.shape[2]
    bgr = rgb_or_rgba[..., [2, 1, 0, 3][:n]]
    types, blobs = [], []
    if exif:
        types.append(cv2.IMAGE_METADATA_EXIF)
        blobs.append(np.frombuffer(exif[6:], np.uint8))
    ok, buf = cv2.imencodeWithMetadata(".png", np.ascontiguousarray(bgr), types, blobs)
    assert ok
    path.write_bytes(buf.tobytes())


def single_line_error(exc: pytest.ExceptionInfo, path: Path) -> str:
    text = str(exc.value)
    assert "\n" not in text
    assert str(path) in text
    return text


# --------------------------------------------------------------------------- 8-bit Pillow modes


def test_png_rgb8_round_trip_exact(tmp_path: Path) -> None:
    src = rgb8()
    Image.fromarray(src).save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    assert isinstance(img, DecodedImage)
    assert img.rgb.dtype == np.float32 and img.rgb.flags.c_contiguous
    assert (img.height, img.width) == (H, W)
    assert img.megapixels == pytest.approx(H * W / 1e6)
    e = img.extras
    assert (e.source_format, e.source_mode, e.bit_depth, e.grayscale) == ("PNG", "RGB", 8, False)
    assert e.alpha is None
    np.testing.assert_array_equal(as8(img.rgb), src)
    write_image(tmp_path / "b.png", img.rgb, e)
    out = Image.open(tmp_path / "b.png")
    assert out.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(out), src)


@pytest.mark.parametrize("suffix", [".png", ".webp", ".tif"])
def test_rgba8_alpha_exact(tmp_path: Path, suffix: str) -> None:
    src = rgb8(channels=4)
    Image.fromarray(src).save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    assert img.extras.source_mode == "RGBA"
    np.testing.assert_array_equal(as8(img.extras.alpha), src[..., 3])
    target = tmp_path / f"b{suffix}"
    write_image(target, img.rgb, img.extras)
    back = read_image(target)
    np.testing.assert_array_equal(as8(back.extras.alpha), src[..., 3])
    if suffix != ".webp":  # lossy colour; alpha above is still exact (lossless alpha plane)
        np.testing.assert_array_equal(as8(back.rgb), src[..., :3])


def test_la8_gray_plus_alpha(tmp_path: Path) -> None:
    src = rgb8(channels=2)
    Image.fromarray(src, "LA").save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    e = img.extras
    assert (e.source_mode, e.grayscale, e.bit_depth) == ("LA", True, 8)
    np.testing.assert_array_equal(as8(img.rgb[..., 1]), src[..., 0])
    np.testing.assert_array_equal(as8(e.alpha), src[..., 1])
    write_image(tmp_path / "b.png", img.rgb, e)
    out = Image.open(tmp_path / "b.png")
    assert out.mode == "LA"
    np.testing.assert_array_equal(np.asarray(out), src)


def test_palette_with_transparency_gives_alpha(tmp_path: Path) -> None:
    palette = RNG.integers(0, 256, 16 * 3, dtype=np.uint8).tolist()
    idx = RNG.integers(0, 16, (H, W), dtype=np.uint8)
    idx[0, 0] = 5
    im = Image.fromarray(idx, "P")
    im.putpalette(palette)
    im.save(tmp_path / "p.png", transparency=5)
    img = read_image(tmp_path / "p.png")
    assert img.extras.source_mode == "P"
    expected = np.asarray(Image.open(tmp_path / "p.png").convert("RGBA"))
    np.testing.assert_array_equal(as8(img.rgb), expected[..., :3])
    np.testing.assert_array_equal(as8(img.extras.alpha), (idx != 5) * 255)


def test_cmyk_jpeg_reads_as_rgb(tmp_path: Path) -> None:
    Image.fromarray(rgb8(16, 16)).convert("CMYK").save(tmp_path / "c.jpg", quality=100)
    img = read_image(tmp_path / "c.jpg")
    e = img.extras
    assert (e.source_format, e.source_mode, e.grayscale, e.icc_profile) == (
        "JPEG",
        "CMYK",
        False,
        None,
    )
    expected = np.asarray(Image.open(tmp_path / "c.jpg").convert("RGB"))
    np.testing.assert_array_equal(as8(img.rgb), expected)


def test_grayscale_stays_one_channel(tmp_path: Path) -> None:
    src = rgb8(channels=1)[..., 0]
    Image.fromarray(src).save(tmp_path / "g.png")
    img = read_image(tmp_path / "g.png")
    assert img.extras.grayscale and img.extras.source_mode == "L"
    np.testing.assert_array_equal(img.rgb[..., 0], img.rgb[..., 2])
    for suffix, mode in ((".png", "L"), (".jpg", "L"), (".tif", "L"), (".bmp", "L")):
        write_image(tmp_path / f"o{suffix}", img.rgb, img.extras)
        assert Image.open(tmp_path / f"o{suffix}").mode == mode
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o.png")), src)
    # A colourful result is written as its BT.601 luma.
    colourful = np.zeros((H, W, 3), np.float32)
    colourful[..., 0] = 1.0
    write_image(tmp_path / "red.png", colourful, img.extras)
    assert np.asarray(Image.open(tmp_path / "red.png"))[0, 0] == round(0.299 * 255)


def test_bmp_and_webp_read(tmp_path: Path) -> None:
    src = rgb8()
    Image.fromarray(src).save(tmp_path / "a.bmp")
    Image.fromarray(rgb8(channels=4)).save(tmp_path / "a.webp", lossless=True)
    np.testing.assert_array_equal(as8(read_image(tmp_path / "a.bmp").rgb), src)
    assert read_image(tmp_path / "a.webp").extras.alpha is not None


# --------------------------------------------------------------------------- 16-bit and float


def test_png16_rgb_round_trip_exact(tmp_path: Path) -> None:
    src = deep16((H, W, 3))
    cv_write_png16(tmp_path / "a.png", src)
    img = read_image(tmp_path / "a.png")
    e = img.extras
    assert (e.source_mode, e.bit_depth, e.grayscale, e.alpha) == ("RGB;16", 16, False, None)
    np.testing.assert_array_equal(as16(img.rgb), src)
    write_image(tmp_path / "b.png", img.rgb, e)
    out = cv2.imread(str(tmp_path / "b.png"), cv2.IMREAD_UNCHANGED)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out[..., ::-1], src)


def test_png16_rgba_alpha_exact(tmp_path: Path) -> None:
    src = deep16((H, W, 4))
    cv_write_png16(tmp_path / "a.png", src)
    img = read_image(tmp_path / "a.png")
    assert img.extras.source_mode == "RGBA;16"
    np.testing.assert_array_equal(as16(img.extras.alpha), src[..., 3])
    write_image(tmp_path / "b.png", img.rgb, img.extras)
    out = cv2.imread(str(tmp_path / "b.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(out[..., [2, 1, 0, 3]], src)


@pytest.mark.parametrize("channels", [3, 4])
def test_tiff16_round_trip_exact(tmp_path: Path, channels: int) -> None:
    src = deep16((H, W, channels))
    extra = ["unassalpha"] if channels == 4 else None
    tifffile.imwrite(tmp_path / "a.tif", src, photometric="rgb", extrasamples=extra)
    img = read_image(tmp_path / "a.tif")
    assert (img.extras.source_format, img.extras.bit_depth) == ("TIFF", 16)
    np.testing.assert_array_equal(as16(img.rgb), src[..., :3])
    if channels == 4:
        np.testing.assert_array_equal(as16(img.extras.alpha), src[..., 3])
    write_image(tmp_path / "b.tif", img.rgb, img.extras)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "b.tif"), src)


def test_tiff16_planar_and_lzw(tmp_path: Path) -> None:
    src = deep16((H, W, 3))
    planar = tmp_path / "planar.tif"
    tifffile.imwrite(planar, np.moveaxis(src, 2, 0), photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(as16(read_image(planar).rgb), src)
    # OpenCV and Pillow write LZW, which tifffile cannot decompress without imagecodecs: those
    # files take the OpenCV fallback.
    ok, buf = cv2.imencode(".tif", np.ascontiguousarray(src[..., ::-1]))
    assert ok
    (tmp_path / "lzw.tif").write_bytes(buf.tobytes())
    np.testing.assert_array_equal(as16(read_image(tmp_path / "lzw.tif").rgb), src)
    gray = deep16((H, W))
    Image.fromarray(gray).save(tmp_path / "gray_lzw.tif", compression="tiff_lzw")
    img = read_image(tmp_path / "gray_lzw.tif")
    assert img.extras.grayscale and img.extras.bit_depth == 16
    np.testing.assert_array_equal(as16(img.rgb[..., 0]), gray)


def test_truncated_tiff_strips_refused_before_opencv(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "a.tif", deep16((64, 64, 3)), photometric="rgb")
    data = (tmp_path / "a.tif").read_bytes()
    with tifffile.TiffFile(tmp_path / "a.tif") as tif:
        image_mod._check_tiff_data_present(tif.pages[0], len(data))
        with pytest.raises(ValueError, match="truncated"):
            image_mod._check_tiff_data_present(tif.pages[0], len(data) // 2)


def test_gray16_png_and_tiff(tmp_path: Path) -> None:
    src = deep16((H, W))
    Image.fromarray(src).save(tmp_path / "g.png")
    tifffile.imwrite(tmp_path / "g.tif", src)
    for name in ("g.png", "g.tif"):
        img = read_image(tmp_path / name)
        e = img.extras
        assert (e.source_mode, e.bit_depth, e.grayscale) == ("I;16", 16, True)
        np.testing.assert_array_equal(as16(img.rgb[..., 0]), src)
        write_image(tmp_path / f"out_{name}", img.rgb, e)
    out_png = Image.open(tmp_path / "out_g.png")
    assert out_png.mode == "I;16"
    np.testing.assert_array_equal(np.asarray(out_png), src)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out_g.tif"), src)


def test_every_16bit_value_survives(tmp_path: Path) -> None:
    src = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    tifffile.imwrite(tmp_path / "all.tif", src)
    img = read_image(tmp_path / "all.tif")
    write_image(tmp_path / "all.png", img.rgb, img.extras)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "all.png")), src)


def test_la16_png(tmp_path: Path) -> None:
    src = deep16((H, W, 2))
    rows = b"".join(b"\x00" + src[y].astype(">u2").tobytes() for y in range(H))
    (tmp_path / "la.png").write_bytes(png_by_hand(W, H, 16, 4, rows))
    img = read_image(tmp_path / "la.png")
    e = img.extras
    assert (e.source_mode, e.bit_depth, e.grayscale) == ("LA;16", 16, True)
    np.testing.assert_array_equal(as16(img.rgb[..., 0]), src[..., 0])
    np.testing.assert_array_equal(as16(e.alpha), src[..., 1])
    write_image(tmp_path / "o.tif", img.rgb, e)  # TIFF keeps gray+alpha
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "o.tif"), src)
    write_image(tmp_path / "o.png", img.rgb, e)  # PNG: 16-bit RGBA with equal colour channels
    out = cv2.imread(str(tmp_path / "o.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(out[..., 1], src[..., 0])
    np.testing.assert_array_equal(out[..., 3], src[..., 1])


def test_float_tiff(tmp_path: Path) -> None:
    src = RNG.random((H, W, 3), dtype=np.float32) * 1.4 - 0.2
    tifffile.imwrite(tmp_path / "f.tif", src, photometric="rgb")
    img = read_image(tmp_path / "f.tif")
    e = img.extras
    assert (e.bit_depth, e.source_mode) == (32, "RGB;F")
    expected = np.clip(src, 0, 1)
    np.testing.assert_array_equal(img.rgb, expected)
    write_image(tmp_path / "o.tif", img.rgb, e)
    out = tifffile.imread(tmp_path / "o.tif")
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)
    assert output_bit_depth(e, ".png") == 16 and output_bit_depth(e, "jpg") == 8


def test_float_gray_tiff(tmp_path: Path) -> None:
    src = RNG.random((H, W), dtype=np.float32)
    tifffile.imwrite(tmp_path / "f.tif", src)
    img = read_image(tmp_path / "f.tif")
    assert (img.extras.source_mode, img.extras.grayscale) == ("F", True)
    np.testing.assert_array_equal(img.rgb[..., 1], src)


# --------------------------------------------------------------------------- orientation


# What the stored pixels must be so that applying orientation N gives the upright image.
_INVERSE = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def stored_for(upright: np.ndarray, orientation: int) -> np.ndarray:
    method = _INVERSE[orientation]
    if method is None:
        return upright
    planes = [Image.fromarray(upright[..., c]) for c in range(upright.shape[2])]
    return np.stack([np.asarray(p.transpose(method)) for p in planes], axis=2)


def write_oriented(path: Path, stored: np.ndarray, orientation: int) -> None:
    exif = exif_bytes(orientation)
    kind = path.name.split("_")[0]
    if kind == "png8":
        Image.fromarray(stored).save(path, exif=exif)
    elif kind == "webp":
        Image.fromarray(stored).save(path, lossless=True, exif=exif)
    elif kind == "jpg":
        Image.fromarray(stored).save(path, quality=100, subsampling=0, exif=exif)
    elif kind == "tif8":
        Image.fromarray(stored).save(path, exif=exif)
    elif kind == "png16":
        cv_write_png16(path, stored, exif)
    elif kind == "tif16":
        tifffile.imwrite(path, stored, photometric="rgb", extratags=[(274, "H", 1, orientation)])


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize(
    "kind", ["png8.png", "webp.webp", "jpg.jpg", "tif8.tif", "png16.png", "tif16.tif"]
)
def test_exif_orientation_applied(tmp_path: Path, kind: str, orientation: int) -> None:
    if kind.startswith(("png16", "tif16")):
        upright = deep16((H, W, 4 if kind.startswith("png16") else 3))
    else:
        upright = np.kron(rgb8(3, 3, 4 if kind.startswith("png8") else 3), np.ones((8, 8, 1)))
        upright = upright[:, :-4].astype(np.uint8)  # 24x20 blocks: asymmetric, JPEG-friendly
    path = tmp_path / f"{kind.split('.')[0]}_{orientation}.{kind.split('.')[1]}"
    write_oriented(path, stored_for(upright, orientation), orientation)
    if kind.startswith(("png8", "webp", "jpg")):  # our numpy transforms agree with Pillow's
        reference = np.asarray(ImageOps.exif_transpose(Image.open(path)))
        np.testing.assert_allclose(reference, upright, atol=3)
    img = read_image(path)
    assert img.rgb.flags.c_contiguous and img.rgb.shape[:2] == upright.shape[:2]
    colour = upright[..., :3]
    if upright.dtype == np.uint16:
        np.testing.assert_array_equal(as16(img.rgb), colour)
    elif kind.startswith("jpg"):
        np.testing.assert_allclose(as8(img.rgb), colour, atol=3)
    else:
        np.testing.assert_array_equal(as8(img.rgb), colour)
    if upright.shape[2] == 4:
        scale = as16 if upright.dtype == np.uint16 else as8
        np.testing.assert_array_equal(scale(img.extras.alpha), upright[..., 3])


def test_exif_copied_with_orientation_reset(tmp_path: Path) -> None:
    stored = stored_for(np.kron(rgb8(2, 3), np.ones((8, 8, 1))).astype(np.uint8), 6)
    Image.fromarray(stored).save(tmp_path / "a.jpg", quality=95, exif=exif_bytes(6))
    img = read_image(tmp_path / "a.jpg")
    exif = Image.Exif()
    exif.load(img.extras.exif)
    assert exif[0x0112] == 1 and exif[0x010F] == "TestCam"
    for suffix in (".jpg", ".png", ".webp", ".tif"):
        target = tmp_path / f"out{suffix}"
        write_image(target, img.rgb, img.extras)
        out = Image.open(target).getexif()
        assert out.get(0x0112) == 1, suffix
        assert out.get(0x010F) == "TestCam", suffix
        assert out.get_ifd(0x8769).get(0x9003) == "2024:05:06 07:08:09", suffix


def test_exif_in_16bit_outputs(tmp_path: Path) -> None:
    cv_write_png16(tmp_path / "a.png", deep16((H, W, 3)), exif_bytes(3))
    img = read_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png", img.rgb, img.extras)
    out = Image.open(tmp_path / "b.png").getexif()
    assert (out.get(0x0112), out.get(0x010F)) == (1, "TestCam")
    assert out.get_ifd(0x8769).get(0x9003) == "2024:05:06 07:08:09"
    write_image(tmp_path / "b.tif", img.rgb, img.extras)  # tifffile: IFD0 text tags only
    with tifffile.TiffFile(tmp_path / "b.tif") as tif:
        assert tif.pages[0].tags["Make"].value == "TestCam"


def test_exif_from_tiff_keeps_only_descriptive_tags(tmp_path: Path) -> None:
    tags = [(271, "s", 0, "TiffCam", True), (274, "H", 1, 8, True)]
    tifffile.imwrite(tmp_path / "a.tif", deep16((H, W, 3)), photometric="rgb", extratags=tags)
    img = read_image(tmp_path / "a.tif")
    assert img.rgb.shape[:2] == (W, H)  # orientation 8 swaps the axes
    exif = Image.Exif()
    exif.load(img.extras.exif)
    assert exif[0x010F] == "TiffCam" and exif[0x0112] == 1
    assert 273 not in exif and 258 not in exif  # strip offsets, bits per sample: file layout


def test_png16_without_opencv_metadata_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenCV < 4.12: pixels still 16-bit; metadata from Pillow's header chunks; warn on write."""
    src = deep16((H, W, 3))
    cv_write_png16(tmp_path / "a.png", stored_for(src, 6), exif_bytes(6))
    monkeypatch.delattr(cv2, "imdecodeWithMetadata")
    monkeypatch.delattr(cv2, "imencodeWithMetadata")
    img = read_image(tmp_path / "a.png")
    np.testing.assert_array_equal(as16(img.rgb), src)
    assert img.extras.exif is not None
    with pytest.warns(UserWarning, match="OpenCV < 4.12"):
        write_image(tmp_path / "b.png", img.rgb, img.extras)
    np.testing.assert_array_equal(as16(read_image(tmp_path / "b.png").rgb), src)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_broken_exif_is_ignored(tmp_path: Path) -> None:
    src = rgb8()
    Image.fromarray(src).save(tmp_path / "a.png", exif=b"Exif\x00\x00MM\x00*garbage")
    img = read_image(tmp_path / "a.png")
    np.testing.assert_array_equal(as8(img.rgb), src)


# --------------------------------------------------------------------------- ICC, JPEG options


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp", ".tif"])
@pytest.mark.parametrize("deep", [False, True])
def test_icc_profile_copied(tmp_path: Path, suffix: str, deep: bool) -> None:
    icc = srgb_icc()
    if deep:
        tifffile.imwrite(tmp_path / "a.tif", deep16((H, W, 3)), photometric="rgb", iccprofile=icc)
    else:
        Image.fromarray(rgb8()).save(tmp_path / "a.tif", icc_profile=icc)
    img = read_image(tmp_path / "a.tif")
    assert img.extras.icc_profile == icc
    target = tmp_path / f"b{suffix}"
    write_image(target, img.rgb, img.extras)
    if suffix == ".tif" and deep:
        with tifffile.TiffFile(target) as tif:
            assert tif.pages[0].tags[34675].value == icc
    else:
        assert Image.open(target).info.get("icc_profile") == icc


def test_jpeg_quality_and_subsampling_honoured(tmp_path: Path) -> None:
    img = DecodedImage(
        rgb=RNG.random((32, 32, 3), dtype=np.float32),
        extras=ImageExtras("PNG", "RGB", 8, False, None, None, None),
    )
    for quality, sampling in ((95, 0), (60, 2)):
        target = tmp_path / f"q{quality}.jpg"
        write_image(target, img.rgb, img.extras, jpeg_quality=quality)
        ref = io.BytesIO()
        Image.fromarray(as8(img.rgb)).save(ref, "JPEG", quality=quality)
        out = Image.open(target)
        assert out.quantization == Image.open(ref).quantization
        assert JpegImagePlugin.get_sampling(out) == sampling
    assert (tmp_path / "q95.jpg").stat().st_size > (tmp_path / "q60.jpg").stat().st_size


def test_jpeg_drops_alpha_with_warning(tmp_path: Path) -> None:
    Image.fromarray(rgb8(channels=4)).save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    with pytest.warns(UserWarning, match="transparency"):
        write_image(tmp_path / "b.jpg", img.rgb, img.extras)
    assert Image.open(tmp_path / "b.jpg").mode == "RGB"


def test_alpha_resized_for_scaled_output(tmp_path: Path) -> None:
    Image.fromarray(rgb8(channels=4)).save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    big = cv2.resize(img.rgb, (W * 2, H * 2), interpolation=cv2.INTER_NEAREST)
    write_image(tmp_path / "b.png", big, img.extras)
    assert Image.open(tmp_path / "b.png").size == (W * 2, H * 2)
    a = resize_alpha(img.extras.alpha, 2 * H, 2 * W)
    assert a.shape == (2 * H, 2 * W) and a.dtype == np.float32
    assert a.min() >= 0 and a.max() <= 1


def test_animated_reads_first_frame_with_warning(tmp_path: Path) -> None:
    first, second = rgb8(), rgb8()
    for name in ("a.gif", "a.webp"):
        frames = [Image.fromarray(first), Image.fromarray(second)]
        kwargs = {"lossless": True} if name.endswith("webp") else {}
        frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:], **kwargs)
        with pytest.warns(UserWarning, match="only the first"):
            img = read_image(tmp_path / name)
        if name.endswith("webp"):
            np.testing.assert_array_equal(as8(img.rgb), first)


def test_constants_and_bit_depth_table() -> None:
    assert MAX_PIXELS_DEFAULT == 200_000_000
    assert ".gif" not in INPUT_EXTENSIONS and ".webp" in INPUT_EXTENSIONS
    assert set(OUTPUT_EXTENSIONS.values()) <= INPUT_EXTENSIONS
    e16 = ImageExtras("PNG", "RGB;16", 16, False, None, None, None)
    e8 = ImageExtras("PNG", "RGB", 8, False, None, None, None)
    assert [output_bit_depth(e16, s) for s in (".png", ".tif", ".jpg", ".webp", ".bmp")] == [
        16,
        16,
        8,
        8,
        8,
    ]
    assert output_bit_depth(e8, ".TIFF") == 8


# --------------------------------------------------------------------------- read errors


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def test_errors_are_single_line_read_errors(tmp_path: Path) -> None:
    png, jpg = io.BytesIO(), io.BytesIO()
    Image.fromarray(rgb8(64, 64)).save(png, "PNG")
    Image.fromarray(rgb8(64, 64)).save(jpg, "JPEG")
    cv_write_png16(tmp_path / "deep.png", deep16((64, 64, 3)))
    tifffile.imwrite(tmp_path / "deep.tif", deep16((64, 64, 3)), photometric="rgb")
    cases = {
        "empty.png": b"",
        "trunc.png": _truncated(png.getvalue()),
        "trunc.jpg": _truncated(jpg.getvalue()),
        "trunc16.png": _truncated((tmp_path / "deep.png").read_bytes()),
        "trunc16.tif": _truncated((tmp_path / "deep.tif").read_bytes()),
        "text.jpg": b"this is not an image\n" * 10,
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ImageReadError) as exc:
            read_image(path)
        single_line_error(exc, path)
    for path in (tmp_path / "missing.png", tmp_path):
        with pytest.raises(ImageReadError) as exc:
            read_image(path)
        single_line_error(exc, path)


def test_max_pixels_checked_before_decoding(tmp_path: Path) -> None:
    # 20000 x 10000 = 200 M pixels with garbage pixel data: only a header check can say "too big",
    # and Pillow's own decompression-bomb error (at 179 M pixels) must not be what fires.
    path = tmp_path / "huge.png"
    path.write_bytes(png_by_hand(20000, 10001, 8, 0, b"\x00" * 16))
    with pytest.raises(ImageReadError) as exc:
        read_image(path)
    text = single_line_error(exc, path)
    assert "--max-pixels" in text and "200,000,000" in text
    small = tmp_path / "small.png"
    Image.fromarray(rgb8()).save(small)
    with pytest.raises(ImageReadError, match="max-pixels"):
        read_image(small, max_pixels=H * W - 1)
    assert read_image(small, max_pixels=H * W).width == W
    cv_write_png16(tmp_path / "deep.png", deep16((H, W, 3)))
    tifffile.imwrite(tmp_path / "deep.tif", deep16((H, W, 3)), photometric="rgb")
    for path in (tmp_path / "deep.png", tmp_path / "deep.tif"):
        with pytest.raises(ImageReadError, match="max-pixels"):
            read_image(path, max_pixels=H * W - 1)
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's guard restored for everyone else


def test_concurrent_reads_restore_pillow_guard(tmp_path: Path) -> None:
    before = Image.MAX_IMAGE_PIXELS
    paths = []
    for i in range(8):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rgb8(64, 64)).save(paths[-1])
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(read_image, paths * 4))
    assert len(results) == 32
    assert before == Image.MAX_IMAGE_PIXELS


# --------------------------------------------------------------------------- writing, atomicity


def test_write_failure_leaves_no_target_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    img = DecodedImage(
        rgb=np.zeros((H, W, 3), np.float32),
        extras=ImageExtras("PNG", "RGB", 8, False, None, None, None),
    )

    def half_write_then_fail(job: image_mod._Encode) -> None:
        job.tmp.write_bytes(b"\x89PNG partial")
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setitem(image_mod._WRITERS, "PNG", half_write_then_fail)
    target = tmp_path / "out.png"
    with pytest.raises(ImageWriteError) as exc:
        write_image(target, img.rgb, img.extras)
    assert "disk on fire" in single_line_error(exc, target)
    assert list(tmp_path.iterdir()) == []
    # An existing target is replaced only on success.
    target.write_bytes(b"old")
    with pytest.raises(ImageWriteError):
        write_image(target, img.rgb, img.extras)
    assert target.read_bytes() == b"old"
    monkeypatch.undo()
    write_image(target, img.rgb, img.extras)
    assert Image.open(target).size == (W, H)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_write_errors_are_image_write_errors(tmp_path: Path) -> None:
    img = read_image_from(rgb8(), tmp_path)
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    for target in (blocker / "sub" / "x.png", tmp_path / "x.gif"):
        with pytest.raises(ImageWriteError) as exc:
            write_image(target, img.rgb, img.extras)
        single_line_error(exc, target)


def read_image_from(src: np.ndarray, tmp_path: Path) -> DecodedImage:
    Image.fromarray(src).save(tmp_path / "src.png")
    return read_image(tmp_path / "src.png")


def test_atomic_path_cleans_up_on_keyboard_interrupt(tmp_path: Path) -> None:
    target = tmp_path / "t.png"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png"
        assert is_temp_file(tmp) and tmp.exists()
        tmp.write_bytes(b"new but unfinished")
        raise KeyboardInterrupt
    assert sorted(os.listdir(tmp_path)) == ["t.png"]
    assert target.read_bytes() == b"old"
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["t.png"]


def test_is_temp_file() -> None:
    assert is_temp_file(temp_path_for(Path("/x/photo.jpg")))
    assert is_temp_file(temp_path_for(Path("/x/noext")))
    assert is_temp_file(temp_path_for(Path("/x/" + "n" * 300 + ".png")))
    assert len(temp_path_for(Path("/x/" + "n" * 300 + ".png")).name) < 255
    assert not is_temp_file(Path("/x/photo.jpg"))
    assert not is_temp_file(Path("/x/.hidden.png"))


def test_no_warnings_for_plain_round_trip(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        img = read_image_from(rgb8(), tmp_path)
        write_image(tmp_path / "o.jpg", img.rgb, img.extras)
