"""Entropy coding of integer symbols with constriction's range coder.

Every probability table is derived from integers only (manifest frequencies, or the
vq_prior look-up table applied to quantised logits) and turned into float64 by one
exact division ``freq / sum(freqs)``, so every machine hands constriction bit-identical
floats and gets bit-identical codes. Three table sources, one per code kind:

1. ``FactorizedTables``: quantised ae/vae latents (C, h, w), one table per channel.
2. ``StaticTables``: VQ indices (h, w), one table per grid position.
3. ``prior_tables``: VQ indices under the autoregressive prior; logits become
   integer weights ``lut[min(max(q) - q, len(lut) - 1)]`` with
   ``q = rint(logit * scale + offset / 16)``, and a margin that says how far the logits
   sit from a rounding boundary (the codec picks a per-image offset that keeps it >= guard).

A payload is the shortest big-endian byte string that constriction's decoder, which
reads zeros past the end, decodes to the message (``shortest_payload``): the sealed
uint32 words cut to the fewest bytes that still point into the coder's final interval.
"""

from __future__ import annotations

import copy
import functools
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol, cast

import constriction
import numpy as np

from latentserve.errors import CorruptCode, InvalidInput, ModelIntegrityError
from latentserve.worker.codec.cut import shortest, shortest_batch
from latentserve.worker.codec.lockstep import MIN_BATCH as LOCKSTEP_MIN_BATCH
from latentserve.worker.codec.lockstep import LockstepCoder, quantised
from latentserve.worker.runtime.manifest import FactorizedSpec, VQPriorSpec, VQStaticSpec

# perfect=False: fast table construction; encoder and decoder must agree on it, and it
# is part of the code format (changing it changes every payload).
FAMILY = constriction.stream.model.Categorical(perfect=False)
# constriction's submodules live inside its extension module: not importable by path.
RangeEncoder = constriction.stream.queue.RangeEncoder
RangeDecoder = constriction.stream.queue.RangeDecoder


class EncoderState(Protocol):
    """What ``finish`` reads of a RangeEncoder (constriction ships no types)."""

    def is_empty(self) -> bool: ...
    def get_compressed(self) -> np.ndarray: ...  # uint32 words
    def pos(self) -> tuple[int, tuple[int, int]]: ...  # (words emitted, (lower, range))


def probabilities(freqs: np.ndarray) -> np.ndarray:
    """Integer frequencies (..., K), all >= 1, -> float64 probabilities by exact division.

    int64 / int64 is computed as float64(freq) / float64(sum): both are exact below 2**53
    and IEEE division is correctly rounded, so the result is the same everywhere.
    """
    freqs = np.asarray(freqs)
    if freqs.dtype.kind not in "iu":
        raise TypeError(f"frequencies must be integers, got {freqs.dtype}")
    freqs = freqs.astype(np.int64)
    total = freqs.sum(axis=-1, keepdims=True)
    if np.any(freqs < 0) or np.any(total >= 2**53) or np.any(total <= 0):
        raise ModelIntegrityError("integer frequencies must be >= 0, with 0 < sum < 2**53")
    probs: np.ndarray = freqs / total
    return probs


# -- words <-> bytes ------------------------------------------------------------------

def words_to_bytes(words: np.ndarray) -> bytes:
    """uint32 words -> big-endian bytes with the trailing zero bytes trimmed."""
    return np.asarray(words, np.uint32).astype(">u4").tobytes().rstrip(b"\0")


def bytes_to_words(payload: bytes) -> np.ndarray:
    """Inverse of ``words_to_bytes``: zero-pad to whole words, read big-endian."""
    padded = payload + _ZEROS[-len(payload) % 4]
    return np.frombuffer(padded, ">u4").astype(np.uint32)


def batch_words(payloads: Sequence[bytes]) -> list[np.ndarray]:
    """``bytes_to_words`` of every payload, converted in one pass: one join and one
    byte swap for the batch, each result a view into the shared array."""
    padded = [p + _ZEROS[-len(p) % 4] for p in payloads]
    words = np.frombuffer(b"".join(padded), ">u4").astype(np.uint32)
    ends = np.cumsum([len(p) >> 2 for p in padded]).tolist()
    return [words[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]


_ZEROS = (b"", b"\0", b"\0\0", b"\0\0\0")


# -- coding under per-symbol tables ---------------------------------------------------

class SymbolEncoder:
    """Appends symbols under per-symbol probability tables; ``payload()`` seals the message."""

    def __init__(self) -> None:
        self._coder = RangeEncoder()

    def encode(self, symbols: np.ndarray, probs: np.ndarray) -> None:
        """Code ``symbols[i]`` (in [0, K)) under ``probs[i]`` (shape (n, K), float64)."""
        symbols = np.ascontiguousarray(symbols, np.int32).reshape(-1)
        if len(symbols) == 0:
            return
        k = probs.shape[-1]
        if k == 1:  # a one-symbol alphabet carries no information (and constriction refuses it)
            return
        probs = np.ascontiguousarray(probs, np.float64)
        self._coder.encode(symbols, FAMILY, probs)

    def payload(self) -> bytes:
        """The shortest bytes that decode to the message (see ``shortest_payload``)."""
        return finish(self._coder)


def finish(coder: EncoderState) -> bytes:
    """A finished coder's payload: the shortest bytes in its final interval.

    Not checked by decoding: every point of the final interval decodes to the message
    (the decoder recomputes the encoder's nested sub-intervals from the same integer
    state; a point in the last one lies in all of them), and the zero-padded payload is
    such a point by construction. Tests decode every payload of the reference path
    (``entropy_reference``) to confirm it. The sealed words, used when the closed form
    does not apply, always decode (tested).
    """
    if coder.is_empty():
        return b""
    short = shortest_payload(coder)
    return short if short is not None else words_to_bytes(coder.get_compressed())


def finish_batch(coders: Sequence[EncoderState]) -> list[bytes]:
    """``[finish(c) for c in coders]``, byte for byte, the cut done over the whole batch
    at once (``cut.shortest_batch``). An empty coder's state (0 words, lower 0) cuts to
    b"", as ``finish`` gives it (tested)."""
    out = shortest_batch([c.pos() for c in coders], [c.get_compressed() for c in coders])
    if None in out:  # the sealed words, as ``finish`` keeps them
        for i, payload in enumerate(out):
            if payload is None:
                out[i] = finish(coders[i])
    return cast(list[bytes], out)


def shortest_payload(coder: EncoderState) -> bytes | None:
    """The shortest big-endian byte string whose value, zero-padded, lies in the coder's
    final interval: it decodes exactly like the sealed words, 1.7 bytes shorter on average.

    ``coder.pos()`` gives the words emitted so far and the 64-bit state (lower, range)
    that follows them; ``cut.shortest`` is the closed form (None when the sealed stream
    does not fit its picture: the caller then keeps the words).
    ``entropy_reference.shortest_payload_bisect`` is the bisection it replaced.
    """
    return shortest(coder.pos(), coder.get_compressed())


_LOW64 = (1 << 64) - 1


def accepts(coder: EncoderState, payload: bytes) -> bool | None:
    """Whether a decoder reads ``payload`` as the message the finished ``coder`` holds:
    its first 4n bytes (n = the words the state spans after the last symbol; later bytes
    are never read), zero-padded, as a big-endian integer, lie in the final interval.
    None where the closed form does not apply (as ``shortest_payload``). The rule
    decoders follow (docs/code-format.md, "What a decoder accepts"), for tests."""
    position, (lower, width) = coder.pos()
    words = coder.get_compressed()
    n = position + 2
    if n < len(words):
        return None
    x = int.from_bytes(words[::-1].tobytes(), "little") << (32 * (n - len(words)))
    d = ((x & _LOW64) - lower) & _LOW64
    if d >= width:
        return None
    value = int.from_bytes(payload[:4 * n].ljust(4 * n, b"\0"), "big")
    return x - d <= value < x - d + width


class SymbolDecoder:
    """Reads symbols back from a payload written by ``SymbolEncoder``."""

    def __init__(self, payload: bytes) -> None:
        self._coder = RangeDecoder(bytes_to_words(payload))

    def decode(self, probs: np.ndarray) -> np.ndarray:
        """Decode ``len(probs)`` symbols, one per row of ``probs`` (n, K); int32 in [0, K)."""
        n, k = probs.shape
        if n == 0 or k == 1:
            return np.zeros(n, np.int32)
        try:
            out = self._coder.decode(FAMILY, np.ascontiguousarray(probs, np.float64))
        except BaseException as exc:
            raise decode_error(exc) from None
        return np.asarray(out, np.int32)


def cross_entropy_bits(symbols: np.ndarray, probs: np.ndarray) -> float:
    """The model's own cost of ``symbols`` under ``probs`` (n, K): -sum log2 p, in bits."""
    symbols = np.asarray(symbols, np.int64).reshape(-1)
    p = probs[np.arange(len(symbols)), symbols]
    return float(-np.log2(p).sum())


# -- fixed tables: one constriction model per table, built once ------------------------

def fixed_model(probs: np.ndarray) -> constriction.stream.model.Categorical | None:
    """The model constriction builds from one table row (None for a one-entry table,
    which carries no information). Same quantisation as the per-symbol family call
    (both use Categorical(perfect=False) on the same float64s): the same bytes (tested)."""
    return None if len(probs) == 1 else constriction.stream.model.Categorical(probs, perfect=False)


def not_canonical() -> CorruptCode:
    """The refusal of a payload that decodes but is not what the encoder writes."""
    return CorruptCode("the payload is not the one the encoder writes for the symbols it "
                       "decodes to: the bytes were changed (extended, truncated or corrupted)")


def zero_ended() -> CorruptCode:
    """The refusal of a payload that ends in a zero byte: the encoder never writes one
    (its payloads are cut after their last non-zero byte), so the bytes were extended."""
    return CorruptCode("the payload ends in a zero byte, which the encoder never writes: "
                       "the bytes were changed (extended or corrupted)")


def invalid_data() -> CorruptCode:
    """The refusal of a payload that constriction's decoder would refuse: at some symbol
    the payload's point lies outside the coder's interval (``lockstep``'s decoder)."""
    return CorruptCode("the payload does not decode (invalid data: it points outside "
                       "the range coder's interval)")


def decode_error(exc: BaseException) -> CorruptCode:
    """The CodeError for whatever constriction raised on invalid data."""
    # Invalid data raises AssertionError; a Rust panic would surface as pyo3's
    # PanicException, a BaseException: neither may take the process down.
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        raise exc
    return CorruptCode(f"the payload does not decode ({type(exc).__name__}: {exc})")


# -- kind 1: factorized ---------------------------------------------------------------

def per_payload(stacked: np.ndarray, errors: dict[int, CorruptCode]
                ) -> list[np.ndarray | CorruptCode]:
    """A stacked decode as one entry per payload: its row, or the refusal at its index."""
    out: list[np.ndarray | CorruptCode] = list(stacked)
    for i, exc in errors.items():
        out[i] = exc
    return out


class FactorizedTables:
    """Per-channel integer tables for quantised latents of shape (C, h, w).

    Each channel's symbols are i.i.d. under one fixed model (built once), so an image
    costs one coder call per channel; ``entropy_reference`` keeps the per-symbol path.
    """

    def __init__(self, spec: FactorizedSpec, latent_shape: Sequence[int]) -> None:
        if len(latent_shape) != 3:
            raise ModelIntegrityError(
                f"factorized codes need a (C, h, w) latent, the manifest says "
                f"{tuple(latent_shape)}")
        self.shape = tuple(int(s) for s in latent_shape)
        self.offsets = np.array(spec.offsets, np.int64)
        self.sizes = np.array([len(f) for f in spec.freqs], np.int64)
        self.probs = [probabilities(np.array(f, np.int64)) for f in spec.freqs]
        self._all_models = [fixed_model(p) for p in self.probs]
        self._coded = [(c, m) for c, m in enumerate(self._all_models) if m is not None]
        self._offsets32 = self.offsets.astype(np.int32).reshape(1, -1, 1)

    def for_shape(self, latent_shape: Sequence[int]) -> FactorizedTables:
        """The same tables (and constriction models, shared) for another grid (C, h, w):
        an any-size model's codes each have their own."""
        shape = tuple(int(s) for s in latent_shape)
        if shape == self.shape:
            return self
        if len(shape) != 3 or shape[0] != self.shape[0]:
            raise ModelIntegrityError(f"factorized tables of {self.shape[0]} channels cannot "
                                      f"code a latent of shape {shape}")
        other = copy.copy(self)
        other.shape = shape
        return other

    def check(self, symbols: np.ndarray) -> None:
        """Raise InvalidInput unless every symbol lies on its channel's table support
        (``symbols``: one image (C, h, w) or a batch (N, C, h, w))."""
        rel = symbols.astype(np.int64) - self.offsets.reshape(-1, 1, 1)
        bad = (rel < 0) | (rel >= self.sizes.reshape(-1, 1, 1))
        if bad.any():
            c = int(np.argwhere(bad)[0][-3])
            lo, hi = int(self.offsets[c]), int(self.offsets[c] + self.sizes[c] - 1)
            values = symbols[..., c, :, :][bad[..., c, :, :]]
            raise InvalidInput(f"factorized symbols of channel {c} must lie in [{lo}, {hi}]; "
                               f"got values {sorted(set(values.tolist()))[:5]}")

    def encode(self, symbols: np.ndarray) -> bytes:
        """One image's symbols (C, h, w) -> payload; channels in order, raster within each."""
        return self.encode_batch(symbols[None])[0]

    def encode_batch(self, symbols: np.ndarray) -> list[bytes]:
        """Images (N, C, h, w), checked -> one payload each."""
        n, c, hw = len(symbols), self.shape[0], self.shape[1] * self.shape[2]
        models = [model for _, model in self._coded]
        m = len(models)
        if m == 0:  # no channel carries information: every payload is empty
            return [b""] * n
        rel = symbols.reshape(n, c, hw) - self._offsets32
        if m < c:
            rel = rel[:, [ch for ch, _ in self._coded]]
        # Every coded channel of every image as one list of row views, made in one go;
        # per image, map runs its coder calls from C (cheaper than a Python loop, or than
        # iterating the array), and a zero-length deque consumes it.
        rows = list(np.ascontiguousarray(rel, np.int32).reshape(n * m, hw))
        coders = []
        for i in range(0, n * m, m):
            coder = RangeEncoder()
            deque(map(coder.encode, rows[i:i + m], models), 0)
            coders.append(coder)
        return finish_batch(coders)

    def encode_into(self, coder: constriction.stream.queue.RangeEncoder,
                    symbols: np.ndarray) -> None:
        """Append one image's symbols (C, h, w) to a running coder (kind 5 codes its z
        this way, between the offset and y)."""
        rel = np.ascontiguousarray(symbols.reshape(self.shape[0], -1)
                                   - self._offsets32[0], np.int32)
        for ch, model in self._coded:
            coder.encode(rel[ch], model)

    def encoder_for(self, symbols: np.ndarray) -> constriction.stream.queue.RangeEncoder:
        """A coder holding one image's symbols (C, h, w), unfinished (for ``accepts``)."""
        coder = RangeEncoder()
        self.encode_into(coder, symbols)
        return coder

    def decode_from(self, coder: constriction.stream.queue.RangeDecoder) -> np.ndarray:
        """Read one image's symbols (C, h, w) from a running decoder (the inverse of
        ``encode_into``); raises what constriction raises on invalid data."""
        hw = self.shape[1] * self.shape[2]
        parts = [np.zeros(hw, np.int32) if m is None else coder.decode(m, hw)
                 for m in self._all_models]
        out = np.concatenate(parts).astype(np.int32)
        out += np.repeat(self.offsets.astype(np.int32), hw)
        return out.reshape(self.shape)

    def decode(self, payload: bytes) -> np.ndarray:
        """Payload -> symbols (C, h, w); CorruptCode when it does not decode."""
        out = self.decode_batch([payload])[0]
        if isinstance(out, CorruptCode):
            raise out
        return out

    def decode_batch(self, payloads: Sequence[bytes], *,
                     canonical: bool = False) -> list[np.ndarray | CorruptCode]:
        """Per payload its symbols (C, h, w), or the CorruptCode that refused it.

        Every payload whose zero-padded value lies in its symbols' final interval
        decodes (docs/code-format.md, "What a decoder accepts"). ``canonical``: also
        refuse a payload that is not the one ``encode`` writes for the symbols it decodes
        to (re-encoded: a check's cost, used where the encoder's output is verified).
        """
        return per_payload(*self.decode_stacked(payloads, canonical=canonical))

    def decode_stacked(self, payloads: Sequence[bytes], *, canonical: bool = False
                       ) -> tuple[np.ndarray, dict[int, CorruptCode]]:
        """``decode_batch`` as one int32 array (N, C, h, w) (rows of refused payloads
        hold the table offsets) and the refusals by index."""
        c, hw = self.shape[0], self.shape[1] * self.shape[2]
        coded = [m for _, m in self._coded]
        n = len(payloads)
        # Every image's decoded channels go into one list, joined by one concatenate: per
        # image only the coder calls themselves run in Python.
        parts: list[np.ndarray] = []
        errors: dict[int, CorruptCode] = {}
        filler = [np.zeros(hw, np.int32)] * len(coded)
        for i, words in enumerate(batch_words(payloads)):
            if payloads[i].endswith(b"\0"):
                errors[i] = zero_ended()
                parts.extend(filler)
                continue
            dec = RangeDecoder(words).decode
            try:
                parts.extend([dec(m, hw) for m in coded])
            except BaseException as exc:  # the list comprehension added nothing
                errors[i] = decode_error(exc)
                parts.extend(filler)
        rel = (np.concatenate(parts).astype(np.int32, copy=False).reshape(n, len(coded), hw)
               if parts else np.zeros((n, len(coded), hw), np.int32))
        if canonical:
            for i in range(n):
                if i not in errors:
                    again = RangeEncoder()
                    for k, m in enumerate(coded):
                        again.encode(rel[i, k], m)
                    if finish(again) != payloads[i]:
                        errors[i] = not_canonical()
        if len(coded) == c:
            out = rel
        else:  # channels with a one-entry table carry no information: their symbol is 0
            out = np.zeros((n, c, hw), np.int32)
            out[:, [k for k, _ in self._coded]] = rel
        out += self._offsets32
        return out.reshape(n, *self.shape), errors

    def cross_entropy_bits(self, symbols: np.ndarray) -> float:
        hw = self.shape[1] * self.shape[2]
        return sum(cross_entropy_bits(symbols[c].reshape(-1) - self.offsets[c],
                                      np.broadcast_to(p, (hw, len(p))))
                   for c, p in enumerate(self.probs))


# -- kind 2: vq_static ----------------------------------------------------------------

class StaticTables:
    """One integer table per grid position for VQ indices of shape (h, w).

    One fixed model per position, built once; a symbol is one coder call under its
    position's model (far cheaper than rebuilding a K-entry model per symbol).
    """

    def __init__(self, spec: VQStaticSpec, latent_shape: Sequence[int]) -> None:
        self.shape = tuple(int(s) for s in latent_shape)
        positions = int(np.prod(self.shape))
        if len(spec.freqs) != positions or any(len(f) != spec.num_codes for f in spec.freqs):
            raise ModelIntegrityError(
                f"vq_static tables must be {positions} rows of {spec.num_codes} frequencies "
                f"(one per grid position {self.shape}); got {len(spec.freqs)} rows")
        self.num_codes = spec.num_codes
        self.probs = probabilities(np.array(spec.freqs, np.int64))
        self._models = [fixed_model(p) for p in self.probs]
        self._lockstep: LockstepCoder | None = None  # built on the first large batch

    def lockstep(self) -> LockstepCoder:
        """The batch encoder over these models' quantised tables (read from the models
        once: positions x K one-symbol coders, ~10 ms for 49 x 512)."""
        if self._lockstep is None:
            pairs = [quantised(m, self.num_codes, RangeEncoder) for m in self._models]
            self._lockstep = LockstepCoder(np.stack([c for c, _ in pairs]),
                                             np.stack([q for _, q in pairs]))
        return self._lockstep

    def check(self, symbols: np.ndarray) -> None:
        check_indices(symbols, self.num_codes)

    def encode(self, symbols: np.ndarray) -> bytes:
        """One image's indices (h, w) -> payload, raster order."""
        return self.encode_batch(symbols[None])[0]

    def encode_batch(self, symbols: np.ndarray) -> list[bytes]:
        """Indices (N, h, w), checked -> one payload each."""
        models = self._models
        if models and models[0] is None:  # a one-code codebook: nothing to code
            return [b""] * len(symbols)
        if len(symbols) >= LOCKSTEP_MIN_BATCH:  # every image's step p in one numpy call
            return self.lockstep().encode_batch(symbols.reshape(len(symbols), len(models)))
        coders = []
        for row in symbols.reshape(len(symbols), len(models)).tolist():
            coder = RangeEncoder()
            deque(map(coder.encode, row, models), 0)  # as in FactorizedTables.encode_batch
            coders.append(coder)
        return finish_batch(coders)

    def encoder_for(self, symbols: np.ndarray) -> constriction.stream.queue.RangeEncoder:
        """A coder holding one image's indices (h, w), unfinished (for ``accepts``)."""
        coder = RangeEncoder()
        for sym, model in zip(np.asarray(symbols).reshape(-1).tolist(), self._models,
                              strict=True):
            if model is not None:
                coder.encode(sym, model)
        return coder

    def decode(self, payload: bytes) -> np.ndarray:
        """Payload -> indices (h, w); CorruptCode when it does not decode."""
        out = self.decode_batch([payload])[0]
        if isinstance(out, CorruptCode):
            raise out
        return out

    def decode_batch(self, payloads: Sequence[bytes], *,
                     canonical: bool = False) -> list[np.ndarray | CorruptCode]:
        """Per payload its indices (h, w), or the CorruptCode that refused it
        (``canonical``: as in ``FactorizedTables.decode_batch``)."""
        return per_payload(*self.decode_stacked(payloads, canonical=canonical))

    def decode_stacked(self, payloads: Sequence[bytes], *, canonical: bool = False
                       ) -> tuple[np.ndarray, dict[int, CorruptCode]]:
        """``decode_batch`` as one int32 array (N, h, w) (rows of refused payloads zero)
        and the refusals by index."""
        models = self._models
        n, size = len(payloads), len(models)
        errors: dict[int, CorruptCode] = {}
        if models and models[0] is None:  # a one-code codebook: nothing is coded
            errors = {i: zero_ended() for i, p in enumerate(payloads) if p.endswith(b"\0")}
            if canonical:
                errors = {i: not_canonical() for i, p in enumerate(payloads) if p}
            return np.zeros((n, *self.shape), np.int32), errors
        if len(payloads) >= LOCKSTEP_MIN_BATCH:  # every payload's step p in one numpy call
            zero = [i for i, p in enumerate(payloads) if p.endswith(b"\0")]
            rows, refused = self.lockstep().decode_batch(payloads)
            out = rows.reshape(n, *self.shape)
            errors = {int(i): invalid_data() for i in np.flatnonzero(refused)}
            errors.update({i: zero_ended() for i in zero})
        else:
            out, errors = self._decode_each(payloads)
        if canonical:
            for i, row in enumerate(out.reshape(n, size).tolist()):
                if i not in errors:
                    again = RangeEncoder()
                    for sym, model in zip(row, models, strict=True):
                        again.encode(sym, model)
                    if finish(again) != payloads[i]:
                        errors[i] = not_canonical()
        for i in errors:
            out[i] = 0
        return out, errors

    def _decode_each(self, payloads: Sequence[bytes]
                     ) -> tuple[np.ndarray, dict[int, CorruptCode]]:
        """``decode_stacked`` through constriction's decoder, payload by payload."""
        models = self._models
        n, size = len(payloads), len(models)
        errors: dict[int, CorruptCode] = {}
        # One flat list of Python ints for the batch, one conversion at the end.
        flat: list[int] = []
        filler = [0] * size
        for i, words in enumerate(batch_words(payloads)):
            if payloads[i].endswith(b"\0"):
                errors[i] = zero_ended()
                flat.extend(filler)
                continue
            dec = RangeDecoder(words).decode
            try:
                flat.extend([dec(model) for model in models])
            except BaseException as exc:  # the list comprehension added nothing
                errors[i] = decode_error(exc)
                flat.extend(filler)
        return np.fromiter(flat, np.int32, len(flat)).reshape(n, *self.shape), errors

    def cross_entropy_bits(self, symbols: np.ndarray) -> float:
        return cross_entropy_bits(symbols.reshape(-1), self.probs)


def check_indices(symbols: np.ndarray, num_codes: int) -> None:
    """Raise InvalidInput unless every VQ index lies in [0, num_codes)."""
    bad = (symbols < 0) | (symbols >= num_codes)
    if bad.any():
        raise InvalidInput(f"VQ indices must lie in [0, {num_codes - 1}]; "
                           f"got {sorted(set(symbols[bad].tolist()))[:5]}")


# -- kinds 3 and 4: vq_prior, vq_parallel ---------------------------------------------
# Both code VQ indices under integer tables derived from a float prior's logits by the
# same rule (the offset, the guard, the check below); they differ only in the order the
# indices are coded in (raster, or the schedule's groups) and in how the prior is run.

def check_prior_spec(spec: VQPriorSpec) -> None:
    """Refuse a vq_prior spec whose integer tables could be degenerate."""
    if not (spec.logit_scale > 0 and np.isfinite(spec.logit_scale)):
        raise ModelIntegrityError(f"vq_prior logit_scale must be > 0, got {spec.logit_scale}")
    if not (0 < spec.guard < 0.5 / spec.logit_scale):
        raise ModelIntegrityError(
            f"vq_prior guard must lie in (0, 0.5 / logit_scale = {0.5 / spec.logit_scale}), "
            f"got {spec.guard}")
    if len(spec.lut) < 1 or min(spec.lut) < 1:
        raise ModelIntegrityError("vq_prior lut must be a non-empty list of integers >= 1")


# Kind 3 rounds ``logit * logit_scale + j / PRIOR_OFFSETS`` with a per-image offset j, the
# first one that keeps every table-shaping logit ``guard`` away from a rounding boundary.
# j is the payload's first symbol, under OFFSET_FREQS (halving: j = 0 costs 1 bit).
PRIOR_OFFSETS = 16
OFFSET_FREQS = np.array([2 ** (PRIOR_OFFSETS - 1 - j) for j in range(PRIOR_OFFSETS - 1)] + [1],
                        np.int64)
OFFSET_PROBS = probabilities(OFFSET_FREQS)[None]
# After the indices, kind 3 carries CHECK_BYTES of a CRC32 of (offset, indices), coded as
# uniform bytes: the decoder's proof that its float-derived tables were the encoder's
# (a wrong table passes with probability 2**-16; the header's CRC covers only the bytes).
CHECK_BYTES = 2
CHECK_PROBS = probabilities(np.ones((CHECK_BYTES, 256), np.int64))


def prior_check(offset: int, symbols: np.ndarray) -> np.ndarray:
    """The check symbols kind 3 appends: low CHECK_BYTES bytes of CRC32(offset, indices)."""
    crc = zlib.crc32(bytes([int(offset)]) + np.asarray(symbols, "<i4").tobytes())
    return np.array([(crc >> (8 * i)) & 0xFF for i in range(CHECK_BYTES)], np.int32)


def first_safe_offsets(n: int, attempt: Callable[[np.ndarray, int], np.ndarray]
                       ) -> np.ndarray:
    """Per image the first rounding offset j in 0..15 that ``attempt(todo, j)`` accepts,
    -1 where none does. ``attempt`` gets the indices of the images still without one and
    returns a bool mask over them (recording whatever it needs of the accepted ones):
    kind 3's and kind 5's encoders search the same way."""
    offsets = np.full(n, -1, np.int64)
    todo = np.arange(n)
    for j in range(PRIOR_OFFSETS):
        if len(todo) == 0:
            break
        ok = attempt(todo, j)
        offsets[todo[ok]] = j
        todo = todo[~ok]
    return offsets


def plan_offsets(logits: np.ndarray, spec: VQPriorSpec) -> tuple[np.ndarray, np.ndarray]:
    """The encoder's plan from teacher-forced logits (N, positions, K): per image the
    rounding offset (the first of 0..15 whose every table has margin >= guard; -1: none,
    the image is coded as kind 2) and its float64 tables (N, positions, K), uniform where
    the offset is -1."""
    weights = np.ones(logits.shape, np.int64)
    lut = _lut_tables(tuple(spec.lut))[0]  # indexed by min(d, len(lut))

    def attempt(todo: np.ndarray, j: int) -> np.ndarray:
        c, frac, finite = prior_quantize(logits[todo], spec, j)
        margin = prior_margin(c, frac, finite, spec, cap=spec.guard).min(axis=1)
        ok: np.ndarray = margin >= spec.guard
        weights[todo[ok]] = lut[c[ok]]
        return ok

    offsets = first_safe_offsets(len(logits), attempt)
    return offsets, probabilities(weights)


def prior_tables(logits: np.ndarray, spec: VQPriorSpec,
                 offset: np.ndarray | int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits (..., K) -> (float64 probabilities (..., K), margin (...)); see prior_weights."""
    weights, margin = prior_weights(logits, spec, offset)
    return probabilities(weights), margin


def prior_weights(logits: np.ndarray, spec: VQPriorSpec, offset: np.ndarray | int = 0, *,
                  cap: float = np.inf) -> tuple[np.ndarray, np.ndarray]:
    """Logits (..., K) -> (int64 weights (..., K), margin (...)).

    q = rint(logit * logit_scale + offset / PRIOR_OFFSETS) (``offset``: an int, or ints
    shaped like ``logits.shape[:-1]``), d = max(q) - q, weight = lut[min(d, len(lut) - 1)].
    ``margin`` is, per table, the smallest distance (in logit units) from a logit to a
    rounding boundary whose crossing would change a weight, or ``cap`` where that is
    larger. Float noise smaller than the margin cannot change the table.
    """
    c, frac, finite = prior_quantize(logits, spec, offset)
    return _lut_tables(tuple(spec.lut))[0][c], prior_margin(c, frac, finite, spec, cap=cap)


def prior_quantize(logits: np.ndarray, spec: VQPriorSpec,
                   offset: np.ndarray | int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The integer part of ``prior_weights``: (c = min(d, len(lut)) as intp, the rounding
    fractions x - q in [-0.5, 0.5], whether each table's logits are all finite)."""
    shift = np.asarray(offset, np.float64) / PRIOR_OFFSETS  # exact: a dyadic fraction
    x = np.asarray(logits, np.float64) * spec.logit_scale
    x += shift[..., None]
    # logits are (..., K) with at least one table axis: one flag per table, an array
    finite = cast(np.ndarray, np.isfinite(x).all(axis=-1))
    if not finite.all():  # a table with a NaN/inf logit gets margin 0
        x[~finite] = 0.0
    q = np.rint(x)
    d: np.ndarray = q.max(axis=-1, keepdims=True) - q
    np.minimum(d, len(spec.lut), out=d)
    x -= q
    return d.astype(np.intp), x, finite


def prior_margin(c: np.ndarray, frac: np.ndarray, finite: np.ndarray, spec: VQPriorSpec, *,
                 cap: float = np.inf) -> np.ndarray:
    """Per table, min(cap, the margin) from ``prior_quantize``'s output (see prior_weights)."""
    _, up_of, down_of = _lut_tables(tuple(spec.lut))
    # Only tables with a logit within cap of a boundary need the exact (slower) rule.
    near = (np.abs(frac) > 0.5 - cap * spec.logit_scale).any(axis=-1)
    margin = np.full(near.shape, float(cap))
    if near.any():
        cn, fn = c[near], frac[near]
        above = np.where(up_of[cn], 0.5 - fn, np.inf)  # 0.5 - frac to the boundary above
        below = np.where(down_of[cn], 0.5 + fn, np.inf)  # 0.5 + frac to the one below
        margin[near] = np.minimum(np.minimum(above, below).min(axis=-1) / spec.logit_scale,
                                  cap)
    return np.where(finite, margin, 0.0)


@functools.lru_cache(maxsize=16)
def _lut_tables(lut: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indexed by c = min(d, len(lut)): the weight, and whether moving to d - 1 (up) or
    d + 1 (down) changes it. Noise below the margin moves a logit across at most one
    boundary; only moves that change a weight count: any move of a maximal logit (it
    shifts the others' d, or leaves a tie), and a move to a neighbour whose weight differs
    (so d = len(lut) - 1 counts upwards only, and the clamped tail not at all)."""
    n = len(lut)
    weight = np.array(lut + (lut[-1],), np.int64)  # c = n: clamped (d >= n)
    up = np.ones(n + 1, bool)
    down = np.ones(n + 1, bool)
    up[1:] = weight[:-1] != weight[1:]
    down[:-1] = weight[1:] != weight[:-1]
    down[n] = False
    up[0] = down[0] = True
    return weight, up, down
