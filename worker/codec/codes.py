"""Latent codes: symbols <-> self-describing byte strings (layout in docs/code-format.md).

``LatentCodec(runtime)`` codes one model's symbols: ``encode(symbols) -> list[bytes]``
and ``decode(codes) -> symbols``; ``decode_each`` reports a refusal per code instead
of raising, so one bad code in a batch does not sink the others. Which model made a
code is the pipeline's question (``Pipeline.identify``); the codec only checks that a
code is its own model's, and refuses anything it cannot decode exactly.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from latentserve.errors import (
    CodeError,
    CodeMismatch,
    CorruptCode,
    InvalidInput,
    ModelIntegrityError,
    NotExactlyDecodable,
    UnknownFormatVersion,
)
from latentserve.worker.codec.coderpool import CoderPool, TableSpec
from latentserve.worker.codec.entropy import (
    CHECK_BYTES,
    CHECK_PROBS,
    FAMILY,
    OFFSET_PROBS,
    PRIOR_OFFSETS,
    FactorizedTables,
    RangeDecoder,
    RangeEncoder,
    StaticTables,
    batch_words,
    check_indices,
    check_prior_spec,
    cross_entropy_bits,
    decode_error,
    finish,
    fixed_model,
    prior_check,
    zero_ended,
)
from latentserve.worker.codec.hyperprior import DECODER_MARGIN as HYPER_MARGIN
from latentserve.worker.codec.hyperprior import (
    HyperTables,
    hyper_check,
    scale_indices,
)
from latentserve.worker.codec.hyperprior import plan_offsets as plan_scale_offsets
from latentserve.worker.codec.prior_sparse import plan_prior, step_tables
from latentserve.worker.runtime.engine import ModelRuntime
from latentserve.worker.runtime.manifest import CODE_KIND_IDS, VQPriorSpec

FORMAT_VERSION = 1   # fixed-size models: the latent shape is the model's
SIZED_VERSION = 2    # any-size models: the header adds the image's height and width
VERSIONS = (FORMAT_VERSION, SIZED_VERSION)
MAGIC = 0xA  # high nibble of byte 0
HEADER_SIZE = 7
# Format 2's size field: H - 1 and W - 1 as unsigned LEB128 varints of at most 3 bytes,
# each side at most MAX_SIDE (what the 3 bytes leave room for is refused, not read).
MAX_SIDE = 1 << 16
SIZE_VARINT_BYTES = 3
KIND_NAMES = {v: k for k, v in CODE_KIND_IDS.items()}
# The encoder codes kind 3 only when every table-shaping logit lies >= guard from a
# rounding boundary, so decoder-side noise below guard cannot change a table. A decoder
# that sees a logit closer than guard/4 knows its noise exceeds 3/4 guard and refuses.
DECODER_MARGIN = 0.25
FACTORIZED, VQ_STATIC, VQ_PRIOR, VQ_PARALLEL, HYPERPRIOR = (
    CODE_KIND_IDS[k] for k in ("factorized", "vq_static", "vq_prior", "vq_parallel",
                               "hyperprior"))
PRIOR_KIND_IDS = (VQ_PRIOR, VQ_PARALLEL)  # coded under a float prior's logits


# -- header ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=256)
def _digest_state(manifest_digest: str) -> tuple[bytes, int]:
    """(fingerprint, CRC32 of the raw digest): what every code of that model starts from."""
    raw = bytes.fromhex(manifest_digest)
    return raw[:2], zlib.crc32(raw)


@functools.lru_cache(maxsize=1024)
def _head_crc(manifest_digest: str, head: bytes) -> int:
    """CRC32 of the raw digest, then ``head``: the running CRC every code with that head
    (bytes 0..3, and a format-2 size field) continues over its payload."""
    return zlib.crc32(head, _digest_state(manifest_digest)[1])


def checksum(manifest_digest: str, head: bytes, payload: bytes) -> int:
    """Low 24 bits of CRC32(sha256(manifest) as 32 raw bytes, header bytes 0..3 (and a
    format-2 size field), payload)."""
    return zlib.crc32(payload, _head_crc(manifest_digest, head)) & 0xFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def size_field(height: int, width: int) -> bytes:
    """Format 2's size field: varint(H - 1) varint(W - 1) (2 bytes up to 128 x 128, 4 up
    to 16384 x 16384)."""
    for side in (height, width):
        if not 1 <= side <= MAX_SIDE:
            raise InvalidInput(f"an image side must be 1..{MAX_SIDE} pixels, got {side}")
    return _varint(height - 1) + _varint(width - 1)


def read_size_field(code: bytes, at: int) -> tuple[tuple[int, int], int]:
    """((H, W), the offset after the field); CorruptCode for a truncated, overlong,
    non-minimal or out-of-range field."""
    sides = []
    for which in ("height", "width"):
        value = shift = 0
        for k in range(SIZE_VARINT_BYTES + 1):
            if at >= len(code):
                raise CorruptCode(f"the code ends inside its size field ({which}): truncated")
            if k == SIZE_VARINT_BYTES:
                raise CorruptCode(f"the code's size field ({which}) is longer than "
                                  f"{SIZE_VARINT_BYTES} bytes: corrupted")
            byte = code[at]
            at += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                if byte == 0 and k > 0:
                    raise CorruptCode(f"the code's size field ({which}) is not in its "
                                      "shortest form: corrupted")
                break
        if value + 1 > MAX_SIDE:
            raise CorruptCode(f"the code's {which} {value + 1} is over {MAX_SIDE}: corrupted")
        sides.append(value + 1)
    return (sides[0], sides[1]), at


def pack(manifest_digest: str, kind: int, payload: bytes,
         size: tuple[int, int] | None = None) -> bytes:
    """Build a code: header (7 bytes; format 2: then the size field) + payload.

    ``size`` (H, W) makes a format-2 code (any-size models), None a version-1 code.
    """
    return pack_all(manifest_digest, [(kind, payload)], size)[0]


def pack_all(manifest_digest: str, pairs: Sequence[tuple[int, bytes]],
             size: tuple[int, int] | None = None) -> list[bytes]:
    """``pack`` of every (kind, payload) pair, the header work done once per kind."""
    version = FORMAT_VERSION if size is None else SIZED_VERSION
    extra = b"" if size is None else size_field(*size)
    fingerprint = _digest_state(manifest_digest)[0]
    heads: dict[int, tuple[bytes, int]] = {}
    for kind in {kind for kind, _ in pairs}:
        head = bytes([(MAGIC << 4) | version, kind]) + fingerprint
        heads[kind] = head, _head_crc(manifest_digest, head + extra)
    crc32 = zlib.crc32
    if len(heads) == 1 and not extra:  # v1 codes of one kind (kinds 1 and 2 always)
        ((head, state),) = heads.values()
        return [head + (crc32(p, state) & 0xFFFFFF).to_bytes(3, "big") + p for _, p in pairs]
    out = []
    for kind, payload in pairs:
        head, state = heads[kind]
        out.append(b"".join((head, (crc32(payload, state) & 0xFFFFFF).to_bytes(3, "big"),
                             extra, payload)))
    return out


class Header(NamedTuple):
    """A parsed code: format version, kind id, model fingerprint, checksum and payload
    (a named tuple: built once per code on every decode, it must cost little)."""

    version: int
    kind: int
    fingerprint: bytes
    checksum: int
    payload: bytes
    head: bytes  # what the checksum covers before the payload: bytes 0..3 (+ size field)
    size: tuple[int, int] | None = None  # format 2: the image's (height, width)

    @property
    def kind_name(self) -> str:
        return KIND_NAMES[self.kind]

    def made_by(self, manifest_digest: str) -> bool:
        """Whether the checksum binds this code to the manifest with that sha256 (hex)."""
        return (_digest_state(manifest_digest)[0] == self.fingerprint
                and checksum(manifest_digest, self.head, self.payload) == self.checksum)


def parse_header(code: bytes) -> Header:
    """Split a code into its fields; CorruptCode / UnknownFormatVersion for what cannot be read."""
    if not isinstance(code, (bytes, bytearray, memoryview)):
        raise CorruptCode(f"a latent code must be bytes, got {type(code).__name__}")
    if type(code) is not bytes:
        code = bytes(code)
    if len(code) < HEADER_SIZE:
        raise CorruptCode(f"a latent code is at least {HEADER_SIZE} bytes (the header); "
                          f"got {len(code)}: truncated")
    if code[0] >> 4 != MAGIC:
        raise CorruptCode(f"not a latentserve code: first byte 0x{code[0]:02x}, expected 0xA1 "
                          "or 0xA2 (magic 0xA, then the format version)")
    version = code[0] & 0xF
    if version not in VERSIONS:
        raise UnknownFormatVersion(
            f"the code is in format version {version}; this build reads versions "
            f"{', '.join(map(str, VERSIONS))}: decode it with a latentserve that knows "
            f"version {version}", format_version=version)
    if code[1] not in KIND_NAMES:
        raise CorruptCode(f"code kind {code[1]} is not one of {sorted(KIND_NAMES)} "
                          f"({', '.join(f'{k} {n}' for k, n in sorted(KIND_NAMES.items()))})")
    size, start = None, HEADER_SIZE
    if version == SIZED_VERSION:
        size, start = read_size_field(code, HEADER_SIZE)
    return Header(version, code[1], code[2:4], int.from_bytes(code[4:7], "big"),
                  code[start:], code[:4] if size is None else code[:4] + code[HEADER_SIZE:start],
                  size)


# -- the codec ------------------------------------------------------------------------

class LatentCodec:
    """One model's entropy coder: symbols (N, *latent_shape) <-> codes.

    Kinds: ``factorized`` and ``hyperprior`` (ae/vae); ``vq_static``, ``vq_prior`` and
    ``vq_parallel`` (vqvae). A prior kind (3: raster, 4: the schedule's groups) codes an
    image as ``vq_static`` when, for each of the 16 rounding offsets, some prior logit sits
    within ``guard`` of a rounding boundary (the header records the kind); a hyperprior
    model likewise falls back to ``factorized`` when some scale sits within its guard of a
    table-index boundary for every offset.
    """

    def __init__(self, runtime: ModelRuntime, *, pool: CoderPool | None = None) -> None:
        self.runtime = runtime
        # Large batches of kinds 1 and 2 are coded in the pool's processes (every core).
        self.pool = pool
        m = runtime.manifest
        self.manifest = m
        self.kind = CODE_KIND_IDS[m.code_kind]
        self.factorized = FactorizedTables(m.factorized, m.latent_shape) if m.factorized else None
        self.static = (StaticTables(m.vq_static, m.latent_shape)
                       if m.family == "vqvae" and m.vq_static else None)
        # The prior kind this model writes (3 or 4) and its spec; None: no prior kind.
        self.prior_kind: int | None = None
        self.prior: VQPriorSpec | None = None
        if m.family == "vqvae" and m.code_kind in ("vq_prior", "vq_parallel"):
            self.prior_kind = CODE_KIND_IDS[m.code_kind]
            self.prior = m.vq_prior if self.prior_kind == VQ_PRIOR else m.vq_parallel
        if self.prior is not None:
            check_prior_spec(self.prior)
        self.hyper = (HyperTables(m.hyperprior, m.latent_shape, exact=runtime.hyper_exact)
                      if m.hyperprior is not None and m.family != "vqvae" else None)
        self.kinds = ({FACTORIZED} | ({HYPERPRIOR} if self.hyper else set())
                      if m.family != "vqvae"
                      else {VQ_STATIC} | ({self.prior_kind} if self.prior_kind else set()))
        # Coding order of a prior kind's indices (raster for kind 3).
        self.order = (np.array(self.prior.order(m.num_symbols), np.int64)
                      if self.prior is not None else None)
        shape = tuple(m.latent_shape)
        # Any-size models: every code has its own grid, so the pool (tables built per
        # shape once per process) is not used for them.
        self._specs = {k: TableSpec(f"{m.digest}:{k}", spec, shape)
                       for k, spec in ((FACTORIZED, m.factorized), (VQ_STATIC, m.vq_static))
                       if spec is not None and k in self.kinds and not m.any_size}
        if m.any_size:
            self.pool = None

    # -- encode -----------------------------------------------------------------------
    def encode(self, symbols: np.ndarray, *, kind: str | None = None,
               size: tuple[int, int] | None = None,
               latent: np.ndarray | None = None) -> list[bytes]:
        """Symbols (N, *latent_shape) -> one code per image.

        ``kind`` forces a kind (``vq_static`` on a vq_prior model skips the prior);
        default: the manifest's kind, with the guard's fallback to vq_static. An
        any-size model needs ``size``, the images' (H, W) (symbols of shape
        ``latent_shape_for(H, W)``): its codes are format 2 and record it. ``latent``:
        the float latents the symbols were rounded from, for a hyperprior's
        hyper-encoder (``compress_images`` passes them); without them it reads the
        symbols (valid codes, a little larger).
        """
        if self.manifest.any_size != (size is not None):
            raise InvalidInput(f"{self.manifest.ref}: encode needs the image size for an "
                               "any-size model, and only for one")
        want = self._kind_id(kind)
        if self.pool is not None and want in self._specs and self.pool.wants(len(symbols)):
            return self._pool_encode(symbols, want)
        return pack_all(self.manifest.digest,
                        self.encode_payloads(symbols, kind=kind, size=size, latent=latent),
                        size)

    def compress_images(self, images: np.ndarray, *, kind: str | None = None,
                        size: tuple[int, int] | None = None) -> list[bytes]:
        """uint8 images (N, C, H, W) -> codes: ``encode_network``, then ``encode``."""
        symbols, latent = self.encode_network(images)
        return self.encode(symbols, kind=kind, size=size, latent=latent)

    def encode_network(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The encoder network's half of compress: (symbols, the float latent when a
        hyperprior's hyper-encoder reads it, else None). It reads the float y when the
        manifest says so (``code.hyperprior.z.input`` "latent"; "symbols": y_hat), as
        CompressAI's compress does (z = h_a(|y|) on y before rounding, the input h_a is
        trained on; the rounded y costs the photo hyperprior ~12 % more bits)."""
        if self.hyper is None or self.hyper.spec.z_input != "latent":
            return self.runtime.encode(images), None
        latent = self.runtime.encode_latent(images)
        return self.runtime.quantize(latent), latent

    def _pool_encode(self, symbols: np.ndarray, kind: int) -> list[bytes]:
        """Kinds 1 and 2 in the pool's processes: the table check, the coding, headers
        and CRCs all made there; this thread checks only the shape and that the symbols
        fit the integer type they travel in (so none can wrap on the way)."""
        assert self.pool is not None
        spec = self._specs[kind]
        arr = np.asarray(symbols)
        if arr.dtype.kind not in "iu":
            raise InvalidInput(f"symbols must be integers, got {arr.dtype}")
        arr = self.runtime.check_symbols(arr)
        info = np.iinfo(spec.wire_dtype)
        if arr.size and (int(arr.min()) < info.min or int(arr.max()) > info.max):
            arr = self._check_symbols(arr)  # off the tables: raises, naming the values
        try:
            return self.pool.encode(spec, arr, pack_as=(self.manifest.digest, kind),
                                    check=True)
        except InvalidInput:
            # A slice names only its own bad values: say it as inline coding would.
            self._check_symbols(arr)
            raise

    def encode_payloads(self, symbols: np.ndarray, *, kind: str | None = None,
                        size: tuple[int, int] | None = None,
                        latent: np.ndarray | None = None) -> list[tuple[int, bytes]]:
        """Like ``encode`` but returns (kind id, payload) pairs, without headers."""
        symbols = self._check_symbols(symbols, size)
        want = self._kind_id(kind)
        if want == FACTORIZED:
            return [(FACTORIZED, p) for p in self._encode_fixed(FACTORIZED, symbols, size)]
        if want == HYPERPRIOR:
            return self._encode_hyper(symbols, latent)
        assert self.static is not None
        if want == VQ_STATIC or len(symbols) == 0:
            return [(VQ_STATIC, p) for p in self._encode_fixed(VQ_STATIC, symbols)]
        assert self.prior is not None
        plan = plan_prior(self.prior_logits(symbols), self.prior)
        order = self.order
        assert order is not None
        if np.array_equal(order, np.arange(len(order))):
            order = None  # raster (kind 3): no reordered copy of every image's tables
        out = []
        for i, j in enumerate(plan.offsets.tolist()):
            if j >= 0:  # each image's tables built just before they are coded
                out.append((want, prior_payload(j, symbols[i], plan.tables(i), order)))
            else:  # float noise on another machine could change a table: use the static one
                out.append((VQ_STATIC, self.static.encode(symbols[i])))
        return out

    def hyper_plan(self, symbols: np.ndarray, latent: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Kind-5 plan for checked y symbols (N, C, h, w): (z symbols, per image the offset
        j (-1: no offset keeps every scale guard from an index boundary, code it as kind
        1), the table indices (N, C, h, w)). z is the hyper-encoder's of ``latent`` (the
        float y) when given, else of the symbols: either way the decoder needs only z."""
        hyper = self.hyper
        assert hyper is not None
        if latent is not None and latent.shape != symbols.shape:
            raise InvalidInput(f"latents of shape {latent.shape} for symbols of shape "
                               f"{symbols.shape}")
        z = hyper.quantize_z(self.runtime.hyper_latent(symbols if latent is None else latent))
        grid = (int(symbols.shape[2]), int(symbols.shape[3]))
        want = hyper.spec.z_shape_for(grid)
        if tuple(z.shape[1:]) != want:
            raise ModelIntegrityError(f"{self.manifest.ref}: hyper_encoder gives z of shape "
                                      f"{tuple(z.shape[1:])}, the manifest says {want}")
        if hyper.exact:  # integer indices: no offset to search, nothing to guard
            return z, np.zeros(len(z), np.int64), self.runtime.hyper_indices(z, grid)
        offsets, indices = plan_scale_offsets(self.runtime.hyper_scales(z), hyper.spec)
        return z, offsets, indices

    def _encode_hyper(self, symbols: np.ndarray, latent: np.ndarray | None
                      ) -> list[tuple[int, bytes]]:
        hyper = self.hyper
        assert hyper is not None and self.factorized is not None
        if len(symbols) == 0:
            return []
        z, offsets, indices = self.hyper_plan(symbols, latent)
        if hyper.exact:
            return [(HYPERPRIOR, hyper.encode_exact(z[i], symbols[i], indices[i]))
                    for i in range(len(symbols))]
        return [(HYPERPRIOR, hyper.encode(int(j), z[i], symbols[i], indices[i])) if j >= 0
                else (FACTORIZED, self.factorized.encode(symbols[i]))
                for i, j in enumerate(offsets.tolist())]

    def prior_logits(self, symbols: np.ndarray) -> np.ndarray:
        """Teacher-forced logits (N, h*w, K) in raster order, computed exactly as the
        decoder computes them: kind 3 through the stepper (the step graph when the model
        has one, else full passes), kind 4 one pass per schedule group."""
        assert self.static is not None
        if self.prior_kind == VQ_PARALLEL:
            flat = self.runtime.parallel_logits(symbols)
        else:
            stepper = self.runtime.prior_stepper(len(symbols))
            if stepper.stepwise:  # the step graph's outputs stacked as (N, h*w, K) at once
                positions = int(np.prod(self.manifest.latent_shape))
                flat = np.stack([stepper.logits(p, symbols) for p in range(positions)], axis=1)
            else:
                logits = stepper.all_logits(symbols)
                flat = logits.reshape(len(symbols), logits.shape[1], -1).transpose(0, 2, 1)
        if flat.shape[2] != self.static.num_codes:
            raise ModelIntegrityError(
                f"{self.manifest.ref}: the prior gives {flat.shape[2]} logits per position, "
                f"the codebook has {self.static.num_codes} codes")
        return flat

    def prior_plan(self, symbols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Teacher-forced plan of the model's prior kind (3 or 4): per image the rounding
        offset (the first of 0..15 whose every table has margin >= guard; -1: none, code
        it as kind 2) and its tables ((N, h*w, K) float64 in raster order, uniform where
        the offset is -1)."""
        assert self.prior is not None
        plan = plan_prior(self.prior_logits(symbols), self.prior)
        return plan.offsets, plan.dense()

    def cross_entropy_bits(self, symbols: np.ndarray, kinds: Sequence[int], *,
                           size: tuple[int, int] | None = None) -> np.ndarray:
        """Per image, the cost of its symbols under the integer tables of the given kind
        (an any-size model's: of images of ``size``)."""
        symbols = self._check_symbols(symbols, size)
        out = np.zeros(len(symbols))
        plan = (self.prior_plan(symbols)
                if self.prior_kind is not None and self.prior_kind in kinds else None)
        hplan = (self.hyper_plan(symbols)
                 if self.hyper is not None and HYPERPRIOR in kinds else None)
        for i, (s, k) in enumerate(zip(symbols, kinds, strict=True)):
            if k == HYPERPRIOR:
                z, offsets, indices = hplan  # type: ignore[misc]
                hyper = self.hyper
                assert hyper is not None
                out[i] = (hyper.exact_bits(z[i], s, indices[i]) if hyper.exact else
                          hyper.cross_entropy_bits(int(max(offsets[i], 0)), z[i], s, indices[i]))
            elif k == FACTORIZED:
                out[i] = self._tables(FACTORIZED, size).cross_entropy_bits(s)
            elif k == VQ_STATIC:
                out[i] = self.static.cross_entropy_bits(s)  # type: ignore[union-attr]
            else:  # the offset symbol, the indices under the prior's tables, the check
                offsets, probs = plan  # type: ignore[misc]
                out[i] = (cross_entropy_bits(offsets[i:i + 1], OFFSET_PROBS)
                          + cross_entropy_bits(s.reshape(-1), probs[i]) + 8 * CHECK_BYTES)
        return out

    # -- decode -----------------------------------------------------------------------
    def decode(self, codes: Sequence[bytes]) -> np.ndarray:
        """Codes -> int32 symbols (N, *latent_shape); raises the first refusal (naming its
        index)."""
        results = self.decode_each(codes)
        for i, r in enumerate(results):
            if isinstance(r, CodeError):
                raise with_index(r, i, len(results))
        if not results:
            return np.zeros((0, *self.manifest.latent_shape), np.int32)
        return np.stack(results)  # type: ignore[arg-type]

    def decode_each(self, codes: Sequence[bytes]) -> list[np.ndarray | CodeError]:
        """Decode every code on its own terms: symbols, or the CodeError that refused it.

        Prior-kind codes are decoded together: one prior run per grid position (kind 3)
        or per schedule group (kind 4) for all of them.
        """
        headers: list[Header | CodeError] = []
        for code in codes:
            try:
                headers.append(self.check(code))
            except CodeError as exc:
                headers.append(exc)
        return self.decode_headers(headers)

    def decode_headers(self, headers: Sequence[Header | CodeError]) -> list[np.ndarray | CodeError]:
        """``decode_each`` for codes already parsed and bound to this model (their
        checksum matched its digest, as ``check`` or ``Pipeline.identify`` require); a
        CodeError in the list is passed through. The kind is still checked here."""
        if not self.manifest.any_size:
            symbols, ok, errors = self.decode_stacked(headers)
            out: list[np.ndarray | CodeError] = list(errors.get(i, CorruptCode("not decoded"))
                                                     for i in range(len(headers)))
            for k, i in enumerate(ok):
                out[i] = symbols[k]
            return out
        results: list[np.ndarray | CodeError] = [CorruptCode("not decoded")] * len(headers)
        prior_jobs: list[tuple[int, bytes]] = []
        hyper_jobs: list[tuple[int, bytes]] = []
        fixed: dict[int, list[tuple[int, bytes]]] = {FACTORIZED: [], VQ_STATIC: []}
        for i, header in enumerate(headers):
            if isinstance(header, CodeError):
                results[i] = header
            elif header.kind not in self.kinds:
                results[i] = self._foreign_kind(header)
            elif (header.size is not None) != self.manifest.any_size:
                results[i] = CorruptCode(f"{self.manifest.ref} does not write format-"
                                         f"{header.version} codes: corrupted")
            else:
                (prior_jobs if header.kind in PRIOR_KIND_IDS
                 else hyper_jobs if header.kind == HYPERPRIOR
                 else fixed[header.kind]).append((i, header.payload))
        for kind, jobs in fixed.items():
            if jobs and self.manifest.any_size:  # one batch per grid shape
                by_size: dict[tuple[int, int], list[tuple[int, bytes]]] = {}
                for i, p in jobs:
                    by_size.setdefault(headers[i].size, []).append((i, p))  # type: ignore[union-attr, arg-type]
                for hw, group in by_size.items():
                    for (i, _), r in zip(group, self._decode_fixed(kind, group, hw), strict=True):
                        results[i] = r
            elif jobs:
                for i, r in zip((i for i, _ in jobs), self._decode_fixed(kind, jobs), strict=True):
                    results[i] = r
        if prior_jobs:
            for (i, _), d in zip(prior_jobs, self._decode_prior([p for _, p in prior_jobs]),
                                 strict=True):
                results[i] = d
        hyper_sizes: dict[tuple[int, int], list[tuple[int, bytes]]] = {}
        for i, p in hyper_jobs:  # one hyper-decoder run per grid shape
            hyper_sizes.setdefault(headers[i].size, []).append((i, p))  # type: ignore[union-attr, arg-type]
        for hw, group in hyper_sizes.items():
            for (i, _), d in zip(group, self._decode_hyper([p for _, p in group], hw),
                                 strict=True):
                results[i] = d
        return results

    def decode_stacked(self, headers: Sequence[Header | CodeError]
                       ) -> tuple[np.ndarray, list[int], dict[int, CodeError]]:
        """``decode_headers`` for a fixed-size model, stacked: (the symbols of the codes
        that decode, (M, *latent_shape) int32 in index order; their indices; the
        refusals by index). One array per batch, not one per code."""
        m = self.manifest
        if m.any_size:
            raise InvalidInput(f"{m.ref}: an any-size model's codes have grids of their "
                               "own sizes; use decode_headers")
        n = len(headers)
        errors: dict[int, CodeError] = {}
        jobs: dict[int, list[int]] = {}
        kinds = self.kinds
        for i, header in enumerate(headers):
            if isinstance(header, CodeError):
                errors[i] = header
            elif header.kind not in kinds:
                errors[i] = self._foreign_kind(header)
            elif header.size is not None:
                errors[i] = CorruptCode(f"{m.ref} does not write format-{header.version} "
                                        "codes: corrupted")
            else:
                jobs.setdefault(header.kind, []).append(i)
        parts: list[tuple[list[int], np.ndarray]] = []
        for kind, idx in jobs.items():
            payloads = [headers[i].payload for i in idx]  # type: ignore[union-attr]
            errs: dict[int, CodeError] | dict[int, CorruptCode]
            if kind in (FACTORIZED, VQ_STATIC):
                if self.pool is not None and self.pool.wants(len(payloads)):
                    arr, errs = self.pool.decode_stacked(self._specs[kind], payloads,
                                                         canonical=False)
                else:
                    arr, errs = self._tables(kind, None).decode_stacked(payloads)
            else:
                decode = self._decode_prior if kind in PRIOR_KIND_IDS else self._decode_hyper
                arr, errs = _stack(decode(payloads), m.latent_shape)
            for k, exc in errs.items():
                errors[idx[k]] = exc
            parts.append((idx, arr))
        if len(parts) == 1 and not errors:  # the common case: one kind, nothing refused
            return parts[0][1], parts[0][0], errors
        full = np.zeros((n, *m.latent_shape), np.int32)
        for idx, arr in parts:
            full[idx] = arr
        ok = [i for i in range(n) if i not in errors]
        return full[ok], ok, errors

    def pooled_kind(self, head: bytes) -> TableSpec | None:
        """The pool's table spec for version-1 codes whose bytes 0..3 are ``head``
        (this model's fingerprint, a kind it codes in the pool); None otherwise."""
        if (self.pool is None or len(head) != 4 or head[0] != (MAGIC << 4) | FORMAT_VERSION
                or head[2:4] != self.manifest.fingerprint):
            return None
        return self._specs.get(head[1])

    def decode_unparsed(self, codes: Sequence[bytes], head: bytes
                        ) -> tuple[np.ndarray, list[int], dict[int, CodeError], list[int]]:
        """``decode_stacked`` for version-1 codes not yet parsed, all with bytes 0..3
        ``head`` (``pooled_kind(head)`` not None; each >= HEADER_SIZE bytes): the
        headers read and the checksums verified in the pool's processes, not here.
        Returns (the symbols of the codes that decode, their indices, the refusals by
        index, the indices whose checksum does not bind them to this model, for the
        caller to name why as ``parse_header`` + identify would)."""
        spec = self.pooled_kind(head)
        assert spec is not None and self.pool is not None
        symbols, refused, unmatched = self.pool.decode_codes(
            spec, codes, _head_crc(self.manifest.digest, head))
        errors: dict[int, CodeError] = dict(refused)
        if not errors and not unmatched:
            return symbols, list(range(len(codes))), errors, unmatched
        skip = set(errors) | set(unmatched)
        ok = [i for i in range(len(codes)) if i not in skip]
        return symbols[ok], ok, errors, unmatched

    def _decode_hyper(self, payloads: list[bytes], size: tuple[int, int] | None = None
                      ) -> list[np.ndarray | CodeError]:
        """Kind-5 payloads: j and z of every code, one hyper-decoder run for all of them,
        then each y under the tables its scales pick (refused where a scale lies within
        guard/4 of an index boundary, or where the check fails). ``size``: the images'
        (H, W), for an any-size model's codes."""
        hyper = self.hyper
        assert hyper is not None
        if hyper.exact:
            return self._decode_hyper_exact(payloads, size)
        out, heads = _read_heads(payloads, hyper.read_head)
        if not heads:
            return out
        scales = self.runtime.hyper_scales(np.stack([z for _, _, _, z in heads]))
        offsets = np.array([j for _, _, j, _ in heads], np.int64)
        indices, margins = scale_indices(scales, hyper.spec, offsets)
        floor = hyper.spec.guard * HYPER_MARGIN
        for k, (i, coder, j, z) in enumerate(heads):
            if not margins[k] >= floor:
                out[i] = NotExactlyDecodable(
                    f"a scale that this machine's hyper_decoder ({self.runtime.provider}) "
                    f"gives lies {float(margins[k]):.2g} (in ln scale) from a table-index "
                    f"boundary, less than guard/4 = {floor:.2g}: its tables may differ from "
                    "the encoder's, so the code is refused rather than decoded inexactly; "
                    "decode it where the hyper_decoder computes like the encoder's (the CPU "
                    "provider, the same onnxruntime)")
                continue
            try:
                y, check = hyper.read_rest(coder, indices[k])
            except CodeError as exc:
                out[i] = exc
                continue
            if not np.array_equal(check, hyper_check(j, z, y)):
                out[i] = NotExactlyDecodable(
                    "the decoded latent fails its check: this machine's hyper_decoder "
                    f"({self.runtime.provider}) gave other tables than the encoder's (float "
                    "noise beyond the guard), or the payload was changed; the code is "
                    "refused rather than decoded inexactly")
            elif j >= PRIOR_OFFSETS or not self._on_support(y):
                # Not re-encoded (docs/code-format.md, "What a decoder accepts"), but the
                # symbols must be ones the encoder can write.
                out[i] = CorruptCode("the payload decodes to a latent outside the model's "
                                     "symbol support: the bytes were changed")
            else:
                out[i] = y
        return out

    def _decode_hyper_exact(self, payloads: list[bytes], size: tuple[int, int] | None
                            ) -> list[np.ndarray | CodeError]:
        """The exact layout: every z, one integer hyper-decoder run, then each y."""
        hyper = self.hyper
        assert hyper is not None
        shape = (self.manifest.latent_shape_for(*size) if size is not None
                 else self.manifest.latent_shape)
        grid = (int(shape[1]), int(shape[2]))
        z_shape = hyper.spec.z_shape_for(grid)
        out, heads = _read_heads(payloads, lambda p: hyper.read_z(p, z_shape))
        if not heads:
            return out
        indices = self.runtime.hyper_indices(np.stack([z for _, _, z in heads]), grid)
        for k, (i, coder, _) in enumerate(heads):
            try:
                y = hyper.read_y(coder, indices[k])
            except CodeError as exc:
                out[i] = exc
                continue
            # Not re-encoded (docs/code-format.md, "What a decoder accepts"), but the
            # symbols must be ones the encoder can write.
            out[i] = y if self._on_support(y) else CorruptCode(
                "the payload decodes to a latent outside the model's symbol support: the "
                "bytes were changed")
        return out

    def _on_support(self, y: np.ndarray) -> bool:
        try:
            self.factorized.check(y)  # type: ignore[union-attr]
        except InvalidInput:
            return False
        return True

    def _decode_fixed(self, kind: int, jobs: list[tuple[int, bytes]],
                      size: tuple[int, int] | None = None) -> list[np.ndarray | CorruptCode]:
        """Kinds 1 and 2: decode (not re-encoded: the checksum guards the bytes, see
        "What a decoder accepts" in docs/code-format.md). ``size``: the images' (H, W),
        for an any-size model's codes."""
        payloads = [p for _, p in jobs]
        if self.pool is not None and self.pool.wants(len(payloads)):
            return self.pool.decode(self._specs[kind], payloads, canonical=False)
        tables = self._tables(kind, size)
        return tables.decode_batch(payloads)

    def _tables(self, kind: int, size: tuple[int, int] | None) -> FactorizedTables | StaticTables:
        tables = self.factorized if kind == FACTORIZED else self.static
        assert tables is not None
        if size is not None and isinstance(tables, FactorizedTables):
            return tables.for_shape(self.manifest.latent_shape_for(*size))
        return tables

    def _encode_fixed(self, kind: int, symbols: np.ndarray,
                      size: tuple[int, int] | None = None) -> list[bytes]:
        """Kinds 1 and 2, checked symbols -> payloads (in the pool for large batches)."""
        if self.pool is not None and self.pool.wants(len(symbols)):
            return self.pool.encode(self._specs[kind], symbols)
        return self._tables(kind, size).encode_batch(symbols)

    def not_shortest(self, codes: Sequence[bytes]) -> list[int]:
        """Indices of the kind-1/2 codes whose payload is not the one the encoder writes
        for the symbols it decodes to (decoded, re-encoded, compared: what decoders no
        longer do per code, for checking an encoder, e.g. ``latentserve models check``)."""
        bad = []
        for i, code in enumerate(codes):
            h = self.check(code)
            if h.kind in (FACTORIZED, VQ_STATIC):
                tables = self._tables(h.kind, None if h.size is None else h.size)
                if isinstance(tables.decode_batch([h.payload], canonical=True)[0], CodeError):
                    bad.append(i)
        return bad

    def check(self, code: bytes) -> Header:
        """Parse a code and require that this model made it with a kind it writes."""
        header = parse_header(code)
        m = self.manifest
        if header.fingerprint != m.fingerprint:
            raise CodeMismatch(
                f"this code was made by the model with manifest fingerprint "
                f"{header.fingerprint.hex()}, not by {m.ref} (fingerprint {m.fingerprint.hex()}); "
                "decode it with the model that made it", fingerprint=header.fingerprint.hex())
        if not header.made_by(m.digest):
            raise CorruptCode(
                f"checksum mismatch for a code of {m.ref}: the bytes were changed or truncated "
                "(or another model with the same 2-byte fingerprint made it)")
        if header.kind not in self.kinds:
            raise self._foreign_kind(header)
        if (header.size is not None) != m.any_size:
            raise CorruptCode(
                f"{m.ref} writes format-{SIZED_VERSION if m.any_size else FORMAT_VERSION} "
                f"codes; this one is format {header.version}: corrupted")
        return header

    def _foreign_kind(self, header: Header) -> CorruptCode:
        return CorruptCode(f"{self.manifest.ref} does not write codes of kind {header.kind} "
                           f"({header.kind_name}); it writes {sorted(self.kinds)}")

    def _decode_prior(self, payloads: list[bytes]) -> list[np.ndarray | CodeError]:
        """Decode payloads of the model's prior kind step by step, the prior batched over
        the images: kind 3 one grid position per step (raster), kind 4 one schedule group.
        Per step the tables of every live code are built in one vectorised call; only the
        coder calls run per code."""
        spec = self.prior
        assert spec is not None
        h, w = self.manifest.latent_shape
        n, k = len(payloads), self.static.num_codes  # type: ignore[union-attr]
        grid = np.zeros((n, h, w), np.int64)
        flat = grid.reshape(n, h * w)
        floor = spec.guard * DECODER_MARGIN
        errors: list[CodeError | None] = [None] * n
        offsets = np.zeros(n, np.int64)
        coders: list[Any] = [None] * n
        for i, words in enumerate(batch_words(payloads)):
            if payloads[i].endswith(b"\0"):
                errors[i] = zero_ended()
                continue
            coders[i] = RangeDecoder(words)
            try:
                offsets[i] = coders[i].decode(OFFSET_MODEL)
            except BaseException as exc:
                errors[i] = decode_error(exc)
        if self.prior_kind == VQ_PARALLEL:
            steps = [list(g) for g in spec.schedule]

            def logits_at(step: int) -> np.ndarray:
                return self.runtime.group_logits(grid, step)
        else:
            steps = [[p] for p in range(h * w)]
            stepper = self.runtime.prior_stepper(n)  # whole batch: its caches cover every grid

            def logits_at(step: int) -> np.ndarray:
                return stepper.logits(step, grid)[:, None]
        alive = np.array([i for i in range(n) if errors[i] is None], np.int64)
        for step, members in enumerate(steps):
            if len(alive) == 0:
                break
            # Refused codes stay in the batch (their grids frozen): kind 3's caches need
            # every row, and a batch's composition is the encoder's.
            logits = logits_at(step)
            if logits.shape[2] != k:
                raise ModelIntegrityError(f"{self.manifest.ref}: the prior gives "
                                          f"{logits.shape[2]} logits per position, the "
                                          f"codebook has {k} codes")
            logits = logits[alive] if len(alive) < n else logits
            na, g = logits.shape[:2]
            probs, margins = step_tables(logits.reshape(na * g, k),
                                         np.repeat(offsets[alive], g), spec)
            probs, margins = probs.reshape(na, g, k), margins.reshape(na, g)
            margin = margins.min(axis=1)
            for j in np.flatnonzero(~(margin >= floor)).tolist():  # NaN is refused too
                i = int(alive[j])
                errors[i] = NotExactlyDecodable(
                    f"at grid position {members[int(np.argmin(margins[j]))]} the prior's "
                    f"logits on this machine ({self.runtime.provider}) lie "
                    f"{float(margin[j]):.2g} from a rounding boundary, less than guard/4 "
                    f"= {floor:.2g}: its tables may differ from the encoder's, so the "
                    "code is refused rather than decoded inexactly; decode it where the "
                    "prior computes like the encoder's (the CPU provider, the same "
                    "onnxruntime)")
            family = FAMILY
            decoded: list[int] = []
            rows: list[int] = []
            for j, i in enumerate(alive.tolist()):
                if errors[i] is not None:
                    continue
                try:
                    got = coders[i].decode(family, probs[j])
                except BaseException as exc:
                    errors[i] = decode_error(exc)
                    continue
                rows.append(i)
                decoded.extend(got.tolist())
            if rows:  # one assignment per step, not one per code
                flat[np.array(rows)[:, None], members] = np.array(decoded).reshape(
                    len(rows), len(members))
            alive = np.array([i for i in alive.tolist() if errors[i] is None], np.int64)
        out: list[np.ndarray | CodeError] = []
        for i in range(n):
            if errors[i] is None:
                try:
                    check = np.asarray(coders[i].decode(CHECK_MODEL, CHECK_BYTES), np.int32)
                except BaseException as exc:
                    errors[i] = decode_error(exc)
                else:
                    if not np.array_equal(check, prior_check(int(offsets[i]), grid[i])):
                        errors[i] = NotExactlyDecodable(
                            "the decoded VQ indices fail their check: this machine's prior "
                            f"({self.runtime.provider}) gave other tables than the encoder's "
                            "(float noise beyond the guard), or the payload was changed; "
                            "the code is refused rather than decoded inexactly; decode it "
                            "where the prior computes like the encoder's (the CPU provider, "
                            "the same onnxruntime)")
            # Not re-encoded: see "What a decoder accepts" in docs/code-format.md.
            out.append(errors[i] or grid[i].astype(np.int32))
        return out

    # -- helpers ----------------------------------------------------------------------
    def _kind_id(self, kind: str | None) -> int:
        if kind is None:
            return self.kind
        if kind not in CODE_KIND_IDS or CODE_KIND_IDS[kind] not in self.kinds:
            allowed = [KIND_NAMES[k] for k in sorted(self.kinds)]
            raise InvalidInput(f"{self.manifest.ref} cannot write code kind {kind!r}; "
                               f"it writes {allowed}")
        return CODE_KIND_IDS[kind]

    def _check_symbols(self, symbols: np.ndarray,
                       size: tuple[int, int] | None = None) -> np.ndarray:
        symbols = np.asarray(symbols)
        if symbols.dtype.kind not in "iu":
            raise InvalidInput(f"symbols must be integers, got {symbols.dtype}")
        symbols = self.runtime.check_symbols(symbols, size)
        if self.factorized is not None and self.manifest.family != "vqvae":
            self.factorized.check(symbols)
        else:
            check_indices(symbols, self.static.num_codes)  # type: ignore[union-attr]
        return symbols.astype(np.int32)


# The offset and check tables are fixed: one model each, built once.
OFFSET_MODEL = fixed_model(OFFSET_PROBS[0])
CHECK_MODEL = fixed_model(CHECK_PROBS[0])


def prior_payload(offset: int, symbols: np.ndarray, tables: np.ndarray,
                  order: np.ndarray | None = None) -> bytes:
    """A kind-3 or kind-4 payload: the rounding offset, the indices under their tables
    (grid (h, w) and tables (h*w, K) in raster order, coded in ``order``: raster when
    None, kind 4's schedule), the check (over the raster grid)."""
    coder = RangeEncoder()
    coder.encode(int(offset), OFFSET_MODEL)
    flat = np.ascontiguousarray(symbols, np.int32).reshape(-1)
    probs = np.ascontiguousarray(tables, np.float64)
    if order is not None:
        flat, probs = flat[order], probs[order]
    coder.encode(flat, FAMILY, probs)
    coder.encode(prior_check(offset, symbols), CHECK_MODEL)
    return finish(coder)


def _read_heads(payloads: list[bytes], read: Callable[[bytes], tuple[Any, ...]]
                ) -> tuple[list[np.ndarray | CodeError], list[tuple[Any, ...]]]:
    """Every payload's head through ``read`` (kind 5's (coder, j, z) or (coder, z)):
    (the results so far, refusals filled in; (index, *head) of the others)."""
    out: list[np.ndarray | CodeError] = [CorruptCode("not decoded")] * len(payloads)
    heads = []
    for i, payload in enumerate(payloads):
        if payload.endswith(b"\0"):
            out[i] = zero_ended()
            continue
        try:
            heads.append((i, *read(payload)))
        except CodeError as exc:
            out[i] = exc
    return out, heads


def _stack(results: Sequence[np.ndarray | CodeError], shape: Sequence[int]
           ) -> tuple[np.ndarray, dict[int, CodeError]]:
    """Per-code results -> (one array, zero rows where refused; the refusals by index)."""
    errors = {i: r for i, r in enumerate(results) if isinstance(r, CodeError)}
    out = np.zeros((len(results), *shape), np.int32)
    for i, r in enumerate(results):
        if not isinstance(r, CodeError):
            out[i] = r
    return out, errors


def with_index(exc: CodeError, index: int, total: int) -> CodeError:
    """The same refusal, its message prefixed with the code's position in the batch."""
    if total <= 1:
        return exc
    new = type(exc)(f"code {index} of {total}: {exc}")
    new.__cause__ = exc.__cause__
    return new
