"""KL divergences used by the VAE and its tests (DESIGN.md "The math")."""

from __future__ import annotations

import numpy as np
from torch import Tensor


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """Elementwise KL(N(mu, exp(logvar)) || N(0, 1)) in nats, closed form:
    0.5 * (mu^2 + sigma^2 - log sigma^2 - 1)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0)


def discrete_kl(p: np.ndarray | list[float], q: np.ndarray | list[float]) -> float:
    """KL(P || Q) = sum p log(p / q) in nats; terms with p = 0 count 0, q = 0 under p > 0 is inf."""
    p = np.asarray(p, np.float64)
    q = np.asarray(q, np.float64)
    if p.shape != q.shape or p.ndim != 1:
        raise ValueError(f"P and Q must be 1-d of one length, got {p.shape} and {q.shape}")
    for name, d in (("P", p), ("Q", q)):
        if d.min() < 0 or not np.isclose(d.sum(), 1.0):
            raise ValueError(f"{name} = {d.tolist()} is not a probability distribution")
    mask = p > 0
    if np.any(q[mask] == 0):
        return float("inf")
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))
