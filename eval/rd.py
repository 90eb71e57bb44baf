"""Rate-distortion measurement: every model and every classic codec on the same images.

A point is one model (one rung of a ladder) or one codec setting, measured per image:
bytes all included (our whole latent code, header and all; a classic codec's whole
file), PSNR and SSIM of the reconstruction against the original (and MS-SSIM when every
image is large enough for its five scales: photos, not digits), and the wall time to
encode and to decode the whole set, from which images/s follow.

Models go through ``worker.pipeline.Pipeline`` (``compress`` / ``reconstruct``), exactly
what the service and the job workers run, in one batched call each, after a warm-up
call so that session start-up is not counted. Codecs code one image per call, as a
user storing one file per image would.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from latentserve.errors import InvalidInput
from latentserve.eval.classic_codecs import CodecSetting
from latentserve.eval.metrics import ms_ssim, ms_ssim_defined, psnr, ssim

WARMUP_IMAGES = 8


@dataclass
class RDPoint:
    """One measured setting; arrays hold one value per image."""

    kind: str            # "model" | "codec"
    family: str          # ae | vae | vqvae | jpeg | webp | png | webp-lossless
    label: str           # model ref (name:version) or codec label ("webp q10")
    lossless: bool
    quality: int | None  # codec quality; None for models and lossless references
    nbytes: np.ndarray
    psnr: np.ndarray
    ssim: np.ndarray
    encode_s: float
    decode_s: float
    pixels: int | np.ndarray  # H x W per image (one int when every image has it)
    msssim: np.ndarray | None = None  # None where MS-SSIM is undefined (images too small)

    @property
    def count(self) -> int:
        return len(self.nbytes)

    @property
    def bytes_per_image(self) -> float:
        return float(self.nbytes.mean())

    @property
    def bpp(self) -> float:
        """Mean of the per-image bits per pixel (bytes x 8 / (H x W))."""
        return float(np.mean(self.nbytes * 8.0 / np.asarray(self.pixels, np.float64)))

    @property
    def mean_psnr(self) -> float:
        return float(self.psnr.mean())

    @property
    def mean_ssim(self) -> float:
        return float(self.ssim.mean())

    @property
    def mean_msssim(self) -> float | None:
        return None if self.msssim is None else float(self.msssim.mean())

    @property
    def encode_ips(self) -> float:
        return self.count / max(self.encode_s, 1e-9)

    @property
    def decode_ips(self) -> float:
        return self.count / max(self.decode_s, 1e-9)

    def summary(self) -> dict[str, Any]:
        """The averaged figures (what the table and the plot show)."""
        return {"kind": self.kind, "family": self.family, "label": self.label,
                "lossless": self.lossless, "quality": self.quality, "images": self.count,
                "bytes_per_image": self.bytes_per_image, "bits_per_pixel": self.bpp,
                "psnr_db": self.mean_psnr, "ssim": self.mean_ssim, "ms_ssim": self.mean_msssim,
                "encode_images_per_s": self.encode_ips, "decode_images_per_s": self.decode_ips}

    def to_json(self) -> dict[str, Any]:
        """Summary plus the per-image values."""
        return self.summary() | {"per_image": {
            "bytes": self.nbytes.astype(int).tolist(),
            "psnr_db": np.round(self.psnr, 4).tolist(),
            "ssim": np.round(self.ssim, 5).tolist(),
            "ms_ssim": None if self.msssim is None else np.round(self.msssim, 5).tolist()}}


    @classmethod
    def from_json(cls, d: dict[str, Any], pixels: int | np.ndarray) -> RDPoint:
        """A point back from ``to_json`` (an earlier run on the same images: ``pixels``)."""
        per = d["per_image"]
        count = len(per["bytes"])
        return cls(kind=d["kind"], family=d["family"], label=d["label"],
                   lossless=d["lossless"], quality=d["quality"],
                   nbytes=np.array(per["bytes"], np.int64),
                   psnr=np.array(per["psnr_db"], np.float64),
                   ssim=np.array(per["ssim"], np.float64),
                   encode_s=count / d["encode_images_per_s"],
                   decode_s=count / d["decode_images_per_s"], pixels=pixels,
                   msssim=None if per.get("ms_ssim") is None
                   else np.array(per["ms_ssim"], np.float64))


def images_digest(images: Images) -> str:
    """sha256 over every image's shape and pixels: which set a measurement was made on."""
    h = hashlib.sha256()
    for im in images:
        h.update(repr(tuple(im.shape)).encode())
        h.update(np.ascontiguousarray(im).tobytes())
    return h.hexdigest()


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


Images = np.ndarray | Sequence[np.ndarray]  # (N, C, H, W), or (C, H, W) of any sizes


def pixel_counts(images: Images) -> int | np.ndarray:
    """H x W of every image: one int when the set is one array."""
    if isinstance(images, np.ndarray):
        return int(images.shape[2] * images.shape[3])
    return np.array([im.shape[1] * im.shape[2] for im in images], np.int64)


def per_image(metric: Callable[[np.ndarray, np.ndarray], np.ndarray], images: Images,
              recon: Images) -> np.ndarray:
    """A batch metric on one array, or image by image on a list of any sizes."""
    if isinstance(images, np.ndarray) and isinstance(recon, np.ndarray):
        return metric(images, recon)
    return np.concatenate([metric(a[None], np.asarray(b)[None])
                           for a, b in zip(images, recon, strict=True)])


def unfit_reason(manifest: Any, images: Images) -> str | None:
    """Why a model cannot code ``images`` (its size or channels), or None if it can."""
    if manifest.any_size:
        if any(im.shape[0] != manifest.channels for im in images):
            return (f"model {manifest.ref} takes {manifest.describe_size()} images; "
                    "the evaluation set has other channel counts")
        return None
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) != 1:
        return (f"model {manifest.ref} takes {manifest.describe_size()} images; "
                "the evaluation set mixes sizes")
    if shapes != {tuple(manifest.image_shape)}:
        return (f"model {manifest.ref} takes images of shape {tuple(manifest.image_shape)}; "
                f"the evaluation set is {shapes.pop()}")
    return None


def msssim_if_defined(images: Images, recon: Images) -> np.ndarray | None:
    """Per-image MS-SSIM when every image is large enough for it, else None."""
    if not all(ms_ssim_defined(*im.shape[-2:]) for im in images):
        return None
    return per_image(ms_ssim, images, recon)


def measure_model(pipeline: Any, ref: str, images: Images) -> RDPoint:
    """Compress and reconstruct ``images`` with one model through the pipeline.

    An any-size model (a photo codec) takes a list of images of their own sizes and is
    reported as family ``photo``; a fixed-size model needs one array of its shape."""
    runtime = pipeline.runtime(ref)  # loads and verifies the model before timing starts
    manifest = runtime.manifest
    reason = unfit_reason(manifest, images)
    if reason is not None:
        raise InvalidInput(reason)
    if manifest.any_size:
        items = list(images)
        pipeline.reconstruct_each(pipeline.compress(manifest.ref, items[:2]))
        codes, enc_s = _timed(lambda: pipeline.compress(manifest.ref, items))
        recon, dec_s = _timed(lambda: pipeline.reconstruct_each(codes, ref=manifest.ref))
        return RDPoint(kind="model", family="photo", label=manifest.ref, lossless=False,
                       quality=None, nbytes=np.array([len(c) for c in codes]),
                       psnr=per_image(psnr, items, recon), ssim=per_image(ssim, items, recon),
                       encode_s=enc_s, decode_s=dec_s, pixels=pixel_counts(items),
                       msssim=msssim_if_defined(items, recon))
    if not isinstance(images, np.ndarray):
        images = np.stack(images)
    warm = images[:WARMUP_IMAGES]
    pipeline.reconstruct(pipeline.compress(manifest.ref, warm), ref=manifest.ref)
    codes, enc_s = _timed(lambda: pipeline.compress(manifest.ref, images))
    recon, dec_s = _timed(lambda: pipeline.reconstruct(codes, ref=manifest.ref))
    recon = np.asarray(recon)
    if recon.shape != images.shape:
        raise InvalidInput(f"model {manifest.ref} reconstructed shape {recon.shape} "
                           f"for images {images.shape}")
    return RDPoint(kind="model", family=manifest.family, label=manifest.ref, lossless=False,
                   quality=None, nbytes=np.array([len(c) for c in codes]),
                   psnr=psnr(images, recon), ssim=ssim(images, recon),
                   encode_s=enc_s, decode_s=dec_s, pixels=images.shape[2] * images.shape[3],
                   msssim=msssim_if_defined(images, recon))


def measure_codec(setting: CodecSetting, images: Images) -> RDPoint:
    """Code each image as its own file with one codec setting."""
    channels = images[0].shape[0]
    files, enc_s = _timed(lambda: [setting.encode(im) for im in images])
    decoded, dec_s = _timed(lambda: [setting.decode(f, channels) for f in files])
    recon: Images = np.stack(decoded) if isinstance(images, np.ndarray) else decoded
    if setting.lossless and not all(np.array_equal(a, b)
                                    for a, b in zip(images, recon, strict=True)):
        raise AssertionError(f"{setting.label} is meant to be lossless but changed pixels")
    return RDPoint(kind="codec", family=setting.family, label=setting.label,
                   lossless=setting.lossless, quality=setting.quality,
                   nbytes=np.array([len(f) for f in files]),
                   psnr=per_image(psnr, images, recon), ssim=per_image(ssim, images, recon),
                   encode_s=enc_s, decode_s=dec_s, pixels=pixel_counts(images),
                   msssim=msssim_if_defined(images, recon))


def run_rd(images: Images, *, pipeline: Any | None, refs: Sequence[str],
           codecs: Sequence[CodecSetting],
           progress: Callable[[str], None] | None = None,
           reused: Sequence[RDPoint] = ()) -> list[RDPoint]:
    """Measure every model ref, then every codec setting, on the same uint8 images (one
    (N, C, H, W) array, or a list of (C, H, W) photos of their own sizes). A codec
    setting with a point in ``reused`` (an earlier run on these images) takes that point
    instead of being measured again."""
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.dtype != np.uint8 or len(images) == 0:
            raise InvalidInput(f"evaluation images must be a non-empty uint8 (N, C, H, W) "
                               f"batch, got {images.dtype} {images.shape}")
    elif not images or any(im.dtype != np.uint8 or im.ndim != 3 for im in images):
        raise InvalidInput("evaluation images must be a non-empty list of uint8 (C, H, W)")
    points = []
    for ref in refs:
        if pipeline is None:
            raise InvalidInput("models were asked for but no model repository was given")
        points.append(measure_model(pipeline, ref, images))
        if progress:
            progress(f"{points[-1].label}: {points[-1].bytes_per_image:.1f} B, "
                     f"{points[-1].mean_psnr:.2f} dB")
    earlier = {p.label: p for p in reused if p.kind == "codec"}
    for setting in codecs:
        if setting.label in earlier:
            points.append(earlier[setting.label])
            continue
        points.append(measure_codec(setting, images))
        if progress:
            progress(f"{setting.label}: {points[-1].bytes_per_image:.1f} B, "
                     f"{points[-1].mean_psnr:.2f} dB")
    return points


def curves(points: Sequence[RDPoint]) -> dict[tuple[str, str], list[RDPoint]]:
    """Lossy points grouped by (kind, family), each group sorted by bytes per image."""
    out: dict[tuple[str, str], list[RDPoint]] = {}
    for p in points:
        if not p.lossless:
            out.setdefault((p.kind, p.family), []).append(p)
    return {k: sorted(v, key=lambda p: p.bytes_per_image) for k, v in out.items()}
