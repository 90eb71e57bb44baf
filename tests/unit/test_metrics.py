"""PSNR, SSIM and MS-SSIM against reference computations on fixed arrays."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio

from latentserve.errors import InvalidInput
from latentserve.eval.metrics import ms_ssim, psnr, ssim

ROOT = Path(__file__).resolve().parents[2]
MS_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


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


def _blur_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering with the 1-D window ``g`` along both axes."""
    win = np.lib.stride_tricks.sliding_window_view
    return win(win(x, len(g), axis=0) @ g, len(g), axis=1) @ g


def _pool2(x: np.ndarray) -> np.ndarray:
    """2 x 2 mean, an odd side zero-padded by one on both ends, the padding counted."""
    ph, pw = x.shape[0] % 2, x.shape[1] % 2
    x = np.pad(x, ((ph, ph), (pw, pw)))
    h, w = x.shape[0] // 2 * 2, x.shape[1] // 2 * 2
    x = x[:h, :w]
    return 0.25 * (x[0::2, 0::2] + x[1::2, 0::2] + x[0::2, 1::2] + x[1::2, 1::2])


def _ms_ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Wang, Simoncelli, Bovik 2003 written out for one channel: contrast-structure at
    four scales, full SSIM at the fifth, standard weights, Gaussian sigma 1.5."""
    r = np.arange(-5, 6, dtype=np.float64)
    g = np.exp(-(r ** 2) / (2 * 1.5 ** 2))
    g /= g.sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    a, b = a.astype(np.float64), b.astype(np.float64)
    value = 1.0
    for level, weight in enumerate(MS_WEIGHTS):
        ma, mb = _blur_valid(a, g), _blur_valid(b, g)
        va = _blur_valid(a * a, g) - ma * ma
        vb = _blur_valid(b * b, g) - mb * mb
        cov = _blur_valid(a * b, g) - ma * mb
        cs = (2 * cov + c2) / (va + vb + c2)
        if level < len(MS_WEIGHTS) - 1:
            value *= max(float(cs.mean()), 0.0) ** weight
            a, b = _pool2(a), _pool2(b)
        else:
            lum = (2 * ma * mb + c1) / (ma * ma + mb * mb + c1)
            value *= max(float((lum * cs).mean()), 0.0) ** weight
    return value


def _photo_pairs() -> list[tuple[np.ndarray, np.ndarray]]:
    """Two crops (3, H, W) of the shipped example photo, odd sides so that the pooling
    pads, each with a degraded copy: JPEG at quality 20 (a real codec's errors)."""
    with Image.open(ROOT / "examples" / "photos" / "chelsea.jpg") as img:
        rgb = np.asarray(img.convert("RGB"), np.uint8)
    pairs = []
    for crop in (rgb[:171, :201], rgb[40:241, 100:283]):
        buf = io.BytesIO()
        Image.fromarray(crop).save(buf, format="JPEG", quality=20)
        with Image.open(buf) as j:
            degraded = np.asarray(j.convert("RGB"), np.uint8)
        pairs.append((crop.transpose(2, 0, 1).copy(), degraded.transpose(2, 0, 1).copy()))
    return pairs


def test_ms_ssim_matches_written_out_reference() -> None:
    for ref, test in _photo_pairs():
        got = ms_ssim(ref[None], test[None])
        want = np.mean([_ms_ssim_reference(r, t) for r, t in zip(ref, test, strict=True)])
        # computed in float32 (see eval/metrics.py), the reference in float64
        np.testing.assert_allclose(got, [want], rtol=0, atol=1e-5)
        assert 0.8 < got[0] < 0.999  # JPEG q20 visibly degrades, but keeps the structure


def test_ms_ssim_of_identical_images_is_one_grey_and_colour() -> None:
    ref, _ = _photo_pairs()[0]
    np.testing.assert_allclose(ms_ssim(ref[None], ref[None]), [1.0], rtol=0, atol=1e-6)
    grey = np.stack([ref[:1], ref[1:2]])  # two one-channel images in one batch
    np.testing.assert_allclose(ms_ssim(grey, grey), [1.0, 1.0], rtol=0, atol=1e-6)


def test_ms_ssim_refuses_images_too_small_for_five_scales() -> None:
    small = np.zeros((1, 3, 160, 400), np.uint8)
    with pytest.raises(InvalidInput, match="161 x 161"):
        ms_ssim(small, small)
