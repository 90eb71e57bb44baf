"""The earlier coder, kept as the reference: per-symbol tables, a bisection, a decode check.

Kept callable so tests can require that the fast paths of ``entropy`` write exactly these
bytes, and so ``bench/codec.py`` can time old against new in one run. Nothing in serving
calls it. Per image it builds a (symbols x alphabet) float64 table, codes it through
constriction's per-symbol family call, cuts the payload by bisection and decodes the
result to check it.
"""

from __future__ import annotations

import numpy as np

from latentserve.errors import CorruptCode
from latentserve.worker.codec.entropy import (
    CHECK_PROBS,
    FAMILY,
    OFFSET_PROBS,
    FactorizedTables,
    RangeEncoder,
    StaticTables,
    SymbolDecoder,
    prior_check,
    words_to_bytes,
)


def shortest_payload_bisect(coder: RangeEncoder) -> bytes | None:
    """``entropy.shortest_payload`` computed by bisection over the payload length."""
    position, (lower, width) = coder.pos()
    words = coder.get_compressed()
    n = position + 2
    if len(words) > n:
        return None
    x = int.from_bytes(np.asarray(words, np.uint32).astype(">u4").tobytes(), "big")
    x <<= 32 * (n - len(words))
    d = (x - lower) % (1 << 64)
    if d >= width:
        return None
    lo, end = x - d, min(x - d + width, 1 << (32 * n))

    def point(length: int) -> int | None:
        shift = 8 * (4 * n - length)
        m = -(-lo >> shift)
        return m if m << shift < end else None

    short, long_ = -1, 4 * n
    while long_ - short > 1:
        mid = (short + long_) // 2
        if point(mid) is None:
            short = mid
        else:
            long_ = mid
    m = point(long_)
    assert m is not None
    return m.to_bytes(long_, "big").rstrip(b"\0") if long_ else b""


class ReferenceEncoder:
    """Symbols under per-symbol float64 tables; the payload is checked by decoding it."""

    def __init__(self) -> None:
        self._coder = RangeEncoder()
        self._parts: list[tuple[np.ndarray, np.ndarray]] = []

    def encode(self, symbols: np.ndarray, probs: np.ndarray) -> None:
        """Code ``symbols[i]`` under ``probs[i]`` ((n, K) float64); K = 1 codes nothing."""
        symbols = np.ascontiguousarray(symbols, np.int32).reshape(-1)
        if len(symbols) == 0 or probs.shape[-1] == 1:
            return
        probs = np.ascontiguousarray(probs, np.float64)
        self._coder.encode(symbols, FAMILY, probs)
        self._parts.append((symbols, probs))

    def payload(self) -> bytes:
        """The bisected shortest payload if it decodes to the message, else the sealed words."""
        if self._coder.is_empty():
            return b""
        short = shortest_payload_bisect(self._coder)
        if short is not None and self._decodes_to_message(short):
            return short
        return words_to_bytes(self._coder.get_compressed())

    def _decodes_to_message(self, payload: bytes) -> bool:
        decoder = SymbolDecoder(payload)
        try:
            return all(np.array_equal(decoder.decode(p), s) for s, p in self._parts)
        except CorruptCode:
            return False


def _channel_rows(tables: FactorizedTables) -> list[np.ndarray]:
    hw = tables.shape[1] * tables.shape[2]
    return [np.ascontiguousarray(np.broadcast_to(p, (hw, len(p)))) for p in tables.probs]


def factorized_encode(tables: FactorizedTables, symbols: np.ndarray) -> bytes:
    """One image (C, h, w) -> payload, the per-symbol way."""
    enc = ReferenceEncoder()
    for c, rows in enumerate(_channel_rows(tables)):
        enc.encode(symbols[c].reshape(-1) - tables.offsets[c], rows)
    return enc.payload()


def factorized_decode(tables: FactorizedTables, payload: bytes) -> np.ndarray:
    """Payload -> (C, h, w), the per-symbol way; CorruptCode when it does not decode."""
    dec = SymbolDecoder(payload)
    out = np.empty(tables.shape, np.int32)
    for c, rows in enumerate(_channel_rows(tables)):
        out[c] = (dec.decode(rows) + tables.offsets[c]).reshape(tables.shape[1:])
    return out


def static_encode(tables: StaticTables, symbols: np.ndarray) -> bytes:
    """One image's indices (h, w) -> payload, the per-symbol way."""
    enc = ReferenceEncoder()
    enc.encode(symbols.reshape(-1), tables.probs)
    return enc.payload()


def static_decode(tables: StaticTables, payload: bytes) -> np.ndarray:
    """Payload -> indices (h, w), the per-symbol way."""
    return SymbolDecoder(payload).decode(tables.probs).reshape(tables.shape)


def prior_payload(offset: int, symbols: np.ndarray, tables: np.ndarray) -> bytes:
    """A kind-3 payload the old way (see ``codec.prior_payload``)."""
    enc = ReferenceEncoder()
    enc.encode(np.array([offset]), OFFSET_PROBS)
    enc.encode(symbols.reshape(-1), tables)
    enc.encode(prior_check(offset, symbols), CHECK_PROBS)
    return enc.payload()
