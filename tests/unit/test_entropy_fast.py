"""The fast coder (fixed models, closed-form payload, no decode check) writes exactly the
bytes of the reference coder (worker/codec/entropy_reference.py, the earlier path),
on random symbols and tables of every kind, and refuses exactly what it refuses."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from latentserve.errors import CorruptCode
from latentserve.worker.codec import entropy_reference as ref
from latentserve.worker.codec.codes import prior_payload
from latentserve.worker.codec.entropy import (
    FAMILY,
    FactorizedTables,
    RangeEncoder,
    StaticTables,
    SymbolDecoder,
    accepts,
    finish,
    probabilities,
    shortest_payload,
)
from latentserve.worker.runtime.manifest import FactorizedSpec, VQStaticSpec
from random_tables import SETTINGS, random_freqs, sample


def factorized(rng: np.random.Generator, c: int, h: int, w: int,
               kmax: int) -> tuple[FactorizedTables, np.ndarray]:
    sizes = rng.integers(1, kmax + 1, c)  # size 1: a channel that carries no information
    spec = FactorizedSpec(step=0.5, offsets=tuple(int(o) for o in rng.integers(-20, 5, c)),
                          freqs=tuple(tuple(random_freqs(rng, int(k))) for k in sizes))
    tables = FactorizedTables(spec, (c, h, w))
    n = int(rng.integers(1, 5))
    symbols = np.stack([np.stack([sample(rng, np.broadcast_to(p, (h, w, len(p)))) + spec.offsets[i]
                                  for i, p in enumerate(tables.probs)]) for _ in range(n)])
    return tables, symbols.astype(np.int32)


def mutations(payload: bytes, rng: np.random.Generator) -> list[bytes]:
    """Payloads near a valid one: extended, padded, cut, one byte changed."""
    out = [payload + b"\0", payload + bytes([int(rng.integers(1, 256))]), payload[:-1]]
    if payload:
        b = bytearray(payload)
        b[int(rng.integers(len(b)))] ^= 1 << int(rng.integers(8))
        out.append(bytes(b))
    return out


def reference_verdict(decode, encode, payload: bytes):  # type: ignore[no-untyped-def]
    """What the old codec did: decode, re-encode, compare -> symbols or None (refused)."""
    try:
        symbols = decode(payload)
    except CorruptCode:
        return None
    return symbols if encode(symbols) == payload else None


def check_plain_decode(tables, reference_decode, payload: bytes) -> None:  # type: ignore[no-untyped-def]
    """The serving decoder (no re-encode, docs/code-format.md "What a decoder accepts"):
    a zero-ended payload is refused; any other gives exactly the reference decoder's
    symbols (or its refusal), and those symbols' final interval holds the payload."""
    got = tables.decode_batch([payload])[0]
    if payload.endswith(b"\0"):
        assert isinstance(got, CorruptCode) and "zero byte" in str(got)
        return
    try:
        want = reference_decode(payload)
    except CorruptCode:
        assert isinstance(got, CorruptCode)
        return
    assert isinstance(got, np.ndarray) and got.dtype == np.int32 and np.array_equal(got, want)
    assert accepts(tables.encoder_for(got), payload) is not False


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), c=st.integers(1, 6), h=st.integers(1, 6),
       w=st.integers(1, 6), kmax=st.integers(1, 40))
def test_factorized_fast_equals_reference(seed: int, c: int, h: int, w: int, kmax: int) -> None:
    rng = np.random.default_rng(seed)
    tables, symbols = factorized(rng, c, h, w, kmax)
    fast = tables.encode_batch(symbols)
    assert fast == [ref.factorized_encode(tables, s) for s in symbols]
    decoded = tables.decode_batch(fast, canonical=True)
    for s, d in zip(symbols, decoded, strict=True):
        assert isinstance(d, np.ndarray) and d.dtype == np.int32 and np.array_equal(d, s)
    for payload in fast:
        for bad in mutations(payload, rng):
            want = reference_verdict(lambda p: ref.factorized_decode(tables, p),
                                     lambda s: ref.factorized_encode(tables, s), bad)
            got = tables.decode_batch([bad], canonical=True)[0]
            if want is None:
                assert isinstance(got, CorruptCode)
            else:
                assert isinstance(got, np.ndarray) and np.array_equal(got, want)
            check_plain_decode(tables, lambda p: ref.factorized_decode(tables, p), bad)


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), h=st.integers(1, 8), w=st.integers(1, 8),
       k=st.integers(1, 300), n=st.integers(1, 4))
def test_static_fast_equals_reference(seed: int, h: int, w: int, k: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    spec = VQStaticSpec(num_codes=k, freqs=tuple(tuple(random_freqs(rng, k)) for _ in range(h * w)))
    tables = StaticTables(spec, (h, w))
    symbols = sample(rng, np.broadcast_to(tables.probs, (n, *tables.probs.shape)))
    symbols = symbols.reshape(n, h, w).astype(np.int32)
    fast = tables.encode_batch(symbols)
    assert fast == [ref.static_encode(tables, s) for s in symbols]
    for s, d in zip(symbols, tables.decode_batch(fast, canonical=True), strict=True):
        assert isinstance(d, np.ndarray) and np.array_equal(d, s)
    for payload in fast:
        for bad in mutations(payload, rng):
            want = reference_verdict(lambda p: ref.static_decode(tables, p),
                                     lambda s: ref.static_encode(tables, s), bad)
            got = tables.decode_batch([bad], canonical=True)[0]
            assert (isinstance(got, CorruptCode) if want is None
                    else np.array_equal(got, want))  # type: ignore[arg-type]
            check_plain_decode(tables, lambda p: ref.static_decode(tables, p), bad)


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 60), k=st.integers(2, 300),
       offset=st.integers(0, 15))
def test_prior_payload_fast_equals_reference(seed: int, n: int, k: int, offset: int) -> None:
    rng = np.random.default_rng(seed)
    tables = probabilities(np.maximum(1, (rng.pareto(0.7, (n, k)) * 50).astype(np.int64)))
    symbols = sample(rng, tables).astype(np.int32)
    assert prior_payload(offset, symbols, tables) == ref.prior_payload(offset, symbols, tables)


@settings(max_examples=400, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 200), k=st.integers(2, 400),
       skew=st.floats(0.3, 8.0))
def test_closed_form_payload_equals_bisection_and_decodes(seed: int, n: int, k: int,
                                                          skew: float) -> None:
    """The closed form cuts where the bisection did, and (the argument that replaced the
    decode check) every such payload decodes to the message."""
    rng = np.random.default_rng(seed)
    probs = probabilities(np.maximum(1, (rng.random((n, k)) ** skew * 2**20).astype(np.int64)))
    symbols = sample(rng, probs).astype(np.int32)
    coder = RangeEncoder()
    if n:
        coder.encode(symbols, FAMILY, probs)
    if coder.is_empty():
        assert finish(coder) == b""
        return
    assert shortest_payload(coder) == ref.shortest_payload_bisect(coder)
    payload = finish(coder)
    assert np.array_equal(SymbolDecoder(payload).decode(probs), symbols)
    checked = ref.ReferenceEncoder()
    checked.encode(symbols, probs)
    assert checked.payload() == payload
