"""The family contracts, checked on running graphs (torch modules or onnxruntime sessions).

Every check takes a callable, so the same rules apply to a user's torch module before
export, to the ONNX graph after it, and to a graph imported from elsewhere. Each
violation raises InvalidInput naming the tensor and what was expected:

- encoder ``image`` uint8 (N, C, H, W) -> ``latent`` float32 (N, C', h, w) (ae / vae) or
  ``indices`` integer (N, h, w) (vqvae); row i depends on image i alone (not on the
  batch size or the other images: a batch-norm layer left in training mode breaks it).
- decoder ``latent`` / ``indices`` -> ``image`` float (N, C, H, W), the encoder's image shape.
- prior ``indices`` (N, h, w) -> ``logits`` float (N, K, h, w), K the codebook size, and
  causal in raster order: the logits at p do not change when positions >= p do.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from latentserve.errors import InvalidInput

Run = Callable[[np.ndarray], np.ndarray]
# Batched float kernels may reorder sums: allow this much (relative to the output's scale).
BATCH_TOLERANCE = 1e-4


def call(run: Run, x: np.ndarray, *, what: str, given: str) -> np.ndarray:
    """``run(x)`` with any failure turned into InvalidInput naming ``what`` and its input."""
    try:
        out = run(x)
    except InvalidInput:
        raise
    except Exception as exc:  # noqa: BLE001 - user graphs raise anything
        text = str(exc).strip().splitlines()
        raise InvalidInput(f"{what} fails on {given} {x.dtype} {tuple(x.shape)}: "
                           f"{text[0] if text else type(exc).__name__}") from None
    return np.asarray(out)


def _close(a: np.ndarray, b: np.ndarray) -> float:
    """Max |a - b| relative to the scale of a (0 for equal integer tensors)."""
    if a.dtype.kind in "iu":
        return 0.0 if np.array_equal(a, b) else float("inf")
    scale = max(1.0, float(np.abs(a).max(initial=0.0)))
    return float(np.abs(a.astype(np.float64) - b).max(initial=0.0)) / scale


def check_batch_invariant(run: Run, x: np.ndarray, out: np.ndarray, *, what: str,
                          tensor: str) -> None:
    """Row i of ``run(x)`` must not depend on the batch: alone, and in reversed order."""
    alone = call(run, x[:1], what=what, given="one input of")
    if alone.shape[1:] != out.shape[1:] or len(alone) != 1:
        raise InvalidInput(f"{what} output {tensor!r} has shape {tuple(alone.shape)} for a "
                           f"batch of 1 but {tuple(out.shape)} for a batch of {len(x)}: the "
                           "batch axis 0 must be dynamic and the other axes fixed")
    diff = _close(out[:1], alone)
    if diff > BATCH_TOLERANCE:
        raise InvalidInput(
            f"{what} output {tensor!r} depends on the batch composition: image 0 alone "
            f"gives another result than in a batch of {len(x)} (relative difference "
            f"{diff:.3g}); each row must depend on its own input only (put batch norm in "
            "eval mode, drop statistics taken over the batch)")
    if len(x) > 1:
        rev = call(run, x[::-1].copy(), what=what, given="reversed")
        diff = _close(out, rev[::-1])
        if diff > BATCH_TOLERANCE:
            raise InvalidInput(
                f"{what} output {tensor!r} depends on the batch composition: the same "
                f"{len(x)} inputs in reversed order give other rows (relative difference "
                f"{diff:.3g})")


def check_encoder(run: Run, images: np.ndarray, family: str, *,
                  what: str = "encoder") -> np.ndarray:
    """Run the encoder contract on uint8 ``images``; returns the encoder's output."""
    tensor = "indices" if family == "vqvae" else "latent"
    out = call(run, images, what=what, given="images")
    if family == "vqvae":
        if out.dtype.kind not in "iu" or out.ndim != 3:
            raise InvalidInput(
                f"{what} output {tensor!r} is {out.dtype} {tuple(out.shape)}; a vqvae encoder "
                f"must give integer codebook indices (N, h, w) (look the nearest code up "
                "inside the encoder)")
        if out.min(initial=0) < 0:
            raise InvalidInput(f"{what} output 'indices' holds negative values "
                               f"(min {int(out.min())}); indices must be in 0..K-1")
    else:
        if out.dtype.kind != "f" or out.ndim != 4:
            raise InvalidInput(
                f"{what} output {tensor!r} is {out.dtype} {tuple(out.shape)}; an {family} "
                "encoder must give a float latent (N, C, h, w) (or (N, D) through the "
                "torch API, which makes it (N, D, 1, 1))")
        if not np.all(np.isfinite(out)):
            raise InvalidInput(f"{what} output 'latent' holds NaN or infinite values")
    if len(out) != len(images):
        raise InvalidInput(f"{what} output {tensor!r} has {len(out)} rows for {len(images)} "
                           "images: axis 0 must be the batch")
    check_batch_invariant(run, images, out, what=what, tensor=tensor)
    return out


def check_decoder(run: Run, feed: np.ndarray, image_shape: tuple[int, int, int], *,
                  what: str = "decoder") -> np.ndarray:
    """Run the decoder contract on encoder symbols ``feed``; returns its float images."""
    out = call(run, feed, what=what, given="the encoder's output")
    want = (len(feed), *image_shape)
    if out.dtype.kind != "f" or tuple(out.shape) != want:
        raise InvalidInput(f"{what} output 'image' is {out.dtype} {tuple(out.shape)}; expected "
                           f"float images {want} (N x the encoder's input shape)")
    if not np.all(np.isfinite(out)):
        raise InvalidInput(f"{what} output 'image' holds NaN or infinite values")
    check_batch_invariant(run, feed, out, what=what, tensor="image")
    return out


def check_prior(run: Run, indices: np.ndarray, num_codes: int, *, what: str = "prior",
                seed: int = 0) -> np.ndarray:
    """Run the prior contract (shape, K, causality) on index grids; returns its logits."""
    indices = indices.astype(np.int64)
    n, h, w = indices.shape
    out = call(run, indices, what=what, given="indices")
    want = (n, num_codes, h, w)
    if out.dtype.kind != "f" or tuple(out.shape) != want:
        raise InvalidInput(f"{what} output 'logits' is {out.dtype} {tuple(out.shape)}; expected "
                           f"float logits {want} (N, K = {num_codes} codes, h, w)")
    check_batch_invariant(run, indices, out, what=what, tensor="logits")
    rng = np.random.default_rng(seed)
    cells = h * w
    for p in sorted({0, cells // 2, cells - 1}):
        other = indices.reshape(n, -1).copy()
        other[:, p:] = rng.integers(0, num_codes, size=other[:, p:].shape)
        got = call(run, other.reshape(n, h, w), what=what, given="indices")
        a = out.reshape(n, num_codes, -1)[:, :, :p + 1]
        b = got.reshape(n, num_codes, -1)[:, :, :p + 1]
        diff = _close(a, b)
        if diff > BATCH_TOLERANCE:
            bad = int(np.argmax(np.abs(a - b).max(axis=(0, 1))))
            raise InvalidInput(
                f"{what} output 'logits' is not causal in raster order: the logits at "
                f"position {bad} (row {bad // w}, column {bad % w}) change when the indices "
                f"at positions >= {p} do (relative difference {diff:.3g}); the logits at p "
                "may depend on earlier positions only")
    return out


def check_hyper_encoder(run: Run, latent: np.ndarray, *,
                        what: str = "hyper_encoder") -> np.ndarray:
    """Run the hyper-encoder contract on rounded latents (N, C, h, w): a float
    ``hyper_latent`` (N, Cz, hz, wz), finite, batch invariant; returns it."""
    out = call(run, latent.astype(np.float32), what=what, given="the rounded latent")
    if out.dtype.kind != "f" or out.ndim != 4 or len(out) != len(latent):
        raise InvalidInput(f"{what} output 'hyper_latent' is {out.dtype} {tuple(out.shape)}; "
                           f"expected a float (N = {len(latent)}, Cz, hz, wz)")
    if not np.all(np.isfinite(out)):
        raise InvalidInput(f"{what} output 'hyper_latent' holds NaN or infinite values")
    check_batch_invariant(run, latent.astype(np.float32), out, what=what, tensor="hyper_latent")
    return out


def check_hyper_decoder(run: Run, z: np.ndarray, latent_shape: tuple[int, ...], *,
                        what: str = "hyper_decoder") -> np.ndarray:
    """Run the hyper-decoder contract on rounded hyper-latents: ``scales`` float, the
    latent's shape, finite and > 0, batch invariant; returns them."""
    out = call(run, z.astype(np.float32), what=what, given="the rounded hyper_latent")
    want = (len(z), *latent_shape)
    if out.dtype.kind != "f" or tuple(out.shape) != want:
        raise InvalidInput(f"{what} output 'scales' is {out.dtype} {tuple(out.shape)}; expected "
                           f"float scales {want} (one per latent element)")
    if not np.all(np.isfinite(out)) or out.min(initial=1.0) <= 0:
        raise InvalidInput(f"{what} output 'scales' must be finite and > 0 (end the network "
                           f"with softplus or exp); got min {float(np.nanmin(out)):.3g}")
    check_batch_invariant(run, z.astype(np.float32), out, what=what, tensor="scales")
    return out
