"""Distortion metrics on uint8 image batches: PSNR, SSIM and MS-SSIM, one value per image.

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

MS-SSIM where it is defined, i.e. both sides over 160 px (photos: bsds500 is 481 x 321):
pytorch-msssim's ``ms_ssim`` (the implementation CompressAI's published MS-SSIM figures
use) with its standard parameters: five scales weighted 0.0448, 0.2856, 0.3001, 0.2363,
0.1333, 11 x 11 Gaussian window sigma 1.5, K1 = 0.01, K2 = 0.03, data range 255, 2 x 2
average pooling between scales; colour images score the mean of their per-channel values.
Computed one image at a time (photos of a set have their own sizes) in float32, as
CompressAI does, on one torch thread with oneDNN off for the call: its depthwise 1 x 11
convolutions are slower (0.35 s vs 0.2 s wall per 481 x 321 photo on a busy machine;
float64 0.6 s), and an eval scores thousands of photos. float32 moves a value by ~1e-6
against float64 (tests: 1e-5).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from latentserve.errors import InvalidInput
from latentserve.worker.runtime.quality import PEAK, check_pair, mse, psnr

__all__ = ["MS_SSIM_MIN_SIDE", "ms_ssim", "ms_ssim_defined", "mse", "psnr", "ssim"]

# Wang et al. 2004: Gaussian window, sigma 1.5 (scikit-image truncates at 3.5 sigma -> 11 x 11).
SSIM_SIGMA = 1.5
# MS-SSIM halves the image four times and needs the 11 x 11 window at the coarsest
# scale: a side must exceed (11 - 1) * 2^4 (pytorch-msssim asserts the same).
MS_SSIM_MIN_SIDE = 161


def ms_ssim_defined(height: int, width: int) -> bool:
    """Whether MS-SSIM's five scales fit an image of this size."""
    return min(height, width) >= MS_SSIM_MIN_SIDE


@contextmanager
def _torch_for_metrics() -> Iterator[None]:
    """One torch thread and oneDNN off for the block (both restored after). One thread:
    on a busy machine torch's default pool spins (0.7 s of CPU per photo with 2 threads
    against 0.06 s with one). oneDNN's ``flags()`` also resets its TF32 switch and warns
    that there is no Intel GPU, which says nothing here."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="TF32 acceleration", category=UserWarning)
            with torch.backends.mkldnn.flags(enabled=False):
                yield
    finally:
        torch.set_num_threads(threads)


def ms_ssim(reference: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Per-image MS-SSIM (N,) with the standard parameters (see the module doc)."""
    import torch
    from pytorch_msssim import ms_ssim as _ms_ssim

    reference, test = check_pair(reference, test)
    height, width = reference.shape[2:]
    if not ms_ssim_defined(height, width):
        raise InvalidInput(f"MS-SSIM's five scales need images of at least {MS_SSIM_MIN_SIDE} "
                           f"x {MS_SSIM_MIN_SIDE} pixels, got {height} x {width}")
    out = np.empty(len(reference), np.float64)
    with torch.no_grad(), _torch_for_metrics():
        for i, (a, b) in enumerate(zip(reference, test, strict=True)):
            x = torch.from_numpy(a[None].astype(np.float32))
            y = torch.from_numpy(b[None].astype(np.float32))
            out[i] = float(_ms_ssim(x, y, data_range=PEAK, size_average=True))
    return out


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
