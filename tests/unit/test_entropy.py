"""worker/codec/entropy.py: exact round trips over random integer tables and shapes (hypothesis)."""

from __future__ import annotations

import math

import constriction
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from latentserve.errors import CorruptCode, InvalidInput, ModelIntegrityError
from latentserve.worker.codec.entropy import (
    FactorizedTables,
    StaticTables,
    SymbolDecoder,
    SymbolEncoder,
    bytes_to_words,
    check_prior_spec,
    cross_entropy_bits,
    prior_tables,
    prior_weights,
    probabilities,
    words_to_bytes,
)
from latentserve.worker.runtime.manifest import FactorizedSpec, VQPriorSpec, VQStaticSpec
from random_tables import SETTINGS, random_freqs, sample


def test_probabilities_are_exact_quotients() -> None:
    freqs = np.array([[1, 2, 3, 65530], [7, 7, 7, 7]], np.int64)
    p = probabilities(freqs)
    assert p.dtype == np.float64
    assert p[0, 0] == 1 / 65536 and p[0, 3] == 65530 / 65536 and p[1, 2] == 0.25
    with pytest.raises(TypeError):
        probabilities(np.array([0.5, 0.5]))


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), c=st.integers(1, 6), h=st.integers(1, 6),
       w=st.integers(1, 6), kmax=st.integers(1, 40))
def test_factorized_round_trip(seed: int, c: int, h: int, w: int, kmax: int) -> None:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, kmax + 1, c)  # size 1: a channel that carries no information
    spec = FactorizedSpec(step=0.5, offsets=tuple(int(o) for o in rng.integers(-20, 5, c)),
                          freqs=tuple(tuple(random_freqs(rng, int(k))) for k in sizes))
    tables = FactorizedTables(spec, (c, h, w))
    symbols = np.stack([sample(rng, np.broadcast_to(p, (h, w, len(p)))) + spec.offsets[i]
                        for i, p in enumerate(tables.probs)]).astype(np.int32)
    tables.check(symbols)
    payload = tables.encode(symbols)
    assert not payload.endswith(b"\0")
    assert np.array_equal(tables.decode(payload), symbols)
    bits = tables.cross_entropy_bits(symbols)
    # Range coder: at most a few bytes over the model's own cost.
    assert len(payload) * 8 <= bits + 64


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), h=st.integers(1, 8), w=st.integers(1, 8),
       k=st.integers(2, 300))
def test_static_round_trip(seed: int, h: int, w: int, k: int) -> None:
    rng = np.random.default_rng(seed)
    spec = VQStaticSpec(num_codes=k, freqs=tuple(tuple(random_freqs(rng, k)) for _ in range(h * w)))
    tables = StaticTables(spec, (h, w))
    symbols = sample(rng, tables.probs).reshape(h, w).astype(np.int32)
    payload = tables.encode(symbols)
    assert np.array_equal(tables.decode(payload), symbols)


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 60), k=st.integers(2, 256),
       scale=st.sampled_from([1.0, 2.0, 4.0]), lut_len=st.integers(1, 60))
def test_prior_tables_round_trip_and_noise_below_margin(seed: int, n: int, k: int, scale: float,
                                                        lut_len: int) -> None:
    rng = np.random.default_rng(seed)
    spec = VQPriorSpec(logit_scale=scale, guard=1e-4,
                       lut=tuple(max(1, round(65536 * math.exp(-d / scale)))
                                 for d in range(lut_len)))
    logits = (rng.standard_normal((n, k)) * rng.uniform(0.1, 8)).astype(np.float32)
    probs, margin = prior_tables(logits, spec)
    symbols = sample(rng, probs)
    enc = SymbolEncoder()
    enc.encode(symbols, probs)
    payload = enc.payload()
    assert np.array_equal(SymbolDecoder(payload).decode(probs), symbols)
    # A capped margin is the exact one, capped (what the encoder's offset search uses).
    _, capped = prior_weights(logits, spec, 3, cap=0.01)
    assert np.array_equal(capped, np.minimum(prior_weights(logits, spec, 3)[1], 0.01))
    # Noise strictly below each table's margin never changes the table.
    noise = rng.uniform(-1, 1, logits.shape) * margin[:, None] * 0.999
    noise = np.where(np.isfinite(noise), noise, rng.uniform(-0.1, 0.1, logits.shape))
    probs2, _ = prior_tables(logits.astype(np.float64) + noise, spec)
    assert np.array_equal(probs, probs2)


def test_prior_margin_is_distance_to_rounding_boundary() -> None:
    spec = VQPriorSpec(logit_scale=2.0, guard=1e-4, lut=(100, 50, 25, 1))
    # x = logit * 2: 6.0 (q 6, max) ; 5.2 (q 5, d 1); 4.74 (q 5, d 1); -10 (clamped, ignored)
    probs, margin = prior_tables(np.array([[3.0, 2.6, 2.37, -5.0]]), spec)
    assert margin[0] == pytest.approx((0.5 - 0.26) / 2)
    assert probs[0].tolist() == (np.array([100, 50, 50, 1]) / 201).tolist()
    # Only crossings that change a weight count. lut[3] is the last entry: d 3 <-> 4 is free.
    base = [3.0, 2.6]  # x 6.0 (max) and 5.2: 0.3 / 2 = 0.15 to the nearest crossing
    for extra, want in (
            (1.74, 0.01),   # x 3.48: d 3, 0.02 below the crossing up to d 2: counts
            (1.76, 0.01),   # x 3.52: d 2, 0.02 above the crossing down to d 3: counts
            (1.26, 0.15),   # x 2.52: d 3, 0.02 above the crossing down to d 4: free
            (1.24, 0.15)):  # x 2.48: d 4, 0.02 below the crossing up to d 3: free
        _, margin = prior_tables(np.array([base + [extra]]), spec)
        assert margin[0] == pytest.approx(want), extra
    # A NaN logit: margin 0 (never coded, refused on decode).
    _, margin = prior_tables(np.array([[np.nan, 1.0], [0.0, 1.0]]), spec)
    assert margin[0] == 0 and margin[1] > 0


def test_prior_spec_validation() -> None:
    check_prior_spec(VQPriorSpec(logit_scale=2.0, guard=2e-5, lut=(10, 1)))
    for bad in (VQPriorSpec(logit_scale=0.0, guard=1e-5, lut=(1,)),
                VQPriorSpec(logit_scale=2.0, guard=0.3, lut=(1,)),
                VQPriorSpec(logit_scale=2.0, guard=1e-5, lut=(5, 0))):
        with pytest.raises(ModelIntegrityError):
            check_prior_spec(bad)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=64))
def test_words_bytes_inverse(data: bytes) -> None:
    trimmed = data.rstrip(b"\0")
    assert words_to_bytes(bytes_to_words(trimmed)) == trimmed


def test_trimmed_payloads_always_decode() -> None:
    """The sealed words with trailing zero bytes trimmed (even whole zero words) always
    decode once re-padded with zeros: the fallback payload, and the reason it is sound."""
    rng = np.random.default_rng(0)
    trimmed_whole_word = 0
    for _ in range(3000):
        n, k = int(rng.integers(1, 30)), int(rng.integers(2, 20))
        probs = probabilities(rng.integers(1, 1000, (n, k)) ** 2)
        symbols = sample(rng, probs)
        coder = constriction.stream.queue.RangeEncoder()
        coder.encode(symbols.astype(np.int32), constriction.stream.model.Categorical(perfect=False),
                     probs)
        words = coder.get_compressed()
        full = words.astype(">u4").tobytes()
        payload = words_to_bytes(words)
        trimmed_whole_word += len(full) - len(payload) >= 4
        assert np.array_equal(SymbolDecoder(payload).decode(probs), symbols)
    assert trimmed_whole_word > 0  # the case that matters did occur


def decodes_to(payload: bytes, probs: np.ndarray, symbols: np.ndarray) -> bool:
    try:
        return np.array_equal(SymbolDecoder(payload).decode(probs), symbols)
    except CorruptCode:
        return False


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 80), k=st.integers(2, 300),
       skew=st.floats(0.3, 8.0))
def test_payload_is_the_shortest_string_that_decodes(seed: int, n: int, k: int,
                                                     skew: float) -> None:
    rng = np.random.default_rng(seed)
    probs = probabilities(np.maximum(1, (rng.random((n, k)) ** skew * 2**20).astype(np.int64)))
    symbols = sample(rng, probs)
    enc = SymbolEncoder()
    enc.encode(symbols, probs)
    payload = enc.payload()
    sealed = words_to_bytes(enc._coder.get_compressed())
    assert len(payload) <= len(sealed) and not payload.endswith(b"\0")
    assert decodes_to(payload, probs, symbols)
    if payload:
        # Every string one byte shorter lies below or above the final interval; the only
        # candidates are the floor and the ceiling of the payload at that length.
        head = int.from_bytes(payload[:-1], "big")
        shorter = [payload[:-1]]
        if head + 1 < 256 ** (len(payload) - 1):
            shorter.append((head + 1).to_bytes(len(payload) - 1, "big"))
        assert not any(decodes_to(c, probs, symbols) for c in shorter)


def test_garbage_payload_raises_corrupt_code_or_decodes_in_range() -> None:
    rng = np.random.default_rng(1)
    probs = probabilities(rng.integers(1, 100, (40, 50)))
    for _ in range(500):
        payload = rng.bytes(int(rng.integers(0, 20)))
        try:
            out = SymbolDecoder(payload).decode(probs)
        except CorruptCode:
            continue
        assert out.min() >= 0 and out.max() < 50


def test_factorized_check_names_the_channel() -> None:
    spec = FactorizedSpec(step=1.0, offsets=(-1, 0), freqs=((1, 2, 3), (4, 5)))
    tables = FactorizedTables(spec, (2, 1, 2))
    with pytest.raises(InvalidInput, match=r"channel 1 must lie in \[0, 1\]"):
        tables.check(np.array([[[0, 1]], [[2, 0]]]))


def test_cross_entropy_bits() -> None:
    probs = probabilities(np.array([[1, 3], [1, 1]]))
    assert cross_entropy_bits(np.array([1, 0]), probs) == pytest.approx(-math.log2(0.75) + 1)
