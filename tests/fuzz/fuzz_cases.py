"""Case generators for the Inference service: model names, images, codes, request fields,
with the statuses each may get.

Every generated request carries ``allowed``: the statuses the API documents for what
is wrong with it (proto/latentserve/v1/*.proto). A request assembled from several
parts may fail for any of its parts' reasons (the order of the checks is the server's
business), and may succeed only if every part can: ``combine`` computes that set.
``None`` means "any definite status" (random bytes, other message types).

Strategies are built once (module constants, or ``functools.cache`` on their inputs):
building and validating strategy objects inside every draw cost hypothesis more
than the requests themselves.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any

import grpc
import numpy as np
from hypothesis import strategies as st

from latentserve.v1 import inference_pb2 as pb

from .fuzz_images import ImageCase, one

C = grpc.StatusCode
OK, INVALID, NOT_FOUND, EXHAUSTED = C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.RESOURCE_EXHAUSTED
MISMATCH, DATA_LOSS = C.FAILED_PRECONDITION, C.DATA_LOSS
Allowed = frozenset[grpc.StatusCode] | None
Codes = tuple[tuple[str, bytes], ...]  # (model that made it, code)
__all__ = ["ImageCase", "one"]


@dataclass(frozen=True)
class Limits:
    """The fuzz server's small limits, so that every limit path is reachable."""

    images: int = 8            # max_images_per_request
    message_bytes: int = 16384  # max_message_bytes (gRPC itself refuses 2x this)
    pixels: int = 4096          # max_pixels_per_image: 64 x 64 passes, 65 x 65 does not
    job_items: int = 64         # max_job_items
    chunk_size: int = 8
    queued_chunks: int = 24


LIMITS = Limits()
SHAPE = (1, 28, 28)  # every tiny model's image shape
MODELS = ("tiny-ae", "tiny-vae", "tiny-vqvae")


def combine(parts: Iterable[Allowed]) -> Allowed:
    """The statuses of a request made of ``parts``: any part's failure, or OK if all can pass."""
    out: set[grpc.StatusCode] = set()
    can_pass = True
    for p in parts:
        if p is None:
            return None
        out |= p - {OK}
        can_pass &= OK in p
    return frozenset(out | ({OK} if can_pass else set()))


def _same(value: Any) -> Any:
    return value


def _also_same(value: Any) -> Any:
    return value


def weighted(good: st.SearchStrategy[Any],
             *others: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` as three branches of a one_of with ``others``: one_of keeps one copy of a
    repeated branch, so the copies are mapped through two different identities."""
    return st.one_of(good, good.map(_same), good.map(_also_same), *others)


def usually(good: st.SearchStrategy[Any], edge: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` about three draws in four: requests wrong in one field are the common case
    (hypothesis also favours the first branch)."""
    return weighted(good, edge)


# -- scalars ------------------------------------------------------------------------------------

EDGE_U32 = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 27, 28, 29, 64, 65, 255, 256, 4096, 65535,
                                      65536, 2**31 - 1, 2**31, 2**32 - 1]),
                     st.integers(0, 2**32 - 1))
EDGE_U64 = st.one_of(st.sampled_from([0, 1, 7, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1]),
                     st.integers(0, 2**64 - 1))
# Temperatures: NaN, infinities, signed zeros, subnormals, float32's extremes.
EDGE_F32 = st.one_of(st.sampled_from([0.0, -0.0, -1.0, 1e-45, 1e-38, 1e-30, 1e-6, 0.01, 0.5, 1.0,
                                      2.0, 100.0, 1000.0, 1000.001, 1e30, 3.4028235e38,
                                      float("inf"), -float("inf"), float("nan")]),
                     st.floats(width=32))
INT32 = st.integers(-2**31, 2**31 - 1)
FORMATS = usually(st.sampled_from([0, 1, 2]), INT32)  # proto3 enums are open: any int32
SEED = st.integers(0, 2**16)
BOOL = st.booleans()


MAX_TEMPERATURE = 1000.0  # latentserve.worker.runtime.pipeline.MAX_TEMPERATURE


def temperature_status(t: float | None) -> frozenset[grpc.StatusCode]:
    """Sample's verdict on a temperature (a float32 on the wire; None: unset, 1.0)."""
    if t is None:
        return one(OK)
    t32 = float(np.float32(t))
    return one(OK) if 0 < t32 <= MAX_TEMPERATURE else one(INVALID)


def job_temperature_status(t: float | None) -> frozenset[grpc.StatusCode]:
    """SubmitJob's: it checks > 0 and finite only, and a worker refuses the job over the
    maximum (the job fails); refusing it at submission would be right too."""
    status = temperature_status(t)
    t32 = float(np.float32(t if t is not None else 1.0))
    return one(OK, INVALID) if status == {INVALID} and np.isfinite(t32) and t32 > 0 else status


# -- model references ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Ref:
    """A model reference as sent, the status it resolves to, and the model it names."""

    text: str
    status: grpc.StatusCode
    name: str = ""

    @property
    def empty(self) -> bool:
        return self.text == ""


def ref_status(text: str) -> Ref:
    """What the API says of ``text`` as a model: "NAME" or "NAME:VERSION" (version >= 1)."""
    name, sep, version = text.strip().partition(":")
    if not name or (sep and (not version.isdigit() or int(version) < 1)):
        return Ref(text, INVALID)
    if name in MODELS and (not sep or int(version) == 1):
        return Ref(text, OK, name)
    return Ref(text, NOT_FOUND)


FIXED_REFS = [*MODELS, *(f"{m}:1" for m in MODELS), "tiny-ae:01", " tiny-vae\n",
              ":", ":1", "tiny-ae:", "tiny-ae:0", "tiny-ae:-1", "tiny-ae:1:1", "tiny-ae:1.0",
              "tiny-ae:2", "tiny-vqvae:99999999999999999999999", "TINY-AE", "no-such-model",
              "../tiny-ae", "tiny-ae/1", "*", "\x00", "tiny-ae\x00", "mnist-ae-q1",
              "golden-ae:1", "\u202etiny-ae"]


@cache
def long_text(min_size: int = 300, max_size: int = 40_000) -> st.SearchStrategy[str]:
    """Over-long strings, cheap to generate: one character repeated, maybe a suffix.

    Mostly under the message limit; the rest past it, some past twice the limit, which
    gRPC itself refuses (and its Python client takes ~150 ms to report: kept rare).
    """
    sizes = usually(st.integers(min_size, 3000), st.integers(min_size, max_size))
    return st.builds(lambda n, ch, tail: ch * n + tail, sizes,
                     st.sampled_from("m\u00e9:0-\u4e2d"), st.sampled_from(["", ":1", ":x"]))


# Good references about half the time, so that the rest of a request gets looked at too
# (hypothesis favours the first branch of a one_of: the good one comes first).
REFS = weighted(st.sampled_from(MODELS), st.just(""), st.sampled_from(FIXED_REFS),
                st.text(max_size=24), long_text()).map(ref_status)


# -- images -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageMsg:
    """One Image message and its statuses (by ``resize``)."""

    msg: pb.Image
    plain: Allowed
    resized: Allowed
    label: str

    def allowed(self, resize: bool) -> Allowed:
        return self.resized if resize else self.plain


def raw_status(c: int, h: int, w: int, n_bytes: int) -> frozenset[grpc.StatusCode]:
    """The API's verdict on RawImage(channels=c, height=h, width=w) holding n_bytes."""
    out = set()
    if h * w > LIMITS.pixels:
        out.add(EXHAUSTED)
    if c not in (1, 3) or h < 1 or w < 1 or n_bytes != c * h * w or (c, h, w) != SHAPE:
        out.add(INVALID)
    return frozenset(out or {OK})


def pixel_bytes(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


SHAPES = st.one_of(
    st.just(SHAPE), st.sampled_from([(3, 28, 28), (2, 28, 28), (4, 28, 28), (0, 28, 28),
                                     (1, 28, 27), (1, 27, 28), (1, 0, 0), (1, 1, 784),
                                     (1, 784, 1), (1, 64, 64), (1, 65, 65), (3, 1, 1),
                                     (28, 28, 1)]),
    st.tuples(EDGE_U32, EDGE_U32, EDGE_U32))
# How many bytes raw pixels hold, given the exact count: the exact count, as uint16 or
# float32 pixels would, a few off, or any.
SIZES = st.one_of(st.just(("times", 1)), st.just(("times", 2)), st.just(("times", 4)),
                  st.tuples(st.just("plus"), st.integers(-3, 3)),
                  st.tuples(st.just("any"), st.integers(0, 3000)))


def _size(exact: int, how: tuple[str, int], cap: int) -> int:
    kind, k = how
    n = exact * k if kind == "times" else exact + k if kind == "plus" else k
    return min(max(n, 0), cap)


@st.composite
def _raw_images(draw: st.DrawFn) -> ImageMsg:
    c, h, w = draw(SHAPES)
    size = _size(c * h * w, draw(SIZES), 4000)
    msg = pb.Image(raw=pb.RawImage(data=pixel_bytes(size, draw(SEED)), channels=c, height=h,
                                   width=w))
    status = raw_status(c, h, w, size)
    return ImageMsg(msg, status, status, f"raw {c}x{h}x{w} holding {size} bytes")


RAW_IMAGES = _raw_images()  # odd channel counts and shapes, wrong byte counts, other dtypes
MUTATIONS = st.lists(st.tuples(st.sampled_from(["flip", "set", "cut", "extend", "delete"]),
                               st.integers(0, 2**20), st.integers(0, 255),
                               st.binary(max_size=16)), min_size=1, max_size=4)


def mutate(data: bytes, changes: list[tuple[str, int, int, bytes]]) -> bytes:
    """Flip, overwrite, cut or extend a few bytes of ``data`` (positions modulo its size)."""
    b = bytearray(data)
    for how, at, value, extra in changes:
        at %= max(len(b), 1)
        if how == "flip" and b:
            b[at] ^= 1 << (value % 8)
        elif how == "set" and b:
            b[at] = value
        elif how == "cut":
            del b[at:]
        elif how == "extend":
            b += extra
        elif b:
            del b[at:at + 1 + value % 8]
    return bytes(b)


def damaged(strategy: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """A valid message's bytes, truncated, bit-flipped or spliced."""
    return st.builds(mutate, strategy, MUTATIONS)


@cache
def encoded_images(corpus: tuple[ImageCase, ...]) -> st.SearchStrategy[ImageMsg]:
    some = one(OK, INVALID, EXHAUSTED)
    return st.one_of(
        st.sampled_from(corpus).map(lambda c: ImageMsg(pb.Image(encoded=c.data), c.plain,
                                                       c.resized, c.label)),
        st.builds(lambda c, changes: ImageMsg(pb.Image(encoded=mutate(c.data, changes)), some,
                                              some, f"mutated {c.label}"),
                  st.sampled_from(corpus), MUTATIONS),
        # Random bytes are not an image (the formats read all have a magic number).
        st.binary(max_size=600).map(lambda b: ImageMsg(pb.Image(encoded=b), one(INVALID),
                                                       one(INVALID), "random bytes")),
        st.just(ImageMsg(pb.Image(), one(INVALID), one(INVALID), "empty Image")),
    )


@cache
def good_images(corpus: tuple[ImageCase, ...]) -> st.SearchStrategy[ImageMsg]:
    """Images the models take as they are: files of the right size and mode, raw pixels."""
    files = [c for c in corpus if c.plain == {OK}]
    return st.one_of(
        st.sampled_from(files).map(lambda c: ImageMsg(pb.Image(encoded=c.data), c.plain,
                                                      c.resized, c.label)),
        SEED.map(lambda seed: ImageMsg(pb.Image(raw=pb.RawImage(
            data=pixel_bytes(784, seed), channels=1, height=28, width=28)), one(OK), one(OK),
            "raw 1x28x28")))


@cache
def image_msgs(corpus: tuple[ImageCase, ...]) -> st.SearchStrategy[ImageMsg]:
    """Any image; good ones most of the time, so that one bad image among good ones is
    the common case."""
    return weighted(good_images(corpus), encoded_images(corpus), RAW_IMAGES)


# -- requests -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """A request's bytes (or a request stream's), the statuses it may get, and what it is."""

    payload: bytes | tuple[bytes, ...]
    allowed: Allowed
    label: str
    messages: int = 1  # replies an OK response stream must hold (one per message)

    def __repr__(self) -> str:  # failure reports: the label, not kilobytes of payload
        size = (len(self.payload) if isinstance(self.payload, bytes)
                else [len(p) for p in self.payload])
        allowed = "any" if self.allowed is None else sorted(c.name for c in self.allowed)
        return f"Case({self.label[:500]!r}, {size} bytes, allowed={allowed})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # hypothesis's printer
        printer.text(repr(self))


def size_status(msg: Any) -> frozenset[grpc.StatusCode]:
    return one(EXHAUSTED) if msg.ByteSize() > LIMITS.message_bytes else one(OK)


@st.composite
def _raw_batches(draw: st.DrawFn) -> tuple[pb.RawBatch, frozenset[grpc.StatusCode]]:
    count = draw(COUNTS)
    c, h, w = draw(BATCH_SHAPES)
    exact = count * c * h * w
    size = _size(exact, draw(SIZES), 8000)
    msg = pb.RawBatch(data=pixel_bytes(size, count), count=count, channels=c, height=h, width=w)
    out = set()
    if h * w > LIMITS.pixels:
        out.add(EXHAUSTED)
    if (c, h, w) != SHAPE or size != exact:
        out.add(INVALID)
    return msg, frozenset(out or {OK})


COUNTS = usually(st.integers(0, LIMITS.images + 1), EDGE_U32)
BATCH_SHAPES = usually(st.just(SHAPE), st.one_of(
    st.sampled_from([(3, 28, 28), (1, 28, 1), (0, 0, 0), (1, 65, 65)]),
    st.tuples(EDGE_U32, EDGE_U32, EDGE_U32)))
RAW_BATCHES = _raw_batches()  # odd counts, shapes and byte counts (empty batches too)
MAYBE_BATCH = st.one_of(st.none(), st.none(), RAW_BATCHES)


@dataclass(frozen=True)
class CompressParts:
    """A CompressRequest and the statuses of everything in it but its model."""

    msg: pb.CompressRequest
    ref: Ref
    body: Allowed
    label: str


@st.composite
def _compress_parts(draw: st.DrawFn, corpus: tuple[ImageCase, ...]) -> CompressParts:
    ref = draw(REFS)
    images = draw(st.lists(image_msgs(corpus), max_size=LIMITS.images + 2))
    resize = draw(BOOL)
    batch = draw(MAYBE_BATCH)
    msg = pb.CompressRequest(model=ref.text, images=[i.msg for i in images], resize=resize)
    parts: list[Allowed] = [i.allowed(resize) for i in images]
    count = len(images)
    if batch is not None:
        msg.batch.CopyFrom(batch[0])
        parts.append(batch[1])
        count = batch[0].count
        if images:
            parts.append(one(INVALID))
    if count > LIMITS.images:
        parts.append(one(EXHAUSTED))
    parts.append(size_status(msg))
    label = (f"{len(images)} images [{', '.join(i.label for i in images)}]"
             f"{' + batch' if batch else ''}{' resize' if resize else ''}")
    return CompressParts(msg, ref, combine(parts), label)


@cache
def compress_parts(corpus: tuple[ImageCase, ...]) -> st.SearchStrategy[CompressParts]:
    """Models, image lists, raw images and batches of every kind, limits crossed."""
    return _compress_parts(corpus)


def compress_case(parts: CompressParts) -> Case:
    model = one(INVALID) if parts.ref.empty else one(parts.ref.status)
    return Case(parts.msg.SerializeToString(), combine([model, parts.body]),
                f"Compress model={parts.ref.text[:40]!r} {parts.label}")


# -- codes --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CodeCase:
    """A latent code (or not), the statuses it gets, and the model that made it (if real)."""

    code: bytes
    allowed: frozenset[grpc.StatusCode]
    maker: str
    label: str


def _flipped(real: tuple[str, bytes], bits: frozenset[int]) -> CodeCase:
    maker, code = real
    b = bytearray(code)
    bits = frozenset(bit % (8 * len(code)) for bit in bits)
    for bit in bits:
        b[bit // 8] ^= 1 << (bit % 8)
    # A changed fingerprint names no model here (FAILED_PRECONDITION); anything else fails
    # the checksum or the header checks (DATA_LOSS).
    allowed = one(DATA_LOSS, MISMATCH) if bytes(b) != code else one(OK)
    return CodeCase(bytes(b), allowed, maker if bytes(b) == code else "",
                    f"{maker} code, bits {sorted(bits)} flipped")


@cache
def code_cases(codes: Codes, foreign: tuple[bytes, ...]) -> st.SearchStrategy[CodeCase]:
    """Real codes, codes with flipped bits, truncated or extended codes, other repos' codes."""
    real = st.sampled_from(codes)
    return st.one_of(
        real.map(lambda mc: CodeCase(mc[1], one(OK), mc[0], f"{mc[0]} code")),
        st.builds(_flipped, real, st.frozensets(st.integers(0, 2**16), min_size=1,
                                                max_size=6)),
        st.builds(lambda mc, keep: CodeCase(mc[1][:keep % len(mc[1])], one(DATA_LOSS), "",
                                            f"{mc[0]} code cut to {keep % len(mc[1])} bytes"),
                  real, st.integers(0, 2**16)),
        st.builds(lambda mc, tail: CodeCase(mc[1] + tail, one(DATA_LOSS), "",
                                            f"{mc[0]} code + {len(tail)} bytes"),
                  real, st.binary(min_size=1, max_size=8)),
        st.sampled_from(foreign).map(lambda c: CodeCase(c, one(MISMATCH), "", "foreign code")),
        st.binary(max_size=64).map(lambda b: CodeCase(b, one(DATA_LOSS, MISMATCH), "",
                                                      "random bytes")),
        st.binary(max_size=40).map(lambda b: CodeCase(b"\xa1\x01" + b, one(DATA_LOSS, MISMATCH),
                                                      "", "random bytes after a v1 header")),
    )


def reconstruct_allowed(codes: list[CodeCase], ref: Ref, fmt: int, msg: Any) -> Allowed:
    parts: list[Allowed] = [size_status(msg)]
    if len(codes) > LIMITS.images:
        parts.append(one(EXHAUSTED))
    if fmt not in (0, 1, 2):
        parts.append(one(INVALID))
    if not ref.empty and ref.status is not OK:
        parts.append(one(ref.status))
    for c in codes:
        if c.maker and not ref.empty and ref.status is OK and c.maker != ref.name:
            parts.append(one(MISMATCH))
        else:
            parts.append(c.allowed)
    return combine(parts)


@st.composite
def _reconstruct_cases(draw: st.DrawFn, codes: Codes, foreign: tuple[bytes, ...]) -> Case:
    ref = draw(REFS)
    items = draw(st.lists(code_cases(codes, foreign), max_size=LIMITS.images + 2))
    fmt = draw(FORMATS)
    msg = pb.ReconstructRequest(codes=[c.code for c in items], format=fmt, model=ref.text)
    return Case(msg.SerializeToString(), reconstruct_allowed(items, ref, fmt, msg),
                f"Reconstruct model={ref.text[:40]!r} format={fmt} "
                f"[{', '.join(c.label for c in items)}]")


@cache
def reconstruct_cases(codes: Codes, foreign: tuple[bytes, ...]) -> st.SearchStrategy[Case]:
    """Real codes, flipped bits, truncations, other models' codes, odd formats and models."""
    return _reconstruct_cases(codes, foreign)


# -- Sample, GetModel ---------------------------------------------------------------------------

TEMPERATURES = usually(st.one_of(st.none(), st.sampled_from([0.5, 1.0, 2.0])), EDGE_F32)


@st.composite
def _sample_cases(draw: st.DrawFn) -> Case:
    ref = draw(REFS)
    count = draw(COUNTS)
    temperature = draw(TEMPERATURES)
    fmt = draw(FORMATS)
    msg = pb.SampleRequest(model=ref.text, count=count, seed=draw(EDGE_U64),
                           start=draw(EDGE_U64), format=fmt)
    if temperature is not None:
        msg.temperature = temperature
    parts = [one(INVALID) if ref.empty else one(ref.status), temperature_status(temperature),
             one(OK) if fmt in (0, 1, 2) else one(INVALID),
             one(EXHAUSTED) if count > LIMITS.images else one(OK), size_status(msg)]
    return Case(msg.SerializeToString(), combine(parts),
                f"Sample model={ref.text[:40]!r} count={count} seed={msg.seed} "
                f"start={msg.start} temperature={temperature} format={fmt}")


SAMPLE_CASES = _sample_cases()  # counts, seeds, starts, temperatures at and past every edge


def _get_model(ref: Ref) -> Case:
    msg = pb.GetModelRequest(model=ref.text)
    status = one(INVALID) if ref.empty else one(ref.status)
    return Case(msg.SerializeToString(), combine([status, size_status(msg)]),
                f"GetModel {ref.text[:60]!r}")


MODEL_CASES = REFS.map(_get_model)


# -- raw bytes ----------------------------------------------------------------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


# Random bytes, and byte strings built from random protobuf tags and values (a length
# prefix may claim more than follows).
_FIELD = st.builds(
    lambda number, wire, value: _varint(number << 3 | wire) + value,
    st.integers(1, 20), st.integers(0, 7),
    st.one_of(st.binary(max_size=12), st.integers(0, 2**70).map(_varint),
              st.binary(max_size=40).map(lambda b: _varint(len(b)) + b)))
PROTOBUF_NOISE = st.one_of(st.binary(max_size=200), st.lists(_FIELD, max_size=8).map(b"".join))


def negative_field(data: bytes, number: int, k: int) -> bytes:
    """``data`` with varint field ``number`` set again to -k, as a client's negative int64
    lands on the wire (ten bytes of two's complement); for a uint field the last one wins."""
    return data + _varint(number << 3) + _varint(2**64 - k)
