"""worker/coderpool.py: codes in worker processes come back in request order, exactly the
in-process bytes; a bad code is reported by its index; a killed process is replaced and
its work redone, each item's result given once."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from latentserve.worker.codec import LatentCodec
from latentserve.worker.coderpool import CoderPool
from latentserve.worker.engine import EngineConfig
from latentserve.worker.errors import CodeError, CorruptCode
from latentserve.worker.pipeline import Pipeline

ONE_THREAD = EngineConfig(intra_op_threads=1)
GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden_repo"


@pytest.fixture(scope="module")
def pool() -> Iterator[CoderPool]:
    # min_batch=1: every batch goes through the processes, however small.
    with CoderPool(2, min_batch=1) as p:
        yield p


@pytest.fixture(scope="module")
def inline() -> Pipeline:
    return Pipeline(GOLDEN, ONE_THREAD)


@pytest.fixture(scope="module")
def pooled(pool: CoderPool) -> Pipeline:
    return Pipeline(GOLDEN, ONE_THREAD, coder_pool=pool)


def symbols_for(codec: LatentCodec, n: int, seed: int) -> np.ndarray:
    """Random symbols on the model's table support."""
    rng = np.random.default_rng(seed)
    shape = codec.manifest.latent_shape
    if codec.factorized is not None and codec.static is None:
        t = codec.factorized
        rel = rng.integers(0, t.sizes.reshape(-1, 1, 1), (n, *shape))
        return (rel + t.offsets.reshape(-1, 1, 1)).astype(np.int32)
    return rng.integers(0, codec.static.num_codes, (n, *shape)).astype(np.int32)  # type: ignore[union-attr]


@pytest.mark.parametrize(("model", "kind"), [("golden-ae:1", None),
                                             ("golden-vqvae:1", "vq_static")])
@pytest.mark.parametrize("n", [1, 2, 3, 17])
def test_pool_codes_are_the_inline_codes_in_order(inline: Pipeline, pooled: Pipeline,
                                                  model: str, kind: str | None, n: int) -> None:
    symbols = symbols_for(inline.codec(model), n, seed=n)
    codes = pooled.codec(model).encode(symbols, kind=kind)
    assert codes == inline.codec(model).encode(symbols, kind=kind)
    assert np.array_equal(pooled.codec(model).decode(codes), symbols)


def test_pool_reports_a_bad_code_by_its_index(inline: Pipeline, pooled: Pipeline) -> None:
    codec = pooled.codec("golden-ae:1")
    symbols = symbols_for(codec, 9, seed=5)
    codes = codec.encode(symbols)
    # A payload the encoder would not write (one byte appended), checksum made valid:
    # only the pool's canonical re-encode can refuse it.
    from latentserve.worker.codec import pack, parse_header

    bad = pack(codec.manifest.digest, codes[6][1], parse_header(codes[6]).payload + b"\x07")
    codes[6] = bad
    each = codec.decode_each(codes)
    assert [i for i, r in enumerate(each) if isinstance(r, CodeError)] == [6]
    assert isinstance(each[6], CorruptCode)
    assert [type(r).__name__ for r in each] == [
        type(r).__name__ for r in inline.codec("golden-ae:1").decode_each(codes)]
    with pytest.raises(CorruptCode, match="^code 6 of 9: the payload is not the one"):
        codec.decode(codes)
    images = pooled.reconstruct_each(codes)
    assert isinstance(images[6], CorruptCode) and all(
        isinstance(im, np.ndarray) for i, im in enumerate(images) if i != 6)


def test_a_killed_process_is_replaced_and_its_work_redone(pooled: Pipeline,
                                                          inline: Pipeline) -> None:
    pool = pooled.coder_pool
    assert pool is not None
    codec = pooled.codec("golden-vqvae:1")
    symbols = symbols_for(codec, 40, seed=9)
    want = inline.codec("golden-vqvae:1").encode(symbols, kind="vq_static")
    before, replaced = pool.pids(), pool.replaced
    os.kill(before[0], signal.SIGKILL)
    time.sleep(0.2)  # let the executor notice (it may also notice mid-batch: same outcome)
    assert codec.encode(symbols, kind="vq_static") == want
    assert pool.replaced == replaced + 1
    assert not set(pool.pids()) & {before[0]}
    assert np.array_equal(codec.decode(want), symbols)
