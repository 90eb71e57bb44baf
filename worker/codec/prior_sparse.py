"""Kinds 3 and 4: the prior-table rule of ``entropy`` evaluated on the logits that matter.

``entropy.prior_quantize`` / ``prior_margin`` define a table from every one of a
position's K logits (``x = float64(logit) * logit_scale + j / 16``, ``q = rint(x)``,
``d = max(q) - q``, weight ``lut[min(d, len(lut))]``, the margin). A logit more than
``len(lut) + 2`` units of ``x`` below the position's largest has ``d >= len(lut) + 2`` for
every offset j: weight ``lut[-1]``, and no part in the margin (a move between the clamp
and its neighbours changes no weight). So only the few logits near the top are computed,
each with exactly the reference's float64 operations (the same values, bit for bit), and
the others enter as the table's fill value ``lut[-1] / total``. The results are those of
the dense rule (tested: tests/unit/test_prior_sparse.py).
"""

from __future__ import annotations

import math

import numpy as np

from latentserve.worker.codec.entropy import (
    PRIOR_OFFSETS,
    _lut_tables,
    plan_offsets,
    prior_margin,
    prior_quantize,
)
from latentserve.worker.runtime.manifest import VQPriorSpec

# A table margin within this relative distance below the cap is settled by the dense rule
# (the reference skips the exact margin when no logit at all is near a boundary, which can
# differ from the exact value by float rounding only).
_CAP_BAND = 1e-9


class Candidates:
    """The logits of T tables (T, K) that can shape a table: per candidate its table
    (sorted), column and x0 = float64(logit) * logit_scale; per table the count, whether
    all its logits are finite, and the largest x0."""

    def __init__(self, flat: np.ndarray, spec: VQPriorSpec) -> None:
        t, k = flat.shape
        self.k = k
        top = flat.max(axis=1)  # NaN-propagating: a NaN table is not finite
        self.finite = np.isfinite(top) & np.isfinite(flat.min(axis=1))
        # One unit of x more than the rule needs covers the rounding of the threshold
        # (computed in the logits' own precision: a float32 ulp is far below a unit).
        thr64 = top.astype(np.float64) - (len(spec.lut) + 3) / spec.logit_scale
        thr = thr64.astype(flat.dtype)
        up = thr > thr64  # rounded up: one step down, so no candidate is lost
        thr[up] = np.nextafter(thr[up], flat.dtype.type(-np.inf))
        thr[~self.finite] = np.nan  # no candidates: such tables are handled apart
        where = np.flatnonzero(flat >= thr[:, None])
        self.tab, self.col = np.divmod(where, k)
        self.x0 = flat[self.tab, self.col].astype(np.float64) * spec.logit_scale
        self.counts = np.bincount(self.tab, minlength=t)
        starts = np.concatenate(([0], np.cumsum(self.counts)[:-1]))
        self.top = np.full(t, np.nan)
        live = self.counts > 0
        self.top[live] = np.maximum.reduceat(self.x0, starts[live]) if live.any() else []


def _evaluate(x0: np.ndarray, seg: np.ndarray, starts: np.ndarray, top: np.ndarray,
              shift: np.ndarray, spec: VQPriorSpec, *, margins: bool = True
              ) -> tuple[np.ndarray, np.ndarray]:
    """For candidates (x0, their table ``seg`` among the tables evaluated, segments
    ``starts``) under per-table ``shift`` (offset / 16): (c per candidate, the exact
    margin per table: the reference's with cap = inf; empty when not ``margins``)."""
    _, up_of, down_of = _lut_tables(tuple(spec.lut))
    x = x0 + shift[seg]
    q = np.rint(x)
    d = np.rint(top + shift)[seg] - q  # max(q) = rint(max(x)): rint and + are monotone
    np.minimum(d, len(spec.lut), out=d)
    c = d.astype(np.intp)
    if not margins:
        return c, np.zeros(0)
    x -= q
    above = np.where(up_of[c], 0.5 - x, np.inf)
    below = np.where(down_of[c], 0.5 + x, np.inf)
    return c, np.minimum.reduceat(np.minimum(above, below), starts) / spec.logit_scale


def _segments(seg: np.ndarray) -> np.ndarray:
    """Start of each run of equal values in a sorted, non-empty index array."""
    return np.concatenate(([0], np.flatnonzero(seg[1:] != seg[:-1]) + 1))


class PriorPlan:
    """The encoder's plan, sparse: per image its offset (-1: code it as kind 2) and its
    float64 tables (positions, K), built per image on demand (``tables``) or for the
    batch (``dense``), equal to ``entropy.plan_offsets``'s."""

    def __init__(self, offsets: np.ndarray, shape: tuple[int, int, int], fill: np.ndarray,
                 tab: np.ndarray, col: np.ndarray, vals: np.ndarray) -> None:
        self.offsets = offsets
        self.shape = shape
        self._fill, self._tab, self._col, self._vals = fill, tab, col, vals
        n, p, k = shape
        self._starts = np.searchsorted(tab, np.arange(n + 1) * p).tolist()
        # Each candidate's place in its image's flat (positions * K) table: one 1-d
        # scatter per image in ``tables`` (a 2-d one costs twice as much).
        self._at = (tab % p) * k + col

    def tables(self, i: int) -> np.ndarray:
        """Image i's float64 tables (positions, K)."""
        _, p, k = self.shape
        out = np.empty((p, k))
        out[:] = self._fill[i * p:(i + 1) * p, None]
        a, b = self._starts[i], self._starts[i + 1]
        out.reshape(-1)[self._at[a:b]] = self._vals[a:b]
        return out

    def dense(self) -> np.ndarray:
        """Every image's tables (N, positions, K)."""
        n, p, k = self.shape
        out = np.repeat(self._fill[:, None], k, axis=1)
        out[self._tab, self._col] = self._vals
        return out.reshape(n, p, k)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenated index ranges [starts[i], starts[i] + lengths[i])."""
    if len(starts) == 0:
        return np.zeros(0, np.intp)
    ends = np.cumsum(lengths)
    out = np.ones(int(ends[-1]), np.intp)
    out[0] = starts[0]
    out[ends[:-1]] = starts[1:] - (starts[:-1] + lengths[:-1]) + 1
    return np.cumsum(out)


# Beyond this |x| a candidate's offset filter (below) could lose precision: such images
# are planned by the dense rule itself.
_FILTER_RANGE = 2.0 ** 30


# Images planned together: a chunk's candidate arrays stay in the CPU's caches.
PLAN_CHUNK = 32


class ChunkedPlan:
    """The plans of consecutive chunks of images as one plan (``PriorPlan``'s interface),
    kept apart: merging their candidate arrays cost about a fifth of the planning."""

    def __init__(self, parts: list[PriorPlan]) -> None:
        self.parts = parts
        self.chunk = parts[0].shape[0]
        self.offsets = np.concatenate([q.offsets for q in parts])
        _, p, k = parts[0].shape
        self.shape = (len(self.offsets), p, k)

    def tables(self, i: int) -> np.ndarray:
        """Image i's float64 tables (positions, K)."""
        return self.parts[i // self.chunk].tables(i % self.chunk)

    def dense(self) -> np.ndarray:
        """Every image's tables (N, positions, K)."""
        return np.concatenate([q.dense() for q in self.parts])


def plan_prior(logits: np.ndarray, spec: VQPriorSpec) -> PriorPlan | ChunkedPlan:
    """``entropy.plan_offsets`` (the first offset whose every table has margin >= guard),
    on the candidate logits only, PLAN_CHUNK images at a time."""
    n = len(logits)
    if n <= PLAN_CHUNK:
        return _plan_chunk(logits, spec)
    return ChunkedPlan([_plan_chunk(logits[a:a + PLAN_CHUNK], spec)
                        for a in range(0, n, PLAN_CHUNK)])


def _plan_chunk(logits: np.ndarray, spec: VQPriorSpec) -> PriorPlan:
    """``plan_prior`` of one chunk of images.

    A candidate comes within ``guard`` of a rounding boundary at few offsets j (one when
    guard * logit_scale < 1/32: the 16 offsets' boundaries lie 1/16 apart in x), found
    once per candidate with a factor-2 safety band; a table is evaluated exactly (as
    the reference) only at the offsets where one of its candidates is that close.
    Elsewhere its margin exceeds the guard, which is all the plan needs to know.
    """
    n, p, k = logits.shape
    flat = np.ascontiguousarray(logits).reshape(n * p, k)
    cand = Candidates(flat, spec)
    weight = _lut_tables(tuple(spec.lut))[0]
    guard, scale = spec.guard, spec.logit_scale
    cstart = np.concatenate(([0], np.cumsum(cand.counts)[:-1]))
    offsets = np.full(n, -1, np.int64)
    # An image with a non-finite table has margin 0 at every offset: kind 2.
    todo = cand.finite.reshape(n, p).all(axis=1)
    img = cand.tab // p
    huge = np.abs(cand.x0) > _FILTER_RANGE
    dense_imgs = np.unique(img[huge]).tolist() if huge.any() else []
    for i in dense_imgs:
        todo[i] = False
        offsets[i] = plan_offsets(flat[i * p:(i + 1) * p][None], spec)[0][0]
    # v: the offset (in 1/16 units, mod 16) that puts x0 + v/16 on a half-integer; an
    # offset j within ``reach`` of it (twice the guard) may bring the candidate near.
    v = (0.5 - cand.x0) * PRIOR_OFFSETS
    jstar = np.rint(v)
    v -= jstar
    reach = 2 * guard * scale * PRIOR_OFFSETS
    keys = []
    # |v| <= 1/2, so |v - delta| < reach needs |delta| < reach + 1/2: only 0 unless the
    # guard is wide.
    wide = math.ceil(reach + 0.5) - 1
    for delta in range(-wide, wide + 1):
        risky = np.flatnonzero(np.abs(v - delta) < reach)
        keys.append(cand.tab[risky] * PRIOR_OFFSETS
                    + (jstar[risky].astype(np.int64) + delta) % PRIOR_OFFSETS)
    pairs = np.unique(np.concatenate(keys))
    pair_tab, pair_j = np.divmod(pairs, PRIOR_OFFSETS)
    for j in range(PRIOR_OFFSETS):
        if not todo.any():
            break
        tables = pair_tab[(pair_j == j) & todo[pair_tab // p]]
        failed = np.zeros(n, bool)
        if len(tables):
            idx = _ranges(cstart[tables], cand.counts[tables])
            seg = np.repeat(np.arange(len(tables)), cand.counts[tables])
            starts = np.concatenate(([0], np.cumsum(cand.counts[tables])[:-1]))
            _, margin = _evaluate(cand.x0[idx], seg, starts, cand.top[tables],
                                  np.full(len(tables), j / PRIOR_OFFSETS), spec)
            bad = margin < guard
            failed[tables[bad] // p] = True
            band = bad & (margin >= guard * (1 - _CAP_BAND))
            for i in np.unique(tables[band] // p).tolist():  # settled by the dense rule
                cq, frac, fin = prior_quantize(flat[i * p:(i + 1) * p], spec, j)
                failed[i] = not prior_margin(cq, frac, fin, spec, cap=guard).min() >= guard
        ok = todo & ~failed
        offsets[ok] = j
        todo &= failed
    # The tables of the planned images, at their offsets.
    fill = np.full(n * p, 1.0) / np.float64(k)  # uniform (an image with no offset)
    vals = np.empty(len(cand.tab))
    vals.fill(1.0 / np.float64(k))
    if (offsets >= 0).all():  # the common case: every table, no selection needed
        shift = np.repeat(offsets.astype(np.float64) / PRIOR_OFFSETS, p)
        c, _ = _evaluate(cand.x0, cand.tab, cstart, cand.top, shift, spec, margins=False)
        w = weight[c]
        total = np.add.reduceat(w, cstart) + (k - cand.counts) * weight[-1]
        fill = weight[-1] / total
        vals = w / total[cand.tab]
        return PriorPlan(offsets, (n, p, k), fill, cand.tab, cand.col, vals)
    sel = np.flatnonzero(offsets[img] >= 0)
    if len(sel):
        tab = cand.tab[sel]
        starts = _segments(tab)
        tables = tab[starts]
        seg = np.repeat(np.arange(len(tables)), cand.counts[tables])
        shift = offsets[tables // p].astype(np.float64) / PRIOR_OFFSETS
        c, _ = _evaluate(cand.x0[sel], seg, starts, cand.top[tables], shift, spec,
                         margins=False)
        w = weight[c]
        total = np.add.reduceat(w, starts) + (k - cand.counts[tables]) * weight[-1]
        fill[tables] = weight[-1] / total
        vals[sel] = w / total[seg]
    return PriorPlan(offsets, (n, p, k), fill, cand.tab, cand.col, vals)


def step_tables(logits: np.ndarray, offsets: np.ndarray,
                spec: VQPriorSpec) -> tuple[np.ndarray, np.ndarray]:
    """``entropy.prior_tables(logits, spec, offsets)`` for tables (T, K) with one offset
    each (T,): (float64 probabilities (T, K), margin (T,)), on the candidates only."""
    t, k = logits.shape
    cand = Candidates(np.ascontiguousarray(logits), spec)
    weight = _lut_tables(tuple(spec.lut))[0]
    margin = np.zeros(t)
    # A non-finite table: the reference zeroes its x, so every d is 0 (margin 0).
    probs = np.empty((t, k))
    probs[:] = (weight[0] / np.int64(k * weight[0])) if not cand.finite.all() else 0.0
    live = np.flatnonzero(cand.finite)
    if len(cand.tab) and len(live):
        starts = _segments(cand.tab)
        tables = cand.tab[starts]
        seg = np.repeat(np.arange(len(tables)), np.diff(np.append(starts, len(cand.tab))))
        shift = np.asarray(offsets, np.float64)[tables] / PRIOR_OFFSETS
        c, m = _evaluate(cand.x0, seg, starts, cand.top[tables], shift, spec)
        margin[tables] = m
        w = weight[c]
        total = np.add.reduceat(w, starts) + (k - cand.counts[tables]) * weight[-1]
        probs[tables] = (weight[-1] / total)[:, None]
        probs[cand.tab, cand.col] = w / total[seg]
    return probs, margin
