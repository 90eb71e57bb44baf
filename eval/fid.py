"""The Frechet distance between two feature sets: an MNIST "FID".

FID (Heusel et al. 2017, "GANs trained by a two time-scale update rule converge to a
local Nash equilibrium") fits a Gaussian to each set of features and reports the
squared 2-Wasserstein distance between the two Gaussians:

    d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))

Here the features are the 64 penultimate activations (fc1 after its ReLU) of the
shipped MNIST classifier, not Inception-v3's 2048 pool features, so the figures are
**not comparable with Inception-FID** or with FIDs published for other networks; they
compare models of this project with each other and with the real-vs-real floor
(training images against validation images, same count). Like any FID it is biased
upwards for small sets: compare figures made with the same number of samples.
"""

from __future__ import annotations

import numpy as np

from latentserve.errors import InvalidInput


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise InvalidInput(f"need features (N >= 2, D), got shape {tuple(x.shape)}")
    mu = x.mean(axis=0)
    centred = x - mu
    cov = centred.T @ centred / (len(x) - 1)
    return mu, cov


def _sym_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition;
    the tiny negative eigenvalues that rounding leaves are set to 0."""
    sym = (matrix + matrix.T) / 2
    vals, vecs = np.linalg.eigh(sym)
    root: np.ndarray = (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T
    return root


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray,
                     cov2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) for two Gaussians.

    Tr((S1 S2)^(1/2)) is computed as Tr((R S2 R)^(1/2)) with R = S1^(1/2): S1 S2 is not
    symmetric, but it is similar to R S2 R, which is symmetric PSD, so its trace root is
    the sum of square roots of that matrix's (clipped) eigenvalues. This is stable for
    singular covariances (fewer samples than dimensions), where scipy's general
    ``sqrtm`` returns complex noise. The result is clipped at 0 (rounding can make a
    distance of identical sets -1e-13).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    d = mu1.shape[0]
    if mu2.shape != (d,) or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise InvalidInput(f"shape mismatch: means {mu1.shape} {mu2.shape}, covariances "
                           f"{cov1.shape} {cov2.shape}")
    root1 = _sym_sqrt(cov1)
    middle = root1 @ ((cov2 + cov2.T) / 2) @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_root = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff) + float(np.trace(cov1)) + float(np.trace(cov2)) - 2 * trace_root
    return max(value, 0.0)


def fid(features1: np.ndarray, features2: np.ndarray) -> float:
    """The Frechet distance between the Gaussians fitted to two feature sets (N, D)."""
    a, b = np.asarray(features1), np.asarray(features2)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise InvalidInput(f"feature sets must be (N, D) with one D, got {a.shape} and "
                           f"{b.shape}")
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))
