"""worker/codec/coderpool.py: codes in worker processes come back in request order, exactly the
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

from latentserve.errors import CodeError, CorruptCode
from latentserve.worker.codec.coderpool import CoderPool
from latentserve.worker.codec.codes import LatentCodec
from latentserve.worker.runtime.engine import EngineConfig
from latentserve.worker.runtime.pipeline import Pipeline

ONE_THREAD = EngineConfig(intra_op_threads=1)
GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden_repo"


@pytest.fixture(scope="module")
def pool() -> Iterator[CoderPool]:
    # min_batch=1, min_slice=1: every batch goes through the processes, however small,
    # cut into one slice per process from two items on.
    with CoderPool(2, min_batch=1, min_slice=1) as p:
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
    # A payload the encoder would not write (a zero byte appended), checksum made valid:
    # only the pool's decoder can refuse it.
    from latentserve.worker.codec.codes import pack, parse_header

    bad = pack(codec.manifest.digest, codes[6][1], parse_header(codes[6]).payload + b"\0")
    codes[6] = bad
    each = codec.decode_each(codes)
    assert [i for i, r in enumerate(each) if isinstance(r, CodeError)] == [6]
    assert isinstance(each[6], CorruptCode)
    assert [type(r).__name__ for r in each] == [
        type(r).__name__ for r in inline.codec("golden-ae:1").decode_each(codes)]
    with pytest.raises(CorruptCode, match="^code 6 of 9: the payload ends in a zero byte"):
        codec.decode(codes)
    images = pooled.reconstruct_each(codes)
    assert isinstance(images[6], CorruptCode) and all(
        isinstance(im, np.ndarray) for i, im in enumerate(images) if i != 6)


@pytest.mark.parametrize(("model", "kind"), [("golden-ae:1", None),
                                             ("golden-vqvae:1", "vq_static")])
def test_a_slice_per_process_and_a_bad_code_in_the_second_slice(
        inline: Pipeline, pooled: Pipeline, model: str, kind: str | None) -> None:
    from latentserve.worker.codec.codes import pack, parse_header

    codec = pooled.codec(model)
    symbols = symbols_for(codec, 101, seed=11)
    codes = codec.encode(symbols, kind=kind)
    assert codes == inline.codec(model).encode(symbols, kind=kind)
    p = parse_header(codes[77])
    codes[77] = pack(codec.manifest.digest, p.kind, p.payload + b"\0")
    each = codec.decode_each(codes)
    assert [i for i, r in enumerate(each) if isinstance(r, CodeError)] == [77]
    good = [i for i in range(101) if i != 77]
    assert np.array_equal(np.stack([each[i] for i in good]), symbols[good])  # type: ignore[misc]


def test_threads_sharing_a_pool_get_their_own_codes(inline: Pipeline, pooled: Pipeline) -> None:
    import threading

    codec = pooled.codec("golden-ae:1")
    inputs = [symbols_for(codec, 30 + k, seed=100 + k) for k in range(4)]
    want = [inline.codec("golden-ae:1").encode(s) for s in inputs]
    got: dict[int, list[bytes]] = {}

    def lane(k: int) -> None:
        for _ in range(5):
            got[k] = codec.encode(inputs[k])
            assert np.array_equal(codec.decode(got[k]), inputs[k])

    threads = [threading.Thread(target=lane, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[k] for k in range(4)] == want


def test_a_process_killed_while_coding_is_replaced_and_its_slice_redone(
        inline: Pipeline) -> None:
    import threading

    with CoderPool(1, min_batch=1) as pool:
        pipe = Pipeline(GOLDEN, ONE_THREAD, coder_pool=pool)
        codec = pipe.codec("golden-ae:1")
        symbols = symbols_for(codec, 20_000, seed=3)
        want = inline.codec("golden-ae:1").encode(symbols)
        assert codec.encode(symbols[:2]) == want[:2]  # the process holds the tables now
        victim = pool.pids()[0]
        got: list[list[bytes]] = []
        t = threading.Thread(target=lambda: got.append(codec.encode(symbols)))
        t.start()
        time.sleep(0.05)  # most likely mid-slice; a kill before or after it ends the same
        os.kill(victim, signal.SIGKILL)
        t.join()
        assert got == [want]
        assert codec.encode(symbols[:3]) == want[:3]
        assert pool.replaced == 1 and victim not in pool.pids()


def test_a_closed_pool_refuses_work() -> None:
    from latentserve.errors import Unavailable

    pool = CoderPool(1, min_batch=1)
    pipe = Pipeline(GOLDEN, ONE_THREAD, coder_pool=pool)
    codec = pipe.codec("golden-ae:1")
    symbols = symbols_for(codec, 4, seed=1)
    codec.encode(symbols)
    pids = pool.pids()
    pool.close()
    with pytest.raises(Unavailable, match="closed"):
        codec.encode(symbols)
    time.sleep(0.1)
    for pid in pids:  # stopped and reaped: no such process any more
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


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


def test_the_pools_canonical_check_reports_a_longer_payload_by_its_index(
        inline: Pipeline, pooled: Pipeline, pool: CoderPool) -> None:
    """Serving decodes without re-encoding; the pool still offers the canonical check
    (the encoder's output verified): a payload with bytes appended is refused at its
    index, the others decode."""
    from latentserve.worker.codec.codes import FACTORIZED, parse_header

    codec = pooled.codec("golden-ae:1")
    symbols = symbols_for(codec, 9, seed=6)
    payloads = [parse_header(c).payload for c in codec.encode(symbols)]
    payloads[4] += b"\x07\x01"
    got = pool.decode(codec._specs[FACTORIZED], payloads, canonical=True)
    assert [i for i, r in enumerate(got) if isinstance(r, CorruptCode)] == [4]
    assert np.array_equal(np.stack([got[i] for i in range(9) if i != 4]),  # type: ignore[misc]
                          symbols[[i for i in range(9) if i != 4]])


def _same(a: list[object], b: list[object]) -> bool:
    """Per item the same image, or a refusal of the same type and words."""
    for x, y in zip(a, b, strict=True):
        if isinstance(x, np.ndarray) and isinstance(y, np.ndarray):
            if not np.array_equal(x, y):
                return False
        elif type(x) is not type(y) or str(x) != str(y):
            return False
    return True


@pytest.mark.parametrize(("model", "kind"), [("golden-ae:1", None),
                                             ("golden-vqvae:1", "vq_static")])
def test_reconstruct_reads_the_headers_in_the_processes(
        inline: Pipeline, pooled: Pipeline, pool: CoderPool, model: str, kind: str | None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Codes of one head go to the processes whole (headers read and checksums verified
    there): the same images and refusals as inline, a changed byte refused with
    inline's words at its index, the processes' zero-byte refusal at its own."""
    from latentserve.worker.codec.codes import pack, parse_header

    calls: list[int] = []
    real = pool.decode_codes
    monkeypatch.setattr(pool, "decode_codes",
                        lambda spec, codes, state: calls.append(len(codes)) or real(
                            spec, codes, state))
    codec = pooled.codec(model)
    codes = codec.encode(symbols_for(codec, 37, seed=21), kind=kind)
    codes[5] = codes[5][:-1] + bytes([codes[5][-1] ^ 0x40])  # checksum no longer matches
    p = parse_header(codes[30])
    codes[30] = pack(codec.manifest.digest, p.kind, p.payload + b"\0")
    got, want = pooled.reconstruct_each(codes), inline.reconstruct_each(codes)
    assert calls == [37]
    assert _same(got, want)  # type: ignore[arg-type]
    assert isinstance(got[5], CorruptCode) and "checksum mismatch" in str(got[5])
    assert isinstance(got[30], CorruptCode) and "zero byte" in str(got[30])
    assert [i for i, r in enumerate(got) if not isinstance(r, np.ndarray)] == [5, 30]
    with pytest.raises(CorruptCode, match="^code 5 of 37: checksum mismatch"):
        pooled.reconstruct(codes)


def test_reconstruct_of_mixed_or_foreign_codes_goes_the_ordinary_way(
        inline: Pipeline, pooled: Pipeline) -> None:
    """Codes of two models, a model named that did not make them, a truncated code:
    each refused or decoded exactly as inline."""
    ae, vq = pooled.codec("golden-ae:1"), pooled.codec("golden-vqvae:1")
    codes = (ae.encode(symbols_for(ae, 6, seed=1))
             + vq.encode(symbols_for(vq, 5, seed=2), kind="vq_static"))
    assert _same(pooled.reconstruct_each(codes), inline.reconstruct_each(codes))  # type: ignore[arg-type]
    only_ae = ae.encode(symbols_for(ae, 8, seed=3))
    assert _same(pooled.reconstruct_each(only_ae, "golden-vqvae:1"),  # type: ignore[arg-type]
                 inline.reconstruct_each(only_ae, "golden-vqvae:1"))
    only_ae[2] = only_ae[2][:5]
    assert _same(pooled.reconstruct_each(only_ae), inline.reconstruct_each(only_ae))  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [99, 10**6])
def test_symbols_off_the_tables_are_refused_in_inlines_words(
        inline: Pipeline, pooled: Pipeline, bad: int) -> None:
    """The processes check the symbols (a value the wire type holds) or the caller does
    (one it does not): either way the words of inline coding, for the whole batch."""
    from latentserve.errors import InvalidInput

    codec = pooled.codec("golden-ae:1")
    symbols = symbols_for(codec, 40, seed=4)
    symbols[33, 0, 0, 0] = bad  # in the second slice
    with pytest.raises(InvalidInput) as want:
        inline.codec("golden-ae:1").encode(symbols)
    with pytest.raises(InvalidInput) as got:
        codec.encode(symbols)
    assert str(got.value) == str(want.value)


def test_a_crash_with_two_calls_queued_redoes_both(inline: Pipeline) -> None:
    """Two threads' slices queued on one process; it is killed: a fresh process gets
    both again, each thread its own codes, once."""
    import threading

    with CoderPool(1, min_batch=1) as pool:
        pipe = Pipeline(GOLDEN, ONE_THREAD, coder_pool=pool)
        codec = pipe.codec("golden-ae:1")
        inputs = [symbols_for(codec, 12_000, seed=40 + k) for k in range(2)]
        want = [inline.codec("golden-ae:1").encode(s) for s in inputs]
        assert codec.encode(inputs[0][:2]) == want[0][:2]
        victim = pool.pids()[0]
        got: dict[int, list[bytes]] = {}
        threads = [threading.Thread(target=lambda k=k: got.__setitem__(k, codec.encode(inputs[k])))
                   for k in range(2)]
        for t in threads:
            t.start()
        time.sleep(0.05)
        os.kill(victim, signal.SIGKILL)
        for t in threads:
            t.join()
        assert [got[0], got[1]] == want
        assert pool.replaced == 1 and victim not in pool.pids()


def test_a_read_cut_short_replaces_the_process_before_the_next(inline: Pipeline) -> None:
    """After a read that an exception cut off mid-message (marked on the process), the
    next reader does not trust the stream: a fresh process codes the queue again."""
    with CoderPool(1, min_batch=1) as pool:
        pipe = Pipeline(GOLDEN, ONE_THREAD, coder_pool=pool)
        codec = pipe.codec("golden-ae:1")
        symbols = symbols_for(codec, 50, seed=8)
        want = inline.codec("golden-ae:1").encode(symbols)
        assert codec.encode(symbols) == want
        before = pool.pids()
        pool._workers[0].cut_short = True
        assert codec.encode(symbols) == want
        assert pool.replaced == 1 and pool.pids() != before
