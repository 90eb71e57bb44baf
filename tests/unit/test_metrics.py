"""PSNR and SSIM against reference computations on fixed arrays."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio

from latentserve.errors import InvalidInput
from latentserve.eval.metrics import psnr, ssim


def _pair(seed: int = 0, n: int = 4, shape: tuple[int, int, int] = (1, 28, 28)):
    rng = np.random.default_rng(seed)
    ref = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    noise = rng.normal(0, 12, ref.shape)
    test = np.clip(ref + noise, 0, 255).astype(np.uint8)
    return ref, test


def _ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. 2004 written out: 11 x 11 Gaussian (sigma 1.5), valid positions only."""
    r = np.arange(-5, 6, dtype=np.float64)
    g = np.exp(-(r ** 2) / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    h, wd = a.shape
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for y in range(h - 10):
        for x in range(wd - 10):
            pa, pb = a[y:y + 11, x:x + 11], b[y:y + 11, x:x + 11]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va = (w * pa * pa).sum() - ma * ma
            vb = (w * pb * pb).sum() - mb * mb
            cov = (w * pa * pb).sum() - ma * mb
            vals.append(((2 * ma * mb + c1) * (2 * cov + c2))
                        / ((ma * ma + mb * mb + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_psnr_matches_skimage_per_image() -> None:
    ref, test = _pair()
    got = psnr(ref, test)
    want = [peak_signal_noise_ratio(r, t, data_range=255) for r, t in zip(ref, test, strict=True)]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_psnr_known_values_and_floor() -> None:
    zeros = np.zeros((2, 1, 28, 28), np.uint8)
    ones = zeros.copy()
    ones[0] = 1                      # MSE 1 -> 20 log10(255) = 48.13 dB
    got = psnr(zeros, ones)
    assert got[0] == pytest.approx(20 * np.log10(255.0), abs=1e-12)
    # identical image: MSE floored at 1e-10, a finite 148.13 dB rather than infinity
    assert got[1] == pytest.approx(10 * np.log10(255.0 ** 2 / 1e-10), abs=1e-9)


def test_ssim_matches_written_out_reference() -> None:
    ref, test = _pair(seed=1, n=3)
    got = ssim(ref, test)
    want = [_ssim_reference(r[0], t[0]) for r, t in zip(ref, test, strict=True)]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    assert np.all(got < 0.99)


def test_ssim_of_identical_images_is_one_and_rgb_works() -> None:
    ref, _ = _pair(seed=2, n=2, shape=(3, 16, 20))
    np.testing.assert_allclose(ssim(ref, ref), 1.0)


@pytest.mark.parametrize("bad", [
    lambda a: a[:, :, :27],                    # shape mismatch
    lambda a: a.astype(np.float32),            # not uint8
    lambda a: a[0],                            # not a batch
])
def test_metrics_refuse_bad_input(bad) -> None:  # type: ignore[no-untyped-def]
    ref, test = _pair()
    with pytest.raises(InvalidInput):
        psnr(ref, bad(test))


def test_ssim_refuses_images_smaller_than_its_window() -> None:
    small = np.zeros((1, 1, 8, 8), np.uint8)
    with pytest.raises(InvalidInput, match="11 x 11"):
        ssim(small, small)
