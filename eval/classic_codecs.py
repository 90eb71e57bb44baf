"""Classic image codecs to compare against, through Pillow: JPEG, WebP, AVIF, PNG.

Each image is coded as a file of its own and its size is the whole file, headers
included, since that is what a user storing one image per object pays. Settings:

- JPEG with optimised Huffman tables (``optimize=True``), qualities 5 .. 95;
- WebP lossy at ``method=6`` (the slowest, smallest setting), qualities 0 .. 90;
- AVIF (Pillow's libavif, when it has AVIF: ``PIL.features.check("avif")``), speed 6,
  4:2:0, qualities 10 .. 90;
- lossless references: PNG (``optimize=True``) and WebP lossless (``method=6``).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from latentserve.errors import InvalidInput

JPEG_QUALITIES = (5, 10, 20, 30, 50, 75, 90, 95)
WEBP_QUALITIES = (0, 5, 10, 20, 30, 50, 75, 90)
AVIF_QUALITIES = (10, 20, 30, 40, 50, 60, 75, 90)
AVIF_SPEED = 6  # libavif default; speed 4 is 4% smaller and 7x slower
# The names ``--codecs`` accepts, and the settings each one expands to.
CODEC_NAMES = ("jpeg", "webp", "avif", "png")


@dataclass(frozen=True)
class CodecSetting:
    """One codec at one setting. ``family`` names its RD curve (``webp-lossless`` apart)."""

    family: str            # "jpeg" | "webp" | "png" | "webp-lossless"
    quality: int | None    # None for the lossless references
    lossless: bool

    @property
    def label(self) -> str:
        return self.family if self.quality is None else f"{self.family} q{self.quality}"

    def encode(self, image: np.ndarray) -> bytes:
        """uint8 (C, H, W) -> the whole file's bytes."""
        arr = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
        buf = io.BytesIO()
        pil = Image.fromarray(np.ascontiguousarray(arr))
        if self.family == "jpeg":
            pil.save(buf, format="JPEG", quality=self.quality, optimize=True)
        elif self.family == "webp":
            pil.save(buf, format="WEBP", quality=self.quality, method=6)
        elif self.family == "avif":
            pil.save(buf, format="AVIF", quality=self.quality, speed=AVIF_SPEED,
                     subsampling="4:2:0")
        elif self.family == "webp-lossless":
            pil.save(buf, format="WEBP", lossless=True, quality=100, method=6)
        elif self.family == "png":
            pil.save(buf, format="PNG", optimize=True)
        else:
            raise InvalidInput(f"unknown codec family {self.family!r}")
        return buf.getvalue()

    def decode(self, data: bytes, channels: int) -> np.ndarray:
        """File bytes -> uint8 (C, H, W)."""
        with Image.open(io.BytesIO(data)) as img:
            arr = np.asarray(img.convert("L" if channels == 1 else "RGB"), np.uint8)
        return arr[None] if channels == 1 else arr.transpose(2, 0, 1).copy()


def codec_settings(names: Sequence[str]) -> list[CodecSetting]:
    """Expand ``--codecs`` names into settings: ``webp`` brings its lossless reference too."""
    out: list[CodecSetting] = []
    for name in names:
        name = name.strip().lower()
        if name == "jpeg":
            out += [CodecSetting("jpeg", q, False) for q in JPEG_QUALITIES]
        elif name == "webp":
            out += [CodecSetting("webp", q, False) for q in WEBP_QUALITIES]
            out.append(CodecSetting("webp-lossless", None, True))
        elif name == "avif":
            from PIL import features

            if not features.check("avif"):
                raise InvalidInput("this Pillow cannot write AVIF (PIL.features.check('avif') "
                                   "is False); leave avif out of --codecs")
            out += [CodecSetting("avif", q, False) for q in AVIF_QUALITIES]
        elif name == "png":
            out.append(CodecSetting("png", None, True))
        elif name:
            raise InvalidInput(f"unknown codec {name!r}; choose from {', '.join(CODEC_NAMES)}")
    return out


def parse_codecs(text: str) -> list[str]:
    """``"jpeg,webp"`` -> ``["jpeg", "webp"]``, refusing unknown names; ``""`` -> none."""
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    for n in names:
        if n not in CODEC_NAMES:
            raise InvalidInput(f"unknown codec {n!r} in --codecs {text!r}; "
                               f"choose from {', '.join(CODEC_NAMES)}")
    return names
