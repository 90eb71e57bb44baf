"""The payload cut: the shortest bytes in a finished range coder's final interval.

``shortest`` is the closed form for one coder state, in Python integers; ``shortest_batch``
gives exactly its bytes for a whole batch of states, in uint64 numpy arithmetic over the
batch (the per-image Python integer work cost the vq_static encoder ~1.7 us an image,
about a third of the library's own time for the image). States the vectorised form does
not cover (a borrow or carry that crosses the 64-bit state window, the empty payload, a
stream that does not fit the picture) are handed to ``shortest`` one by one.
docs/code-format.md ("Payload") states the format; ``entropy.finish`` uses it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import cast

import numpy as np

# One coder state as ``RangeEncoder.pos()`` gives it: (words emitted, (lower, range)).
State = tuple[int, tuple[int, int]]

_LOW64 = (1 << 64) - 1
# Batches below this size take the scalar form: the vectorised one has a fixed cost of
# some 30 numpy calls, ~60 us (on the 2-core dev machine, 32 images: 1.9-2.9 us an
# image vectorised, 1.7 scalar; 1,000 images: 0.65 vs 1.5).
MIN_BATCH = 64


def shortest(state: State, words: np.ndarray) -> bytes | None:
    """The shortest big-endian byte string whose value, zero-padded, lies in the final
    interval of a coder in ``state`` whose sealed words are ``words`` (uint32).

    The sealed stream X is one point of the interval; measuring from it keeps pending
    carries out of the arithmetic: the interval is [X - d, X - d + range) in units of the
    last state bit, d = (X's last 64 bits - lower) mod 2**64. None when the sealed stream
    does not fit that picture (the caller then keeps the words).
    """
    position, (lower, width) = state
    n = position + 2  # the state window spans two words after the emitted ones
    pad = n - len(words)
    if pad < 0:
        return None
    # The words in reverse order, each little-endian, read little-endian: the big-endian
    # value of the stream, without a byte-swapped copy.
    x = int.from_bytes(np.asarray(words, np.uint32)[::-1].tobytes(), "little") << (32 * pad)
    d = ((x & _LOW64) - lower) & _LOW64  # only X's last 64 bits meet the state
    if d >= width:
        return None
    lo = x - d
    if lo < 0:  # an interval reaching below the stream's start: no coder's state
        return None
    return interval_cut(lo, width, n)


def interval_cut(lo: int, width: int, n: int) -> bytes:
    """The shortest big-endian byte string whose value, zero-padded to ``n`` words, lies
    in [lo, lo + width) (lo >= 0, in units of the last of the n words' bits): the cut
    ``shortest`` makes once it has the interval (``lockstep`` computes it directly)."""
    if lo == 0:
        return b""  # the empty payload reads as zeros, the interval's own start
    bits = 32 * n
    top = lo + width - 1  # the interval's last integer, clipped to the window below
    if top.bit_length() > bits:
        top = (1 << bits) - 1
    # A multiple of 2**s lies in [lo, top] iff (lo - 1) >> s != top >> s, i.e. iff s is
    # below the bit length of (lo - 1) ^ top: drop the most whole bytes that allows
    # (fewer than 4n, since 0 < lo <= top < 2**(32n)), then round lo up at that byte.
    dropped = (((lo - 1) ^ top).bit_length() - 1) >> 3
    m = -(-lo >> (8 * dropped))
    return m.to_bytes(4 * n - dropped, "big").rstrip(b"\0")


def window_tail(a: np.ndarray, width: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For final intervals whose lower end minus one, ``a``, and ``a + width`` differ only in
    the 64-bit window (uint64 arrays): k, the highest byte where they differ (the payload
    drops the tail's k low bytes), and the tail ((a >> 8k) + 1) << 8k. Rows where that
    does not hold get meaningless values; callers take them the slow way."""
    diff = a ^ (a + width)
    k = np.zeros(len(a), np.uint64)
    for byte in range(1, 8):
        k += diff >= np.uint64(1 << (8 * byte))
    shift = k * np.uint64(8)
    return k, ((a >> shift) + np.uint64(1)) << shift


def shortest_batch(states: Sequence[State], words: Sequence[np.ndarray], *,
                   min_batch: int | None = None) -> list[bytes | None]:
    """``[shortest(s, w) for s, w in zip(states, words)]``, byte for byte, vectorised.

    Write a = lo - 1 and t = top (``shortest``'s names). Where X's last 64 bits x exceed
    d (no borrow out of the window) and a's low 64 bits plus the range stay below 2**64
    (no carry), a and t share every bit above the window, so the cut is decided by
    uint64s: k = the index of the highest byte where a and t differ (0..7), and the
    payload is the emitted words, then ((a >> 8k) + 1) as 8 - k big-endian bytes. The +1
    cannot carry out of the last byte (a has a 0 bit where t has its highest differing 1),
    so that byte is non-zero and ``shortest``'s rstrip removes nothing; lo = a + 1 > 0.
    The rest go to ``shortest``. ``words``: C-contiguous uint32 arrays (as
    ``get_compressed`` gives them); batches under ``min_batch`` (default ``MIN_BATCH``;
    tests pass 0) take ``shortest``.
    """
    count = len(states)
    if count < max(MIN_BATCH if min_batch is None else min_batch, 1):
        return [shortest(s, w) for s, w in zip(states, words, strict=True)]
    emitted, windows = zip(*states, strict=True)
    position = np.fromiter(emitted, np.int64, count)
    lower = np.fromiter(itertools.chain.from_iterable(windows), np.uint64, 2 * count)
    lower, width = lower[0::2], lower[1::2]
    sizes = np.fromiter(map(len, words), np.int64, count)
    # One join of every coder's words (bytes.join reads their buffers; native order),
    # and two zero words the windows of short streams read past the sealed ones.
    # (numpy ships no Buffer type for its arrays: the cast only tells mypy.)
    stream = np.frombuffer(b"".join(cast(list[bytes], [*words, bytes(8)])), np.uint32)
    starts = np.cumsum(sizes) - sizes
    pad = position + 2 - sizes
    shaped = (pad >= 0) & (pad <= 2)
    zero = len(stream) - 1
    high = stream[np.where(shaped & (pad <= 1), starts + position, zero)].astype(np.uint64)
    low = stream[np.where(shaped & (pad == 0), starts + position + 1, zero)].astype(np.uint64)
    x = (high << np.uint64(32)) | low
    d = x - lower  # mod 2**64: uint64 arithmetic wraps
    a = x - d - np.uint64(1)  # lo - 1's low 64 bits; exact where x > d
    fast = shaped & (d < width) & (x > d) & (width <= ~a)
    k, tail = window_tail(a, width)
    # Every payload laid out in one uint32 buffer, image i at unit ``at[i]``: its
    # emitted words, then the tail's two words (cut to 8 - k bytes when sliced out).
    span = np.where(fast, position + 2, 0)
    at = np.cumsum(span) - span
    units = np.empty(int(span.sum()), np.uint32)
    owner = np.repeat(np.arange(count), sizes)
    local = np.arange(len(stream) - 2) - starts[owner]
    keep = fast[owner] & (local < position[owner])
    units[(at[owner] + local)[keep]] = stream[:-2][keep]
    fat = at[fast] + position[fast]
    units[fat] = (tail[fast] >> np.uint64(32)).astype(np.uint32)
    units[fat + 1] = (tail[fast] & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    blob = units.astype(">u4").tobytes()
    begin = (4 * at).tolist()
    end = (4 * (at + position + 2) - k.astype(np.int64)).tolist()
    out: list[bytes | None] = [blob[b:e] for b, e in zip(begin, end, strict=True)]
    for i in np.flatnonzero(~fast).tolist():
        out[i] = shortest(states[i], words[i])
    return out
