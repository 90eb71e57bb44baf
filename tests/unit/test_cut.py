"""The vectorised payload cut (``cut.shortest_batch``) gives exactly the scalar closed
form's bytes (``cut.shortest``): on real coders' states, on made-up states around every
boundary (borrows and carries across the 64-bit window, the empty payload, the sealed
words' fallback), and through the encoders' batch paths against the reference coder."""

from __future__ import annotations

from unittest.mock import patch

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from latentserve.worker.codec import cut
from latentserve.worker.codec import entropy_reference as ref
from latentserve.worker.codec.cut import State, shortest, shortest_batch
from latentserve.worker.codec.entropy import (
    FAMILY,
    FactorizedTables,
    RangeEncoder,
    StaticTables,
    SymbolDecoder,
    finish,
    finish_batch,
    probabilities,
    shortest_payload,
    words_to_bytes,
)
from latentserve.worker.runtime.manifest import FactorizedSpec, VQStaticSpec
from random_tables import SETTINGS, random_freqs, sample

LOW64 = (1 << 64) - 1


class FakeCoder:
    """An EncoderState with a chosen state and words (what ``finish`` reads)."""

    def __init__(self, state: State, words: list[int]) -> None:
        self.state, self.words = state, np.array(words, np.uint32)

    def is_empty(self) -> bool:
        return False

    def get_compressed(self) -> np.ndarray:
        return self.words

    def pos(self) -> State:
        return self.state


def window_low(position: int, words: list[int]) -> int:
    """X's last 64 bits for a state window of position + 2 words (zeros past the words)."""
    if len(words) > position + 2:
        return 0  # no such window: shortest gives None whatever lower is
    high, low = (words + [0] * (position + 2 - len(words)))[position:]
    return (high << 32) | low


@st.composite
def made_up_state(draw: st.DrawFn) -> tuple[State, list[int]]:
    """A state near the closed form's boundaries: words full of 0s and 0xFFFFFFFFs (long
    borrow and carry chains), a range of any bit length, lower at a chosen distance d
    below X's window (d >= range: the fallback; d > x: a borrow out of the window)."""
    position = draw(st.integers(0, 4))
    size = draw(st.integers(max(0, position - 1), position + 3))  # pad -1..2 and beyond
    word = st.one_of(st.sampled_from([0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]),
                     st.integers(0, 2**32 - 1))
    words = draw(st.lists(word, min_size=size, max_size=size))
    bits = draw(st.integers(1, 64))
    width = draw(st.integers(1 << (bits - 1), (1 << bits) - 1))
    if draw(st.booleans()):
        lower = draw(st.integers(0, LOW64))
    else:
        d = draw(st.one_of(st.integers(0, 3), st.integers(max(0, width - 3), width + 2),
                           st.integers(0, width)))
        lower = (window_low(position, words) - d) & LOW64
    return (position, (lower, width)), words


@SETTINGS
@given(batch=st.lists(made_up_state(), min_size=0, max_size=40))
def test_vectorised_cut_equals_scalar_on_made_up_states(
        batch: list[tuple[State, list[int]]]) -> None:
    states = [s for s, _ in batch]
    words = [np.array(w, np.uint32) for _, w in batch]
    want = [shortest(s, w) for s, w in zip(states, words, strict=True)]
    assert shortest_batch(states, words, min_batch=0) == want
    assert shortest_batch(states, words) == want  # small batches: the scalar form


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), count=st.integers(1, 40), k=st.integers(2, 300),
       skew=st.floats(0.3, 8.0))
def test_vectorised_cut_equals_scalar_on_real_coders(seed: int, count: int, k: int,
                                                     skew: float) -> None:
    """Coders of 0..60 symbols (0: an empty coder), cut together; every payload decodes."""
    rng = np.random.default_rng(seed)
    coders, messages = [], []
    for _ in range(count):
        n = int(rng.integers(0, 61))
        probs = probabilities(np.maximum(1, (rng.random((n, k)) ** skew * 2**20)
                                         .astype(np.int64)))
        symbols = sample(rng, probs).astype(np.int32)
        coder = RangeEncoder()
        if n:
            coder.encode(symbols, FAMILY, probs)
        coders.append(coder)
        messages.append((symbols, probs))
    states = [c.pos() for c in coders]
    words = [c.get_compressed() for c in coders]
    cut = shortest_batch(states, words, min_batch=0)
    assert cut == [shortest_payload(c) for c in coders]
    assert finish_batch(coders) == [finish(c) for c in coders]
    for payload, (symbols, probs) in zip(finish_batch(coders), messages, strict=True):
        assert np.array_equal(SymbolDecoder(payload).decode(probs), symbols)


def test_edge_cases_by_hand() -> None:
    # An empty coder: b"" from the cut, as finish gives it, alone and in a batch.
    empty = RangeEncoder()
    assert finish(empty) == b"" and shortest_payload(empty) == b""
    many = [RangeEncoder() for _ in range(cut.MIN_BATCH + 3)]
    many[5].encode(np.array([3, 1], np.int32), FAMILY, probabilities(np.ones((2, 7), np.int64)))
    assert finish_batch(many) == [finish(c) for c in many]
    # The cut rounds up at its last byte: X = 0x123456789ABCDEF0, the interval
    # [X - 5, X + 251): its shortest point is 0x123456789ABCDF00, 7 bytes ending 0xDF.
    state: State = (0, (0x123456789ABCDEF0 - 5, 256))
    words = np.array([0x12345678, 0x9ABCDEF0], np.uint32)
    want = bytes.fromhex("123456789abcdf")
    assert shortest(state, words) == want
    assert shortest_batch([state] * 3, [words] * 3, min_batch=0) == [want] * 3
    # The sealed words' fallback (d >= range: the words are not in the interval):
    # None from both forms, and finish_batch keeps the words, zero bytes trimmed.
    sealed = FakeCoder((1, (0xFFFF, 16)), [7, 0x100, 0])
    assert shortest(sealed.pos(), sealed.words) is None
    batch = [sealed] * (cut.MIN_BATCH + 1)
    assert finish_batch(batch) == [finish(sealed)] * len(batch) == [
        words_to_bytes(sealed.words)] * len(batch)
    assert finish(sealed) == bytes([0, 0, 0, 7, 0, 0, 1])


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), count=st.integers(1, 24), k=st.integers(1, 300))
def test_batch_encoders_equal_reference(seed: int, count: int, k: int) -> None:
    """The batch encoders, their cut vectorised at every batch size (the threshold set to
    1: a constant, not the coder), write the reference coder's bytes."""
    with patch.object(cut, "MIN_BATCH", 1):
        check_batch_encoders(seed, count, k)


def check_batch_encoders(seed: int, count: int, k: int) -> None:
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    spec = VQStaticSpec(num_codes=k, freqs=tuple(tuple(random_freqs(rng, k))
                                                 for _ in range(h * w)))
    static = StaticTables(spec, (h, w))
    symbols = sample(rng, np.broadcast_to(static.probs, (count, *static.probs.shape)))
    symbols = symbols.reshape(count, h, w).astype(np.int32)
    assert static.encode_batch(symbols) == [ref.static_encode(static, s) for s in symbols]
    c = int(rng.integers(1, 5))
    sizes = rng.integers(1, min(k, 40) + 1, c)  # size 1: a channel not coded
    fspec = FactorizedSpec(step=0.5, offsets=tuple(int(o) for o in rng.integers(-20, 5, c)),
                           freqs=tuple(tuple(random_freqs(rng, int(s))) for s in sizes))
    fact = FactorizedTables(fspec, (c, h, w))
    latents = np.stack([np.stack([sample(rng, np.broadcast_to(p, (h, w, len(p))))
                                  + fspec.offsets[i] for i, p in enumerate(fact.probs)])
                        for _ in range(count)]).astype(np.int32)
    assert fact.encode_batch(latents) == [ref.factorized_encode(fact, s) for s in latents]
