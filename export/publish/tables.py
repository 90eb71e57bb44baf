"""Integer entropy-model tables frozen at export, their bit estimates, and the AE's GMM.

All frequency tables are 16-bit style: every frequency >= 1, each table sums to exactly
2^16 (CompressAI's quantised CDFs are the reference). The bit estimates below are the
ideal code lengths under these integer tables, i.e. what the range coder spends before
its flush.
"""

from __future__ import annotations

import math
from decimal import Decimal, localcontext
from typing import Protocol

import numpy as np

TABLE_TOTAL = 1 << 16
VQ_PRIOR_LOGIT_SCALE = 2.0
VQ_PRIOR_GUARD = 2e-5


def quantize_pmf(pmf: np.ndarray, total: int = TABLE_TOTAL) -> list[int]:
    """A pmf -> integer frequencies, each >= 1, summing to ``total`` (largest remainders)."""
    p = np.asarray(pmf, np.float64)
    n = len(p)
    if n == 0 or n > total:
        raise ValueError(f"a table needs 1..{total} symbols, got {n}")
    if not np.all(np.isfinite(p)) or p.min() < 0 or p.sum() <= 0:
        raise ValueError("pmf must be finite, non-negative and not all zero")
    scaled = p / p.sum() * (total - n)
    freqs = np.floor(scaled).astype(np.int64) + 1
    short = total - int(freqs.sum())
    if short > 0:
        order = np.argsort(-(scaled - np.floor(scaled)), kind="stable")
        freqs[order[:short]] += 1
    return [int(f) for f in freqs]


class PmfTable(Protocol):
    """A factorised density that tabulates itself (``FactorizedDensity``, a user's)."""

    def pmf_table(self, lo: list[int], hi: list[int]) -> list[list[float]]: ...


def ae_tables(density: PmfTable, symbols: np.ndarray) -> dict[str, object]:
    """The AE's learned factorised density, tabulated over the training symbols' support.

    ``symbols`` (N, C, h, w) are the rounded training latents; channel c's support is
    [min, max] of its symbols (anything outside is clipped by the engine).
    """
    c = symbols.shape[1]
    per = symbols.transpose(1, 0, 2, 3).reshape(c, -1)
    lo = [int(v) for v in per.min(1)]
    hi = [int(v) for v in per.max(1)]
    pmfs = density.pmf_table(lo, hi)
    return {"step": 1.0, "offsets": lo, "freqs": [quantize_pmf(np.array(p)) for p in pmfs]}


def histogram_tables(symbols: np.ndarray, *, step: float,
                     smoothing: float = 0.5) -> dict[str, object]:
    """Per-channel histograms of integer symbols (N, C, h, w), + ``smoothing`` per bin.

    The VAE's code model. Its posterior mean, quantised with ``step``, is coded under
    this histogram of the quantised *training* means rather than under the discretised
    N(0, I) prior: the prior describes z = mu + sigma * eps, not mu, and the aggregate
    distribution of the means is narrower than N(0, I) (sigma is far from 0 in many
    dimensions). Coding mu under N(0, I) would overpay, most of all in collapsed
    dimensions, where mu is ~0 for every image: there the histogram has one dominant
    bin (or a single symbol) and costs ~0 bits, while N(0, I) would charge ~log2(1/step)
    + 2 bits each. Symbols outside the training range are clipped by the engine.
    """
    c = symbols.shape[1]
    per = symbols.transpose(1, 0, 2, 3).reshape(c, -1)
    offsets, freqs = [], []
    for row in per:
        lo, hi = int(row.min()), int(row.max())
        counts = np.bincount(row - lo, minlength=hi - lo + 1).astype(np.float64) + smoothing
        offsets.append(lo)
        freqs.append(quantize_pmf(counts))
    return {"step": float(step), "offsets": offsets, "freqs": freqs}


def vq_static_tables(indices: np.ndarray, num_codes: int, *,
                     smoothing: float = 0.5) -> dict[str, object]:
    """Per grid position, the training indices' counts + ``smoothing``, as frequencies."""
    flat = indices.reshape(len(indices), -1)
    freqs = []
    for pos in range(flat.shape[1]):
        counts = np.bincount(flat[:, pos], minlength=num_codes).astype(np.float64) + smoothing
        freqs.append(quantize_pmf(counts))
    return {"num_codes": int(num_codes), "freqs": freqs}


def prior_lut(scale: float = VQ_PRIOR_LOGIT_SCALE, total: int = TABLE_TOTAL) -> list[int]:
    """Weights by distance d from the best quantised logit, down to the first weight 1."""
    lut = []
    d = 0
    while True:
        v = max(1, round(total * math.exp(-d / scale)))
        lut.append(v)
        if v == 1:
            return lut
        d += 1


def vq_prior_spec() -> dict[str, object]:
    return {"logit_scale": VQ_PRIOR_LOGIT_SCALE, "guard": VQ_PRIOR_GUARD,
            "lut": prior_lut(VQ_PRIOR_LOGIT_SCALE)}


# -- hyperprior (code kind 5) ------------------------------------------------------------
# CompressAI's GaussianConditional scale table: exp(linspace(ln 0.11, ln 256, 64)).
HYPER_SCALE_MIN = 0.11
HYPER_SCALE_MAX = 256.0
HYPER_LEVELS = 64
# In units of ln(scale): a relative error of 2e-5 (~170 float32 ulps) in a scale cannot
# move its table index. One offset fails for ~1 in 6 MNIST images; 16 for none seen.
HYPER_GUARD = 2e-5


# The Gaussian tables are computed in decimal arithmetic (software, correctly rounded),
# not with libm's exp / erfc, whose last bits vary between machines: an export gives the
# same integer tables everywhere (and so the same manifest, and the same golden codes).
_DECIMAL_DIGITS = 80
_PI = Decimal("3.1415926535897932384626433832795028841971693993751058209749445923078164062862")


def decimal_scales() -> list[Decimal]:
    """exp(linspace(ln s_min, ln s_max, levels)) in decimal arithmetic."""
    lo, hi = Decimal(str(HYPER_SCALE_MIN)).ln(), Decimal(str(HYPER_SCALE_MAX)).ln()
    return [(lo + (hi - lo) * i / (HYPER_LEVELS - 1)).exp() for i in range(HYPER_LEVELS)]


def hyper_scale_table() -> np.ndarray:
    """The scales of the Gaussian tables, float64 (export only: the tables are frozen)."""
    with localcontext() as ctx:
        ctx.prec = _DECIMAL_DIGITS
        return np.array([float(s) for s in decimal_scales()])


def _normal_cdf(t: Decimal) -> Decimal:
    """Phi(t) by erf's Taylor series at 80 digits (0 or 1 beyond |t| = 10, where the tail
    is below 1e-23, far under a table's 2^-16 resolution)."""
    if abs(t) >= 10:
        return Decimal(1) if t > 0 else Decimal(0)
    x = t / Decimal(2).sqrt()
    x2, term, total, n = x * x, x, x, 0
    tiny = Decimal(10) ** -(_DECIMAL_DIGITS - 15)
    while True:
        n += 1
        term = -term * x2 / n
        add = term / (2 * n + 1)
        total += add
        if abs(add) < tiny:
            return (1 + total * 2 / _PI.sqrt()) / 2


def gaussian_tables(lo: int, hi: int) -> list[list[int]]:
    """Per table scale s, the integer frequencies of v in lo..hi under N(0, s^2) integrated
    over [v - 1/2, v + 1/2], the tails folded into the end symbols."""
    out = []
    with localcontext() as ctx:
        ctx.prec = _DECIMAL_DIGITS
        for s in decimal_scales():
            cdf = [_normal_cdf((Decimal(v) + Decimal("0.5")) / s) for v in range(lo, hi)]
            edges = [Decimal(0), *cdf, Decimal(1)]
            pmf = np.array([float(b - a) for a, b in zip(edges, edges[1:], strict=False)])
            out.append(quantize_pmf(pmf + 1e-12))
    return out


def hyperprior_spec(y_spec: dict[str, object], z_spec: dict[str, object],
                    z_shape: list[int]) -> dict[str, object]:
    """code.hyperprior: z's factorized tables and the Gaussian tables over the support of
    the fallback (factorized) tables of y."""
    offsets = [int(o) for o in y_spec["offsets"]]  # type: ignore[attr-defined]
    tops = [o + len(f) - 1 for o, f in zip(offsets, y_spec["freqs"], strict=True)]  # type: ignore[call-overload]
    lo, hi = min(offsets), max(tops)
    if hi == lo:
        hi = lo + 1  # a table needs two symbols
    return {"z": {"shape": [int(s) for s in z_shape], "offsets": z_spec["offsets"],
                  "freqs": z_spec["freqs"]},
            "scale_min": HYPER_SCALE_MIN, "scale_max": HYPER_SCALE_MAX,
            "levels": HYPER_LEVELS, "guard": HYPER_GUARD, "y_offset": lo,
            "tables": gaussian_tables(lo, hi)}


# -- bit estimates ------------------------------------------------------------------------

def factorized_bits(symbols: np.ndarray, spec: dict[str, object]) -> np.ndarray:
    """Bits per image of integer symbols (N, C, h, w) under factorized tables (clipped)."""
    offsets = spec["offsets"]
    freqs = spec["freqs"]
    bits = np.zeros(len(symbols))
    for c, (lo, f) in enumerate(zip(offsets, freqs, strict=True)):  # type: ignore[call-overload]
        f = np.asarray(f, np.float64)
        idx = np.clip(symbols[:, c].reshape(len(symbols), -1) - lo, 0, len(f) - 1)
        bits += -np.log2(f[idx] / f.sum()).sum(1)
    return bits


def vq_static_bits(indices: np.ndarray, spec: dict[str, object]) -> np.ndarray:
    """Bits per image of index grids (N, h, w) under the per-position tables."""
    f = np.asarray(spec["freqs"], np.float64)
    flat = indices.reshape(len(indices), -1)
    p = f[np.arange(flat.shape[1])[None], flat] / f.sum(1)[None]
    bits: np.ndarray = -np.log2(p).sum(1)
    return bits


def vq_prior_bits(indices: np.ndarray, logits: np.ndarray,
                  spec: dict[str, object]) -> np.ndarray:
    """Bits per image of index grids under the prior's logits quantised as the codec does."""
    scale = float(spec["logit_scale"])  # type: ignore[arg-type]
    lut = np.asarray(spec["lut"], np.float64)
    q = np.rint(logits.astype(np.float64) * scale)
    d = np.minimum(q.max(1, keepdims=True) - q, len(lut) - 1).astype(np.int64)
    w = lut[d]                                          # (N, K, h, w)
    chosen = np.take_along_axis(w, indices[:, None].astype(np.int64), 1)[:, 0]
    bits: np.ndarray = -np.log2(chosen / w.sum(1)).reshape(len(indices), -1).sum(1)
    return bits


def softmax_bits(indices: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Bits per image of index grids under the prior's float softmax (the ideal)."""
    lg = logits.astype(np.float64)
    lg = lg - lg.max(1, keepdims=True)
    logp = lg - np.log(np.exp(lg).sum(1, keepdims=True))
    chosen = np.take_along_axis(logp, indices[:, None].astype(np.int64), 1)[:, 0]
    bits: np.ndarray = -(chosen / math.log(2)).reshape(len(indices), -1).sum(1)
    return bits


# -- AE sampling density --------------------------------------------------------------------

def fit_diag_gmm(x: np.ndarray, components: int = 10, *, iters: int = 60,
                 seed: int = 0, min_std: float = 0.05) -> dict[str, object]:
    """A diagonal Gaussian mixture fitted to rows of ``x`` (N, D) by EM."""
    x = np.asarray(x, np.float64)
    n, dim = x.shape
    k = max(1, min(components, n))
    rng = np.random.default_rng(seed)
    means = x[rng.choice(n, k, replace=False)]
    var = np.tile(x.var(0) + min_std**2, (k, 1))
    weights = np.full(k, 1.0 / k)
    for _ in range(iters):
        # E step: log N(x | m, v) per component, in (N, K).
        logp = -0.5 * (((x[:, None] - means[None]) ** 2 / var[None]).sum(2)
                       + np.log(2 * np.pi * var).sum(1)[None]) + np.log(weights)[None]
        logp -= logp.max(1, keepdims=True)
        resp = np.exp(logp)
        resp /= resp.sum(1, keepdims=True)
        # M step.
        nk = resp.sum(0) + 1e-9
        weights = nk / n
        means = (resp.T @ x) / nk[:, None]
        var = (resp.T @ x**2) / nk[:, None] - means**2
        var = np.maximum(var, min_std**2)
    return {"kind": "gmm", "weights": weights.tolist(), "means": means.tolist(),
            "stds": np.sqrt(var).tolist()}
