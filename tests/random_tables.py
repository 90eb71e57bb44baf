"""Random entropy-coding tables and symbols for the coder tests (tests/unit/test_entropy*.py)."""

from __future__ import annotations

import numpy as np
from hypothesis import settings

SETTINGS = settings(max_examples=150, deadline=None)


def random_freqs(rng: np.random.Generator, k: int) -> list[int]:
    """Skewed integer tables: some huge, some 1, like real exported tables."""
    return [int(x) for x in np.maximum(1, (rng.pareto(0.7, k) * 50).astype(np.int64))]


def sample(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One symbol per row of ``probs`` (..., K), drawn from it."""
    cdf = np.cumsum(probs, axis=-1)
    u = rng.random(probs.shape[:-1])[..., None] * cdf[..., -1:]
    return np.minimum((cdf < u).sum(-1), probs.shape[-1] - 1)
