"""Image I/O shared by every part: decode PNG/JPEG/PGM bytes, encode PNG, read IDX sets.

Arrays are uint8 in (C, H, W) per image and (N, C, H, W) per batch.
"""

from __future__ import annotations

import functools
import gzip
import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from latentserve.errors import InvalidInput, ResourceLimit

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pgm", ".ppm", ".bmp", ".webp")
# The formats the API documents (PNG, JPEG, PGM/PPM, BMP, WebP), as Pillow names them.
# Pillow reads some forty more, a few through little-tested parsers (and EPS through
# Ghostscript): bytes of any other format are refused without being parsed.
IMAGE_FORMATS = ("PNG", "JPEG", "PPM", "BMP", "WEBP")
DEFAULT_MAX_PIXELS = 25_000_000  # a 24 MP photo (6000 x 4000) fits


def _mode_for(channels: int) -> str:
    if channels == 1:
        return "L"
    if channels == 3:
        return "RGB"
    raise InvalidInput(f"images with {channels} channels are not supported; use 1 or 3")


def describe_shape(shape: tuple[int, int, int]) -> str:
    """``L 28x28`` / ``RGB 481x321`` (W x H); ``RGB, any size`` where H, W are 0."""
    mode = {1: "L", 3: "RGB"}.get(shape[0], f"{shape[0]}-channel")
    return f"{mode}, any size" if shape[1] == 0 else f"{mode} {shape[2]}x{shape[1]}"


def convert_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """uint8 (C, H, W) -> (channels, H, W), exactly as Pillow's convert: grey -> RGB
    repeats the plane, RGB -> grey is ITU-R 601-2 luma ``(19595 R + 38470 G + 7471 B +
    2^15) >> 16``."""
    if image.shape[0] == channels:
        return image
    if image.shape[0] == 1 and channels == 3:
        return np.repeat(image, 3, axis=0)
    if image.shape[0] == 3 and channels == 1:
        r, g, b = (image[i].astype(np.uint32) for i in range(3))
        luma: np.ndarray = ((19595 * r + 38470 * g + 7471 * b + 0x8000) >> 16).astype(np.uint8)
        return luma[None]
    raise InvalidInput(f"cannot convert a {image.shape[0]}-channel image to {channels} channels")


def decode_image(data: bytes, shape: tuple[int, int, int], *, resize: bool = False,
                 max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image") -> np.ndarray:
    """Decode encoded image bytes into uint8 (C, H, W) of exactly ``shape``.

    A different size or mode is refused unless ``resize`` (then converted and resized).
    ``shape`` (C, 0, 0) takes any size (an any-size model): only the mode must match,
    and ``resize`` converts the mode only. Images over ``max_pixels`` are refused before
    their pixels are decoded.
    """
    channels, height, width = shape
    img: Image.Image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            if img.width * img.height > max_pixels:
                raise ResourceLimit(
                    f"{name} is {img.width}x{img.height} = {img.width * img.height} pixels; "
                    f"the limit is {max_pixels}", limit="max_pixels_per_image")
            img.load()
    except ResourceLimit:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ResourceLimit(f"{name}: {exc}") from None
    except UnidentifiedImageError:
        raise InvalidInput(f"{name} is not a readable PNG/JPEG/PGM/PPM/BMP/WebP image: it "
                           f"starts with {bytes(data[:8])!r}, the start of none of them") from None
    except Exception as exc:  # Pillow raises many types for bad bytes
        raise InvalidInput(f"{name} is not a readable PNG/JPEG/PGM/PPM/BMP/WebP image "
                           f"({exc})") from None
    want_mode = _mode_for(channels)
    if height == 0:  # any size: the mode alone must match
        width, height = img.size
    if img.mode != want_mode or img.size != (width, height):
        if not resize:
            raise InvalidInput(
                f"{name} is {img.mode} {img.width}x{img.height}; the model takes "
                f"{describe_shape(shape)} (pass --resize / resize=true to convert)")
        img = img.convert(want_mode)
        if img.size != (width, height):
            img = img.resize((width, height), Image.Resampling.LANCZOS)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1).copy()


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (C, H, W) -> PNG bytes (exactly what Pillow's ``Image.save`` writes)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise InvalidInput(f"encode_png takes uint8 (C, H, W) with C in (1, 3), "
                           f"got {image.dtype} {image.shape}")
    arr = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    if _direct_png_ok():
        return _png_direct(np.ascontiguousarray(arr))
    return _png_pil(arr)


def _png_pil(arr: np.ndarray) -> bytes:
    """(H, W) or (H, W, 3) uint8 -> PNG bytes through ``Image.save`` (the reference)."""
    buf = io.BytesIO()
    # zlib's default level: optimize=True costs 60% more time for <1% fewer bytes,
    # and PNG encoding dominates a sample job's worker time.
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# What PngImagePlugin writes for an L or RGB image saved with no options: the signature,
# IHDR (bit depth 8, colour type 0 or 2), one IDAT per block of its zip encoder's
# output, IEND; and what it asks that encoder for (optimize, level, strategy, dictionary).
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOUR = {"L": b"\x08\x00\x00\x00\x00", "RGB": b"\x08\x02\x00\x00\x00"}
_PNG_ZIP_CONFIG = (False, -1, -1, b"")
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind))))


def _png_direct(arr: np.ndarray) -> bytes:
    """``_png_pil``'s bytes, from Pillow's own zip encoder driven directly: Image.save's
    plugin machinery costs more Python time than the compression of a 28x28 image, and
    a worker's PNG encoding holds the GIL that its other threads need."""
    h, w = arr.shape[:2]
    mode = "L" if arr.ndim == 2 else "RGB"
    im = Image.frombuffer(mode, (w, h), arr, "raw", mode, 0, 1)
    encoder = Image._getencoder(mode, "zip", mode, _PNG_ZIP_CONFIG)
    parts = [_PNG_SIGNATURE, _png_chunk(b"IHDR", struct.pack(">II", w, h) + _PNG_COLOUR[mode])]
    try:
        encoder.setimage(im.im, (0, 0, w, h))
        bufsize = max(ImageFile.MAXBLOCK, w * 4)  # as ImageFile._save sizes it
        while True:
            _, status, data = encoder.encode(bufsize)
            parts.append(_png_chunk(b"IDAT", data))
            if status:
                break
    finally:
        encoder.cleanup()
    if status < 0:
        raise InvalidInput(f"PNG encoding failed (Pillow encoder status {status})")
    parts.append(_PNG_IEND)
    return b"".join(parts)


@functools.cache
def _direct_png_ok() -> bool:
    """Whether ``_png_direct`` writes ``Image.save``'s bytes with this Pillow (checked once
    on a few images of both modes; the private encoder API it uses may change)."""
    rng = np.random.default_rng(0)
    probes = [rng.integers(0, 256, (5, 7), np.uint8), np.zeros((28, 28), np.uint8),
              rng.integers(0, 256, (9, 4, 3), np.uint8),
              (rng.integers(0, 4, (40, 33, 3)) * 80).astype(np.uint8)]
    try:
        return all(_png_direct(a) == _png_pil(a) for a in probes)
    except Exception:  # noqa: BLE001 - any change in Pillow's internals: use Image.save
        return False


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX image file (optionally .gz) into uint8 (N, 1, H, W)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 16 or data[0:2] != b"\0\0" or data[2] != 0x08 or data[3] != 3:
        raise InvalidInput(f"{path} is not an IDX3 uint8 image file (bad magic)")
    n, h, w = (int.from_bytes(data[i:i + 4], "big") for i in (4, 8, 12))
    if len(data) != 16 + n * h * w:
        raise InvalidInput(f"{path}: header says {n}x{h}x{w}, file holds {len(data) - 16} bytes")
    return np.frombuffer(data, np.uint8, offset=16).reshape(n, 1, h, w).copy()


def read_image_file(path: str | Path, shape: tuple[int, int, int], *,
                    resize: bool = False) -> np.ndarray:
    """One image file -> uint8 (C, H, W)."""
    path = Path(path)
    return decode_image(path.read_bytes(), shape, resize=resize, name=str(path))


def list_image_files(folder: str | Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def load_image_list(path: str | Path) -> list[np.ndarray]:
    """A folder of images (or one image, or an IDX file) -> uint8 (C, H, W) arrays, each
    at its own size; RGB if any image is colour, else grey (photo sets mix sizes and
    orientations)."""
    path = Path(path)
    if path.is_file() and ("idx" in path.name or path.suffix in (".gz", ".idx3-ubyte")):
        return list(read_idx(path))
    files = list_image_files(path) if path.is_dir() else [path]
    if not files:
        raise InvalidInput(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    modes = []
    for f in files:
        with Image.open(f) as img:
            modes.append(img.mode)
    channels = 1 if all(m in ("L", "1") for m in modes) else 3
    return [read_image_file(f, (channels, 0, 0), resize=True) for f in files]


def load_images(path: str | Path, shape: tuple[int, int, int] | None = None, *,
                resize: bool = False) -> np.ndarray:
    """An IDX(.gz) file, a folder of images or one image -> uint8 (N, C, H, W).

    For folders and files, ``shape`` fixes the size (default: the first image's, grey).
    """
    path = Path(path)
    if path.is_file() and ("idx" in path.name or path.suffix in (".gz", ".idx3-ubyte")):
        return read_idx(path)
    files = list_image_files(path) if path.is_dir() else [path]
    if not files:
        raise InvalidInput(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if shape is None:
        with Image.open(files[0]) as first:
            shape = (3 if first.mode == "RGB" else 1, first.height, first.width)
    return np.stack([read_image_file(f, shape, resize=resize) for f in files])
