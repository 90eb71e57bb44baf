"""The Frechet distance of ``latentserve eval`` against cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from latentserve.errors import InvalidInput
from latentserve.eval.fid import fid, frechet_distance, gaussian_stats


def test_identical_sets_give_zero() -> None:
    x = np.random.default_rng(0).normal(size=(500, 16)) @ np.random.default_rng(1).normal(
        size=(16, 16))
    assert fid(x, x) == pytest.approx(0.0, abs=1e-8)
    assert fid(x, x[::-1].copy()) == pytest.approx(0.0, abs=1e-8)  # order does not matter


def test_identical_singular_sets_give_zero() -> None:
    # fewer samples than dimensions (as for a tiny eval): rank-deficient covariances
    x = np.random.default_rng(2).normal(size=(10, 64))
    assert fid(x, x) == pytest.approx(0.0, abs=1e-8)
    y = np.random.default_rng(3).normal(size=(12, 64))
    assert np.isfinite(fid(x, y)) and fid(x, y) > 0


def test_mean_shift_of_two_gaussians() -> None:
    # same covariance, means apart by delta: d^2 = |delta|^2 (sampling noise aside)
    rng = np.random.default_rng(4)
    delta = np.array([3.0, -4.0, 0.0, 1.0])
    a = rng.normal(size=(40000, 4))
    b = rng.normal(size=(40000, 4)) + delta
    assert fid(a, b) == pytest.approx(float(delta @ delta), rel=0.02)


def test_formula_against_a_hand_computation() -> None:
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]),
                            np.array([[9.0]])) == pytest.approx(4.0 + 1.0)
    # diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2
    va, vb = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 2.0])
    want = 9.0 + (1 - 3) ** 2 + (2 - 1) ** 2 + 0.0
    assert frechet_distance(mu1, np.diag(va), mu2, np.diag(vb)) == pytest.approx(want)


def test_formula_matches_scipy_sqrtm_on_full_covariances() -> None:
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(5)
    m1, m2 = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    c1, c2 = m1 @ m1.T + 0.1 * np.eye(6), m2 @ m2.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    root = np.real(linalg.sqrtm(c1 @ c2))
    want = float((mu1 - mu2) @ (mu1 - mu2) + np.trace(c1 + c2 - 2 * root))
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(want, rel=1e-9)


def test_stats_and_bad_shapes() -> None:
    x = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]])
    mu, cov = gaussian_stats(x.astype(np.float32))
    assert mu.dtype == np.float64 and cov.dtype == np.float64
    np.testing.assert_allclose(mu, [2.0, 4.0])
    np.testing.assert_allclose(cov, np.cov(x, rowvar=False))
    with pytest.raises(InvalidInput, match="N >= 2"):
        gaussian_stats(np.zeros((1, 3)))
    with pytest.raises(InvalidInput, match="one D"):
        fid(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(InvalidInput, match="shape mismatch"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
