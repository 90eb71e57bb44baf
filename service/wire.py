"""Conversions between the API's messages and numpy arrays, shared by server and client.

Images are uint8 (C, H, W) arrays; on the wire they are ``Image`` messages holding
either image-file bytes (PNG/JPEG/...) or ``RawImage`` planar pixels.
"""

from __future__ import annotations

import io
import math
import numbers
from typing import Any

import numpy as np

from latentserve.errors import InvalidInput, ResourceLimit
from latentserve.v1 import inference_pb2 as pb
from latentserve.worker.runtime.images import (
    DEFAULT_MAX_PIXELS,
    convert_channels,
    decode_image,
    describe_shape,
    encode_png,
)
from latentserve.worker.runtime.manifest import Manifest

FORMATS = {"png": pb.IMAGE_FORMAT_PNG, "raw": pb.IMAGE_FORMAT_RAW}


def raw_image(image: np.ndarray) -> pb.Image:
    """uint8 (C, H, W) -> an Image with raw planar pixels."""
    if image.dtype != np.uint8 or image.ndim != 3:
        raise InvalidInput(f"images must be uint8 (C, H, W), got {image.dtype} {image.shape}")
    c, h, w = image.shape
    return pb.Image(raw=pb.RawImage(data=np.ascontiguousarray(image).tobytes(),
                                    channels=c, height=h, width=w))


def encode_image(image: np.ndarray, fmt: int) -> pb.Image:
    """uint8 (C, H, W) -> an Image in the requested ImageFormat (PNG unless RAW)."""
    if fmt == pb.IMAGE_FORMAT_RAW:
        return raw_image(image)
    if fmt not in (pb.IMAGE_FORMAT_UNSPECIFIED, pb.IMAGE_FORMAT_PNG):
        raise InvalidInput(f"image format {fmt} is not one of PNG (1) or RAW (2)")
    return pb.Image(encoded=encode_png(image))


def decode_raw(raw: pb.RawImage, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               name: str = "image") -> np.ndarray:
    """A RawImage -> uint8 (C, H, W), checking that the bytes match the stated shape."""
    c, h, w = raw.channels, raw.height, raw.width
    if h * w > max_pixels:
        raise ResourceLimit(f"{name} is {w}x{h} = {w * h} pixels; the limit is {max_pixels}",
                            limit="max_pixels_per_image")
    if c not in (1, 3) or h < 1 or w < 1:
        raise InvalidInput(f"{name}: raw shape (channels={c}, height={h}, width={w}) is not "
                           "an image; channels must be 1 or 3, height and width >= 1")
    if len(raw.data) != c * h * w:
        raise InvalidInput(f"{name}: raw data holds {len(raw.data)} bytes; channels x height x "
                           f"width = {c}x{h}x{w} needs {c * h * w}")
    return np.frombuffer(raw.data, np.uint8).reshape(c, h, w)


def takes(shape: tuple[int, int, int]) -> str:
    """What a model takes, C x H x W: ``1x28x28``, or ``3xHxW (RGB, any size)``."""
    if shape[1] == 0:
        return f"{shape[0]}xHxW ({describe_shape(shape)})"
    return f"{shape[0]}x{shape[1]}x{shape[2]}"


def decode_request_image(msg: pb.Image, shape: tuple[int, int, int], *, resize: bool,
                         max_pixels: int, name: str) -> np.ndarray:
    """A request's Image -> uint8 (C, H, W) of exactly the model's ``shape`` ((C, 0, 0):
    any size). The rule for channels, the same for encoded and raw images and on every
    path: another channel count is refused (INVALID_ARGUMENT naming both) unless
    ``resize``, which converts (grey -> RGB repeats the plane, RGB -> grey is Pillow's
    luma); ``resize`` changes the size of encoded images for fixed-size models only."""
    which = msg.WhichOneof("pixels")
    if which == "encoded":
        return decode_image(msg.encoded, shape, resize=resize, max_pixels=max_pixels, name=name)
    if which != "raw":
        raise InvalidInput(f"{name} is empty: set Image.encoded (file bytes) or Image.raw")
    image = decode_raw(msg.raw, max_pixels=max_pixels, name=name)
    if resize and image.shape[0] != shape[0]:
        image = convert_channels(image, shape[0])
    if image.shape[0] != shape[0] or (shape[1] and image.shape != shape):
        hint = (" (resize converts channels; it resizes encoded images only)" if resize
                else " (pass --resize / resize=true to convert the channels)"
                if image.shape[0] != shape[0] else "")
        raise InvalidInput(f"{name} is raw {image.shape[0]}x{image.shape[1]}x"
                           f"{image.shape[2]} (C x H x W); the model takes {takes(shape)}{hint}")
    return image


def raw_batch(images: np.ndarray) -> pb.RawBatch:
    """uint8 (N, C, H, W) -> one RawBatch."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise InvalidInput(f"a batch must be uint8 (N, C, H, W), got {images.dtype} {images.shape}")
    n, c, h, w = images.shape
    return pb.RawBatch(data=np.ascontiguousarray(images).tobytes(), count=n, channels=c,
                       height=h, width=w)


def decode_batch(batch: pb.RawBatch, shape: tuple[int, int, int], *, max_pixels: int,
                 name: str = "batch", resize: bool = False) -> np.ndarray:
    """A request's RawBatch -> uint8 (N, C, H, W), which must match the model's ``shape``
    (any H, W for an any-size model's (C, 0, 0)); ``resize`` converts the channels."""
    n, got = batch.count, (batch.channels, batch.height, batch.width)
    if resize and got[0] != shape[0] and got[0] in (1, 3) and min(got[1:]) >= 1:
        plain = decode_batch(batch, (got[0], shape[1], shape[2]), max_pixels=max_pixels,
                             name=name)
        return np.stack([convert_channels(im, shape[0]) for im in plain]) if n else \
            np.zeros((0, shape[0], *got[1:]), np.uint8)
    if got[1] * got[2] > max_pixels:
        raise ResourceLimit(f"{name} images are {got[2]}x{got[1]} = {got[1] * got[2]} pixels; "
                            f"the limit is {max_pixels}", limit="max_pixels_per_image")
    if got[0] != shape[0] or (shape[1] and got != shape) or min(got[1:]) < 1:
        hint = (" (pass --resize / resize=true to convert the channels)"
                if got[0] != shape[0] and got[0] in (1, 3) else "")
        raise InvalidInput(f"{name} holds {got[0]}x{got[1]}x{got[2]} (C x H x W) images; the "
                           f"model takes {takes(shape)}{hint}")
    size = n * got[0] * got[1] * got[2]
    if len(batch.data) != size:
        raise InvalidInput(f"{name}: data holds {len(batch.data)} bytes; count x channels x "
                           f"height x width = {n}x{got[0]}x{got[1]}x{got[2]} needs {size}")
    return np.frombuffer(batch.data, np.uint8).reshape(n, *got)


def decode_reply_image(msg: pb.Image) -> np.ndarray:
    """A reply's Image (PNG or raw) -> uint8 (C, H, W)."""
    if msg.WhichOneof("pixels") == "raw":
        return decode_raw(msg.raw, max_pixels=1 << 62).copy()
    from PIL import Image

    with Image.open(io.BytesIO(msg.encoded)) as img:
        arr = np.asarray(img.convert("RGB" if img.mode not in ("L", "1", "I;16") else "L"))
    return arr[None].copy() if arr.ndim == 2 else arr.transpose(2, 0, 1).copy()


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def model_info(manifest: Manifest, *, newest: bool, provider: str | None) -> pb.ModelInfo:
    """The ModelInfo of one model version; ``provider`` None when not loaded."""
    c, h, w = manifest.image_shape
    quality = {k: v for k, v in ((k, _number(v)) for k, v in manifest.quality.items())
               if v is not None}
    return pb.ModelInfo(
        name=manifest.name, version=manifest.version, ref=manifest.ref, family=manifest.family,
        channels=c, height=h, width=w,
        latent_shape=list(manifest.latent_shape[:1] if manifest.any_size
                          else manifest.latent_shape),
        code_kind=manifest.code_kind, quality=quality, manifest_sha256=manifest.digest,
        newest=newest, loaded=provider is not None, provider=provider or "",
        operations=list(manifest.operations), any_size=manifest.any_size,
        stride=manifest.stride)
