"""The lockstep batch encoder of kind 2 (worker/codec/lockstep.py) writes exactly the bytes
of constriction's per-image coder cut by ``entropy.finish`` and of the reference coder
(entropy_reference), carries and Python-integer cuts included."""

from __future__ import annotations

from collections import deque
from unittest.mock import patch

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from latentserve.worker.codec import entropy, lockstep
from latentserve.worker.codec import entropy_reference as ref
from latentserve.worker.codec.entropy import RangeEncoder, StaticTables, finish_batch
from latentserve.worker.runtime.manifest import VQStaticSpec
from random_tables import SETTINGS, random_freqs, sample


def per_image(tables: StaticTables, symbols: np.ndarray) -> list[bytes]:
    """What ``StaticTables.encode_batch`` wrote before lockstep: one coder per image."""
    coders = []
    for row in symbols.reshape(len(symbols), -1).tolist():
        coder = RangeEncoder()
        deque(map(coder.encode, row, tables._models), 0)
        coders.append(coder)
    return finish_batch(coders)


def static_tables(rng: np.random.Generator, positions: int, k: int,
                  skew: bool = False) -> StaticTables:
    if skew:  # one symbol near certain: long runs of tiny steps, many carries
        freqs = [[int(2 ** int(rng.integers(10, 23)))] + [1] * (k - 1)
                 for _ in range(positions)]
    else:
        freqs = [random_freqs(rng, k) for _ in range(positions)]
    spec = VQStaticSpec(num_codes=k, freqs=tuple(tuple(f) for f in freqs))
    return StaticTables(spec, (positions, 1))


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), positions=st.integers(1, 60), k=st.integers(2, 300),
       n=st.integers(1, 80), skew=st.booleans())
def test_lockstep_equals_per_image_coder_and_reference(seed: int, positions: int, k: int,
                                                        n: int, skew: bool) -> None:
    rng = np.random.default_rng(seed)
    tables = static_tables(rng, positions, k, skew)
    symbols = sample(rng, np.broadcast_to(tables.probs, (n, *tables.probs.shape)))
    symbols = symbols.reshape(n, positions, 1).astype(np.int32)
    with patch.object(entropy, "LOCKSTEP_MIN_BATCH", 1):  # lockstep at every batch size
        fast = tables.encode_batch(symbols)
    assert fast == per_image(tables, symbols)
    assert fast[:3] == [ref.static_encode(tables, s) for s in symbols[:3]]
    for s, d in zip(symbols, tables.decode_batch(fast), strict=True):
        assert isinstance(d, np.ndarray) and np.array_equal(d, s)


def test_carries_and_python_cuts_are_exercised_and_exact() -> None:
    """Tables that make many carries out of the 64-bit window and many final states the
    uint64 cut cannot decide: both go their own way, and the bytes stay the same."""
    seen = {"carry": 0, "slow": 0}
    carry, slow = lockstep._carry, lockstep._slow

    def counting_carry(words: np.ndarray, emitted: np.ndarray, at: np.ndarray) -> None:
        seen["carry"] += len(at)
        carry(words, emitted, at)

    def counting_slow(*args):  # type: ignore[no-untyped-def]
        seen["slow"] += 1
        return slow(*args)

    rng = np.random.default_rng(7)
    with patch.object(lockstep, "_carry", counting_carry), \
            patch.object(lockstep, "_slow", counting_slow):
        for trial in range(40):
            k = int(rng.integers(2, 6))
            freqs = rng.integers(1, 2 ** int(rng.integers(1, 24)), (int(rng.integers(1, 80)), k))
            spec = VQStaticSpec(num_codes=k, freqs=tuple(tuple(int(x) for x in f) for f in freqs))
            tables = StaticTables(spec, (len(freqs), 1))
            symbols = rng.integers(0, k, (200, len(freqs), 1)).astype(np.int32)
            assert tables.encode_batch(symbols) == per_image(tables, symbols), trial
    assert seen["carry"] > 100 and seen["slow"] > 10, seen


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(2, 600))
def test_quantised_tables_are_a_partition_of_the_precision(seed: int, k: int) -> None:
    """The pairs read from constriction tile [0, 2**24): cum increasing from 0, each
    probability >= 1, the last ending at 2**24."""
    rng = np.random.default_rng(seed)
    freqs = np.array(random_freqs(rng, k), np.int64)
    model = entropy.fixed_model(entropy.probabilities(freqs))
    cum, prob = lockstep.quantised(model, k, RangeEncoder)
    assert cum[0] == 0 and (prob >= 1).all()
    assert np.array_equal(cum[1:], cum[:-1] + prob[:-1])
    assert int(cum[-1] + prob[-1]) == 1 << lockstep.PRECISION


def test_small_batches_keep_the_per_image_coder() -> None:
    rng = np.random.default_rng(3)
    tables = static_tables(rng, 49, 64)
    symbols = rng.integers(0, 64, (lockstep.MIN_BATCH - 1, 49, 1)).astype(np.int32)
    assert tables.encode_batch(symbols) == per_image(tables, symbols)
    assert tables._lockstep is None  # not even built
    more = rng.integers(0, 64, (lockstep.MIN_BATCH, 49, 1)).astype(np.int32)
    assert tables.encode_batch(more) == per_image(tables, more)
    assert tables._lockstep is not None


def payloads_near(rng: np.random.Generator, payloads: list[bytes]) -> list[bytes]:
    """The payloads, then for each one a changed copy: a bit flipped, cut short, random
    bytes, all-0xFF bytes (refused at the first symbol), or zero-ended."""
    out = list(payloads)
    for p in payloads:
        b = bytearray(p)
        r = int(rng.integers(5))
        if r == 0 and b:
            b[int(rng.integers(len(b)))] ^= 1 << int(rng.integers(8))
        elif r == 1:
            b = b[:max(0, len(b) - int(rng.integers(1, 4)))]
        elif r == 2:
            b = bytearray(rng.integers(1, 256, int(rng.integers(1, 40))).astype(np.uint8))
        elif r == 3:
            b = bytearray(b"\xff" * int(rng.integers(5, 12)))
        else:
            b += b"\0"
        out.append(bytes(b))
    return out


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), positions=st.integers(1, 60), k=st.integers(2, 300),
       n=st.integers(1, 40), skew=st.booleans())
def test_lockstep_decoder_equals_constriction(seed: int, positions: int, k: int, n: int,
                                             skew: bool) -> None:
    """Valid and changed payloads: the same symbols where constriction decodes, a refusal
    (CorruptCode) exactly where it refuses, zero-ended payloads refused first."""
    rng = np.random.default_rng(seed)
    tables = static_tables(rng, positions, k, skew)
    symbols = sample(rng, np.broadcast_to(tables.probs, (n, *tables.probs.shape)))
    symbols = symbols.reshape(n, positions, 1).astype(np.int32)
    payloads = payloads_near(rng, tables.encode_batch(symbols))
    want, want_errors = tables._decode_each(payloads)
    with patch.object(entropy, "LOCKSTEP_MIN_BATCH", 1):
        got, errors = tables.decode_stacked(payloads)
    assert errors.keys() == want_errors.keys()
    for i, exc in errors.items():
        assert type(exc) is type(want_errors[i])
        assert ("zero byte" in str(exc)) == ("zero byte" in str(want_errors[i]))
    want[list(want_errors)] = 0
    assert got.dtype == np.int32 and np.array_equal(got, want)
    assert np.array_equal(got[:n], symbols)


def test_a_payload_off_the_first_interval_is_refused_in_both_paths() -> None:
    """0xFF... points above (2**40 - 1) << 24, past every table's top at the first
    symbol: constriction raises there, lockstep flags the same row."""
    rng = np.random.default_rng(5)
    tables = static_tables(rng, 49, 64)
    good = tables.encode_batch(rng.integers(0, 64, (40, 49, 1)).astype(np.int32))
    payloads = [*good, b"\xff" * 8, b"\xff" * 5]
    _, want = tables._decode_each(payloads)
    _, got = tables.decode_stacked(payloads)
    assert sorted(want) == sorted(got) == [40, 41]
    assert "does not decode" in str(got[40])


def test_long_payloads_cost_their_read_words_only() -> None:
    """Bytes past the words a decoder can read change nothing (constriction reads
    lazily): a payload with a megabyte appended decodes as without it, in a batch."""
    rng = np.random.default_rng(9)
    tables = static_tables(rng, 49, 64)
    symbols = rng.integers(0, 64, (40, 49, 1)).astype(np.int32)
    payloads = tables.encode_batch(symbols)
    payloads[3] += b"\x07" * (1 << 20)
    want, want_errors = tables._decode_each(payloads)
    got, errors = tables.decode_stacked(payloads)
    assert not errors and not want_errors
    assert np.array_equal(got, want) and np.array_equal(got, symbols)
