"""Kind 2 for a batch: constriction's range coder run in lockstep over the images.

Every vq_static image codes position p under the same model p, so step p of all N images
is one set of uint64 numpy operations instead of N coder calls (49 per image: as many
Python-level calls as constriction's own per-image figure makes, before any of our work).

The arithmetic is constriction 0.5's ``RangeEncoder`` (32-bit words, 64-bit state,
24-bit precision; ``stream/queue.rs``, ``encode_symbol``) read as arithmetic on one big
integer: ``scale = range >> 24``, ``range = scale * prob``, ``lower += scale * cum`` (a
carry out of the 64-bit window adds one to the words already emitted: what its
"inverted situation" defers), and when ``range < 2**32`` the window's top word is
emitted and both shift by 32. After the last symbol, ``pos()`` of that coder is
(words emitted, (lower, range)) and its final interval is [L, L + range), L the emitted
words followed by ``lower``: ``cut.interval_cut`` gives the payload from it, the bytes
``entropy.finish`` takes from the same interval (tests compare the two paths on random
symbols and tables, carries included).

Decoding runs constriction's ``decode_symbol`` the same way: the point (the payload's
first two words, zeros past its end) gives ``quantile = (point - lower) // scale``, which
must lie below 2**24 (else constriction raises: invalid data), the symbol is the one
whose [cum, cum + prob) holds it, and a renormalisation shifts the next word (or zero)
into the point.

The quantised (cumulative, probability) pairs of each model are read from constriction
itself, not recomputed: a fresh coder (lower 0, range 2**64 - 1) that codes one symbol
s is left at lower = (2**40 - 1) * cum(s), range = (2**40 - 1) * prob(s).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from latentserve.worker.codec.cut import interval_cut, window_tail

PRECISION = 24  # constriction's default models: probabilities in units of 2**-24
_FIRST_SCALE = ((1 << 64) - 1) >> PRECISION  # a fresh coder's range >> PRECISION
_WORD = np.uint64(32)
_SMALL = np.uint64(1 << 32)
_PREC = np.uint64(PRECISION)
_LIMIT = np.uint64(1 << PRECISION)
# Batches below this size keep the per-image coder calls: a lockstep step costs ~12 numpy
# calls whatever N is (~50 us for 49 positions), which a few images do not repay.
MIN_BATCH = 32


def quantised(model: Any, size: int, encoder: Any) -> tuple[np.ndarray, np.ndarray]:
    """(cum, prob) as uint64 arrays (size,): how ``model`` (a constriction categorical
    over ``size`` symbols) quantises each symbol, read from coders (``encoder``: the
    RangeEncoder class) that code it first."""
    cum = np.empty(size, np.uint64)
    prob = np.empty(size, np.uint64)
    for s in range(size):
        coder = encoder()
        coder.encode(s, model)
        words, (lower, width) = coder.pos()
        if words or lower % _FIRST_SCALE or width % _FIRST_SCALE:
            raise AssertionError("constriction's coder does not start as lockstep assumes")
        cum[s], prob[s] = lower // _FIRST_SCALE, width // _FIRST_SCALE
    return cum, prob


class LockstepCoder:
    """Per-position quantised tables (positions, K) -> ``encode_batch``, ``decode_batch``."""

    def __init__(self, cum: np.ndarray, prob: np.ndarray) -> None:
        self.cum = np.ascontiguousarray(cum, np.uint64)
        self.prob = np.ascontiguousarray(prob, np.uint64)
        self.positions, self.k = self.cum.shape
        # Flat tables: position p's entry for symbol s at p * K + s (one gather per step).
        self._cum = self.cum.reshape(-1)
        self._prob = self.prob.reshape(-1)
        # Per position the K + 1 boundaries cum[0] = 0 < ... < 2**24, for the decoder.
        self._bounds = np.concatenate(
            [self.cum, np.full((self.positions, 1), 1 << PRECISION, np.uint64)], axis=1)

    def decode_batch(self, payloads: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """Payloads -> (symbols (N, positions) int32, per payload whether constriction's
        decoder refuses it: a quantile off the table at some step). Refused rows hold
        whatever the arithmetic gave; the caller discards them."""
        n, p = len(payloads), self.positions
        # Each payload as a row of big-endian words, zero-padded: the two the point
        # starts from, then at most one more per step; words past those are never read
        # (by constriction either), so a long payload costs no more than a short one.
        cols = p + 2
        size = 4 * cols
        padded = b"".join([b[:size].ljust(size, b"\0") for b in payloads])
        words = np.frombuffer(padded, ">u4").reshape(n, cols).astype(np.uint64)
        point = (words[:, 0] << _WORD) | words[:, 1]
        following = np.full(n, 2, np.intp)
        lower = np.zeros(n, np.uint64)
        width = np.full(n, np.uint64((1 << 64) - 1))
        out = np.empty((p, n), np.int32)
        refused = np.zeros(n, bool)
        rows = np.arange(n)
        for step in range(p):
            scale = width >> _PREC
            quantile = (point - lower) // scale  # uint64: the wrapping difference
            off = quantile >= _LIMIT
            if off.any():
                refused |= off
                quantile[off] = 0
            symbol = np.searchsorted(self._bounds[step], quantile, side="right") - 1
            out[step] = symbol
            lower += scale * self.cum[step, symbol]
            width = scale * self.prob[step, symbol]
            small = width < _SMALL
            if small.any():
                at = rows[small]
                lower[at] <<= _WORD
                width[at] <<= _WORD
                point[at] = (point[at] << _WORD) | words[at, following[at]]
                following[at] += 1
        return np.ascontiguousarray(out.T), refused

    def encode_batch(self, symbols: np.ndarray) -> list[bytes]:
        """Symbols (N, positions), each in [0, K) -> one payload each, the bytes that
        constriction's coder gives for the image cut by ``entropy.finish``."""
        n, p = symbols.shape
        if p != self.positions:
            raise ValueError(f"lockstep tables cover {self.positions} positions, "
                             f"the symbols have {p}")
        index = symbols.astype(np.intp) + np.arange(p, dtype=np.intp) * self.k
        # Gathered once for all steps, column p contiguous.
        cum = np.ascontiguousarray(self._cum[index].T)
        prob = np.ascontiguousarray(self._prob[index].T)
        lower = np.zeros(n, np.uint64)
        width = np.full(n, np.uint64((1 << 64) - 1))
        # At most one word per step: row i's emitted words are words[i, :emitted[i]].
        words = np.zeros((n, p + 2), np.uint32)
        emitted = np.zeros(n, np.intp)
        rows = np.arange(n)
        scale = np.empty(n, np.uint64)
        new = np.empty(n, np.uint64)
        for step in range(p):
            np.right_shift(width, _PREC, out=scale)
            np.multiply(scale, prob[step], out=width)
            np.multiply(scale, cum[step], out=new)
            new += lower
            carried = new < lower  # the add wrapped: carry into the emitted words
            lower, new = new, lower
            if carried.any():
                _carry(words, emitted, np.flatnonzero(carried))
            small = width < _SMALL
            if small.any():
                at = rows[small]
                words[at, emitted[at]] = (lower[at] >> _WORD).astype(np.uint32)
                emitted[at] += 1
                lower[at] <<= _WORD
                width[at] <<= _WORD
        return _payloads(words, emitted, lower, width)


def _carry(words: np.ndarray, emitted: np.ndarray, at: np.ndarray) -> None:
    """Add one to the emitted words of rows ``at`` (rippling through 0xFFFFFFFF words).

    A carry never runs past a row's first word: every interval lies inside the first
    one, [0, 2**64 - 1) in units of its window."""
    pos = emitted[at] - 1
    while len(at):
        if (pos < 0).any():
            raise AssertionError("a range coder carry ran past the first word")
        words[at, pos] += np.uint32(1)
        go_on = words[at, pos] == 0  # wrapped: the carry moves one word up
        at, pos = at[go_on], pos[go_on] - 1


def _payloads(words: np.ndarray, emitted: np.ndarray, lower: np.ndarray,
              width: np.ndarray) -> list[bytes]:
    """The cut of every row's final interval [L, L + width), L = words then lower.

    Where lower > 0 and lower + width does not wrap, L - 1 and L + width - 1 differ only
    in the window's 64 bits, so the cut is decided there (as ``cut.shortest_batch``): k =
    the highest byte where they differ, the payload the emitted words, then
    ((L - 1) >> 8k) + 1 as 8 - k bytes (non-zero last byte: no zeros to strip). The other
    rows go through ``cut.interval_cut`` in Python integers."""
    n, cols = words.shape
    a = lower - np.uint64(1)
    fast = (lower > 0) & (width <= ~a)
    k, tail = window_tail(a, width)
    rows = np.arange(n)
    words[rows, emitted] = (tail >> _WORD).astype(np.uint32)
    words[rows, emitted + 1] = (tail & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    blob = words.astype(">u4").tobytes()
    begin = (rows * (4 * cols)).tolist()
    end = (rows * (4 * cols) + 4 * (emitted + 2) - k.astype(np.intp)).tolist()
    out = [blob[b:e] for b, e in zip(begin, end, strict=True)]
    for i in np.flatnonzero(~fast).tolist():
        out[i] = _slow(words[i, :emitted[i]], int(lower[i]), int(width[i]))
    return out


def _slow(emitted: Sequence[int] | np.ndarray, lower: int, width: int) -> bytes:
    """One row's cut in Python integers (a borrow or carry across the window)."""
    high = int.from_bytes(np.asarray(emitted, ">u4").tobytes(), "big")
    return interval_cut((high << 64) + lower, width, len(emitted) + 2)
