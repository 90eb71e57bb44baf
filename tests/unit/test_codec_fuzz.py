"""Randomly corrupted codes are always refused with a CodeError; nothing crashes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from latentserve.errors import CodeError
from latentserve.worker.codec.codes import HEADER_SIZE, LatentCodec, pack
from latentserve.worker.codec.entropy import accepts
from latentserve.worker.runtime.engine import EngineConfig
from latentserve.worker.runtime.pipeline import Pipeline

# The machine's cores are shared: one onnxruntime thread per session in tests.
ONE_THREAD = EngineConfig(intra_op_threads=1)
GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden_repo"


def blobs(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28]
    c = rng.uniform(4, 24, (n, 2, 1, 1))
    img = 255 * np.exp(-((yy - c[:, 0]) ** 2 + (xx - c[:, 1]) ** 2) / 30)
    return np.clip(img + rng.uniform(0, 80, img.shape), 0, 255).astype(np.uint8)[:, None]


def corrupt(code: bytes, rng: np.random.Generator, others: list[bytes]) -> bytes:
    """One random corruption: bit flips, truncation, extension, overwrite, splice, noise."""
    b = bytearray(code)
    how = rng.integers(7)
    if how == 0:  # 1-3 bit flips anywhere
        for _ in range(int(rng.integers(1, 4))):
            i = int(rng.integers(len(b) * 8))
            b[i // 8] ^= 1 << (i % 8)
    elif how == 1:  # truncation
        b = b[:int(rng.integers(len(b)))]
    elif how == 2:  # extension
        b += rng.bytes(int(rng.integers(1, 9))) if rng.random() < 0.7 else b"\0"
    elif how == 3:  # overwrite a run of bytes
        i = int(rng.integers(len(b)))
        n = int(rng.integers(1, 5))
        b[i:i + n] = rng.bytes(len(b[i:i + n]))
    elif how == 4:  # header of one code, payload of another
        other = others[int(rng.integers(len(others)))]
        b = b[:HEADER_SIZE] + other[HEADER_SIZE:]
    elif how == 5:  # pure noise that looks like a code
        b = bytearray(b"\xa1" + rng.bytes(int(rng.integers(0, 60))))
    else:  # pure noise
        b = bytearray(rng.bytes(int(rng.integers(0, 60))))
    return bytes(b)


def test_1000_corrupted_codes_are_refused() -> None:
    pipe = Pipeline(GOLDEN, ONE_THREAD)
    originals = []
    for ref, kind in (("golden-ae:1", None), ("golden-vqvae:1", None),
                      ("golden-vqvae:1", "vq_static"), ("golden-vqpar:1", None)):
        codec = pipe.codec(ref)
        originals += codec.encode(codec.runtime.encode(blobs(20, seed=len(originals))), kind=kind)
    assert {c[1] for c in originals} == {1, 2, 3, 4}
    rng = np.random.default_rng(2024)
    corrupted: list[bytes] = []
    while len(corrupted) < 1000:
        bad = corrupt(originals[int(rng.integers(len(originals)))], rng, originals)
        if bad not in originals:
            corrupted.append(bad)
    results = []
    for i in range(0, 1000, 100):  # batches of 100, as the service would send them
        results += pipe.reconstruct_each(corrupted[i:i + 100])
    assert all(isinstance(r, CodeError) for r in results), [
        i for i, r in enumerate(results) if not isinstance(r, CodeError)]
    assert all(str(r) for r in results)
    # The originals in the same call still decode: one bad code does not sink a batch.
    mixed = pipe.reconstruct_each(corrupted[:50] + originals)
    assert all(isinstance(r, np.ndarray) for r in mixed[50:])


@pytest.mark.parametrize("ref", ["golden-ae:1", "golden-vqvae:1", "golden-vqpar:1"])
def test_forged_checksums_never_decode_to_garbage(ref: str) -> None:
    """Random payloads with a correct checksum reach the entropy decoder: each is refused,
    or it decodes by the documented rule (docs/code-format.md, "What a decoder accepts"):
    kinds 1 and 2 to the symbols whose final interval holds the payload's value, and the
    encoder's own code for those symbols decodes to them too (random corruption is
    caught by the checksum, see above)."""
    pipe = Pipeline(GOLDEN, ONE_THREAD)
    codec: LatentCodec = pipe.codec(ref)
    rng = np.random.default_rng(7)
    kinds = sorted(codec.kinds)
    for _ in range(300):
        kind = kinds[int(rng.integers(len(kinds)))]
        payload = rng.bytes(int(rng.integers(0, 40)))
        result = codec.decode_each([pack(codec.manifest.digest, kind, payload)])[0]
        if isinstance(result, CodeError):  # (a zero-ended payload always is)
            continue
        assert not payload.endswith(b"\0")
        if kind in (1, 2):
            tables = codec.factorized if kind == 1 else codec.static
            assert accepts(tables.encoder_for(result), payload)  # type: ignore[union-attr]
        again = codec.encode(result[None], kind="vq_static" if kind == 2 else None)
        assert np.array_equal(codec.decode(again)[0], result)
