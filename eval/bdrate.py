"""Bjøntegaard delta rate: the average rate difference between two RD curves at equal PSNR.

The standard method (G. Bjøntegaard, VCEG-M33, 2001): fit log(rate) as a cubic polynomial
of PSNR for each curve, integrate both fits over the PSNR interval the two curves share,
and turn the mean log-rate difference back into a ratio:

    BD-rate = exp( (int_lo^hi fit_test - int_lo^hi fit_anchor) / (hi - lo) ) - 1

reported in percent; negative means the test curve needs fewer bytes than the anchor at
equal quality. Two departures, both only where the standard method is undefined:

- a curve with fewer than 4 points is fitted with a polynomial of degree points - 1
  (a 3-rung ladder gets a quadratic, 2 points a line);
- a single-point curve has a one-point PSNR "range": the integral's limit is the
  log-rate difference at that PSNR, so its rate is compared with the other curve's fit
  there, provided the point lies inside the other curve's PSNR range.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from latentserve.errors import InvalidInput


class BDRateUndefined(InvalidInput):
    """The two curves share no PSNR range, so no delta can be computed."""


def _curve(rates: Sequence[float], psnrs: Sequence[float],
           name: str) -> tuple[np.ndarray, np.ndarray]:
    r = np.asarray(rates, np.float64)
    p = np.asarray(psnrs, np.float64)
    if r.shape != p.shape or r.ndim != 1 or len(r) == 0:
        raise InvalidInput(f"{name} curve needs equal, non-empty rate and PSNR lists; got "
                           f"{r.shape} rates and {p.shape} PSNRs")
    if not (np.all(np.isfinite(r)) and np.all(r > 0) and np.all(np.isfinite(p))):
        raise InvalidInput(f"{name} curve needs positive finite rates and finite PSNRs; got "
                           f"rates {r.tolist()} PSNRs {p.tolist()}")
    order = np.argsort(p)
    return np.log(r[order]), p[order]


def _fit(log_rate: np.ndarray, psnr: np.ndarray) -> np.poly1d:
    degree = min(3, len(np.unique(psnr)) - 1)
    return np.poly1d(np.polyfit(psnr, log_rate, degree))


def bd_rate(anchor_rates: Sequence[float], anchor_psnr: Sequence[float],
            test_rates: Sequence[float], test_psnr: Sequence[float]) -> float:
    """BD-rate of ``test`` against ``anchor`` in percent (negative = test is smaller)."""
    la, pa = _curve(anchor_rates, anchor_psnr, "anchor")
    lt, pt = _curve(test_rates, test_psnr, "test")
    lo, hi = max(pa[0], pt[0]), min(pa[-1], pt[-1])
    if lo > hi:
        raise BDRateUndefined(
            f"the curves share no PSNR range: anchor {pa[0]:.2f}-{pa[-1]:.2f} dB, "
            f"test {pt[0]:.2f}-{pt[-1]:.2f} dB")
    single_a, single_t = pa[0] == pa[-1], pt[0] == pt[-1]
    if single_a and single_t:
        mean_diff = float(lt.mean() - la.mean())
    elif single_t:  # the integral's limit over a one-point range
        mean_diff = float(lt.mean() - _fit(la, pa)(pt[0]))
    elif single_a:
        mean_diff = float(_fit(lt, pt)(pa[0]) - la.mean())
    elif lo == hi:
        mean_diff = float(_fit(lt, pt)(lo) - _fit(la, pa)(lo))
    else:
        ia, it = np.polyint(_fit(la, pa)), np.polyint(_fit(lt, pt))
        mean_diff = float(((it(hi) - it(lo)) - (ia(hi) - ia(lo))) / (hi - lo))
    return (float(np.exp(mean_diff)) - 1.0) * 100.0
