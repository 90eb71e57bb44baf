"""Bjøntegaard delta rate on curves whose answer is known in closed form."""

from __future__ import annotations

import numpy as np
import pytest

from latentserve.eval.bdrate import BDRateUndefined, bd_rate

# A WebP-like curve (bytes/image, PSNR dB) from ../shared/RD-NOTES.md.
WEBP_RATES = [98, 131, 144, 162, 204, 325]
WEBP_PSNR = [22.6, 27.3, 28.7, 31.1, 36.1, 46.2]


def test_codec_against_itself_is_zero() -> None:
    assert bd_rate(WEBP_RATES, WEBP_PSNR, WEBP_RATES, WEBP_PSNR) == pytest.approx(0, abs=1e-9)


@pytest.mark.parametrize("factor", [0.5, 0.7, 1.3])
def test_rates_scaled_at_equal_psnr(factor: float) -> None:
    test = [r * factor for r in WEBP_RATES]
    assert bd_rate(WEBP_RATES, WEBP_PSNR, test, WEBP_PSNR) == pytest.approx(
        (factor - 1) * 100, abs=1e-9)


def test_psnr_shifted_curve_gives_closed_form_delta() -> None:
    # log-rate linear in PSNR: r = exp(a + b p). The test curve reaches each rate 1.5 dB
    # higher, so at equal PSNR it needs exp(-1.5 b) of the anchor's rate.
    a, b = 2.0, 0.08
    p = np.array([24.0, 27.0, 30.0, 33.0, 36.0])
    rates = np.exp(a + b * p)
    got = bd_rate(rates, p, rates, p + 1.5)
    assert got == pytest.approx((np.exp(-1.5 * b) - 1) * 100, abs=1e-9)
    # and the anchor against the test is the inverse ratio
    back = bd_rate(rates, p + 1.5, rates, p)
    assert (1 + got / 100) * (1 + back / 100) == pytest.approx(1, abs=1e-12)


def test_uses_only_the_overlapping_range() -> None:
    # Anchor linear in log-rate; the test matches it exactly over 27-31 dB and is
    # nowhere else: only the overlap counts, so the delta is 0.
    a, b = 1.0, 0.1
    p_anchor = np.array([20.0, 25.0, 30.0, 35.0, 40.0])
    p_test = np.array([27.0, 28.0, 29.0, 30.0, 31.0])
    got = bd_rate(np.exp(a + b * p_anchor), p_anchor, np.exp(a + b * p_test), p_test)
    assert got == pytest.approx(0, abs=1e-9)


def test_three_and_one_point_curves() -> None:
    a, b = 1.0, 0.1
    p = np.array([20.0, 25.0, 30.0, 35.0])
    anchor = np.exp(a + b * p)
    # a three-rung ladder at 60% of the anchor's rate: a quadratic fit, still exact
    p3 = np.array([22.0, 27.0, 33.0])
    assert bd_rate(anchor, p, 0.6 * np.exp(a + b * p3), p3) == pytest.approx(-40, abs=1e-9)
    # one point at 28 dB, 45% of the anchor's rate there
    assert bd_rate(anchor, p, [0.45 * np.exp(a + b * 28)], [28.0]) == pytest.approx(-55, abs=1e-9)


def test_no_overlap_is_refused() -> None:
    with pytest.raises(BDRateUndefined, match="share no PSNR range"):
        bd_rate(WEBP_RATES, WEBP_PSNR, [40.0, 50.0], [50.0, 52.0])


def test_bad_curves_are_refused() -> None:
    with pytest.raises(ValueError, match="positive finite rates"):
        bd_rate([0, 1], [20, 30], [1, 2], [20, 30])
    with pytest.raises(ValueError, match="equal, non-empty"):
        bd_rate([1, 2], [20], [1, 2], [20, 30])
