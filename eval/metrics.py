"""Distortion metrics on uint8 image batches: PSNR and SSIM, one value per image.

PSNR is ``latentserve.worker.runtime.quality.psnr`` (the project's one definition: 0-255
values, MSE floored at 1e-10, so a lossless image scores a finite 148.1 dB; a set is
summarised by the mean of its per-image PSNRs, as in ``../shared/RD-NOTES.md``).

Why SSIM and not MS-SSIM: MS-SSIM (Wang, Simoncelli, Bovik 2003) halves the image four
times and applies an 11 x 11 Gaussian window at each of its five scales; a 28 x 28 image
is 7 x 7 at the third scale and 2 x 2 at the fifth, smaller than the window (maintained
implementations refuse it: pytorch-msssim asserts a side > 160 px). A 3-scale variant with
shrunken windows would be a metric of our own making that nobody else reports. So we use
single-scale SSIM with the standard parameters of Wang et al. 2004 (Gaussian window
sigma 1.5, i.e. 11 x 11, K1 = 0.01, K2 = 0.03, population covariance, data range 255),
computed by scikit-image's maintained ``structural_similarity``; at 28 x 28 the window
fits with 18 x 18 valid positions, and these are the settings papers mean by "SSIM".
"""

from __future__ import annotations

import numpy as np

from latentserve.errors import InvalidInput
from latentserve.worker.runtime.quality import PEAK, check_pair, mse, psnr

__all__ = ["mse", "psnr", "ssim"]

# Wang et al. 2004: Gaussian window, sigma 1.5 (scikit-image truncates at 3.5 sigma -> 11 x 11).
SSIM_SIGMA = 1.5


def ssim(reference: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Per-image SSIM (N,) with Wang et al.'s standard parameters (see the module doc)."""
    from skimage.metrics import structural_similarity

    reference, test = check_pair(reference, test)
    _, channels, height, width = reference.shape
    if min(height, width) < 11:
        raise InvalidInput(f"SSIM's 11 x 11 window needs images of at least 11 x 11 pixels, "
                           f"got {height} x {width}")
    out = np.empty(len(reference), np.float64)
    for i, (a, b) in enumerate(zip(reference, test, strict=True)):
        out[i] = structural_similarity(
            a[0] if channels == 1 else a, b[0] if channels == 1 else b,
            data_range=PEAK, gaussian_weights=True, sigma=SSIM_SIGMA,
            use_sample_covariance=False, channel_axis=None if channels == 1 else 0)
    return out
