"""worker/codec/codes.py: header layout, round trips of every kind, and every refusal.

Uses the checked-in golden models (tests/fixtures/golden_repo: hand-built ONNX graphs run
by onnxruntime) and the tiny trained models of ``tiny_repo`` for the real prior.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from latentserve.errors import (
    CodeError,
    CodeMismatch,
    CorruptCode,
    InvalidInput,
    NotExactlyDecodable,
    UnknownFormatVersion,
)
from latentserve.worker.codec.codes import (
    FORMAT_VERSION,
    HEADER_SIZE,
    VQ_PRIOR,
    VQ_STATIC,
    LatentCodec,
    checksum,
    pack,
    parse_header,
)
from latentserve.worker.codec.entropy import accepts, prior_tables
from latentserve.worker.runtime.engine import EngineConfig, ModelRuntime, PriorStepper
from latentserve.worker.runtime.pipeline import Pipeline

# The machine's cores are shared: one onnxruntime thread per session in tests.
ONE_THREAD = EngineConfig(intra_op_threads=1)
GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden_repo"


@pytest.fixture(scope="module")
def golden() -> Pipeline:
    return Pipeline(GOLDEN, ONE_THREAD)


@pytest.fixture(scope="module")
def tiny(tiny_repo: Path) -> Pipeline:
    return Pipeline(tiny_repo, ONE_THREAD)


def blobs(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28]
    c = rng.uniform(4, 24, (n, 2, 1, 1))
    r = rng.uniform(2, 10, (n, 1, 1))
    img = 255 * np.exp(-((yy - c[:, 0]) ** 2 + (xx - c[:, 1]) ** 2) / (2 * r**2))
    return np.clip(img + rng.uniform(0, 60, img.shape), 0, 255).astype(np.uint8)[:, None]


class NoisyPrior:
    """A real runtime whose prior logits get uniform noise in [-amp, amp] (or a transform)."""

    def __init__(self, runtime: ModelRuntime, amp: float = 0.0, transform: Any = None,
                 seed: int = 0) -> None:
        self._rt, self.amp, self.transform = runtime, amp, transform
        self.rng = np.random.default_rng(seed)
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._rt, name)

    def prior_logits(self, indices: np.ndarray) -> np.ndarray:
        self.calls += 1
        logits = self._rt.prior_logits(indices).astype(np.float64)
        if self.transform is not None:
            return self.transform(logits)
        return logits + self.rng.uniform(-self.amp, self.amp, logits.shape)

    def prior_stepper(self, n: int) -> PriorStepper:
        # Evaluate through this wrapper: full passes (models without a step graph) call
        # prior_logits above, steps run the noisy session below.
        return PriorStepper(self, n)  # type: ignore[arg-type]

    @property
    def prior_step(self) -> Any:
        return None if self._rt.prior_step is None else NoisySession(self._rt.prior_step, self)


class NoisySession:
    """The step graph's session; its logits get the owner's uniform noise (not transforms)."""

    def __init__(self, session: Any, owner: NoisyPrior) -> None:
        self._session, self.owner = session, owner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    def run(self, names: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        assert self.owner.transform is None, "transforms need whole logit grids"
        self.owner.calls += 1
        logits, *feats = self._session.run(names, feed)
        noise = self.owner.rng.uniform(-self.owner.amp, self.owner.amp, logits.shape)
        return [logits + noise, *feats]


# -- header -----------------------------------------------------------------------------

def test_header_layout() -> None:
    digest = "ab" * 32
    code = pack(digest, 3, b"\x12\x34")
    assert len(code) == HEADER_SIZE + 2
    assert code[0] == 0xA1 and code[1] == 3 and code[2:4] == b"\xab\xab"
    crc = zlib.crc32(bytes.fromhex(digest) + code[:4] + b"\x12\x34") & 0xFFFFFF
    assert (code[4:7] == crc.to_bytes(3, "big")
            == checksum(digest, code[:4], b"\x12\x34").to_bytes(3, "big"))
    h = parse_header(code)
    assert ((h.version, h.kind, h.fingerprint, h.payload)
            == (FORMAT_VERSION, 3, b"\xab\xab", b"\x12\x34"))
    assert h.made_by(digest) and not h.made_by("ab" * 31 + "ac")


@pytest.mark.parametrize("code, error, match", [
    (b"", CorruptCode, "truncated"),
    (b"\xa1\x01\x00\x00\x00\x00", CorruptCode, "truncated"),
    (b"\x89PNG\r\n\x1a\n", CorruptCode, "not a latentserve code"),
    (b"\xa3\x01\x00\x00\x00\x00\x00", UnknownFormatVersion, "format version 3"),
    (b"\xa2\x01\x00\x00\x00\x00\x00", CorruptCode, "ends inside its size field"),
    (b"\xa0\x01\x00\x00\x00\x00\x00", UnknownFormatVersion, "format version 0"),
    (b"\xa1\x07\x00\x00\x00\x00\x00", CorruptCode, "code kind 7"),
])
def test_header_refusals(code: bytes, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        parse_header(code)


def test_header_refuses_non_bytes() -> None:
    with pytest.raises(CorruptCode, match="must be bytes"):
        parse_header("a1")  # type: ignore[arg-type]


# -- round trips ------------------------------------------------------------------------

@pytest.mark.parametrize("ref, kind", [("golden-ae:1", None), ("golden-vqvae:1", None),
                                       ("golden-vqvae:1", "vq_static")])
def test_golden_round_trip(golden: Pipeline, ref: str, kind: str | None) -> None:
    codec = golden.codec(ref)
    symbols = codec.runtime.encode(blobs(40))
    codes = codec.encode(symbols, kind=kind)
    assert len(codes) == 40 and all(c[2:4] == codec.manifest.fingerprint for c in codes)
    assert np.array_equal(codec.decode(codes), symbols)
    if kind == "vq_static":
        assert {c[1] for c in codes} == {VQ_STATIC}


def on_every_offsets_boundary(scale: float):  # type: ignore[no-untyped-def]
    """A prior transform: logits r / (16 * scale), r = code + 8 * (position % 2), so for
    every rounding offset j some logit sits exactly on a boundary (r + j = 8 mod 16)."""
    def transform(logits: np.ndarray) -> np.ndarray:
        n, k, h, w = logits.shape
        parity = (np.arange(h * w) % 2).reshape(1, 1, h, w)
        r = np.arange(k).reshape(1, k, 1, 1) % 8 + 8 * parity
        return np.broadcast_to(r / (16 * scale), logits.shape).astype(np.float64)
    return transform


def test_vq_prior_picks_the_first_safe_rounding_offset(golden: Pipeline) -> None:
    codec = golden.codec("golden-vqvae:1")
    symbols = codec.runtime.encode(blobs(60, seed=3))
    codes = codec.encode(symbols)
    assert {c[1] for c in codes} == {VQ_PRIOR}
    offsets, _ = codec.prior_plan(symbols)
    assert offsets.min() == 0 and offsets.max() > 0  # the random bigram hits the guard often
    guard = codec.prior.guard  # type: ignore[union-attr]
    flat = codec.runtime.prior_logits(symbols).reshape(60, 8, 49).transpose(0, 2, 1)
    for i, j in enumerate(offsets):
        margins = [prior_tables(flat[i], codec.prior, o)[1].min() for o in range(j + 1)]
        assert margins[-1] >= guard and all(m < guard for m in margins[:-1])
    assert np.array_equal(codec.decode(codes), symbols)


def test_vq_prior_falls_back_when_no_offset_is_safe(golden: Pipeline) -> None:
    codec = golden.codec("golden-vqvae:1")
    symbols = codec.runtime.encode(blobs(10, seed=3))
    scale = codec.prior.logit_scale  # type: ignore[union-attr]
    edgy = LatentCodec(NoisyPrior(codec.runtime, transform=on_every_offsets_boundary(scale)))  # type: ignore[arg-type]
    codes = edgy.encode(symbols)
    assert {c[1] for c in codes} == {VQ_STATIC}
    assert np.array_equal(codec.decode(codes), symbols)


def test_empty_batches(golden: Pipeline) -> None:
    codec = golden.codec("golden-vqvae:1")
    assert codec.encode(np.zeros((0, 7, 7), np.int32)) == []
    assert codec.decode([]).shape == (0, 7, 7)


@pytest.mark.parametrize("family", ["ae", "vae", "vqvae"])
def test_tiny_round_trip(tiny: Pipeline, mnist_images: np.ndarray, family: str) -> None:
    codec = tiny.codec(f"tiny-{family}")
    symbols = codec.runtime.encode(mnist_images[:64])
    codes = codec.encode(symbols)
    assert np.array_equal(codec.decode(codes), symbols)
    kinds = [c[1] for c in codes]
    payload = np.array([len(c) - HEADER_SIZE for c in codes])
    bits = codec.cross_entropy_bits(symbols, kinds)
    # The range coder's flush: a few bytes per code over the tables' own cost.
    assert np.all(payload * 8 <= bits + 40), (payload * 8 - bits).max()
    if family == "vqvae":
        assert VQ_PRIOR in kinds


def test_kind3_decoding_batches_the_prior(tiny: Pipeline, mnist_images: np.ndarray) -> None:
    codec = tiny.codec("tiny-vqvae")
    symbols = codec.runtime.encode(mnist_images[:50])
    codes = codec.encode(symbols)
    noisy = NoisyPrior(codec.runtime)
    assert np.array_equal(LatentCodec(noisy).decode(codes), symbols)  # type: ignore[arg-type]
    # One prior run (a step, or a full pass for models without a step graph) per grid
    # position for the whole batch, not one per image.
    assert noisy.calls == np.prod(codec.manifest.latent_shape)


@pytest.mark.parametrize("ref", ["tiny-vqvae", "golden-vqvae:1"])
def test_logit_noise_of_1e5_still_decodes_exactly(tiny: Pipeline, golden: Pipeline,
                                                  mnist_images: np.ndarray, ref: str) -> None:
    pipe = golden if ref.startswith("golden") else tiny
    codec = pipe.codec(ref)
    images = blobs(64, seed=9) if ref.startswith("golden") else mnist_images[:64]
    symbols = codec.runtime.encode(images)
    codes = codec.encode(symbols)
    assert sum(c[1] == VQ_PRIOR for c in codes) >= 10
    for seed in range(3):
        noisy = LatentCodec(NoisyPrior(codec.runtime, amp=1e-5, seed=seed))  # type: ignore[arg-type]
        assert np.array_equal(noisy.decode(codes), symbols)


def test_logits_on_a_rounding_boundary_are_refused(golden: Pipeline) -> None:
    codec = golden.codec("golden-vqvae:1")
    symbols = codec.runtime.encode(blobs(30, seed=4))
    codes = codec.encode(symbols)
    scale = codec.prior.logit_scale  # type: ignore[union-attr]
    # Whatever offset a code uses, some logit at grid position 0 or 1 sits on a boundary:
    # the decoder cannot trust its tables.
    edgy = NoisyPrior(codec.runtime, transform=on_every_offsets_boundary(scale))
    results = LatentCodec(edgy).decode_each(codes)  # type: ignore[arg-type]
    for code, r in zip(codes, results, strict=True):
        if code[1] == VQ_PRIOR:
            assert isinstance(r, NotExactlyDecodable)
            assert re.search(r"grid position [01] .*rounding boundary", str(r))
        else:
            assert isinstance(r, np.ndarray)


def test_wrong_tables_never_decode_silently(golden: Pipeline) -> None:
    """Logit noise far above the guard changes tables: refused (exactness check), never garbage."""
    codec = golden.codec("golden-vqvae:1")
    symbols = codec.runtime.encode(blobs(60, seed=5))
    codes = codec.encode(symbols)
    prior = [i for i, c in enumerate(codes) if c[1] == VQ_PRIOR]
    refused = 0
    for amp in (3e-4, 3e-3, 0.6):
        wrong = LatentCodec(NoisyPrior(codec.runtime, amp=amp, seed=1))  # type: ignore[arg-type]
        for i, r in zip(prior, wrong.decode_each([codes[i] for i in prior]), strict=True):
            if isinstance(r, np.ndarray):  # the noise changed no table this code used
                assert np.array_equal(r, symbols[i])
            else:
                assert isinstance(r, (CorruptCode, NotExactlyDecodable))
                refused += 1
    assert refused > len(prior)  # most codes met a changed table


# -- refusals ---------------------------------------------------------------------------

def test_code_of_another_model_is_refused(golden: Pipeline) -> None:
    ae, vq = golden.codec("golden-ae:1"), golden.codec("golden-vqvae:1")
    code = ae.encode(ae.runtime.encode(blobs(1)))[0]
    with pytest.raises(CodeMismatch, match=f"fingerprint {ae.manifest.fingerprint.hex()}.*"
                                           "not by golden-vqvae:1"):
        vq.decode([code])


def test_checksum_mismatch_is_corrupt(golden: Pipeline) -> None:
    codec = golden.codec("golden-ae:1")
    code = bytearray(codec.encode(codec.runtime.encode(blobs(1)))[0])
    code[-1] ^= 0x10
    with pytest.raises(CorruptCode, match="checksum mismatch"):
        codec.decode([bytes(code)])


def test_kind_the_model_does_not_write_is_corrupt(golden: Pipeline) -> None:
    codec = golden.codec("golden-ae:1")
    payload = parse_header(codec.encode(codec.runtime.encode(blobs(1)))[0]).payload
    with pytest.raises(CorruptCode, match="does not write codes of kind 2"):
        codec.decode([pack(codec.manifest.digest, VQ_STATIC, payload)])


@pytest.mark.parametrize("ref", ["golden-ae:1", "golden-vqvae:1"])
def test_what_a_decoder_accepts_with_a_valid_checksum(golden: Pipeline, ref: str) -> None:
    """docs/code-format.md, "What a decoder accepts": the decoder does not re-encode. A
    payload ending in a zero byte is refused (the encoder never writes one); any other
    decodes to the symbols whose final interval holds its value (kinds 1, 2: checked
    against the coder), and the encoder still writes its one shortest payload for them."""
    codec = golden.codec(ref)
    symbols = codec.runtime.encode(blobs(1, seed=2))
    code = codec.encode(symbols, kind=None)[0]
    h = parse_header(code)
    # Zero-extended (with a correct checksum): refused.
    for payload in (h.payload + b"\0", h.payload + b"\0\0\0\0\0"):
        forged = pack(codec.manifest.digest, h.kind, payload)
        with pytest.raises(CorruptCode, match="ends in a zero byte"):
            codec.decode([forged])
    # Zeros up to the end of the state window, then bytes the decoder never reads: the
    # same symbols; the canonical check (kept for verifying encoders) refuses it.
    tables = codec.factorized if h.kind == 1 else codec.static
    assert tables is not None
    if h.kind in (1, 2):
        window = 4 * (tables.encoder_for(symbols[0]).pos()[0] + 2)
        longer = h.payload.ljust(window, b"\0") + b"\x07\x01"
        assert np.array_equal(codec.decode([pack(codec.manifest.digest, h.kind, longer)]),
                              symbols)
        assert isinstance(tables.decode_batch([longer], canonical=True)[0], CorruptCode)
        assert isinstance(tables.decode_batch([h.payload], canonical=True)[0], np.ndarray)
    else:  # kind 3: bytes appended give the same indices or are refused by the check
        forged = pack(codec.manifest.digest, h.kind, h.payload + b"\x07" * 40)
        result = codec.decode_each([forged])[0]
        assert isinstance(result, CodeError) or np.array_equal(result, symbols[0])
    # Cut short: refused, or other symbols whose final interval holds the cut payload.
    for cut in range(1, len(h.payload) + 1):
        payload = h.payload[:-cut]
        result = codec.decode_each([pack(codec.manifest.digest, h.kind, payload)])[0]
        if isinstance(result, CodeError):
            continue
        assert isinstance(result, np.ndarray)
        if h.kind in (1, 2):
            assert accepts(tables.encoder_for(result), payload)  # type: ignore[union-attr]
    # The encoder's payload is the shortest: re-encoding what it decodes to gives it back.
    assert codec.encode(codec.decode([code]), kind=None) == [code]
    # The empty payload is canonical: the all-zero stream, i.e. every symbol the first of
    # its table (it is what the encoder writes for that message).
    symbols = codec.decode([pack(codec.manifest.digest, VQ_STATIC if h.kind == VQ_PRIOR
                                 else h.kind, b"")])
    assert codec.encode(symbols, kind="vq_static" if h.kind == VQ_PRIOR else None)[0][7:] == b""


def test_decode_names_the_bad_index(golden: Pipeline) -> None:
    codec = golden.codec("golden-ae:1")
    codes = codec.encode(codec.runtime.encode(blobs(3)))
    codes[1] = codes[1][:-1]
    with pytest.raises(CorruptCode, match="code 1 of 3"):
        codec.decode(codes)
    results = codec.decode_each(codes)
    assert isinstance(results[0], np.ndarray) and isinstance(results[1], CorruptCode)


def test_encode_refuses_bad_symbols(golden: Pipeline) -> None:
    ae, vq = golden.codec("golden-ae:1"), golden.codec("golden-vqvae:1")
    with pytest.raises(InvalidInput, match=r"channel 0 must lie in \[-4, 4\]"):
        ae.encode(np.full((1, 2, 7, 7), 9, np.int32))
    with pytest.raises(InvalidInput, match=r"VQ indices must lie in \[0, 7\]"):
        vq.encode(np.full((1, 7, 7), 8, np.int32))
    with pytest.raises(InvalidInput, match="shape"):
        vq.encode(np.zeros((1, 6, 7), np.int32))
    with pytest.raises(InvalidInput, match="integers"):
        vq.encode(np.zeros((1, 7, 7), np.float32))
    with pytest.raises(InvalidInput, match="cannot write code kind 'vq_prior'"):
        ae.encode(np.zeros((1, 2, 7, 7), np.int32), kind="vq_prior")


@pytest.mark.parametrize(("ref", "kind"), [("golden-ae:1", None), ("golden-vqvae:1", "vq_static")])
def test_not_shortest_finds_a_longer_payload_by_index(golden: Pipeline, ref: str,
                                                      kind: str | None) -> None:
    """The encoder's own check (``latentserve models check``'s round trip): its payloads are
    the shortest; one with bytes appended (checksum made valid) is found by index."""
    codec = golden.codec(ref)
    codes = codec.encode(codec.runtime.encode(blobs(4, seed=5)), kind=kind)
    assert codec.not_shortest(codes) == []
    h = parse_header(codes[2])
    codes[2] = pack(codec.manifest.digest, h.kind, h.payload + b"\x07\x01")
    assert codec.not_shortest(codes) == [2]
