"""Image files for the fuzz suite: good ones, odd ones and hostile ones.

Each ``ImageCase`` says which statuses a Compress of it may get, as is and with
``resize``: images with absurd headers (PNG, JPEG, BMP, WebP declaring huge or zero
sizes), decompression bombs small on the wire, images past the pixel limit, other
modes, truncated files, and formats the API does not document.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import grpc
import numpy as np
from PIL import Image

C = grpc.StatusCode
OK, INVALID, EXHAUSTED = C.OK, C.INVALID_ARGUMENT, C.RESOURCE_EXHAUSTED


def one(*codes: grpc.StatusCode) -> frozenset[grpc.StatusCode]:
    return frozenset(codes)


def _save(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int, *, depth: int = 8, color: int = 0,
                  idat: bytes = b"") -> bytes:
    """A well-formed PNG header declaring any size, with ``idat`` as the whole image data."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(idat))
            + _chunk(b"IEND", b""))


def jpeg_declaring(width: int, height: int) -> bytes:
    """A real 28 x 28 JPEG whose frame header (SOF0) claims another size."""
    data = bytearray(_save(Image.new("L", (28, 28), 128), "JPEG"))
    at = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, at + 5, height, width)
    return bytes(data)


def bmp_declaring(width: int, height: int) -> bytes:
    data = bytearray(_save(Image.new("L", (28, 28)), "BMP"))
    struct.pack_into("<ii", data, 18, width, height)
    return bytes(data)


def webp_declaring(width: int, height: int) -> bytes:
    """An extended-format (VP8X) WebP header with a canvas of any size up to 2^24."""
    vp8x = bytes([0, 0, 0, 0]) + (width - 1).to_bytes(3, "little") + \
        (height - 1).to_bytes(3, "little")
    body = b"WEBP" + b"VP8X" + struct.pack("<I", len(vp8x)) + vp8x
    return b"RIFF" + struct.pack("<I", len(body)) + body


@dataclass(frozen=True)
class ImageCase:
    """Image file bytes, and the statuses as is (``plain``) and with ``resize`` set."""

    label: str
    data: bytes
    plain: frozenset[grpc.StatusCode]
    resized: frozenset[grpc.StatusCode]

    def allowed(self, resize: bool) -> frozenset[grpc.StatusCode]:
        return self.resized if resize else self.plain


def image_corpus(images: np.ndarray) -> tuple[ImageCase, ...]:
    """Good, odd and hostile image files (``images``: uint8 (N, 1, 28, 28))."""
    grey = Image.fromarray(images[0, 0])
    rgb = Image.merge("RGB", [Image.fromarray(images[i, 0]) for i in (1, 2, 3)])
    good, other = one(OK), one(INVALID)
    convert = (other, good)  # refused as is, converted with resize
    too_big, bad = (one(EXHAUSTED), one(EXHAUSTED)), (other, other)
    p_trns = grey.convert("P")
    cases: list[tuple[str, bytes, tuple[frozenset[grpc.StatusCode], ...]]] = [
        ("png L 28x28", _save(grey, "PNG"), (good, good)),
        ("jpeg L 28x28", _save(grey, "JPEG", quality=90), (good, good)),
        ("bmp L 28x28", _save(grey, "BMP"), (good, good)),
        ("pgm 28x28", _save(grey, "PPM"), (good, good)),
        ("webp lossless 28x28", _save(grey, "WEBP", lossless=True), convert),  # RGB inside
        ("png RGB 28x28", _save(rgb, "PNG"), convert),
        ("png RGBA 28x28", _save(rgb.convert("RGBA"), "PNG"), convert),
        ("png LA 28x28", _save(grey.convert("LA"), "PNG"), convert),
        ("png 1-bit 28x28", _save(grey.convert("1"), "PNG"), convert),
        ("png P+tRNS 28x28", _save(p_trns, "PNG", transparency=0), convert),
        ("png I;16 28x28", _save(Image.fromarray(images[0, 0].astype(np.uint16) * 257), "PNG"),
         convert),
        ("jpeg CMYK 28x28", _save(rgb.convert("CMYK"), "JPEG"), convert),
        ("ppm 16-bit 28x28", b"P5 28 28 65535\n" + bytes(2 * 784), convert),
        ("png 1x1", _save(grey.resize((1, 1)), "PNG"), convert),
        ("png 64x64 (at the pixel limit)", _save(grey.resize((64, 64)), "PNG"), convert),
        ("png 1x4096 (at the pixel limit)", _save(Image.new("L", (1, 4096)), "PNG"), convert),
        ("png 65x65 (over the pixel limit)", _save(grey.resize((65, 65)), "PNG"), too_big),
        ("png bomb 2000x2000 zeros", _save(Image.new("L", (2000, 2000)), "PNG"), too_big),
        ("png bomb 1x3000000 zeros", _save(Image.new("L", (3_000_000, 1)), "PNG"), too_big),
        ("png declaring 2^31-1 square", png_declaring(2**31 - 1, 2**31 - 1), too_big),
        ("png declaring 100000x100000", png_declaring(100_000, 100_000), too_big),
        ("png declaring 65535x1 RGBA16", png_declaring(65535, 1, depth=16, color=6), too_big),
        ("png declaring 0x0", png_declaring(0, 0), bad),
        ("png declaring 28x28 without data", png_declaring(28, 28), bad),
        ("png declaring 28x28, 10 MB of zeros inflated",
         png_declaring(28, 28, idat=bytes(10 << 20)), (good, good)),
        ("png bad depth 3", png_declaring(28, 28, depth=3), bad),
        ("png bad colour type 7", png_declaring(28, 28, color=7), bad),
        ("jpeg declaring 65500x65500", jpeg_declaring(65500, 65500), too_big),
        ("jpeg declaring 0x0", jpeg_declaring(0, 0), bad),
        ("jpeg declaring 28x65535", jpeg_declaring(28, 65535), too_big),
        ("bmp declaring 2^31-1 square", bmp_declaring(2**31 - 1, 2**31 - 1), (
            one(EXHAUSTED, INVALID), one(EXHAUSTED, INVALID))),
        ("bmp declaring -28 rows", bmp_declaring(28, -28), (good, good)),  # top-down BMP
        ("webp declaring 16777216 square", webp_declaring(1 << 24, 1 << 24), (
            one(EXHAUSTED, INVALID), one(EXHAUSTED, INVALID))),
        # Not in the documented formats (PNG, JPEG, PGM/PPM, BMP, WebP).
        ("gif 28x28", _save(grey, "GIF"), bad),
        ("tiff 28x28", _save(grey, "TIFF"), bad),
        ("tga 28x28", _save(grey, "TGA"), bad),
        ("ico 28x28", _save(grey, "ICO"), bad),
        ("eps header", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\n", bad),
        ("empty", b"", bad),
        ("text", b"this is not an image", bad),
        ("png signature only", b"\x89PNG\r\n\x1a\n", bad),
        ("jpeg SOI only", b"\xff\xd8\xff", bad),
        ("latent code bytes", bytes.fromhex("a101b618c18f1d00"), bad),
    ]
    full = _save(grey, "PNG")
    cases.append(("png cut in half", full[:len(full) // 2], bad))
    broken_crc = bytearray(full)
    broken_crc[29] ^= 0xFF  # inside IHDR's CRC
    cases.append(("png with a bad IHDR CRC", bytes(broken_crc), bad))
    jpg = _save(grey, "JPEG")
    cases.append(("jpeg cut in half", jpg[:len(jpg) // 2], bad))
    return tuple(ImageCase(label, data, *codes) for label, data, codes in cases)
