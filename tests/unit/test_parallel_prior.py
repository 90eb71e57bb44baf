"""Code kind 4 (vq_parallel) and the parallel prior: the decoding order, round trips,
refusals, exactness under float noise, sampling, training and export.

The codec tests use the checked-in golden-vqpar:1 (a hand-built ONNX parallel prior on a
6-group schedule); the network tests train a tiny ParallelPrior for a few steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from latentserve.errors import CodeError, CorruptCode, ModelIntegrityError, NotExactlyDecodable
from latentserve.export.nets.parallel_prior import (
    ParallelPrior,
    ParallelPriorConfig,
    check_schedule,
    default_schedule,
)
from latentserve.export.publish.parallel import export_parallel_onnx
from latentserve.export.training.parallel_prior import bits_per_index, train_parallel_prior
from latentserve.worker.codec.codes import (
    VQ_PARALLEL,
    VQ_PRIOR,
    VQ_STATIC,
    LatentCodec,
    pack,
    parse_header,
)
from latentserve.worker.runtime.engine import EngineConfig, ModelRuntime
from latentserve.worker.runtime.manifest import parse_manifest
from latentserve.worker.runtime.pipeline import Pipeline

ONE_THREAD = EngineConfig(intra_op_threads=1)
GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden_repo"
REF = "golden-vqpar:1"


@pytest.fixture(scope="module")
def golden() -> Pipeline:
    return Pipeline(GOLDEN, ONE_THREAD)


def grids(n: int, seed: int = 0, k: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, k, (n, 7, 7)).astype(np.int32)


class NoisyGroups:
    """A real runtime whose parallel prior's logits get uniform noise in [-amp, amp]."""

    def __init__(self, runtime: ModelRuntime, amp: float, seed: int = 0) -> None:
        self._rt, self.amp = runtime, amp
        self.rng = np.random.default_rng(seed)
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._rt, name)

    def group_logits(self, indices: np.ndarray, group: int) -> np.ndarray:
        self.calls += 1
        logits = self._rt.group_logits(indices, group).astype(np.float64)
        return logits + self.rng.uniform(-self.amp, self.amp, logits.shape)


# -- the schedule and the decoding order -------------------------------------------------

def test_default_schedule_partitions_the_grid() -> None:
    for h, w in ((7, 7), (4, 4), (3, 5), (1, 1)):
        groups = default_schedule(h, w)
        check_schedule(groups, h * w)
        assert 1 <= len(groups) <= 7
    assert [len(g) for g in default_schedule(7, 7)] == [1, 4, 4, 8, 8, 12, 12]
    assert default_schedule(7, 7)[0] == [3 * 7 + 3]  # the centre alone
    with pytest.raises(ValueError, match="partition"):
        check_schedule([[0, 1], [1, 2]], 4)


@pytest.mark.parametrize("arch", ["mixer", "conv"])
def test_group_logits_depend_only_on_earlier_groups(arch: str) -> None:
    torch.manual_seed(0)
    prior = ParallelPrior(ParallelPriorConfig(num_codes=8, grid=(7, 7), embed_dim=4,
                                              hidden=8, layers=2, arch=arch)).eval()
    base = torch.as_tensor(grids(3, seed=1), dtype=torch.long)
    rank = prior.rank.view(7, 7)
    with torch.no_grad():
        for g in range(prior.num_groups):
            other = base.clone()
            later = rank >= g
            other[:, later] = torch.as_tensor(grids(3, seed=2 + g), dtype=torch.long)[:, later]
            assert torch.equal(prior(base, torch.tensor(g)), prior(other, torch.tensor(g)))
            if g + 1 < prior.num_groups:  # and they do depend on the group just before
                earlier = base.clone()
                earlier[:, rank == g] = (earlier[:, rank == g] + 1) % 8
                assert not torch.equal(prior(base, torch.tensor(g + 1)),
                                       prior(earlier, torch.tensor(g + 1)))


def test_onnx_group_logits_depend_only_on_earlier_groups(golden: Pipeline) -> None:
    runtime = golden.runtime(REF)
    schedule = runtime.manifest.vq_parallel.schedule  # type: ignore[union-attr]
    base = grids(4, seed=3).astype(np.int64)
    rank = np.zeros(49, np.int64)
    for g, members in enumerate(schedule):
        rank[list(members)] = g
    for g in range(len(schedule)):
        other = base.reshape(4, 49).copy()
        other[:, rank >= g] = grids(4, seed=9 + g).reshape(4, 49)[:, rank >= g]
        got = runtime.group_logits(other.reshape(4, 7, 7), g)
        assert got.shape == (4, len(schedule[g]), 8)
        assert np.array_equal(got, runtime.group_logits(base, g))


def test_manifest_schedule_is_validated() -> None:
    raw = json.loads((GOLDEN / "golden-vqpar" / "1" / "manifest.json").read_text())
    assert parse_manifest(json.dumps(raw).encode()).vq_parallel.schedule[0] == (  # type: ignore[union-attr]
        8, 12, 24, 36, 40)
    bad: list[Any] = [[[0, 1]], [list(range(49)), [3]], [list(range(48)) + [49]], [[]], "x"]
    for schedule in bad:
        raw["code"]["vq_parallel"]["schedule"] = schedule
        with pytest.raises(ModelIntegrityError, match="schedule"):
            parse_manifest(json.dumps(raw).encode())
    del raw["code"]["vq_parallel"]["schedule"]
    with pytest.raises(ModelIntegrityError, match="schedule"):
        parse_manifest(json.dumps(raw).encode())


# -- the codec -----------------------------------------------------------------------------

def test_round_trip_and_one_pass_per_group(golden: Pipeline) -> None:
    codec = golden.codec(REF)
    symbols = grids(40, seed=4)
    codes = codec.encode(symbols)
    assert {c[1] for c in codes} <= {VQ_PARALLEL, VQ_STATIC}
    assert sum(c[1] == VQ_PARALLEL for c in codes) >= 30
    counting = NoisyGroups(codec.runtime, amp=0.0)
    assert np.array_equal(LatentCodec(counting).decode(codes), symbols)  # type: ignore[arg-type]
    # One prior run per schedule group for the whole batch, not per image or position.
    assert counting.calls == len(codec.manifest.vq_parallel.schedule)  # type: ignore[union-attr]
    # The forced static kind, and the kind-3 model refuses kind 4.
    static = codec.encode(symbols[:3], kind="vq_static")
    assert [c[1] for c in static] == [VQ_STATIC] * 3
    assert np.array_equal(codec.decode(static), symbols[:3])
    other = golden.codec("golden-vqvae:1")
    payload = parse_header(codes[0]).payload
    with pytest.raises(CorruptCode, match="does not write codes of kind 4"):
        other.decode([pack(other.manifest.digest, VQ_PARALLEL, payload)])
    with pytest.raises(CorruptCode, match="does not write codes of kind 3"):
        codec.decode([pack(codec.manifest.digest, VQ_PRIOR, payload)])


def test_codes_cost_what_the_tables_say(golden: Pipeline) -> None:
    codec = golden.codec(REF)
    symbols = grids(30, seed=5)
    codes = codec.encode(symbols)
    bits = codec.cross_entropy_bits(symbols, [c[1] for c in codes])
    payload = np.array([len(c) - 7 for c in codes])
    assert np.all(payload * 8 <= bits + 24) and np.all(payload * 8 >= bits - 8)


def test_logit_noise_below_the_guard_decodes_exactly(golden: Pipeline) -> None:
    codec = golden.codec(REF)
    symbols = grids(48, seed=6)
    codes = codec.encode(symbols)
    guard = codec.prior.guard  # type: ignore[union-attr]
    for seed in range(3):
        noisy = LatentCodec(NoisyGroups(codec.runtime, amp=0.5 * guard, seed=seed))  # type: ignore[arg-type]
        assert np.array_equal(noisy.decode(codes), symbols)


def test_wrong_tables_are_refused_never_decoded(golden: Pipeline) -> None:
    codec = golden.codec(REF)
    symbols = grids(48, seed=7)
    codes = codec.encode(symbols)
    refused = 0
    for amp in (3e-3, 3e-2, 0.6):
        wrong = LatentCodec(NoisyGroups(codec.runtime, amp=amp, seed=1))  # type: ignore[arg-type]
        for i, r in enumerate(wrong.decode_each(codes)):
            if isinstance(r, np.ndarray):
                assert np.array_equal(r, symbols[i])
            else:
                assert isinstance(r, (CorruptCode, NotExactlyDecodable))
                refused += 1
    assert refused > len(codes)


def test_corrupted_codes_are_refused(golden: Pipeline) -> None:
    codec = golden.codec(REF)
    symbols = grids(6, seed=8)
    codes = [c for c in codec.encode(symbols) if c[1] == VQ_PARALLEL]
    rng = np.random.default_rng(0)
    for code in codes:
        for _ in range(20):
            bad = bytearray(code)
            bad[int(rng.integers(0, len(bad)))] ^= 1 << int(rng.integers(0, 8))
            result = codec.decode_each([bytes(bad)])[0]
            assert isinstance(result, CodeError)
        # A payload with a valid checksum that is not the encoder's own: refused.
        h = parse_header(code)
        forged = pack(codec.manifest.digest, VQ_PARALLEL, h.payload + b"\0")
        assert isinstance(codec.decode_each([forged])[0], CorruptCode)


# -- sampling --------------------------------------------------------------------------------

def test_sampling_is_deterministic_and_per_index(golden: Pipeline) -> None:
    runtime = golden.runtime(REF)
    a = runtime.sample(6, seed=3, temperature=0.8)
    assert np.array_equal(a, runtime.sample(6, seed=3, temperature=0.8))
    assert np.array_equal(a[4:], runtime.sample(2, seed=3, temperature=0.8, start=4))
    assert not np.array_equal(a, runtime.sample(6, seed=4, temperature=0.8))


# -- training and export ---------------------------------------------------------------------

def test_tiny_training_and_onnx_export(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    # Index grids with structure: each row repeats one code, so the later groups are cheap.
    codes = np.repeat(rng.integers(0, 8, (256, 7, 1)), 7, axis=2)
    cfg = ParallelPriorConfig(num_codes=8, grid=(7, 7), embed_dim=8, hidden=16, layers=2)
    prior, history = train_parallel_prior(codes, cfg, steps=60, lr=1e-2, batch_size=32,
                                          progress=False)
    assert history[-1]["bits_per_index"] < history[0]["bits_per_index"]
    assert bits_per_index(prior, codes[:64]) < 3.0  # uniform: 3 bits
    path = tmp_path / "prior.onnx"
    export_parallel_onnx(prior, path, codes[:2])
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for g in range(prior.num_groups):
            ref = prior(torch.as_tensor(codes[:5]), torch.tensor(g)).numpy()
            got = session.run(None, {"indices": codes[:5].astype(np.int64),
                                     "group": np.array(g, np.int64)})[0]
            assert np.abs(got - ref).max() < 1e-4
