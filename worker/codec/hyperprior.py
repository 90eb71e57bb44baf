"""Code kind 5 (hyperprior, Balle 2018): which Gaussian table codes each latent symbol.

A hyperprior model's hyper-decoder gives one float scale per latent element. The scale
picks one of ``levels`` fixed integer tables (discretised N(0, s_i^2), frozen in the
manifest at export, CompressAI's scale table ``exp(linspace(log 0.11, log 256, 64))``
as the reference) by a quantised index; the tables are integers, so only the index
derivation sees floats, and it is guarded like kind 3's logits:

    u = (ln s - ln s_min) / delta,  delta = (ln s_max - ln s_min) / (levels - 1)
    index = clip(ceil(u - j / 16), 0, levels - 1)        (j = 0: CompressAI's rule,
                                                         the smallest s_i >= s)

with a per-image offset j in 0..15. The boundaries that change an index are the
integers 0..levels-2 of ``u - j / 16``; the margin of an element is its distance to the
nearest one in units of ln s (a relative error of the scale). The encoder takes the first
j whose every margin is >= ``guard`` (else the image is coded as kind 1 under the
factorized fallback tables); a decoder that sees a margin below guard/4 knows that its
scales differ from the encoder's by more than 3/4 guard and refuses (NotExactlyDecodable).
Noise beyond that can pass the margin test unseen, so the payload ends with a 2-byte
check of (j, z, y) as kind 3's does. Layout: docs/code-format.md.

A model with an integer hyper-decoder (worker/codec/intnet.py: the photo hyperprior)
computes the indices exactly on every machine, so its payload (the exact layout) has no
offset and no check: z, then y table by table (the elements of table 0 in (C, h, w)
order, then table 1's, ...; both sides know every index before y), each run under one
prebuilt model, a few calls per image instead of one table per element.
"""

from __future__ import annotations

import functools
import zlib
from typing import Any, cast

import numpy as np

from latentserve.errors import ModelIntegrityError
from latentserve.worker.codec.entropy import (
    CHECK_BYTES,
    CHECK_PROBS,
    FAMILY,
    OFFSET_PROBS,
    PRIOR_OFFSETS,
    FactorizedTables,
    RangeDecoder,
    RangeEncoder,
    bytes_to_words,
    cross_entropy_bits,
    decode_error,
    finish,
    first_safe_offsets,
    fixed_model,
    probabilities,
)
from latentserve.worker.runtime.manifest import FactorizedSpec, HyperpriorSpec

# The decoder refuses a margin below guard * DECODER_MARGIN (kind 3's rule).
DECODER_MARGIN = 0.25


def check_hyperprior_spec(spec: HyperpriorSpec) -> None:
    """Refuse a hyperprior spec whose tables or index rule could be degenerate."""
    if not (0 < spec.scale_min < spec.scale_max and np.isfinite(spec.scale_max)):
        raise ModelIntegrityError(f"hyperprior scales need 0 < min < max, got min "
                                  f"{spec.scale_min}, max {spec.scale_max}")
    if not 2 <= spec.levels <= 1024 or len(spec.tables) != spec.levels:
        raise ModelIntegrityError(f"hyperprior needs 2..1024 scale levels with one table "
                                  f"each; got {spec.levels} levels, {len(spec.tables)} tables")
    width = len(spec.tables[0])
    if width < 2 or any(len(t) != width for t in spec.tables):
        raise ModelIntegrityError("hyperprior tables must all cover the same support of "
                                  ">= 2 symbols")
    if any(min(t) < 1 for t in spec.tables):
        raise ModelIntegrityError("every hyperprior table frequency must be >= 1")
    step = np.log(spec.scale_max / spec.scale_min) / (spec.levels - 1)
    if not 0 < spec.guard < 0.5 * step:
        raise ModelIntegrityError(f"hyperprior guard must lie in (0, half a level = "
                                  f"{0.5 * step:.4g}) in units of ln(scale), got {spec.guard}")
    if len(spec.z_shape) != 3:
        raise ModelIntegrityError(f"hyperprior z_shape must be (C, h, w), got {spec.z_shape}")


@functools.lru_cache(maxsize=64)
def _log_grid(scale_min: float, scale_max: float, levels: int) -> tuple[float, float]:
    """(ln s_min, delta). Computed once per model; libm's last-bit differences between
    machines shift every boundary by ~1e-16, far inside the guard."""
    lo = float(np.log(scale_min))
    return lo, (float(np.log(scale_max)) - lo) / (levels - 1)


def scale_indices(scales: np.ndarray, spec: HyperpriorSpec,
                  offset: int | np.ndarray = 0) -> tuple[np.ndarray, np.ndarray]:
    """Scales (N, ...) -> (table indices (N, ...) as intp, margin (N,) per image).

    ``offset``: one j for all, or one per image (N,). A scale that is not finite and > 0
    gets index 0 and margin 0 (never coded as kind 5, refused when decoded).
    """
    s = np.asarray(scales, np.float64)
    n = s.shape[0]
    flat = s.reshape(n, -1)
    lo, delta = _log_grid(spec.scale_min, spec.scale_max, spec.levels)
    ok = np.isfinite(flat) & (flat > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        u = (np.log(np.where(ok, flat, 1.0)) - lo) / delta
    shift = np.asarray(offset, np.float64).reshape(-1, 1) / PRIOR_OFFSETS  # exact: dyadic
    x = u - shift
    index = np.clip(np.ceil(x), 0, spec.levels - 1)
    nearest = np.clip(np.rint(x), 0, spec.levels - 2)  # the boundaries that change an index
    dist = np.abs(x - nearest) * delta
    dist[~ok] = 0.0
    index[~ok] = 0
    return index.astype(np.intp).reshape(s.shape), dist.min(axis=1, initial=np.inf)


def plan_offsets(scales: np.ndarray, spec: HyperpriorSpec) -> tuple[np.ndarray, np.ndarray]:
    """The encoder's choice per image: (offset j, or -1 when none of the 16 keeps every
    margin >= guard; the table indices under it (N, C, h, w))."""
    indices = np.zeros(scales.shape, np.intp)

    def attempt(todo: np.ndarray, j: int) -> np.ndarray:
        idx, margin = scale_indices(scales[todo], spec, j)
        ok: np.ndarray = margin >= spec.guard
        indices[todo[ok]] = idx[ok]
        return ok

    return first_safe_offsets(scales.shape[0], attempt), indices


def hyper_check(offset: int, z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kind 5's check symbols: the low CHECK_BYTES bytes of CRC32(j, z, y as int32 LE)."""
    crc = zlib.crc32(bytes([int(offset)]) + np.asarray(z, "<i4").tobytes()
                     + np.asarray(y, "<i4").tobytes())
    return np.array([(crc >> (8 * i)) & 0xFF for i in range(CHECK_BYTES)], np.int32)


class HyperTables:
    """A hyperprior model's integer tables, built once at load from the manifest:
    z's factorized tables, and the ``levels`` Gaussian tables of y (float64 by exact
    division, the same bits on every machine)."""

    def __init__(self, spec: HyperpriorSpec, latent_shape: tuple[int, ...], *,
                 exact: bool = False) -> None:
        check_hyperprior_spec(spec)
        self.spec = spec
        self.latent_shape = latent_shape
        self.exact = exact
        self.z = FactorizedTables(FactorizedSpec(step=1.0, offsets=spec.z_offsets,
                                                 freqs=spec.z_freqs), spec.z_shape)
        self.y_offset = spec.y_offset
        self.width = len(spec.tables[0])
        self.probs = probabilities(np.array(spec.tables, np.int64))  # (levels, width)
        # The exact layout's one model per table (width >= 2: never None).
        self.models = [fixed_model(row) for row in self.probs] if exact else []

    def y_probs(self, indices: np.ndarray) -> np.ndarray:
        """Per element (flattened) its table: (n, width) float64."""
        out: np.ndarray = self.probs[np.asarray(indices).reshape(-1)]
        return out

    def check_support(self, y: np.ndarray) -> None:
        """ModelIntegrityError unless every y symbol lies on the Gaussian tables' support
        (the fallback tables' support must sit inside it: checked at load)."""
        rel = y.astype(np.int64) - self.y_offset
        if rel.min(initial=0) < 0 or rel.max(initial=0) >= self.width:
            raise ModelIntegrityError("hyperprior y symbols outside the Gaussian tables' support")

    def quantize_z(self, z: np.ndarray) -> np.ndarray:
        """Hyper-encoder floats -> z symbols on z's table support (clipped, NaN -> offset)."""
        lo = np.array(self.spec.z_offsets, np.float64).reshape(1, -1, 1, 1)
        hi = lo + np.array([len(f) for f in self.spec.z_freqs], np.float64).reshape(1, -1, 1, 1) - 1
        sym = np.rint(np.nan_to_num(z.astype(np.float64), nan=0.0))
        return np.clip(sym, lo, hi).astype(np.int32)

    # -- payload: offset j, z, y, check ------------------------------------------------
    def encode(self, offset: int, z: np.ndarray, y: np.ndarray, indices: np.ndarray) -> bytes:
        """One image's kind-5 payload: j under the halving table, z (C, h, w) under its
        factorized tables, y channel by channel in raster order under the tables
        ``indices`` name, then the check bytes."""
        coder = RangeEncoder()
        coder.encode(int(offset), _OFFSET_MODEL)
        self.z.encode_into(coder, z)
        rel = np.ascontiguousarray(y.reshape(-1).astype(np.int32) - np.int32(self.y_offset))
        coder.encode(rel, FAMILY, self.y_probs(indices))
        coder.encode(hyper_check(offset, z, y), _CHECK_MODEL)
        return finish(coder)

    def read_head(self, payload: bytes) -> tuple[object, int, np.ndarray]:
        """(the running decoder, j, z); CorruptCode when they do not decode."""
        coder = RangeDecoder(bytes_to_words(payload))
        try:
            offset = int(coder.decode(_OFFSET_MODEL))
            z = self.z.decode_from(coder)
        except BaseException as exc:
            raise decode_error(exc) from None
        return coder, offset, z

    def read_rest(self, coder: object, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(y (C, h, w) under the tables ``indices`` name, the check symbols)."""
        dec = cast(Any, coder)
        try:
            rel = dec.decode(FAMILY, self.y_probs(indices))
            check = dec.decode(_CHECK_MODEL, CHECK_BYTES)
        except BaseException as exc:
            raise decode_error(exc) from None
        y = (np.asarray(rel, np.int32) + np.int32(self.y_offset)).reshape(self.latent_shape)
        return y, np.asarray(check, np.int32)

    def cross_entropy_bits(self, offset: int, z: np.ndarray, y: np.ndarray,
                           indices: np.ndarray) -> float:
        """The tables' own cost of one kind-5 payload (offset, z, y, check), in bits."""
        rel = y.reshape(-1).astype(np.int64) - self.y_offset
        return (cross_entropy_bits(np.array([offset]), OFFSET_PROBS)
                + self.z.cross_entropy_bits(z)
                + cross_entropy_bits(rel, self.y_probs(indices)) + 8 * CHECK_BYTES)

    # -- the exact layout: z, then y table by table ---------------------------------
    def encode_exact(self, z: np.ndarray, y: np.ndarray, indices: np.ndarray) -> bytes:
        """One image's payload under exactly computed ``indices`` (C, h, w)."""
        coder = RangeEncoder()
        self.z.for_shape(z.shape).encode_into(coder, z)
        rel = y.reshape(-1).astype(np.int32) - np.int32(self.y_offset)
        order, counts = _by_table(indices, self.spec.levels)
        rel = np.ascontiguousarray(rel[order])
        start = 0
        for model, count in zip(self.models, counts.tolist(), strict=True):
            if count:
                coder.encode(rel[start:start + count], model)
                start += count
        return finish(coder)

    def read_z(self, payload: bytes, z_shape: tuple[int, ...]) -> tuple[object, np.ndarray]:
        """(the running decoder, z) of an exact-layout payload; CorruptCode if z does not
        decode."""
        coder = RangeDecoder(bytes_to_words(payload))
        try:
            z = self.z.for_shape(z_shape).decode_from(coder)
        except BaseException as exc:
            raise decode_error(exc) from None
        return coder, z

    def read_y(self, coder: object, indices: np.ndarray) -> np.ndarray:
        """y (C, h, w) of an exact-layout payload, its tables named by ``indices``."""
        dec = cast(Any, coder)
        order, counts = _by_table(indices, self.spec.levels)
        rel = np.empty(order.size, np.int32)
        start = 0
        try:
            for model, count in zip(self.models, counts.tolist(), strict=True):
                if count:
                    rel[start:start + count] = dec.decode(model, count)
                    start += count
        except BaseException as exc:
            raise decode_error(exc) from None
        y = np.empty(order.size, np.int32)
        y[order] = rel + np.int32(self.y_offset)
        return y.reshape(indices.shape)

    def exact_bits(self, z: np.ndarray, y: np.ndarray, indices: np.ndarray) -> float:
        """The tables' own cost of one exact-layout payload (z, y), in bits."""
        rel = y.reshape(-1).astype(np.int64) - self.y_offset
        p = self.probs[np.asarray(indices).reshape(-1), rel]
        return self.z.for_shape(z.shape).cross_entropy_bits(z) + float(-np.log2(p).sum())


def _by_table(indices: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """(the elements' coding order: by table, raster within one; the count per table)."""
    flat = np.asarray(indices).reshape(-1)
    return np.argsort(flat, kind="stable"), np.bincount(flat, minlength=levels)


_OFFSET_MODEL = fixed_model(OFFSET_PROBS[0])
_CHECK_MODEL = fixed_model(CHECK_PROBS[0])
