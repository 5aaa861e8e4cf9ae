"""Decode images to float32 RGB and encode them back without losing what users care about.

Reading gives ``DecodedImage(rgb, extras)``: ``rgb`` is float32 HxWx3 in [0, 1], upright (EXIF
orientation applied); ``extras`` carries what the model does not touch (alpha, bit depth, colour
mode, ICC profile, EXIF) so that :func:`write_image` can put it back.

Codecs come from libraries, never hand-written:

* Pillow: PNG/JPEG/WebP/BMP/GIF, 8-bit TIFF, 16-bit grayscale PNG ("I;16"), all metadata.
* OpenCV: 16-bit RGB(A) PNG, which Pillow cannot hold (it has no 16-bit RGB mode and silently
  reduces such files to 8 bits); ``cv2.imencodeWithMetadata`` writes their iCCP/eXIf chunks.
* tifffile: 16-bit and float TIFF. Without the optional ``imagecodecs`` package it cannot
  decompress LZW/PackBits/JPEG TIFFs; those fall back to OpenCV's libtiff decoder.

What an output cannot keep (by format):

* JPEG, BMP: no alpha (dropped with a warning); 8 bits. WebP: 8 bits, lossy at ``quality``
  (its alpha plane is lossless), grayscale stored as equal RGB.
* PNG: 16-bit gray+alpha is written as 16-bit RGBA with equal colour channels (no library here
  writes 16-bit LA PNG); every bit is kept.
* 16-bit / float TIFF: tifffile cannot write EXIF or GPS sub-IFDs; only IFD0 text tags (make,
  model, artist, copyright, description) and the ICC profile are kept. 8-bit TIFF with EXIF
  is written uncompressed (Pillow's compressing libtiff writer cannot store the EXIF sub-IFD).
* Everywhere: the EXIF thumbnail (IFD1), XMP, IPTC and Photoshop resources are not carried.
"""

from __future__ import annotations

import errno
import io
import logging
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import tifffile
from PIL import ExifTags, Image, ImageCms, UnidentifiedImageError

from restore_cli.errors import ImageReadError, ImageWriteError
from restore_cli.io.atomic import atomic_path

MAX_PIXELS_DEFAULT = 200_000_000
"""Decompression-bomb guard: images with more pixels are refused before decoding."""

INPUT_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"})
OUTPUT_EXTENSIONS = {"png": ".png", "jpg": ".jpg", "webp": ".webp", "tif": ".tif"}

_ORIENTATION = ExifTags.Base.Orientation
_EXIF_IFD = ExifTags.IFD.Exif
_GPS_IFD = ExifTags.IFD.GPSInfo
_ICC_TAG = 34675  # TIFF InterColorProfile
_CV_EXIF = getattr(cv2, "IMAGE_METADATA_EXIF", 0)  # metadata API: OpenCV >= 4.12
_CV_ICCP = getattr(cv2, "IMAGE_METADATA_ICCP", 2)
_JPEG_MAX_EXIF = 65533  # one APP1 segment; Pillow refuses more
# zlib level 4: on 8-bit photos within 1% of the default level 6's size at ~40% of its time.
# 16-bit: the low bytes are mostly noise; level 1 is ~1% larger than 4-6 and ~1.6x faster.
_PNG_COMPRESSION = 4
_PNG16_COMPRESSION = 1
_BT601 = np.array([0.299, 0.587, 0.114], dtype=np.float32)

# IFD0 tags of a TIFF file that describe the photo rather than the pixel layout; only these
# (plus the EXIF and GPS sub-IFDs) are carried as EXIF from TIFF sources.
_TIFF_DESCRIPTIVE_TAGS = (270, 271, 272, 274, 282, 283, 296, 305, 306, 315, 33432)
_TIFFFILE_ASCII_TAGS = (270, 271, 272, 315, 33432)  # written by tifffile as extratags

# tifffile logs its complaints about damaged files (without naming them) through `logging`;
# the read error or note that follows names the file, so those lines are only noise.
logging.getLogger("tifffile").addHandler(logging.NullHandler())
logging.getLogger("tifffile").propagate = False
# Pillow warns about damaged EXIF blocks without naming the file; read_image notes it instead.
warnings.filterwarnings("ignore", message=r"(Possibly )?[Cc]orrupt EXIF", category=UserWarning)

_current = threading.local()  # per thread: the file being read or written, and its notes


# --------------------------------------------------------------------------- data classes


@dataclass
class ImageExtras:
    """Everything besides the RGB pixels that write_image needs to restore."""

    source_format: str  # "PNG", "JPEG", "WEBP", "TIFF", "BMP" (Pillow's format name)
    source_mode: str  # e.g. "RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16", "RGB;16", "F"
    bit_depth: int  # 8, 16, or 32 (float TIFF)
    grayscale: bool  # one colour channel -> written back as one channel (BT.601 luma)
    alpha: np.ndarray | None  # HxW float32 in [0, 1], carried through unchanged
    icc_profile: bytes | None  # copied to the output; CMYK profiles are dropped
    exif: bytes | None  # "Exif\0\0" + TIFF payload, Orientation reset to 1


@dataclass
class DecodedImage:
    """Upright float32 RGB pixels plus the extras needed to write them back."""

    rgb: np.ndarray  # float32 HxWx3, C-contiguous, values in [0, 1]
    extras: ImageExtras
    # What was read but not as asked (extra frames ignored, EXIF dropped...): one line each,
    # also issued as warnings; `restore` puts them in the run CSV.
    notes: list[str] = field(default_factory=list)

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def megapixels(self) -> float:
        return self.height * self.width / 1e6


class _Unsupported(ValueError):
    """Internal: a readable image we do not handle; read_image prefixes the path."""


class _Pixels(NamedTuple):
    """Decoded pixels before orientation is applied."""

    rgb: np.ndarray  # float32 HxWx3 in [0, 1]
    alpha: np.ndarray | None
    grayscale: bool
    bit_depth: int
    mode: str


class _Meta(NamedTuple):
    orientation: int
    icc: bytes | None
    exif: bytes | None


# --------------------------------------------------------------------------- reading


def read_image(path: Path, *, max_pixels: int = MAX_PIXELS_DEFAULT) -> DecodedImage:
    """Decode ``path`` to upright float32 RGB in [0, 1] plus extras.

    Any failure raises :class:`ImageReadError` with one line ``"<path>: <cause>"``.
    """
    path = Path(path)
    _current.path, _current.notes = path, []
    try:
        data = path.read_bytes()
        if not data:
            raise ImageReadError(f"{path}: empty file (0 bytes)")
        with _pillow_bomb_check_disabled():
            if _is_tiff(data):
                decoded = _decode_tiff(path, data, max_pixels)
            else:
                decoded = _decode_with_pillow(path, data, max_pixels)
        decoded.notes = list(_current.notes)
        return decoded
    except ImageReadError:
        raise
    except Exception as exc:
        raise ImageReadError(f"{path}: {_read_cause(exc)}") from exc
    finally:
        _current.path, _current.notes = None, None


def file_being_read() -> Path | None:
    """The file this thread is decoding or encoding, if any: lets a warning hook name it."""
    return getattr(_current, "path", None)


def _note(message: str) -> None:
    """Record a one-line note for the file being read and issue it as a warning."""
    notes = getattr(_current, "notes", None)
    if notes is not None:
        notes.append(message)
    warnings.warn(message, stacklevel=3)


_CORRUPT_HINTS = (
    "truncat",
    "failed to read",
    "broken data stream",
    "could not create decoder",
    "decoder error",
    "error -3",
    "invalid distance",
    "invalid block type",
)


def _read_cause(exc: Exception) -> str:
    """One short line for the user; never a traceback or a multi-line library message."""
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, IsADirectoryError):
        return "is a directory, not an image file"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, UnidentifiedImageError):
        return "not a recognised image file (or an unsupported format)"
    if isinstance(exc, MemoryError):
        return "not enough memory to decode this image"
    if isinstance(exc, _Unsupported):
        return str(exc)
    text = _first_line(exc)
    lowered = text.lower()
    if "decompressed data too large" in lowered:
        return (
            "refused: a metadata chunk inflates beyond Pillow's safety limit "
            f"(decompression bomb?) ({text})"
        )
    if isinstance(exc, EOFError) or any(hint in lowered for hint in _CORRUPT_HINTS):
        return f"file is truncated or corrupt ({text})"
    return f"cannot decode image ({text})"


def _first_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    lines = str(exc).strip().splitlines()
    return lines[0].strip() if lines else type(exc).__name__


_bomb_lock = threading.Lock()
_bomb_users = 0
_bomb_saved: int | None = None


@contextmanager
def _pillow_bomb_check_disabled() -> Iterator[None]:
    """Switch off Pillow's own decompression-bomb check while we decode.

    We check ``max_pixels`` ourselves from the header; Pillow's fixed limit (warning at 89 MP,
    error at 179 MP) would otherwise fire first, ignore ``--max-pixels`` and print a multi-line
    message. Reference-counted so concurrent reader threads restore the setting correctly.
    """
    global _bomb_users, _bomb_saved
    with _bomb_lock:
        if _bomb_users == 0:
            _bomb_saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _bomb_users += 1
    try:
        yield
    finally:
        with _bomb_lock:
            _bomb_users -= 1
            if _bomb_users == 0:
                Image.MAX_IMAGE_PIXELS = _bomb_saved


def _check_pixel_limit(path: Path, width: int, height: int, max_pixels: int) -> None:
    """Refuse oversized images from the header, before any pixel is decoded."""
    if width * height > max_pixels:
        raise ImageReadError(
            f"{path}: {width}x{height} = {width * height:,} pixels exceeds the limit of "
            f"{max_pixels:,} pixels (raise it with --max-pixels if you trust this file)"
        )


def _warn_extra_frames(path: Path, frames: int, what: str) -> None:
    if frames > 1:
        _note(f"{path}: has {frames} {what}; only the first is read")


def _is_tiff(data: bytes) -> bool:
    return data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _png_ihdr(data: bytes) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG's IHDR, which the spec places first in the file."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 26:
        return data[24], data[25]
    return None


# ---- Pillow path (everything but 16-bit colour PNG and high-bit TIFF)


def _decode_with_pillow(path: Path, data: bytes, max_pixels: int) -> DecodedImage:
    with Image.open(io.BytesIO(data)) as im:
        _check_pixel_limit(path, im.width, im.height, max_pixels)
        if im.format != "MPO":  # camera JPEGs: the extra MPF images are previews / gain maps
            _warn_extra_frames(path, getattr(im, "n_frames", 1), "frames")
        ihdr = _png_ihdr(data)
        if im.format == "PNG" and ihdr is not None and ihdr[0] == 16 and ihdr[1] in (2, 4, 6):
            return _decode_png16_with_opencv(data, im.info, gray_alpha=ihdr[1] == 4)
        tiff_exif = _exif_from_tiff_bytes(data) if im.format == "TIFF" else None
        im.load()  # truncated files raise here (LOAD_TRUNCATED_IMAGES stays off)
        pixels = _pillow_pixels(im)
        if im.format == "TIFF":
            meta = _tiff_meta_after_pillow(im, tiff_exif)
        else:
            meta = _meta_from_exif(_safe_getexif(im), im.info.get("icc_profile"), False)
        return _assemble(pixels, meta, _FORMAT_NAMES.get(im.format, im.format or "UNKNOWN"))


def _safe_getexif(im: Image.Image) -> Image.Exif | None:
    """Broken EXIF must not fail the read: ignore it (with a note when nothing was usable)."""
    try:
        exif = im.getexif()
    except Exception:
        exif = None
    if im.info.get("exif") and not exif:
        path = file_being_read()
        _note(f"{path}: EXIF data is corrupt; ignored" if path else "EXIF data is corrupt")
    return exif


def _tiff_meta_after_pillow(im: Image.Image, exif: Image.Exif | None) -> _Meta:
    """Recent Pillow (13 here) applies a TIFF's orientation itself on load, then drops the tag;
    apply it ourselves only if the tag is still there (older Pillow)."""
    meta = _meta_from_exif(exif, im.info.get("icc_profile"), True)
    tags = getattr(im, "tag_v2", {})
    if _ORIENTATION not in tags:
        meta = meta._replace(orientation=1)
    return meta


_FORMAT_NAMES = {"MPO": "JPEG"}  # Pillow's name for JPEGs with MPF extra images
_PILLOW_PLAIN = {"1": "L", "RGBX": "RGB", "RGBa": "RGBA", "La": "LA", "PA": "RGBA", "YCbCr": "RGB"}


def _normalise_pillow_mode(im: Image.Image) -> Image.Image:
    """Convert Pillow's many modes to L, LA, RGB, RGBA, I;16*, I or F."""
    mode = im.mode
    if mode == "CMYK":
        return _cmyk_to_rgb(im)
    if mode in ("P", "L", "RGB") and "transparency" in im.info:
        return im.convert("LA" if mode == "L" else "RGBA")
    if mode == "P":
        return im.convert("RGB")
    if mode in _PILLOW_PLAIN:
        return im.convert(_PILLOW_PLAIN[mode])
    return im


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    """Use the embedded CMYK profile when there is one (naive conversion shifts colours)."""
    icc = im.info.get("icc_profile")
    if icc:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
            converted = ImageCms.profileToProfile(im, source, srgb, outputMode="RGB")
            if converted is not None:
                return converted
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass
    return im.convert("RGB")


def _pillow_pixels(im: Image.Image) -> _Pixels:
    source_mode = "I;16" if im.mode.startswith("I;16") else im.mode
    norm = _normalise_pillow_mode(im)
    arr = np.asarray(norm)
    mode = norm.mode
    if mode in ("L", "LA", "RGB", "RGBA"):
        colour = _scale(arr[..., : len(mode.rstrip("A"))] if arr.ndim == 3 else arr, 255)
        alpha = _scale(arr[..., -1], 255) if mode.endswith("A") else None
        return _make_pixels(colour, alpha, 8, source_mode)
    if mode.startswith("I;16") or mode == "I":
        gray = np.clip(arr, 0, 65535)
        alpha = _transparency_key_alpha(gray, im.info.get("transparency"))
        return _make_pixels(_scale(gray, 65535), alpha, 16, source_mode)
    if mode == "F":
        return _make_pixels(_unit_float(arr), None, 32, source_mode)
    raise _Unsupported(f"unsupported colour mode {im.mode!r}")


def _transparency_key_alpha(gray: np.ndarray, key: object) -> np.ndarray | None:
    """16-bit grayscale PNG with a tRNS colour key: Pillow's convert would drop to 8 bits."""
    if not isinstance(key, int):
        return None
    return (gray != key).astype(np.float32)


# ---- OpenCV path for 16-bit RGB(A) and gray+alpha PNG


def _decode_png16_with_opencv(data: bytes, info: dict, *, gray_alpha: bool) -> DecodedImage:
    """Pillow reduces 16-bit colour PNGs to 8 bits, so OpenCV decodes them.

    Metadata: OpenCV's (it sees the whole file), else what Pillow found in the header chunks.
    """
    _verify_png_chunks(data)
    arr, blobs = _opencv_decode_with_metadata(data)
    raw_exif = blobs.get(_CV_EXIF, info.get("exif"))
    icc = blobs.get(_CV_ICCP, info.get("icc_profile"))
    meta = _meta_from_exif(_exif_from_bytes(raw_exif), icc, False)
    return _assemble(_opencv_pixels(arr, gray_alpha), meta, "PNG")


def _opencv_decode_with_metadata(data: bytes) -> tuple[np.ndarray, dict[int, bytes]]:
    buf = np.frombuffer(data, dtype=np.uint8)
    if hasattr(cv2, "imdecodeWithMetadata"):  # OpenCV >= 4.12
        arr, types, blobs = cv2.imdecodeWithMetadata(buf, cv2.IMREAD_UNCHANGED)
        meta = _opencv_metadata(types, blobs)
    else:
        arr, meta = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED), {}
    if arr is None or arr.size == 0:
        raise ValueError("OpenCV could not decode this 16-bit PNG")
    return arr, meta


def _opencv_metadata(types: np.ndarray | None, blobs: object) -> dict[int, bytes]:
    """{cv2.IMAGE_METADATA_*: bytes} from imdecodeWithMetadata's parallel outputs."""
    if types is None or blobs is None:
        return {}
    kinds = np.asarray(types).ravel().tolist()
    pairs = zip(kinds, blobs, strict=False)
    return {int(k): np.asarray(b, dtype=np.uint8).tobytes() for k, b in pairs}


def _verify_png_chunks(data: bytes) -> None:
    """Check chunk CRCs and that IEND is present before OpenCV sees the file.

    libpng would print its complaints about truncated files straight to stderr.
    """
    with Image.open(io.BytesIO(data)) as im:
        im.verify()


def _opencv_pixels(arr: np.ndarray, gray_alpha: bool) -> _Pixels:
    """OpenCV gives B,G,R(,A) channel order; gray+alpha PNGs come back as BGRA."""
    depth, scale = _integer_or_float_depth(arr)
    colour = arr[..., 0] if gray_alpha else arr[..., 2::-1]
    alpha = arr[..., 3] if arr.shape[2] == 4 else None
    colour_f, alpha_f = _to_unit(colour, scale), _to_unit(alpha, scale)
    mode = _describe_mode(gray_alpha, alpha is not None, depth)
    return _make_pixels(colour_f, alpha_f, depth, mode)


def _integer_or_float_depth(arr: np.ndarray) -> tuple[int, int]:
    """(bit depth, max value) for uint8/uint16 arrays; (32, 0) for float arrays."""
    if arr.dtype == np.uint8:
        return 8, 255
    if arr.dtype == np.uint16:
        return 16, 65535
    if np.issubdtype(arr.dtype, np.floating):
        return 32, 0
    raise _Unsupported(f"unsupported sample type {arr.dtype}")


# ---- tifffile path for 16-bit and float TIFF


def _decode_tiff(path: Path, data: bytes, max_pixels: int) -> DecodedImage:
    try:
        tif = tifffile.TiffFile(io.BytesIO(data))
    except Exception:
        return _decode_with_pillow(path, data, max_pixels)  # Pillow gives the error message
    with tif:
        if not tif.pages:
            raise _Unsupported("no readable image in this TIFF (truncated or corrupt file?)")
        page = tif.pages[0]
        _check_tiff_layout(page)
        if page.bitspersample <= 8 and page.sampleformat != tifffile.SAMPLEFORMAT.IEEEFP:
            return _decode_with_pillow(path, data, max_pixels)
        _check_pixel_limit(path, page.imagewidth, page.imagelength, max_pixels)
        _warn_extra_frames(path, len(tif.pages), "pages")
        pixels = _tifffile_pixels(page, data)
        icc_tag = page.tags.get(_ICC_TAG)
        icc = bytes(icc_tag.value) if icc_tag is not None else None
    meta = _meta_from_exif(_exif_from_tiff_bytes(data), icc, True)
    return _assemble(pixels, meta, "TIFF")


_MAX_TIFF_SAMPLES = 8  # gray/RGB plus alpha and a few extra samples; more is not a photo


def _check_tiff_layout(page: tifffile.TiffPage) -> None:
    """Refuse layouts that multiply the work beyond the pixel count, before any strip is read.

    A 367-byte file claiming 12,550 samples per pixel in separate planes made tifffile walk
    5.4 million strips (16 s) although its 3x3849 pixels pass ``--max-pixels`` (found by
    tests/fuzz_atheris.py).
    """
    if page.samplesperpixel > _MAX_TIFF_SAMPLES:
        raise _Unsupported(
            f"unsupported TIFF with {page.samplesperpixel} samples per pixel "
            f"(at most {_MAX_TIFF_SAMPLES} are read)"
        )
    if page.imagedepth > 1:
        raise _Unsupported(f"unsupported volumetric TIFF (image depth {page.imagedepth})")


def _tifffile_pixels(page: tifffile.TiffPage, data: bytes) -> _Pixels:
    photometric = page.photometric
    ph = tifffile.PHOTOMETRIC
    if photometric not in (ph.MINISBLACK, ph.MINISWHITE, ph.RGB):
        raise _Unsupported(
            f"unsupported TIFF colour space {photometric.name} at {page.bitspersample} bits"
        )
    if page.sampleformat not in (tifffile.SAMPLEFORMAT.UINT, tifffile.SAMPLEFORMAT.IEEEFP):
        raise _Unsupported(f"unsupported TIFF sample format {page.sampleformat.name}")
    arr = _tiff_samples_last(page, data)
    colour_channels = 3 if photometric == ph.RGB else 1
    colour = arr[..., :colour_channels]
    if photometric == ph.MINISWHITE:
        colour = _invert(colour)
    alpha = arr[..., colour_channels] if arr.shape[2] > colour_channels else None
    depth, scale = _integer_or_float_depth(arr)
    colour_f, alpha_f = _to_unit(colour, scale), _to_unit(alpha, scale)
    if alpha_f is not None and page.extrasamples[:1] == (tifffile.EXTRASAMPLE.ASSOCALPHA,):
        colour_f = _unpremultiply(colour_f, alpha_f)
    gray = colour_channels == 1
    mode = _describe_mode(gray, alpha_f is not None, depth)
    return _make_pixels(colour_f[..., 0] if gray else colour_f, alpha_f, depth, mode)


def _tiff_samples_last(page: tifffile.TiffPage, data: bytes) -> np.ndarray:
    """HxWxS samples; falls back to OpenCV (libtiff) when tifffile lacks the codec."""
    try:
        arr = page.asarray()
    except ValueError as exc:
        if "imagecodecs" not in str(exc):
            raise
        _check_tiff_data_present(page, len(data))
        return _opencv_tiff_samples(data)
    if page.axes.startswith("S"):  # planar configuration "separate"
        arr = np.moveaxis(arr, 0, -1)
    return arr if arr.ndim == 3 else arr[..., np.newaxis]


def _check_tiff_data_present(page: tifffile.TiffPage, size: int) -> None:
    """Refuse truncated files before OpenCV decodes them: it is not relied on to notice."""
    spans = zip(page.dataoffsets, page.databytecounts, strict=False)
    if not page.dataoffsets or any(n <= 0 or o + n > size for o, n in spans):
        raise ValueError("image data is truncated (strips extend past the end of the file)")


def _opencv_tiff_samples(data: bytes) -> np.ndarray:
    arr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.size == 0:
        raise ValueError("could not decode this compressed TIFF")
    if arr.ndim == 2:
        return arr[..., np.newaxis]
    order = [2, 1, 0, *range(3, arr.shape[2])] if arr.shape[2] >= 3 else list(range(arr.shape[2]))
    return arr[..., order]


def _invert(arr: np.ndarray) -> np.ndarray:
    if np.issubdtype(arr.dtype, np.integer):
        return np.iinfo(arr.dtype).max - arr
    return 1.0 - arr


def _unpremultiply(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Associated (premultiplied) alpha: recover the straight colour the model should see."""
    a = alpha[..., np.newaxis] if colour.ndim == 3 else alpha
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(a > 0, colour / np.maximum(a, 1e-12), 0.0)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


# ---- shared helpers


def _describe_mode(gray: bool, alpha: bool, depth: int) -> str:
    base = ("LA" if alpha else "L") if gray else ("RGBA" if alpha else "RGB")
    if depth == 32:
        return "F" if base == "L" else f"{base};F"
    if depth == 16:
        return "I;16" if base == "L" else f"{base};16"
    return base


def _scale(arr: np.ndarray, maxval: int) -> np.ndarray:
    out = arr.astype(np.float32)
    out /= np.float32(maxval)
    return out


def _to_unit(arr: np.ndarray | None, maxval: int) -> np.ndarray | None:
    """Integer samples divided by ``maxval``; float samples (``maxval`` 0) clipped."""
    if arr is None:
        return None
    return _scale(arr, maxval) if maxval else _unit_float(arr)


def _unit_float(arr: np.ndarray) -> np.ndarray:
    """Float samples clipped to [0, 1]; NaN becomes 0."""
    out = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(out, 0.0, 1.0, out=out)


def _make_pixels(colour: np.ndarray, alpha: np.ndarray | None, depth: int, mode: str) -> _Pixels:
    gray = colour.ndim == 2 or colour.shape[2] == 1
    if gray:
        plane = colour if colour.ndim == 2 else colour[..., 0]
        rgb = np.repeat(plane[..., np.newaxis], 3, axis=2)
    else:
        rgb = colour
    return _Pixels(rgb, alpha, gray, depth, mode)


def _assemble(pixels: _Pixels, meta: _Meta, source_format: str) -> DecodedImage:
    rgb = np.ascontiguousarray(_apply_orientation(pixels.rgb, meta.orientation), np.float32)
    alpha = pixels.alpha
    if alpha is not None:
        alpha = np.ascontiguousarray(_apply_orientation(alpha, meta.orientation), np.float32)
    extras = ImageExtras(
        source_format=source_format,
        source_mode=pixels.mode,
        bit_depth=pixels.bit_depth,
        grayscale=pixels.grayscale,
        alpha=alpha,
        icc_profile=_icc_kept_on_read(meta.icc),
        exif=meta.exif,
    )
    return DecodedImage(rgb=rgb, extras=extras)


def _apply_orientation(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Turn stored pixels upright for EXIF orientation 1-8 (same result as exif_transpose)."""
    if orientation == 2:
        return arr[:, ::-1]
    if orientation == 3:
        return arr[::-1, ::-1]
    if orientation == 4:
        return arr[::-1]
    if orientation == 5:
        return arr.swapaxes(0, 1)
    if orientation == 6:
        return np.rot90(arr, k=-1)
    if orientation == 7:
        return arr[::-1, ::-1].swapaxes(0, 1)
    if orientation == 8:
        return np.rot90(arr, k=1)
    return arr


def _icc_colour_space(icc: bytes | None) -> bytes | None:
    """The ICC header's data colour space signature: b"RGB ", b"GRAY", b"CMYK", ..."""
    return icc[16:20] if icc and len(icc) >= 128 else None


def _icc_kept_on_read(icc: bytes | None) -> bytes | None:
    """Only RGB and gray profiles describe the pixels we hand on (CMYK was converted)."""
    return icc if _icc_colour_space(icc) in (b"RGB ", b"GRAY") else None


# ---- EXIF


def _exif_from_bytes(raw: bytes | None) -> Image.Exif | None:
    if not raw:
        return None
    try:
        exif = Image.Exif()
        exif.load(raw)
        return exif
    except Exception:
        return None


def _exif_from_tiff_bytes(data: bytes) -> Image.Exif | None:
    """A TIFF file's first IFD is its EXIF IFD0; parse it without decoding pixels."""
    return _exif_from_bytes(data)


def _meta_from_exif(exif: Image.Exif | None, icc: bytes | None, from_tiff: bool) -> _Meta:
    return _Meta(_orientation_of(exif), icc or None, _portable_exif(exif, from_tiff))


def _orientation_of(exif: Image.Exif | None) -> int:
    try:
        value = int(exif.get(_ORIENTATION, 1)) if exif is not None else 1
    except Exception:
        return 1
    return value if 1 <= value <= 8 else 1


def _portable_exif(exif: Image.Exif | None, from_tiff: bool) -> bytes | None:
    """EXIF bytes safe to attach to any output, Orientation reset to 1.

    From a TIFF only the descriptive IFD0 tags and the EXIF/GPS sub-IFDs are kept: its other
    IFD0 tags (strip offsets, bits per sample, ...) describe the source file's layout.
    """
    if exif is None:
        return None
    try:
        out = _descriptive_copy(exif) if from_tiff else exif
        if _ORIENTATION in out:
            out[_ORIENTATION] = 1
        return out.tobytes() if len(out) else None
    except Exception:
        return None


def _descriptive_copy(exif: Image.Exif) -> Image.Exif:
    out = Image.Exif()
    for tag in _TIFF_DESCRIPTIVE_TAGS:
        if tag in exif:
            out[tag] = exif[tag]
    for ifd in (_EXIF_IFD, _GPS_IFD):
        if ifd in exif:
            sub = exif.get_ifd(ifd)
            if sub:
                out[ifd] = dict(sub)
    return out


# --------------------------------------------------------------------------- writing


_SUFFIX_FORMAT = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".bmp": "BMP",
}


def output_bit_depth(extras: ImageExtras, suffix: str) -> int:
    """Bits per sample write_image stores for ``suffix`` (".png" or "png").

    PNG keeps 16 bits for 16-bit and float sources; TIFF keeps 16 bits and float32; JPEG, WebP
    and BMP are 8-bit formats.
    """
    fmt = _format_for_suffix(suffix)
    if fmt == "PNG":
        return 16 if extras.bit_depth >= 16 else 8
    if fmt == "TIFF":
        return extras.bit_depth if extras.bit_depth in (16, 32) else 8
    return 8


def _format_for_suffix(suffix: str) -> str | None:
    suffix = suffix.lower()
    return _SUFFIX_FORMAT.get(suffix if suffix.startswith(".") else f".{suffix}")


def write_image(
    path: Path, rgb: np.ndarray, extras: ImageExtras, *, jpeg_quality: int = 95
) -> list[str]:
    """Encode float RGB in [0, 1] to ``path`` (format from its suffix), atomically.

    Alpha, grayscale, bit depth, ICC and EXIF from ``extras`` are restored where the format
    can hold them; an alpha of another size (a model that rescales) is resized to fit. JPEG
    and BMP have no alpha: it is dropped with a warning. Returns those warnings (one line
    each) for the run CSV. Failure raises :class:`ImageWriteError` and leaves neither the
    target changed nor a temp file behind.
    """
    path = Path(path)
    previous = getattr(_current, "path", None), getattr(_current, "notes", None)
    _current.path, _current.notes = path, []
    try:
        _write(path, rgb, extras, jpeg_quality)
        return list(_current.notes)
    finally:
        _current.path, _current.notes = previous


def _write(path: Path, rgb: np.ndarray, extras: ImageExtras, jpeg_quality: int) -> None:
    fmt = _format_for_suffix(path.suffix)
    if fmt is None:
        raise ImageWriteError(
            f"{path}: unsupported output format {path.suffix!r} "
            "(use .png, .jpg, .jpeg, .webp, .tif, .tiff or .bmp)"
        )
    colour, alpha = _output_planes(rgb, extras)
    depth = output_bit_depth(extras, path.suffix)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            _WRITERS[fmt](_Encode(tmp, path, colour, alpha, extras, depth, jpeg_quality))
    except ImageWriteError:
        raise
    except Exception as exc:
        raise ImageWriteError(f"{path}: cannot write image ({_write_cause(exc)})") from exc


_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _write_cause(exc: BaseException) -> str:
    text = _first_line(exc)
    if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
        return f"{text}: disk full, quota or file size limit reached"
    return text


def resize_alpha(alpha: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize an HxW alpha plane (for models that change the image size); float32 in [0, 1]."""
    if alpha.shape == (height, width):
        return alpha.astype(np.float32, copy=False)
    shrinking = height * width < alpha.shape[0] * alpha.shape[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC
    src = np.ascontiguousarray(alpha, dtype=np.float32)
    out = cv2.resize(src, (width, height), interpolation=interpolation)
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def _output_planes(rgb: np.ndarray, extras: ImageExtras) -> tuple[np.ndarray, np.ndarray | None]:
    """Colour (HxW luma for grayscale sources, else HxWx3) and alpha fitted to the image."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"write_image expects HxWx3 RGB, got shape {rgb.shape}")
    rgb = np.asarray(rgb, dtype=np.float32)
    colour = _gray_plane(rgb) if extras.grayscale else rgb
    alpha = extras.alpha
    if alpha is not None:
        alpha = resize_alpha(alpha, rgb.shape[0], rgb.shape[1])
    return colour, alpha


def _gray_plane(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma, except that an image whose channels are still equal keeps its exact values
    (the float32 dot product is off by an ulp, which a float TIFF output would keep)."""
    first = rgb[..., 0]
    if np.array_equal(first, rgb[..., 1]) and np.array_equal(first, rgb[..., 2]):
        return np.array(first)
    return rgb @ _BT601


class _Encode(NamedTuple):
    """One encoding job, as handed to the per-format writers."""

    tmp: Path  # the atomic temp file to write
    target: Path  # the real output path, for messages
    colour: np.ndarray  # float HxW (grayscale output) or HxWx3
    alpha: np.ndarray | None  # float HxW, same size
    extras: ImageExtras
    depth: int  # bits per sample to store: 8, 16 or 32 (float)
    quality: int  # JPEG / WebP quality

    @property
    def gray(self) -> bool:
        return self.colour.ndim == 2


def _quantize(plane: np.ndarray, depth: int) -> np.ndarray:
    """Clip to [0, 1] and round to nearest (np.rint) in the output sample type."""
    out = np.nan_to_num(plane.astype(np.float32), nan=0.0, copy=False)  # a fresh copy
    np.clip(out, 0.0, 1.0, out=out)
    if depth == 32:
        return out
    maxval, dtype = (255, np.uint8) if depth == 8 else (65535, np.uint16)
    out *= maxval
    np.rint(out, out=out)
    return out.astype(dtype)


def _stack(colour: np.ndarray, alpha: np.ndarray | None, depth: int) -> np.ndarray:
    """Quantized HxW (gray), HxWx2 (LA), HxWx3 (RGB) or HxWx4 (RGBA) samples."""
    c = _quantize(colour, depth)
    if alpha is None:
        return c
    a = _quantize(alpha, depth)
    return np.concatenate([c if c.ndim == 3 else c[..., np.newaxis], a[..., np.newaxis]], axis=2)


def _to_rgb(colour: np.ndarray) -> np.ndarray:
    return colour if colour.ndim == 3 else np.repeat(colour[..., np.newaxis], 3, axis=2)


def _icc_for_output(icc: bytes | None, gray_output: bool) -> bytes | None:
    """Attach a profile only when it matches the written colour space (RGB or GRAY)."""
    wanted = b"GRAY" if gray_output else b"RGB "
    return icc if _icc_colour_space(icc) == wanted else None


def _warn_alpha_dropped(target: Path, alpha: np.ndarray | None, fmt: str) -> None:
    if alpha is not None:
        _note(
            f"{target}: {fmt} has no alpha channel; transparency is dropped (use .png, .webp "
            "or .tif to keep it)"
        )


def _pillow_save(tmp: Path, pixels: np.ndarray, fmt: str, **options: object) -> None:
    options = {k: v for k, v in options.items() if v is not None}
    Image.fromarray(pixels).save(tmp, format=fmt, **options)


def _write_png(job: _Encode) -> None:
    """8-bit and 16-bit gray via Pillow; 16-bit colour or gray+alpha via OpenCV."""
    if job.depth == 8 or (job.gray and job.alpha is None):
        _pillow_save(
            job.tmp,
            _stack(job.colour, job.alpha, job.depth),
            "PNG",
            compress_level=_PNG_COMPRESSION,
            icc_profile=_icc_for_output(job.extras.icc_profile, job.gray),
            exif=job.extras.exif,
        )
        return
    # Neither Pillow nor OpenCV writes 16-bit gray+alpha PNG: store it as 16-bit RGBA with equal
    # colour channels, which keeps every bit (a .tif output keeps it as gray+alpha).
    samples = _stack(_to_rgb(job.colour), job.alpha, job.depth)
    bgr = samples[..., [2, 1, 0, 3]] if samples.shape[2] == 4 else samples[..., ::-1]
    _opencv_png16(job, np.ascontiguousarray(bgr))


def _opencv_png16(job: _Encode, bgr: np.ndarray) -> None:
    """OpenCV's own metadata support writes the iCCP and eXIf chunks (no chunk splicing)."""
    types, blobs = [], []
    exif = job.extras.exif
    if exif:
        exif = exif[6:] if exif.startswith(b"Exif\x00\x00") else exif
        types.append(_CV_EXIF)  # eXIf holds the bare TIFF payload
        blobs.append(np.frombuffer(exif, dtype=np.uint8))
    icc = _icc_for_output(job.extras.icc_profile, False)
    if icc:
        types.append(_CV_ICCP)
        blobs.append(np.frombuffer(icc, dtype=np.uint8))
    params = [cv2.IMWRITE_PNG_COMPRESSION, _PNG16_COMPRESSION]
    if hasattr(cv2, "imencodeWithMetadata"):  # OpenCV >= 4.12
        ok, buf = cv2.imencodeWithMetadata(".png", bgr, types, blobs, params)
    else:
        if types:
            _note(f"{job.target}: OpenCV < 4.12 cannot write ICC/EXIF into a 16-bit PNG; dropped")
        ok, buf = cv2.imencode(".png", bgr, params)
    if not ok:
        raise ValueError("OpenCV could not encode the 16-bit PNG")
    job.tmp.write_bytes(buf.tobytes())


def _write_jpeg(job: _Encode) -> None:
    """Pillow JPEG; 4:4:4 chroma at quality >= 90, where subsampling would be the largest
    remaining loss (colour bleeding at the sharp edges restoration produces) for about a
    quarter more bytes."""
    _warn_alpha_dropped(job.target, job.alpha, "JPEG")
    exif = job.extras.exif
    if exif and len(exif) > _JPEG_MAX_EXIF:
        _note(f"{job.target}: EXIF too large for JPEG ({len(exif)} bytes); dropped")
        exif = None
    _pillow_save(
        job.tmp,
        _quantize(job.colour, 8),
        "JPEG",
        quality=job.quality,
        subsampling=0 if job.quality >= 90 else None,
        icc_profile=_icc_for_output(job.extras.icc_profile, job.gray),
        exif=exif,
    )


def _write_webp(job: _Encode) -> None:
    """Lossy WebP at ``quality`` (alpha plane lossless). WebP has no grayscale: gray is stored
    as equal RGB. ``exact`` keeps the colour under fully transparent pixels."""
    _pillow_save(
        job.tmp,
        _stack(_to_rgb(job.colour), job.alpha, 8),
        "WEBP",
        quality=job.quality,
        exact=job.alpha is not None,
        icc_profile=_icc_for_output(job.extras.icc_profile, False),
        exif=job.extras.exif,
    )


def _write_tiff(job: _Encode) -> None:
    if job.depth == 8:
        _write_tiff_pillow(job)
    else:
        _write_tiff_tifffile(job)


def _write_tiff_pillow(job: _Encode) -> None:
    """Pillow's libtiff writer (needed for compression) cannot write the EXIF sub-IFD, so files
    with EXIF are stored uncompressed by Pillow's own writer; others deflate-compressed."""
    _pillow_save(
        job.tmp,
        _stack(job.colour, job.alpha, 8),
        "TIFF",
        compression=None if job.extras.exif else "tiff_adobe_deflate",
        icc_profile=_icc_for_output(job.extras.icc_profile, job.gray),
        exif=job.extras.exif,
    )


def _write_tiff_tifffile(job: _Encode) -> None:
    """16-bit / float32 TIFF. tifffile cannot write EXIF or GPS sub-IFDs, so only the
    descriptive IFD0 text tags (make, model, artist, copyright, description) are kept."""
    samples = _stack(job.colour, job.alpha, job.depth)
    tifffile.imwrite(
        job.tmp,
        samples,
        photometric="minisblack" if job.gray else "rgb",
        planarconfig="contig" if samples.ndim == 3 else None,
        extrasamples=("unassalpha",) if job.alpha is not None else None,
        compression="zlib",
        iccprofile=_icc_for_output(job.extras.icc_profile, job.gray),
        extratags=_tiff_ascii_tags(job.extras.exif),
        metadata=None,
    )


def _tiff_ascii_tags(exif_bytes: bytes | None) -> list[tuple[int, str, int, str, bool]]:
    exif = _exif_from_bytes(exif_bytes)
    if exif is None:
        return []
    return [
        (tag, "s", 0, str(exif[tag]), True)
        for tag in _TIFFFILE_ASCII_TAGS
        if isinstance(exif.get(tag), str) and exif[tag].isascii()
    ]


def _write_bmp(job: _Encode) -> None:
    _warn_alpha_dropped(job.target, job.alpha, "BMP")
    _pillow_save(job.tmp, _quantize(job.colour, 8), "BMP")


_WRITERS = {
    "PNG": _write_png,
    "JPEG": _write_jpeg,
    "WEBP": _write_webp,
    "TIFF": _write_tiff,
    "BMP": _write_bmp,
}
