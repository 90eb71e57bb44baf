"""PSNR of uint8 image batches: the one definition every part of latentserve reports.

PSNR is computed per image on 0-255 values with the MSE floored at 1e-10 (so a lossless
image scores a finite 148.1 dB instead of infinity), and a set of images is summarised
by the mean of its per-image PSNRs, as in ``../shared/RD-NOTES.md``. Export (the
manifest's ``val_psnr_db``), ``models check``, the demo, eval and the benchmarks all use
it, so their figures agree. SSIM lives in ``eval.metrics`` (it needs scikit-image).
"""

from __future__ import annotations

import numpy as np

from latentserve.errors import InvalidInput

MSE_FLOOR = 1e-10
PEAK = 255.0


def check_pair(reference: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both uint8 (N, C, H, W) batches of one shape, else InvalidInput."""
    if reference.shape != test.shape:
        raise InvalidInput(f"metric needs equal shapes, got {reference.shape} and {test.shape}")
    if reference.ndim != 4:
        raise InvalidInput(f"metric takes image batches (N, C, H, W), got shape {reference.shape}")
    for name, a in (("reference", reference), ("test", test)):
        if a.dtype != np.uint8:
            raise InvalidInput(f"metric takes uint8 images; {name} is {a.dtype}")
    return reference, test


def mse(reference: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Per-image mean squared error on 0-255 values, shape (N,)."""
    reference, test = check_pair(reference, test)
    diff = reference.astype(np.float64) - test.astype(np.float64)
    out: np.ndarray = (diff * diff).reshape(len(diff), -1).mean(axis=1)
    return out


def psnr(reference: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB (N,), MSE floored at 1e-10."""
    out: np.ndarray = 10.0 * np.log10(PEAK * PEAK / np.maximum(mse(reference, test), MSE_FLOOR))
    return out


def mean_psnr(reference: np.ndarray, test: np.ndarray) -> float:
    """The mean of the per-image PSNRs in dB: how a set of images is summarised."""
    return float(psnr(reference, test).mean())
